"""The eager backends: :func:`_single_tensor_anon` (a per-tensor loop) and :func:`_multi_tensor_anon`
(``torch._foreach_*`` kernels over tensors grouped by device and dtype), in the shape of ``torch.optim.adam``.

Both run the same stages, :func:`_step_tensors`, over different batches: one tensor at a time, or every tensor of a
device and dtype. A refresh rebuilds ``v`` with :func:`anon_hf.refresh.refresh_tensors_`; a step between refreshes
multiplies the first moment by what :func:`anon_hf.refresh.step_preconditioners` chooses. On CPU a step between
refreshes runs over cache-sized pieces of the tensors (flat views of at most :data:`_PIECE_NUMEL` elements): each
piece's moments, step rule and param update run back to back, so the rule's temporaries and the state it rereads stay
in cache instead of costing a trip to memory per op. Every op is elementwise, so the pieces give the same bits as
whole tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..distributed.dtensor import is_dtensor
from ..refresh import (
    StepRule,
    as_real,
    inverse_bias_correction,
    refresh_tensors_,
    step_preconditioners,
    step_rule,
    unseen_flags,
)
from ..schedule import gradients_since_refresh, is_refresh_step

__all__ = ["_multi_tensor_anon", "_single_tensor_anon"]

# Elements per piece of a CPU step between refreshes: 1 MiB of fp32 per tensor of the piece, so a piece's p, g, m, s,
# v and the rule's temporary fit in a core's share of the last-level cache.
_PIECE_NUMEL = 1 << 18

_REFRESH_KEYS = ("refresh", "beta2", "gamma", "eps", "beta3", "keep_unseen", "on_nonfinite")


class _Tensors(NamedTuple):
    """Parallel lists of one batch; ``exp_avg_sqs`` and ``preconds`` are empty when no preconditioner is kept.
    ``steps`` are the tensors' step numbers, already advanced; ``unseen`` and ``inv_bias2s`` are filled for steps
    between refreshes (:func:`anon_hf.refresh.step_preconditioners`'s inputs), empty otherwise."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    preconds: list[Tensor]
    steps: list[int]
    unseen: list[bool]
    inv_bias2s: list[float]

    def pick(self, indices: list[int]) -> _Tensors:
        return _Tensors(*([values[i] for i in indices] if values else [] for values in self))


class _Options(NamedTuple):
    """One call's hyperparameters, in the form the stages read them."""

    hyper: dict[str, Any]
    rule: StepRule
    refresh: dict[str, Any]  # the keyword arguments of refresh_tensors_

    @classmethod
    def of(cls, hyper: dict[str, Any]) -> _Options:
        rule = step_rule(hyper["gamma"], hyper["eps"], hyper["max_precond_ratio"], hyper["keep_unseen"])
        return cls(hyper, rule, {key: hyper[key] for key in _REFRESH_KEYS})


def _single_tensor_anon(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    state_steps: list[Tensor],
    **hyper: Any,
) -> list[int]:
    """Step each tensor on its own, in order. ``hyper``: every keyword of :func:`anon_hf.functional.anon`'s update
    (``lr``, ``beta1``, ``beta2`` and the rows of :data:`anon_hf.hyper.HYPERPARAMETERS`, defaults filled in).
    Returns the sorted distinct steps refreshed."""
    options = _Options.of(hyper)
    state = (params, grads, exp_avgs, exp_avg_sqs, preconds)
    refreshed: set[int] = set()
    for i in range(len(params)):
        one = [[tensors[i]] if tensors else [] for tensors in state]
        refreshed |= _step_tensors(*one, [state_steps[i]], [i], options)
    return sorted(refreshed)


def _multi_tensor_anon(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    state_steps: list[Tensor],
    **hyper: Any,
) -> list[int]:
    """Step every tensor of a device and dtype together with ``torch._foreach_*`` ops; arguments and result as
    :func:`_single_tensor_anon`."""
    if len(params) == 0:
        return []
    options = _Options.of(hyper)
    tensor_lists = [params, grads, exp_avgs, state_steps] + ([exp_avg_sqs, preconds] if preconds else [])
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(tensor_lists, with_indices=True)
    refreshed: set[int] = set()
    for device_lists, positions in grouped.values():
        p, g, m, steps = device_lists[:4]
        s, v = device_lists[4:] if preconds else ([], [])
        refreshed |= _step_tensors(p, g, m, s, v, steps, positions, options)
    return sorted(refreshed)


def _step_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    state_steps: list[Tensor],
    positions: list[int],
    options: _Options,
) -> set[int]:
    """One step of tensors sharing a device and param dtype (``positions``: their indices in the caller's lists, for
    error messages). Tensors at a refresh step are refreshed and stepped whole; the others step in pieces. Returns
    the steps refreshed."""
    torch._foreach_add_(state_steps, 1)
    steps = [int(step.item()) for step in state_steps]
    compute = _compute_dtype(params[0], exp_avgs + exp_avg_sqs + preconds)
    tensors = _Tensors(
        *([as_real(t) for t in values] for values in (params, grads, exp_avgs, exp_avg_sqs, preconds)), steps, [], []
    )
    schedule = options.hyper["refresh"]
    due = [bool(preconds) and is_refresh_step(step, schedule) for step in steps]
    refreshed = set()
    if any(due):
        indices = [i for i, flag in enumerate(due) if flag]
        refreshed = _step_with_refresh(tensors.pick(indices), [positions[i] for i in indices], options, compute)
    _step_between_refreshes(tensors.pick([i for i, flag in enumerate(due) if not flag]), options, compute)
    return refreshed


