"""The Anon update as functions over parallel tensor lists, in the shape of ``torch.optim.adam``.

:func:`anon` takes the parameters, their gradients and their state as lists and dispatches to
:func:`_single_tensor_anon` (a per-tensor loop) or :func:`_multi_tensor_anon` (``torch._foreach_*`` kernels
over tensors grouped by device and dtype). Both share one signature and one refresh routine,
:func:`anon_hf.refresh.refreshed_preconditioner`, so they differ only in how the per-step arithmetic is batched.

Nothing here imports anything but torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .distributed.dtensor import full
from .refresh import limit_applies, limited_preconditioner, refresh_mode, refreshed_preconditioner
from .schedule import RefreshSchedule, gradients_since_refresh, is_refresh_step, previous_refresh_step

__all__ = ["NonFinitePreconditionerError", "anon"]

_NONFINITE_POLICIES = ("raise", "skip")


class NonFinitePreconditionerError(FloatingPointError):
    """A refresh produced a preconditioner with ``nan`` or ``inf`` entries.

    Raised before the bad preconditioner is stored (``on_nonfinite="raise"``, the default). ``group_index`` is
    filled in by :class:`anon_hf.Anon`; ``tensor_index`` is the position of the tensor in its param group.
    """

    def __init__(self, step: int, tensor_index: int, shape: tuple, group_index: int | None = None):
        self.step = step
        self.tensor_index = tensor_index
        self.shape = shape
        self.group_index = group_index
        super().__init__(step, tensor_index, shape, group_index)

    def __str__(self) -> str:
        group = "?" if self.group_index is None else self.group_index
        return (
            f"Anon: the preconditioner refreshed at step {self.step} for param group {group}, tensor "
            f"{self.tensor_index} (shape {tuple(self.shape)}) is not finite: a gradient since the previous refresh "
            "held nan or inf. Fix the gradients (gradient clipping, loss scaling, a lower lr), or pass "
            "on_nonfinite='skip' to keep the previous preconditioner for such tensors."
        )


def _all_finite(tensor: Tensor) -> bool:
    """Whether every element is finite. A sum is one vectorized pass with no temporary (on CPU ~25x faster than
    ``isfinite().all()``) and is finite whenever every element is, unless it overflows; only then, or with a nan or
    inf present, does the elementwise check decide."""
    # On a DTensor a reduction is Partial: every rank must see the same verdict, so it is made whole.
    if bool(torch.isfinite(full(tensor.sum()))):
        return True
    return bool(full(torch.isfinite(tensor).all()))


def _stored_refresh(
    exp_avg_sq: Tensor,
    precond: Tensor,
    step: int,
    *,
    refresh: RefreshSchedule,
    beta2: float,
    gamma: float,
    eps: float,
    beta3: float,
    keep_unseen: bool,
) -> Tensor:
    """The preconditioner a refresh at ``step`` stores: :func:`refreshed_preconditioner` in ``precond``'s dtype."""
    prev = previous_refresh_step(step, refresh)
    return refreshed_preconditioner(
        exp_avg_sq,
        precond,
        mode=refresh_mode(gamma, eps),
        steps_since_refresh=step - prev,
        first=prev == 0,
        beta2=beta2,
        gamma=gamma,
        eps=eps,
        beta3=beta3,
        keep_unseen=keep_unseen,
    ).to(precond.dtype)


def _refresh_(
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    indices: list[int],
    step: int,
    *,
    on_nonfinite: str,
    tensor_positions: list[int] | None = None,
    **refresh_kwargs,
) -> None:
    """Refresh ``preconds[i]`` for ``i in indices`` (all at ``step``) and reset their accumulators.

    ``refresh_kwargs``: the keyword arguments of :func:`_stored_refresh`.
    """
    for i in indices:
        new_precond = _stored_refresh(exp_avg_sqs[i], preconds[i], step, **refresh_kwargs)
        # A non-finite accumulator poisons the running mean for good even where the power maps it to a finite
        # number (inf**-0.5 == 0), so both the input and the result, as it will be stored, are checked.
        if not (_all_finite(exp_avg_sqs[i]) and _all_finite(new_precond)):
            if on_nonfinite == "raise":
                position = i if tensor_positions is None else tensor_positions[i]
                raise NonFinitePreconditionerError(step, position, tuple(preconds[i].shape))
        else:
            preconds[i].copy_(new_precond)
        exp_avg_sqs[i].zero_()


