"""The C++ kernel backend (``anon_hf.backends.cpu_kernel``): a thin adapter with the same check-then-write shape as the
compiled graphs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...refresh import StepRule

__all__ = ["KernelCall", "kernel8_step", "kernel_supported"]


def kernel_supported(params, grads, exp_avgs, exp_avg_sqs, preconds) -> tuple[list[bool], str | None]:
    """Per tensor, whether the C++ kernel steps it (CPU, contiguous, fp32/bf16/fp16), and why CPU tensors must take
    the eager path instead (the kernel's build failed) or ``None``. All False when the kernel cannot run."""
    from .. import cpu_kernel

    if not any(p.device.type == "cpu" for p in params) or cpu_kernel.kernel_unavailable_reason() is not None:
        return [False] * len(params), cpu_kernel.build_failure()
    return list(cpu_kernel.kernel().anon_supported(params, grads, exp_avgs, exp_avg_sqs, preconds)), None


class KernelCall:
    """One step of the C++ kernel over the tensors at ``indices`` of ``lists`` (params, grads, exp_avgs,
    exp_avg_sqs, preconds; the last two empty without a preconditioner) and their step counters.

    ``per_tensor`` is ``(neg_step_sizes, inv_bias2s)``, one entry per tensor of ``lists``. ``refresh`` is
    ``(mode, averaged, keep_unseen)`` on a refresh step (``averaged``: a previous preconditioner is averaged in), else
    ``None``; ``rule`` the :class:`~anon_hf.refresh.StepRule` of an ordinary step (``None`` on a refresh step, and
    ignored without a preconditioner: every element then multiplies by 1).
    :meth:`check` returns a refresh's verdicts and writes nothing; :meth:`write` steps and advances the step counters.
    """

    def __init__(self, indices, lists, state_steps, scalar_values, per_tensor, modes: tuple, refresh, rule):
        from ..cpu_kernel import kernel

        self.kernel = kernel()
        self.indices = indices
        preconditioned = len(lists[4]) > 0
        self.tensors = [[t[i] for i in indices] for t in lists[: 5 if preconditioned else 3]]
        self.tensors += [] if preconditioned else [[], []]
        self.tensors.append([state_steps[i] for i in indices])
        code = 0 if refresh is None else self.kernel.REFRESH_MODES[refresh[0]]
        averaged, keep_unseen = (False, False) if refresh is None else refresh[1:]
        sizes, inv_bias2s = ([values[i] for i in indices] for values in per_tensor)
        self.args = (sizes, inv_bias2s, scalar_values, modes[0], modes[1], code, averaged, keep_unseen)
        self.args += self._rule_args(rule if preconditioned else None)
        self.keep: list[bool] = []

    def _rule_args(self, rule: StepRule | None) -> tuple[int, bool, bool]:
        """The kernel's ``(estimate, limit, late_seen)`` arguments for ``rule``: its mode's code (0: none)."""
        if rule is None or rule.estimate_mode is None:
            return 0, False, False
        return self.kernel.REFRESH_MODES[rule.estimate_mode], rule.limit, rule.late_seen

    def check(self) -> dict[int, bool]:
        self.keep = self.kernel.anon_step(*self.tensors, *self.args, True, [])
        return dict(zip(self.indices, self.keep, strict=True))

    def write(self) -> None:
        self.kernel.anon_step(*self.tensors, *self.args, False, self.keep)


def kernel8_step(params, grads, entries, state_steps, scalar_values, per_tensor, modes: tuple, rule) -> None:
    """One step of the 8-bit C++ kernel (``csrc/anon_cpu_8bit.cpp``) between refreshes over contiguous CPU fp32
    tensors, all with a preconditioner or all without; the kernel advances the step counters. ``entries[i]`` is tensor
    ``i``'s 8-bit state (codes and side values, :meth:`~anon_hf.storage.blockwise8.Blockwise8.entries`);
    ``per_tensor``, ``modes`` and ``rule`` as in :class:`KernelCall`."""
    from ...storage.quant8 import QUANTIZED_KEYS
    from ..cpu_kernel import kernel8

    module = kernel8()
    names = [name for key, sides in QUANTIZED_KEYS.items() for name in (key, *sides)]
    lists = [[state[name] for state in entries] if name in entries[0] else [] for name in names]
    if rule is None or "precond" not in entries[0]:
        rule_args = (0, False, False)
    else:
        rule_args = (module.REFRESH_MODES[rule.estimate_mode], rule.limit, rule.late_seen)
    module.anon8_step(params, grads, *lists, state_steps, *per_tensor, scalar_values, *modes, *rule_args)