def _step_with_refresh(
    tensors: _Tensors, positions: list[int], options: _Options, compute: torch.dtype | None
) -> set[int]:
    """The step of tensors at a refresh step: moments, the refresh of ``v`` (those at one step together), then the
    param update with the new ``v`` (its accumulator was just reset, and ``v`` built from this interval's gradients:
    no step rule applies). Returns the steps refreshed."""
    exp_avgs_c, _ = _moments_(tensors, options, compute)
    refresh_at: dict[int, list[int]] = {}
    for i, step in enumerate(tensors.steps):
        refresh_at.setdefault(step, []).append(i)
    for step, indices in refresh_at.items():
        refresh_tensors_(
            tensors.exp_avg_sqs, tensors.preconds, indices, step, tensor_positions=positions, **options.refresh
        )
    _update_params_(tensors.params, exp_avgs_c, _in_compute(tensors.preconds, compute), tensors.steps, options.hyper)
    return set(refresh_at)


def _step_between_refreshes(tensors: _Tensors, options: _Options, compute: torch.dtype | None) -> None:
    """The step of tensors not at a refresh step, piece by piece: moments, the step rule's choice of what multiplies
    the first moment (:class:`anon_hf.refresh.StepRule`), the param update."""
    hyper, rule = options.hyper, options.rule
    for batch in _pieces(_with_rule_inputs(tensors, options)):
        exp_avgs_c, exp_avg_sqs_c = _moments_(batch, options, compute)
        preconds_c = _in_compute(batch.preconds, compute)
        if preconds_c and rule.estimate_mode is not None:
            preconds_c = step_preconditioners(
                exp_avg_sqs_c,
                preconds_c,
                batch.inv_bias2s,
                batch.unseen,
                rule=rule,
                gamma=hyper["gamma"],
                eps=hyper["eps"],
                max_ratio=hyper["max_precond_ratio"],
                # A piece's test runs on data in cache and reads its verdict back without a device sync.
                skip_unbound=_piece_numel(batch.params[0]) is not None,
            )
        _update_params_(batch.params, exp_avgs_c, preconds_c, batch.steps, hyper)


def _with_rule_inputs(tensors: _Tensors, options: _Options) -> _Tensors:
    """``tensors`` with what the step rule reads per tensor: whether its stored ``v`` holds a 0
    (:func:`anon_hf.refresh.unseen_flags`, cached per refresh interval) and its inverse bias correction."""
    if not tensors.preconds or options.rule.estimate_mode is None:
        return tensors
    piece_numel = _piece_numel(tensors.params[0])
    if options.rule.late_seen:
        unseen = unseen_flags(tensors.preconds, piece_numel)
    else:
        unseen = [(False,) if piece_numel else False] * len(tensors.preconds)
    beta2, schedule = options.hyper["beta2"], options.hyper["refresh"]
    inv_bias2s = [inverse_bias_correction(beta2, gradients_since_refresh(step, schedule)) for step in tensors.steps]
    return tensors._replace(unseen=unseen, inv_bias2s=inv_bias2s)


def _piece_numel(param: Tensor) -> int | None:
    """The piece size for tensors on ``param``'s device: :data:`_PIECE_NUMEL` on CPU, ``None`` (whole tensors)
    elsewhere, where a GPU's foreach kernels want few, large launches."""
    return _PIECE_NUMEL if param.device.type == "cpu" else None


def _pieces(tensors: _Tensors) -> Iterator[_Tensors]:
    """``tensors`` in batches of about :func:`_piece_numel` elements (large contiguous tensors cut into flat views,
    small ones gathered), or whole where it is ``None``."""
    if not tensors.params:
        return
    if _piece_numel(tensors.params[0]) is None:
        yield tensors
        return
    batch: list[tuple] = []
    numel = 0
    for row in zip(*(values or [None] * len(tensors.params) for values in tensors), strict=True):
        for piece in _cut(row):
            batch.append(piece)
            numel += piece[0].numel()
            if numel >= _PIECE_NUMEL:
                yield _batch(batch, tensors)
                batch, numel = [], 0
    if batch:
        yield _batch(batch, tensors)