def _refresh_verdicts(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    indices: list[int],
    step: int,
    *,
    refresh: RefreshSchedule,
    beta2: float,
    gamma: float,
    eps: float,
    beta3: float,
    keep_unseen: bool,
    weight_decay: float,
    l2: bool,
    maximize: bool,
) -> dict[int, bool]:
    """Per tensor index, whether refreshing it at ``step`` with this step's gradient gives a finite accumulator and
    preconditioner as stored; writes nothing. The fused path asks this of the tensors it hands to the eager path, so
    that a raise leaves the whole step unwritten."""
    verdicts = {}
    for i in indices:
        precond = torch.view_as_real(preconds[i]) if torch.is_complex(preconds[i]) else preconds[i]
        compute = torch.promote_types(precond.dtype, torch.float32)
        grad = torch.view_as_real(grads[i]) if torch.is_complex(grads[i]) else grads[i]
        grad = grad.to(compute).neg() if maximize else grad.to(compute)
        if l2 and weight_decay != 0:
            param = torch.view_as_real(params[i]) if torch.is_complex(params[i]) else params[i]
            grad = grad.add(param.to(compute), alpha=weight_decay)
        exp_avg_sq = torch.view_as_real(exp_avg_sqs[i]) if torch.is_complex(exp_avg_sqs[i]) else exp_avg_sqs[i]
        exp_avg_sq = exp_avg_sq.to(compute).mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        new_precond = _stored_refresh(
            exp_avg_sq,
            precond,
            step,
            refresh=refresh,
            beta2=beta2,
            gamma=gamma,
            eps=eps,
            beta3=beta3,
            keep_unseen=keep_unseen,
        )
        verdicts[i] = _all_finite(exp_avg_sq) and _all_finite(new_precond)
    return verdicts


def _single_tensor_anon(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    refresh: RefreshSchedule,
    beta3: float,
    keep_unseen: bool,
    max_precond_ratio: float | None,
    bounds: tuple[float | None, float | None] | None,
    maximize: bool,
    on_nonfinite: str,
) -> list[int]:
    preconditioned = len(preconds) > 0
    refreshed = []
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        exp_avg = exp_avgs[i]
        step_t = state_steps[i]
        if torch.is_complex(param):
            param, grad, exp_avg = torch.view_as_real(param), torch.view_as_real(grad), torch.view_as_real(exp_avg)

        step_t += 1
        step = int(step_t.item())

        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        # State stored in another dtype than its param (precond_dtype / moments_dtype) is updated in `compute`
        # and rounded once into its storage; `update` is the first moment in the dtype the param update uses.
        compute = _compute_dtype(params[i], [exp_avgs[i]] + ([exp_avg_sqs[i], preconds[i]] if preconditioned else []))
        if compute is None:
            exp_avg.lerp_(grad, 1 - beta1)
            update = exp_avg
        else:
            grad = grad.to(compute)
            update = exp_avg.to(compute).lerp_(grad, 1 - beta1)
            exp_avg.copy_(update)
        step_size = lr / (1 - beta1**step)
        if not preconditioned:
            param.add_(update, alpha=-step_size)
        else:
            exp_avg_sq, precond = exp_avg_sqs[i], preconds[i]
            if torch.is_complex(exp_avg_sq):
                exp_avg_sq, precond = torch.view_as_real(exp_avg_sq), torch.view_as_real(precond)
            if compute is None:
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            else:
                exp_avg_sq.copy_(exp_avg_sq.to(compute).mul_(beta2).addcmul_(grad, grad, value=1 - beta2))
            if is_refresh_step(step, refresh):
                _refresh_(
                    [exp_avg_sq],
                    [precond],
                    [0],
                    step,
                    refresh=refresh,
                    beta2=beta2,
                    gamma=gamma,
                    eps=eps,
                    beta3=beta3,
                    keep_unseen=keep_unseen,
                    on_nonfinite=on_nonfinite,
                    tensor_positions=[i],
                )
                refreshed.append(step)
            used = precond
            if limit_applies(gamma, max_precond_ratio):
                limit = dict(refresh=refresh, beta2=beta2, gamma=gamma, eps=eps, max_ratio=max_precond_ratio)
                used = _limited_between_refreshes([exp_avg_sq], [precond], [step], **limit)[0]
            param.addcmul_(update, used if compute is None else used.to(compute), value=-step_size)

        if bounds is not None:
            param.clamp_(min=bounds[0], max=bounds[1])
    return sorted(set(refreshed))


