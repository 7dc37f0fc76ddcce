"""Anon's fused step: one pass per tensor, by anon_hf's C++ kernel on CPU or ``torch.compile``'d graphs elsewhere.

Between two refreshes an Anon step reads p, g, m, s, v and writes p, m, s: 8 memory passes where fused AdamW makes 7.
The eager paths spend one pass per op (6 to 8 ops per tensor). The package is split by what changes together:

* :mod:`.plan`: which backend steps which tensor (pure: the C++ kernel, the compiled graphs, or the eager foreach
  path for what neither covers);
* :mod:`.kernel` and :mod:`.graphs`: the backends, each a thin adapter with a ``check()`` (a refresh's verdicts,
  nothing written) and a ``write()``;
* :mod:`.scalars`: the one layout of the step's hyperparameters that both backends read;
* this module: the execution. On a refresh every backend checks, the eager part included, before any backend
  writes, so ``on_nonfinite="raise"`` leaves the whole step unwritten whatever the mix of backends.

Why state is not flattened into one buffer per group: written through slices inside a compiled graph, such a buffer
becomes a ``slice_scatter`` of the whole buffer per tensor, and one static graph over all of a group's tensors takes
a compile time that grows with their number. State therefore stays one tensor per parameter, as in the eager paths:
``state_dict()``, ``load_state_dict()`` and ZeRO's flat partitions see exactly what they see without it.

Nothing here imports anything but torch and the standard library; ``torch.compile`` is first touched on the first
fused step that needs a graph, never at import.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ...distributed.dtensor import agreed_verdicts
from ...refresh import NonFinitePreconditionerError, refresh_mode, refresh_verdicts, step_rule
from ...schedule import is_refresh_step, previous_refresh_step
from ...storage.blockwise8 import Blockwise8
from . import graphs
from .graphs import CompileFailed, GraphCalls, fused_unavailable_reason
from .kernel import KernelCall, kernel8_step, kernel_supported
from .plan import make_plan
from .scalars import per_tensor_scalars, step_scalars_from
from .telemetry import log_once, stats

__all__ = ["fused_unavailable_reason", "stats"]


def _fused_anon(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    state_steps: list[Tensor],
    **hyper: Any,
) -> tuple[list[int], list[int]]:
    """Step what the C++ kernel and the compiled graphs cover; ``hyper``: the keyword arguments of
    ``backends.eager._multi_tensor_anon``. Returns ``(the steps refreshed, the indices left over)``: the caller steps
    the tensors left over with the foreach path (complex or non-contiguous tensors, a failed build or compile, a step
    traced by an outer ``torch.compile``, a refresh of tensors at different steps), in the same call.

    A refresh with ``on_nonfinite="raise"`` that finds a non-finite accumulator or preconditioner, in any tensor, left
    over ones included, raises before anything of this step is written (params, state and step counters are as before
    the call).
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs, preconds)
    if len(params) == 0:
        return [], []
    if torch.compiler.is_compiling():
        return [], _left_over(range(len(params)), "the step is already being traced by an outer torch.compile")
    steps = [int(step.item()) + 1 for step in state_steps]
    refreshing = len(preconds) > 0 and any(is_refresh_step(step, hyper["refresh"]) for step in steps)
    if refreshing and len(set(steps)) > 1:
        # Tensors at different steps (some were skipped with grad None): the eager routine handles each one.
        stats["refresh_eager"] += 1
        return [], list(range(len(params)))
    supported, cpu_eager_reason = kernel_supported(*lists)
    plan = make_plan(
        *lists,
        kernel_supported=supported,
        cpu_eager_reason=cpu_eager_reason,
        graphs_unavailable=fused_unavailable_reason,
    )
    kernel, graph = _backend_calls(plan, lists, state_steps, steps, refreshing, hyper)
    eager_indices = list(plan.eager)
    if refreshing:
        graph, eager_indices = _check_all(kernel, graph, eager_indices, lists, steps[0], hyper)
    if kernel is not None:
        kernel.write()  # advances its tensors' step counters too
        stats["kernel"] += 1
    done = list(plan.empty)
    if graph is not None:
        written, left = graph.write()
        done += written
        eager_indices += left
    if done:
        torch._foreach_add_([state_steps[i] for i in done], 1)
    if eager_indices:
        eager_indices = _left_over(eager_indices, plan.eager_reason or graphs._disabled_reason)
    return ([steps[0]] if refreshing else []), eager_indices


def _backend_calls(plan, lists, state_steps, steps: list[int], refreshing: bool, hyper: dict):
    """The planned calls of the C++ kernel and of the compiled graphs (``None`` where the plan gives one nothing),
    with the step's scalars, modes and, between refreshes, the step rule."""
    averaged = refreshing and hyper["beta3"] > 0.0 and previous_refresh_step(steps[0], hyper["refresh"]) > 0
    scalar_values = step_scalars_from(hyper, averaged=averaged)
    per_tensor = per_tensor_scalars(steps, hyper)
    modes = _modes(hyper)
    mode = refresh_mode(hyper["gamma"], hyper["eps"])
    rule = None if refreshing or not lists[4] else _step_rule(hyper)
    kernel = graph = None
    if plan.kernel:
        refresh = (mode, averaged, hyper["keep_unseen"]) if refreshing else None
        kernel = KernelCall(plan.kernel, lists, state_steps, scalar_values, per_tensor, modes, refresh, rule)
    if plan.chunks:
        refresh = (mode, hyper["beta3"] > 0.0, hyper["keep_unseen"]) if refreshing else None
        graph = GraphCalls(plan.chunks, lists, scalar_values, per_tensor, modes, refresh, rule)
    return kernel, graph