def _cut(row: tuple) -> Iterator[tuple]:
    """One tensor's row (param, grad, m, s, v, step, unseen, inv_bias2; absent entries None; unseen, when present, a
    flag per piece) as flat pieces of at most :data:`_PIECE_NUMEL` elements, each with its own unseen flag, or whole
    when it is small, non-contiguous or a DTensor."""
    tensors = [t for t in row[:5] if t is not None]
    numel, unseen = tensors[0].numel(), row[6]
    if numel <= _PIECE_NUMEL or not all(t.is_contiguous() and not is_dtensor(t) for t in tensors):
        yield row[:6] + (any(unseen) if unseen is not None else None,) + row[7:]
        return
    flat = [t.view(-1) if t is not None else None for t in row[:5]]
    for k, start in enumerate(range(0, numel, _PIECE_NUMEL)):
        pieces = tuple(t[start : start + _PIECE_NUMEL] if t is not None else None for t in flat)
        yield pieces + (row[5], unseen[k] if unseen is not None else None) + row[7:]


def _batch(rows: list[tuple], like: _Tensors) -> _Tensors:
    return _Tensors(*([row[k] for row in rows] if values else [] for k, values in enumerate(like)))


def _moments_(tensors: _Tensors, options: _Options, compute: torch.dtype | None) -> tuple[list[Tensor], list[Tensor]]:
    """Weight decay, then this step's first moment and accumulator, stored in place. Returns both in the compute
    dtype: the stored tensors themselves when ``compute`` is None, else copies in ``compute`` (state kept in another
    dtype than its param is updated there and rounded once on store, as the fused paths do)."""
    hyper = options.hyper
    lr, weight_decay = hyper["lr"], hyper["weight_decay"]
    grads = torch._foreach_neg(tensors.grads) if hyper["maximize"] else tensors.grads
    if weight_decay != 0:
        if hyper["decoupled_weight_decay"]:
            torch._foreach_mul_(tensors.params, 1 - lr * weight_decay)
        elif hyper["maximize"]:
            torch._foreach_add_(grads, tensors.params, alpha=weight_decay)
        else:
            grads = torch._foreach_add(grads, tensors.params, alpha=weight_decay)
    grads = _in_compute(grads, compute)
    exp_avgs_c = _in_compute(tensors.exp_avgs, compute)
    torch._foreach_lerp_(exp_avgs_c, grads, 1 - hyper["beta1"])
    _store(tensors.exp_avgs, exp_avgs_c, compute)
    if not tensors.exp_avg_sqs:
        return exp_avgs_c, []
    beta2 = hyper["beta2"]
    exp_avg_sqs_c = _in_compute(tensors.exp_avg_sqs, compute)
    torch._foreach_mul_(exp_avg_sqs_c, beta2)
    torch._foreach_addcmul_(exp_avg_sqs_c, grads, grads, value=1 - beta2)
    _store(tensors.exp_avg_sqs, exp_avg_sqs_c, compute)
    return exp_avgs_c, exp_avg_sqs_c


def _update_params_(
    params: list[Tensor], exp_avgs: list[Tensor], preconds: list[Tensor], steps: list[int], hyper: dict[str, Any]
) -> None:
    """``p -= lr * v * m / (1 - beta1**t)`` (``v = 1`` when ``preconds`` is empty), then the clamp to ``bounds``."""
    lr, beta1, bounds = hyper["lr"], hyper["beta1"], hyper["bounds"]
    # Tensors skipped on earlier steps (grad None) lag behind and take their own bias correction; one op per step
    # number keeps each element's arithmetic the same however the tensors are batched.
    at_step: dict[int, list[int]] = {}
    for i, step in enumerate(steps):
        at_step.setdefault(step, []).append(i)
    for step, indices in at_step.items():
        stepped = (params, exp_avgs, preconds)
        if len(at_step) > 1:
            stepped = tuple([tensors[i] for i in indices] if tensors else [] for tensors in stepped)
        step_size = lr / (1 - beta1**step)
        if preconds:
            torch._foreach_addcmul_(*stepped, value=-step_size)
        else:
            torch._foreach_add_(stepped[0], stepped[1], alpha=-step_size)
    if bounds is not None:
        if bounds[0] is not None:
            torch._foreach_clamp_min_(params, bounds[0])
        if bounds[1] is not None:
            torch._foreach_clamp_max_(params, bounds[1])


def _in_compute(tensors: list[Tensor], compute: torch.dtype | None) -> list[Tensor]:
    return list(tensors) if compute is None else [t.to(compute) for t in tensors]


def _store(stored: list[Tensor], computed: list[Tensor], compute: torch.dtype | None) -> None:
    if compute is not None:
        torch._foreach_copy_(stored, computed)


def _compute_dtype(param: Tensor, state: list[Tensor]) -> torch.dtype | None:
    """``None`` when ``param`` and all of ``state`` share a dtype of at least fp32 (update in place), else the dtype
    to compute in: at least fp32, so 16-bit params and state are updated in fp32 and rounded once on store, as the
    fused paths do."""
    if all(tensor.dtype == param.dtype for tensor in state) and param.dtype not in (torch.float16, torch.bfloat16):
        return None
    return torch.promote_types(param.dtype, torch.float32)