def _refresh_due_(
    exp_avg_sqs: list[Tensor], preconds: list[Tensor], steps: list[int], positions: list[int], **refresh_kwargs
) -> set[int]:
    """Refresh the tensors whose step (``steps[i]``, already advanced) is a refresh step, those at one step together;
    ``positions`` maps list indices to the caller's, for error messages. Returns the steps refreshed."""
    refresh_at: dict[int, list[int]] = {}
    for i, step in enumerate(steps):
        if is_refresh_step(step, refresh_kwargs["refresh"]):
            refresh_at.setdefault(step, []).append(i)
    for step, indices in refresh_at.items():
        _refresh_(exp_avg_sqs, preconds, indices, step, tensor_positions=positions, **refresh_kwargs)
    return set(refresh_at)


def _limited_between_refreshes(
    exp_avg_sqs: list[Tensor], preconds: list[Tensor], steps: list[int], *, refresh: RefreshSchedule, **limit_kwargs
) -> list[Tensor]:
    """``preconds`` with each tensor not refreshed at its step (``steps[i]``, already advanced) replaced by its
    :func:`anon_hf.refresh.limited_preconditioner`; a refreshed one is used as stored (its accumulator was just
    reset, and ``v`` was built from this interval's gradients)."""
    used = list(preconds)
    for i, step in enumerate(steps):
        if not is_refresh_step(step, refresh):
            used[i] = limited_preconditioner(
                exp_avg_sqs[i],
                preconds[i],
                steps_since_refresh=gradients_since_refresh(step, refresh),
                **limit_kwargs,
            )
    return used


def _foreach_update_params_(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    preconds: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    bounds: tuple[float | None, float | None] | None,
) -> None:
    """``p -= lr * v * m / (1 - beta1**t)`` (``v = 1`` when ``preconds`` is empty), then the clamp to ``bounds``."""
    if len(set(steps)) == 1:
        step_size = lr / (1 - beta1 ** steps[0])
        if preconds:
            torch._foreach_addcmul_(params, exp_avgs, preconds, value=-step_size)
        else:
            torch._foreach_add_(params, exp_avgs, alpha=-step_size)
    else:
        # Tensors skipped on earlier steps (grad None) lag behind: each needs its own bias correction.
        neg_step_sizes = [-lr / (1 - beta1**step) for step in steps]
        updates = torch._foreach_mul(exp_avgs, preconds) if preconds else list(exp_avgs)
        updates = torch._foreach_mul(updates, neg_step_sizes)
        torch._foreach_add_(params, updates)
    if bounds is not None:
        if bounds[0] is not None:
            torch._foreach_clamp_min_(params, bounds[0])
        if bounds[1] is not None:
            torch._foreach_clamp_max_(params, bounds[1])


def _multi_tensor_anon(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    refresh: RefreshSchedule,
    beta3: float,
    keep_unseen: bool,
    max_precond_ratio: float | None,
    bounds: tuple[float | None, float | None] | None,
    maximize: bool,
    on_nonfinite: str,
) -> list[int]:
    if len(params) == 0:
        return []
    preconditioned = len(preconds) > 0
    tensor_lists = [params, grads, exp_avgs, state_steps]
    if preconditioned:
        tensor_lists += [exp_avg_sqs, preconds]
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(tensor_lists, with_indices=True)

    refreshed: set[int] = set()
    for device_lists, original_indices in grouped.values():
        device_params, device_grads, device_exp_avgs, device_steps = device_lists[:4]
        device_exp_avg_sqs, device_preconds = device_lists[4:] if preconditioned else ([], [])
        compute = _compute_dtype(device_params[0], device_exp_avgs + device_exp_avg_sqs + device_preconds)
        if any(torch.is_complex(p) for p in device_params):
            views = [device_params, device_grads, device_exp_avgs, device_exp_avg_sqs, device_preconds]
            device_params, device_grads, device_exp_avgs, device_exp_avg_sqs, device_preconds = (
                [torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors] for tensors in views
            )

        if maximize:
            device_grads = torch._foreach_neg(device_grads)

        torch._foreach_add_(device_steps, 1)
        steps = [int(s.item()) for s in device_steps]

        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(device_params, 1 - lr * weight_decay)
            elif maximize:
                torch._foreach_add_(device_grads, device_params, alpha=weight_decay)
            else:
                device_grads = torch._foreach_add(device_grads, device_params, alpha=weight_decay)

        # State stored in another dtype than the params (precond_dtype / moments_dtype) is updated in `compute`
        # and rounded once into its storage; the param update reads the `compute` copies.
        if compute is not None:
            device_grads = [g.to(compute) for g in device_grads]
        exp_avgs_c = device_exp_avgs if compute is None else [m.to(compute) for m in device_exp_avgs]
        torch._foreach_lerp_(exp_avgs_c, device_grads, 1 - beta1)
        if compute is not None:
            torch._foreach_copy_(device_exp_avgs, exp_avgs_c)

        if preconditioned:
            sqs_c = device_exp_avg_sqs if compute is None else [s.to(compute) for s in device_exp_avg_sqs]
            torch._foreach_mul_(sqs_c, beta2)
            torch._foreach_addcmul_(sqs_c, device_grads, device_grads, value=1 - beta2)
            if compute is not None:
                torch._foreach_copy_(device_exp_avg_sqs, sqs_c)
            refreshed |= _refresh_due_(
                device_exp_avg_sqs,
                device_preconds,
                steps,
                original_indices,
                refresh=refresh,
                beta2=beta2,
                gamma=gamma,
                eps=eps,
                beta3=beta3,
                keep_unseen=keep_unseen,
                on_nonfinite=on_nonfinite,
            )
        preconds_c = device_preconds if compute is None else [v.to(compute) for v in device_preconds]
        if preconditioned and limit_applies(gamma, max_precond_ratio):
            preconds_c = _limited_between_refreshes(
                device_exp_avg_sqs,
                preconds_c,
                steps,
                refresh=refresh,
                beta2=beta2,
                gamma=gamma,
                eps=eps,
                max_ratio=max_precond_ratio,
            )
        _foreach_update_params_(device_params, exp_avgs_c, preconds_c, steps, lr=lr, beta1=beta1, bounds=bounds)
    return sorted(refreshed)