def _step_rule(hyper: dict):
    """The group's :class:`anon_hf.refresh.StepRule` for a step between refreshes, or ``None`` where it leaves every
    ``v`` as it is (the published rule), so that such a step compiles and runs nothing for it."""
    rule = step_rule(hyper["gamma"], hyper["eps"], hyper["max_precond_ratio"], hyper["keep_unseen"])
    return None if rule.estimate_mode is None else rule


def _check_all(kernel, graph, eager_indices, lists, step, hyper):
    """Every backend's verdict on this refresh before any writes: raise for the first non-finite tensor under
    ``on_nonfinite="raise"``. Returns ``(graph, eager_indices)``: a graph backend whose compiler failed is dropped
    and its tensors join the eager ones."""
    verdicts = kernel.check() if kernel is not None else {}
    if graph is not None:
        try:
            verdicts.update(graph.check())
        except CompileFailed:
            eager_indices = eager_indices + [i for _, indices, *_ in graph.calls for i in indices]
            graph = None
    if hyper["on_nonfinite"] == "raise":
        if eager_indices:
            verdicts.update(refresh_verdicts(*lists, eager_indices, step, **hyper))
        # Under FSDP2 these are local shards: every rank raises for the same tensor, or none does.
        verdicts = agreed_verdicts(verdicts, lists[0][0].device)
        bad = sorted(i for i, ok in verdicts.items() if not ok)
        if bad:
            raise NonFinitePreconditionerError(step, bad[0], tuple(lists[4][bad[0]].shape))
    return graph, eager_indices


def _fused_anon_8bit(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    state_steps: list[Tensor],
    storage: Blockwise8,
    **hyper: Any,
) -> list[int]:
    """Step, between refreshes, the tensors with 8-bit state that the 8-bit C++ kernel takes (contiguous CPU fp32),
    then those the compiled 8-bit graph takes (other contiguous floating tensors, and CPU ones when the kernel cannot
    run). The state lists hold codes and ``storage`` (:class:`~anon_hf.storage.blockwise8.Blockwise8`) their side
    values; the tensors are local shards, all with a preconditioner or all without. Returns the indices left over (a
    refresh due, a non-contiguous tensor, no kernel or compiler here), which the caller steps on decoded state."""
    codes = (exp_avgs, exp_avg_sqs, preconds)
    steps = [int(step.item()) + 1 for step in state_steps]
    taken = [
        i
        for i, (param, grad) in enumerate(zip(params, grads, strict=True))
        if param.is_floating_point()
        and param.is_contiguous()
        and grad.is_contiguous()
        and not (preconds and is_refresh_step(steps[i], hyper["refresh"]))
    ]
    if not taken:
        return list(range(len(params)))
    entries = {i: storage.entries(i, storage.codes_of(i, codes)) for i in taken}
    lists = (params, grads, entries, state_steps)
    shared = dict(
        scalar_values=step_scalars_from(hyper, averaged=False),
        modes=_modes(hyper),
        rule=_step_rule(hyper) if preconds else None,
    )
    done = _kernel8(taken, lists, steps, hyper, **shared)
    done += _graphs8([i for i in taken if i not in set(done)], lists, steps, hyper, **shared)
    return [i for i in range(len(params)) if i not in set(done)]


def _kernel8(taken, lists, steps, hyper, *, scalar_values, modes, rule) -> list[int]:
    """Step the CPU fp32 tensors among ``taken`` with the 8-bit C++ kernel, if it runs here; returns them.
    ``lists``: params, grads, 8-bit entries and step counters, by tensor index."""
    from .. import cpu_kernel

    params, grads = lists[:2]
    picked = [
        i for i in taken if params[i].device.type == "cpu" and params[i].dtype == grads[i].dtype == torch.float32
    ]
    if not picked or cpu_kernel.kernel8_unavailable_reason() is not None:
        return []
    per_tensor = per_tensor_scalars([steps[i] for i in picked], hyper)
    tensors = [[values[i] for i in picked] for values in lists]
    kernel8_step(*tensors, scalar_values, per_tensor, modes, rule)
    stats["kernel_8bit"] += 1
    return picked


def _graphs8(picked, lists, steps, hyper, *, scalar_values, modes, rule) -> list[int]:
    """Step the tensors ``picked`` with the compiled 8-bit graph, one at a time, if the compiler runs here; returns
    those stepped (a compiler failure leaves the rest). ``lists`` as in :func:`_kernel8`."""
    params, grads, entries, state_steps = lists
    if not picked or graphs.fused_unavailable_reason([params[i] for i in picked]) is not None:
        return []
    done = []
    for i in picked:
        per_tensor = per_tensor_scalars([steps[i]], hyper)
        try:
            graphs.step_8bit([params[i]], [grads[i]], [entries[i]], scalar_values, per_tensor, modes, rule)
        except CompileFailed:
            break
        state_steps[i] += 1
        done.append(i)
    return done


def _modes(hyper: dict) -> tuple[bool, bool]:
    """The kernels' and graphs' ``(L2 decay, bounds)`` flags: weight decay added to the gradient (not decoupled, not
    0), and a projection onto ``bounds``."""
    decoupled = hyper["decoupled_weight_decay"] or hyper["weight_decay"] == 0
    return not decoupled, hyper["bounds"] is not None


def _left_over(indices, reason: str | None) -> list[int]:
    stats["fallback"] += 1
    if reason is not None:
        log_once(logging.INFO, "Anon fused=True: %s; these tensors take the foreach path.", reason)
    return sorted(indices)
