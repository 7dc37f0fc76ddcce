"""Anon's fused step: the update between refreshes as one ``torch.compile``'d graph per bucket of tensors.

Between two refreshes an Anon step reads p, g, m, s, v and writes p, m, s: 8 memory passes where fused AdamW makes 7.
The eager paths spend one pass per op (6 to 8 ops per tensor). Here the update of every tensor of a bucket (one
device, one param dtype, one set of shapes) is traced once by dynamo and compiled by inductor into one loop per
tensor that touches each byte once, all launched from a single Python call.

Measured before choosing this (numbers in ``benchmarks/README.md``):

* flat state buffers (one per device and dtype, with per-tensor views) written through slices inside the compiled
  graph become a ``slice_scatter`` of the whole buffer per tensor: orders of magnitude slower. State therefore stays
  one tensor per parameter, as in the eager paths, so ``state_dict()``, ``load_state_dict()`` and ZeRO's flat
  partitions see exactly what they see without ``fused``;
* compiling the update of a single tensor with dynamic shapes and calling it per tensor costs ~30 us of guard and
  call overhead per tensor; one graph over the lists costs a few us per tensor.

Every hyperparameter that may change between steps (lr and the bias corrections, weight decay, betas, the bounds,
the sign for ``maximize``) enters the graph as a tensor, so each bucket compiles once and is reused; only shapes,
dtypes, whether a preconditioner exists and whether L2 decay is on are baked in. Each bucket gets a code object of
its own, because dynamo keeps its cache and its recompile limit per code object: buckets never evict each other.

Refresh steps (1, 2, 4, 8, ... for ``"pow2"``: log-space, >= fp32, non-finite check) and what the graph does not
cover (DTensor and complex parameters, running inside an outer ``torch.compile``, a compiler that fails) run the
eager foreach path, which computes the same update.

Nothing here imports anything but torch and the standard library; ``torch.compile`` is first touched on the first
fused step, never at import.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import time
import types
from collections.abc import Callable

import torch
from torch import Tensor

from ._schedule import RefreshSchedule, is_refresh_step

__all__ = ["fused_unavailable_reason", "stats"]

logger = logging.getLogger(__name__)

#: How many ``_fused_anon`` calls took each path in this process: ``"compiled"`` (a compiled graph ran),
#: ``"refresh"`` (a refresh step ran the eager foreach path), ``"fallback"`` (the fused path could not run for
#: these tensors and foreach ran instead) and ``"compiles"`` (graphs built). For tests and benchmarks.
stats: collections.Counter = collections.Counter()

# Compiled graphs, least recently used first. Each holds one bucket's kernels; 64 covers many optimizers and groups.
_MAX_GRAPHS = 64
_graphs: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
_ran: set[tuple] = set()  # keys whose graph has compiled and run at least once
_graph_ids = itertools.count()
_disabled_reason: str | None = None
_logged: set[str] = set()


def _update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    scalars: Tensor,
    neg_step_sizes: Tensor,
    l2: bool,
) -> None:
    """The non-refresh update of each tensor, computed in ``scalars.dtype`` and rounded once into each storage.

    ``scalars`` holds (decay, 1 - beta1, beta2, 1 - beta2, sign, weight_decay, lo, hi), 1-D on the params' device;
    ``neg_step_sizes[i] = -lr / (1 - beta1**step_i)``. ``exp_avg_sqs`` and ``preconds`` are both empty when the
    preconditioner is all ones (gamma == 0). ``l2`` adds ``weight_decay * param`` to the gradient.
    """
    compute = scalars.dtype
    decay, weight1, beta2, weight2 = scalars[0], scalars[1], scalars[2], scalars[3]
    sign, weight_decay, lo, hi = scalars[4], scalars[5], scalars[6], scalars[7]
    for i in range(len(params)):
        param = params[i].to(compute)
        grad = grads[i].to(compute) * sign
        if l2:
            grad = grad + param * weight_decay
        exp_avg = torch.lerp(exp_avgs[i].to(compute), grad, weight1)
        exp_avgs[i].copy_(exp_avg)
        update = exp_avg
        if len(preconds) > 0:
            exp_avg_sqs[i].copy_(exp_avg_sqs[i].to(compute) * beta2 + grad * grad * weight2)
            update = exp_avg * preconds[i].to(compute)
        params[i].copy_(torch.clamp(param * decay + update * neg_step_sizes[i], lo, hi))


def _graph_for(key: tuple) -> Callable:
    graph = _graphs.get(key)
    if graph is not None:
        _graphs.move_to_end(key)
        return graph
    # A code object of its own per bucket: dynamo's cache and recompile limit live on the code object.
    code = _update.__code__.replace(co_name=f"_anon_fused_update_{next(_graph_ids)}")
    graph = torch.compile(types.FunctionType(code, _update.__globals__), fullgraph=True, dynamic=False)
    _graphs[key] = graph
    while len(_graphs) > _MAX_GRAPHS:
        old_key, _ = _graphs.popitem(last=False)
        _ran.discard(old_key)
    return graph


def _log_once(level: int, message: str, *args) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message, *args)


def _is_dtensor(tensor: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def fused_unavailable_reason(params: list[Tensor] | None = None) -> str | None:
    """Why the fused path cannot run (for ``params``, if given) in this process, or ``None`` if it can."""
    if _disabled_reason is not None:
        return _disabled_reason
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported in this environment"
    if torch.compiler.is_compiling():
        return "the step is already being traced by an outer torch.compile"
    for param in params or ():
        if _is_dtensor(param):
            return "DTensor parameters (FSDP2 shards) are not handled by the compiled graph"
        if torch.is_complex(param):
            return "complex parameters are not handled by the compiled graph"
    return None


def _fused_anon(
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
    bounds: tuple[float | None, float | None] | None,
    maximize: bool,
    on_nonfinite: str,
) -> list[int]:
    """Same signature and results as ``functional._multi_tensor_anon``; runs the compiled graph between refreshes."""
    from .functional import _multi_tensor_anon

    kwargs = dict(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        gamma=gamma,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        refresh=refresh,
        beta3=beta3,
        bounds=bounds,
        maximize=maximize,
        on_nonfinite=on_nonfinite,
    )
    if len(params) == 0:
        return []
    reason = fused_unavailable_reason(params)
    if reason is not None:
        stats["fallback"] += 1
        _log_once(logging.INFO, "Anon fused=True: %s; these tensors take the foreach path.", reason)
        return _multi_tensor_anon(params, grads, exp_avgs, exp_avg_sqs, preconds, state_steps, **kwargs)
    preconditioned = len(preconds) > 0
    steps = [int(step.item()) + 1 for step in state_steps]
    if preconditioned and any(is_refresh_step(step, refresh) for step in steps):
        # O(log T) refreshes in a run: they keep the eager, log-space, non-finite-checked routine.
        stats["refresh"] += 1
        return _multi_tensor_anon(params, grads, exp_avgs, exp_avg_sqs, preconds, state_steps, **kwargs)

    decoupled = decoupled_weight_decay or weight_decay == 0
    lo = -math.inf if bounds is None or bounds[0] is None else bounds[0]
    hi = math.inf if bounds is None or bounds[1] is None else bounds[1]
    scalar_values = [
        1.0 - lr * weight_decay if decoupled else 1.0,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        -1.0 if maximize else 1.0,
        0.0 if decoupled else weight_decay,
        lo,
        hi,
    ]
    tensor_lists = [params, grads, exp_avgs, state_steps] + ([exp_avg_sqs, preconds] if preconditioned else [])
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(tensor_lists, with_indices=True)
    left_over: list[int] = []
    for (device, dtype), (lists, indices) in grouped.items():
        if left_over:  # an earlier bucket failed to compile: the rest follow it onto the foreach path
            left_over += indices
            continue
        bucket_params, bucket_grads, bucket_exp_avgs, bucket_steps = lists[:4]
        bucket_exp_avg_sqs, bucket_preconds = lists[4:] if preconditioned else ([], [])
        compute = torch.promote_types(dtype, torch.float32)
        scalars = torch.tensor(scalar_values, dtype=compute, device=device)
        neg_step_sizes = torch.tensor([-lr / (1 - beta1 ** steps[i]) for i in indices], dtype=compute, device=device)
        state_dtypes = (bucket_exp_avgs[0].dtype, bucket_preconds[0].dtype if preconditioned else None)
        key = (device, dtype, state_dtypes, preconditioned, not decoupled, tuple(p.shape for p in bucket_params))
        graph = _graph_for(key)
        first = key not in _ran
        started = time.perf_counter()
        try:
            graph(
                bucket_params,
                bucket_grads,
                bucket_exp_avgs,
                bucket_exp_avg_sqs,
                bucket_preconds,
                scalars,
                neg_step_sizes,
                not decoupled,
            )
        except Exception as err:
            if not first:
                raise
            # Tracing and compiling happen before the graph runs, so nothing was written: foreach can take over.
            _disable(f"torch.compile failed ({type(err).__name__}: {str(err).strip().splitlines()[0][:300]})")
            left_over += indices
            continue
        torch._foreach_add_(bucket_steps, 1)
        stats["compiled"] += 1
        if first:
            _ran.add(key)
            stats["compiles"] += 1
            _log_once(
                logging.INFO,
                "Anon fused=True: the step between refreshes runs a torch.compile'd graph (inductor); refresh steps "
                "run the eager foreach path.",
            )
            logger.debug(
                "Anon fused: compiled a graph for %d tensors (%s, %s) in %.1f s",
                len(bucket_params),
                device,
                dtype,
                time.perf_counter() - started,
            )
    if left_over:
        stats["fallback"] += 1
        pick = [[tensors[i] for i in left_over] if tensors else [] for tensors in tensor_lists]
        return _multi_tensor_anon(*pick[:3], *(pick[4:] or [[], []]), pick[3], **kwargs)
    return []


def _disable(reason: str) -> None:
    global _disabled_reason
    _disabled_reason = reason
    logger.warning("Anon fused=True: %s; every later step takes the foreach path instead.", reason)