def anon(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: float,
    beta1: float,
    beta2: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool = True,
    refresh: RefreshSchedule = "pow2",
    beta3: float = 0.5,
    keep_unseen: bool = True,
    max_precond_ratio: float | None = 10.0,
    bounds: tuple[float | None, float | None] | None = None,
    maximize: bool = False,
    on_nonfinite: str = "raise",
) -> list[int]:
    r"""Functional API that performs the Anon computation; see :class:`anon_hf.Anon` for the math.

    All lists are parallel. ``exp_avg_sqs`` and ``preconds`` are either as long as ``params`` or both empty,
    which means the preconditioner is all ones (``gamma == 0`` from the start: SGD with EMA momentum).
    ``state_steps`` holds one 0-d CPU tensor per parameter and is incremented in place; refreshes follow each
    tensor's own step. Returns the sorted distinct steps at which a refresh happened in this call.

    ``fused=True`` updates each tensor in one pass (``anon_hf.backends.fused``: a C++ kernel on CPU, ``torch.compile``'d
    graphs elsewhere), falling back to foreach where it cannot; ``None`` never builds or compiles anything (see
    :class:`anon_hf.Anon`).
    """
    if preconds and len(preconds) != len(params):
        raise ValueError(
            f"preconds must be empty or have one tensor per param: got {len(preconds)} for {len(params)} params"
        )
    if on_nonfinite not in _NONFINITE_POLICIES:
        raise ValueError(f"Invalid on_nonfinite value: {on_nonfinite!r} (allowed: 'raise', 'skip')")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if fused:
        from .backends.fused import _fused_anon

        func = _fused_anon
    else:
        if foreach is None:
            foreach = _default_foreach(params)
        if foreach and torch.jit.is_scripting():
            raise RuntimeError("torch.jit.script not supported with foreach optimizers")
        func = _multi_tensor_anon if foreach else _single_tensor_anon
    return func(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        preconds,
        state_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        gamma=gamma,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        refresh=refresh,
        beta3=beta3,
        keep_unseen=keep_unseen,
        max_precond_ratio=max_precond_ratio,
        bounds=bounds,
        maximize=maximize,
        on_nonfinite=on_nonfinite,
    )


def _compute_dtype(param: Tensor, state: list[Tensor]) -> torch.dtype | None:
    """``None`` when ``param`` and all of ``state`` share a dtype of at least fp32 (update in place), else the dtype
    to compute in: at least fp32, so 16-bit params and state are updated in fp32 and rounded once on store, as the
    fused paths do."""
    if all(tensor.dtype == param.dtype for tensor in state) and param.dtype not in (torch.float16, torch.bfloat16):
        return None
    return torch.promote_types(param.dtype, torch.float32)


def _default_foreach(params: list[Tensor]) -> bool:
    """torch.optim's rule: foreach when every tensor lives on a device with foreach kernels, never fused."""
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
    except ImportError:  # a private helper; fall back to its rule for the common devices
        return all(p.device.type in ("cuda", "cpu", "xpu", "mps") for p in params)
    _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return foreach
