"""Anon's fused step: one pass per tensor, by anon_hf's C++ kernel on CPU or ``torch.compile``'d graphs elsewhere.

Between two refreshes an Anon step reads p, g, m, s, v and writes p, m, s: 8 memory passes where fused AdamW makes 7.
The eager paths spend one pass per op (6 to 8 ops per tensor). :func:`_fused_anon` hands the CPU tensors the kernel
supports (``anon_hf._cpu_kernel``: contiguous fp32/bf16/fp16) to that kernel, and the rest to graphs in which dynamo
traces the update of a chunk of tensors once and inductor compiles it into one loop per tensor that touches each byte
once. The rest of this docstring is about the graphs.

* Graphs are compiled with dynamic shapes, so a graph depends only on the dtypes, the rank, whether a
  preconditioner exists, whether L2 decay and bounds are on, the number of tensors in a call (16, 4 or 1, all of one
  shape) and the kind of step: a few graphs serve every model, param group and optimizer of the process.
* Every hyperparameter that may change between steps (lr and the bias corrections, weight decay, betas, bounds, the
  sign for ``maximize``) enters as a tensor, so nothing recompiles when a scheduler moves lr.
* A refresh step runs two graphs: a reduction that tells, per tensor, whether the new accumulator and preconditioner
  are finite (so ``on_nonfinite="raise"`` raises before anything is written), then the step with the refresh folded
  in. The power is computed directly where fp32 cannot overflow (gamma == 1 needs none; |gamma| <= 1 with
  eps >= 1e-30 uses ``pow``) and in log space otherwise, as the eager routine does.
* Each graph gets a code object of its own, because dynamo keeps its cache and recompile limit per code object.

Measured before choosing this (``benchmarks/README.md``): flat state buffers (one per device and dtype, with per-tensor
views) written through slices inside a compiled graph became a ``slice_scatter`` of the whole buffer per tensor,
hundreds of times slower; one static graph over all of a group's tensors ran a little faster per step but compiled
for ~0.4 s per tensor, again for every new set of shapes. State therefore stays one tensor per parameter, as in the
eager paths: ``state_dict()``, ``load_state_dict()`` and ZeRO's flat partitions see exactly what they see without it.

Tensors the graphs do not cover run the eager foreach path, which computes the same update: refreshes of tensors whose
step counters differ (some steps skipped with grad None), non-contiguous tensors, DTensor and complex parameters, a
step traced by an outer ``torch.compile``, and everything after the compiler failed once.

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

from ._dtensor import is_dtensor
from ._schedule import RefreshSchedule, is_refresh_step, previous_refresh_step

__all__ = ["fused_unavailable_reason", "stats"]

logger = logging.getLogger(__name__)

#: How often each path ran in this process: ``"compiled"`` (a bucket's step or refresh graph ran),
#: ``"refresh_eager"`` (a refresh ran the eager foreach path), ``"fallback"`` (the fused path could not run for
#: these tensors and foreach ran instead) and ``"compiles"`` (graphs built). For tests and benchmarks.
stats: collections.Counter = collections.Counter()

# Compiled graphs, least recently used first. Each holds one bucket's kernels; 64 covers many optimizers and groups.
_MAX_GRAPHS = 64
_graphs: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
_ran: set[tuple] = set()  # keys whose graph has compiled and run at least once
_graph_ids = itertools.count()
_disabled_reason: str | None = None
_logged: set[str] = set()

# Slots of the `scalars` tensor every graph takes (1-D, on the params' device, in the compute dtype).
_DECAY, _WEIGHT1, _BETA2, _WEIGHT2, _SIGN, _WEIGHT_DECAY, _LO, _HI = range(8)
# Refresh graphs append: 1 / (1 - beta2**n), eps, gamma, beta3 (weight of u_prev), weight of the new estimate.
_INV_BIAS2, _EPS, _GAMMA, _WEIGHT_PREV, _WEIGHT_NEW = range(8, 13)


def _moments(params, grads, exp_avgs, exp_avg_sqs, i: int, scalars: Tensor, modes: tuple, preconditioned: bool):
    """Tensor ``i``'s param, new first moment and new accumulator (``None`` without a preconditioner), in
    ``scalars.dtype``; nothing is written."""
    compute = scalars.dtype
    param = params[i].to(compute)
    grad = grads[i].to(compute) * scalars[_SIGN]
    if modes[0]:  # L2 decay
        grad = grad + param * scalars[_WEIGHT_DECAY]
    exp_avg = exp_avgs[i].to(compute)
    # torch.lerp's own formula for weights < 0.5 (beta1 > 0.5), without its per-element branch.
    exp_avg = exp_avg + (grad - exp_avg) * scalars[_WEIGHT1]
    exp_avg_sq = None
    if preconditioned:
        exp_avg_sq = exp_avg_sqs[i].to(compute) * scalars[_BETA2] + grad * grad * scalars[_WEIGHT2]
    return param, exp_avg, exp_avg_sq


def _new_precond(exp_avg_sq: Tensor, precond: Tensor, scalars: Tensor, gamma_mode: str, has_prev: bool) -> Tensor:
    """``v = u**-0.5`` with ``u = w_prev * precond**-2 + w_new * sigma**gamma`` (see ``functional``).

    ``gamma_mode`` is ``"one"`` (gamma == 1: no power at all), ``"pow"`` (|gamma| <= 1: ``sigma**gamma`` cannot
    leave the range of fp32 for sigma >= eps >= 1e-30) or ``"log"`` (the eager path's log-space arithmetic).
    """
    compute = scalars.dtype
    sigma = exp_avg_sq * scalars[_INV_BIAS2] + scalars[_EPS]
    if gamma_mode == "log":
        log_u = torch.log(sigma) * scalars[_GAMMA] + torch.log(scalars[_WEIGHT_NEW])
        if has_prev:
            log_prev = torch.log(precond.to(compute)) * -2.0 + torch.log(scalars[_WEIGHT_PREV])
            # Weight 0 (the first refresh) must leave log_u alone, not feed -inf into logaddexp.
            log_u = torch.where(scalars[_WEIGHT_PREV] > 0, torch.logaddexp(log_prev, log_u), log_u)
        return torch.exp(log_u * -0.5)
    u = (sigma if gamma_mode == "one" else torch.pow(sigma, scalars[_GAMMA])) * scalars[_WEIGHT_NEW]
    if has_prev:
        inverse = torch.reciprocal(precond.to(compute))
        u = torch.where(scalars[_WEIGHT_PREV] > 0, u + inverse * inverse * scalars[_WEIGHT_PREV], u)
    return torch.rsqrt(u)


def _project(new_param: Tensor, scalars: Tensor, modes: tuple) -> Tensor:
    """Clamp to the box ``[lo, hi]`` when ``bounds`` is set (``modes[1]``)."""
    return torch.clamp(new_param, scalars[_LO], scalars[_HI]) if modes[1] else new_param


def _step_graph(params, grads, exp_avgs, exp_avg_sqs, preconds, scalars, neg_step_sizes, modes: tuple) -> None:
    """The update between refreshes, rounded once into each storage. ``neg_step_sizes[i] = -lr / (1 - beta1**t_i)``;
    ``exp_avg_sqs`` and ``preconds`` are both empty when the preconditioner is all ones (gamma == 0)."""
    preconditioned = len(preconds) > 0
    for i in range(len(params)):
        param, exp_avg, exp_avg_sq = _moments(params, grads, exp_avgs, exp_avg_sqs, i, scalars, modes, preconditioned)
        exp_avgs[i].copy_(exp_avg)
        update = exp_avg
        if preconditioned:
            exp_avg_sqs[i].copy_(exp_avg_sq)
            update = exp_avg * preconds[i].to(scalars.dtype)
        new_param = param * scalars[_DECAY] + update * neg_step_sizes[i]
        params[i].copy_(_project(new_param, scalars, modes))


def _flags_graph(
    params, grads, exp_avgs, exp_avg_sqs, preconds, scalars, modes: tuple, gamma_mode: str, has_prev: bool
):
    """Per tensor, whether this refresh's accumulator and new preconditioner are all finite; writes nothing."""
    flags = []
    for i in range(len(params)):
        _, _, exp_avg_sq = _moments(params, grads, exp_avgs, exp_avg_sqs, i, scalars, modes, True)
        precond = _new_precond(exp_avg_sq, preconds[i], scalars, gamma_mode, has_prev)
        # s * 0 is nan exactly where s is inf or nan: one reduction covers both tensors, with no temporary.
        flags.append(torch.isfinite(exp_avg_sq * 0.0 + precond).all())
    return torch.stack(flags)


def _refresh_graph(
    params, grads, exp_avgs, exp_avg_sqs, preconds, scalars, neg_step_sizes, keep, modes: tuple, gamma_mode, has_prev
) -> None:
    """A refresh step: moments, the new preconditioner (the old one where ``keep[i]`` is False), accumulator reset,
    then the update with the preconditioner as stored."""
    compute = scalars.dtype
    for i in range(len(params)):
        param, exp_avg, exp_avg_sq = _moments(params, grads, exp_avgs, exp_avg_sqs, i, scalars, modes, True)
        exp_avgs[i].copy_(exp_avg)
        precond = _new_precond(exp_avg_sq, preconds[i], scalars, gamma_mode, has_prev)
        preconds[i].copy_(torch.where(keep[i], precond, preconds[i].to(compute)))
        exp_avg_sqs[i].zero_()
        new_param = param * scalars[_DECAY] + exp_avg * preconds[i].to(compute) * neg_step_sizes[i]
        params[i].copy_(_project(new_param, scalars, modes))


_KINDS = {"step": _step_graph, "flags": _flags_graph, "refresh": _refresh_graph}


def _graph_for(key: tuple) -> Callable:
    graph = _graphs.get(key)
    if graph is not None:
        _graphs.move_to_end(key)
        return graph
    # A code object of its own per bucket: dynamo's cache and recompile limit live on the code object.
    base = _KINDS[key[0]]
    code = base.__code__.replace(co_name=f"_anon_fused_{key[0]}_{next(_graph_ids)}")
    # Dynamo's guards already check every input's size and stride; inductor's own per-input asserts would repeat it.
    graph = torch.compile(
        types.FunctionType(code, base.__globals__), fullgraph=True, dynamic=True, options={"size_asserts": False}
    )
    _graphs[key] = graph
    while len(_graphs) > _MAX_GRAPHS:
        old_key, _ = _graphs.popitem(last=False)
        _ran.discard(old_key)
    return graph


class _CompileFailed(Exception):
    pass


def _run(key: tuple, *args):
    """Run the graph for ``key``, raising :class:`_CompileFailed` (nothing written) when dynamo or inductor fail.

    A failure, on a graph's first call or on a recompile for new shapes (one that fails or exceeds dynamo's
    recompile limit), disables the fused path for the process: the foreach path takes over from there.
    """
    graph = _graph_for(key)
    first = key not in _ran
    started = time.perf_counter()
    try:
        result = graph(*args)
    except Exception as err:
        # Dynamo traces and inductor compiles before a graph runs, so nothing of this call was written.
        message = f"{type(err).__name__}: {(str(err).strip() or '?').splitlines()[0][:300]}"
        _disable(f"torch.compile failed ({message}{'' if first else ', on a recompile'})")
        raise _CompileFailed from err
    if first:
        _ran.add(key)
        stats["compiles"] += 1
        logger.debug(
            "Anon fused: compiled a %s graph for %d tensors in %.1f s",
            key[0],
            len(args[0]),
            time.perf_counter() - started,
        )
    return result


def _log_once(level: int, message: str, *args) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message, *args)


def _disable(reason: str) -> None:
    global _disabled_reason
    _disabled_reason = reason
    logger.warning("Anon fused=True: %s; every later step takes the foreach path instead.", reason)


def fused_unavailable_reason(params: list[Tensor] | None = None) -> str | None:
    """Why the fused path cannot run (for ``params``, if given) in this process, or ``None`` if it can."""
    if _disabled_reason is not None:
        return _disabled_reason
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported in this environment"
    if torch.compiler.is_compiling():
        return "the step is already being traced by an outer torch.compile"
    for param in params or ():
        if is_dtensor(param):
            return "DTensor parameters (FSDP2 shards) are not handled by the compiled graphs"
        if torch.is_complex(param):
            return "complex parameters are not handled by the compiled graphs"
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
    """Same signature and results as ``functional._multi_tensor_anon``, through compiled graphs.

    A refresh with ``on_nonfinite="raise"`` that finds a non-finite accumulator or preconditioner raises before
    anything of this step is written (state, params and step counters are as before the call).
    """
    from .functional import NonFinitePreconditionerError, _multi_tensor_anon

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

    def eager(indices: list[int] | None = None) -> list[int]:
        if indices is None:
            return _multi_tensor_anon(params, grads, exp_avgs, exp_avg_sqs, preconds, state_steps, **kwargs)
        pick = [[tensors[i] for i in indices] if tensors else [] for tensors in tensor_lists]
        return _multi_tensor_anon(*pick[:3], *(pick[4:] or [[], []]), pick[3], **kwargs)

    if torch.compiler.is_compiling():
        return _eager_with_reason(eager, "the step is already being traced by an outer torch.compile")
    preconditioned = len(preconds) > 0
    steps = [int(step.item()) + 1 for step in state_steps]
    refreshing = preconditioned and any(is_refresh_step(step, refresh) for step in steps)
    prev = previous_refresh_step(steps[0], refresh) if refreshing else 0
    if refreshing and len(set(steps)) > 1:
        # Tensors at different steps (some were skipped with grad None): the eager routine handles each one.
        stats["refresh_eager"] += 1
        return eager()

    decoupled = decoupled_weight_decay or weight_decay == 0
    scalar_values = [
        1.0 - lr * weight_decay if decoupled else 1.0,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        -1.0 if maximize else 1.0,
        0.0 if decoupled else weight_decay,
        -math.inf if bounds is None or bounds[0] is None else bounds[0],
        math.inf if bounds is None or bounds[1] is None else bounds[1],
    ]
    gamma_mode = has_prev = None
    weighted = False
    if refreshing:
        has_prev = beta3 > 0.0
        gamma_mode = "one" if gamma == 1.0 else "pow" if abs(gamma) <= 1.0 and eps >= 1e-30 else "log"
        # The weights enter as logarithms in log space; log(1) = 0 stands in for "no previous term".
        # The first refresh (prev == 0) weighs the new estimate fully and the initial preconditioner not at all.
        weighted = has_prev and prev > 0
        scalar_values += [1.0 / (1.0 - beta2 ** (steps[0] - prev)), eps, gamma]
        scalar_values += [beta3 if weighted else 0.0, 1.0 - beta3 if weighted else 1.0]
    tensor_lists = [params, grads, exp_avgs, state_steps] + ([exp_avg_sqs, preconds] if preconditioned else [])
    modes = (not decoupled, bounds is not None)

    kernel_indices, others = _kernel_indices(params, grads, exp_avgs, exp_avg_sqs, preconds)
    if any(is_dtensor(params[i]) for i in others):
        return _eager_with_reason(eager, "DTensor parameters (FSDP2 shards) are not handled by the fused path")
    if any(torch.is_complex(params[i]) for i in others):
        return _eager_with_reason(eager, "complex parameters are not handled by the fused path")
    lists = (params, grads, exp_avgs) + ((exp_avg_sqs, preconds) if preconditioned else ())
    neg_step_size = [-lr / (1 - beta1**step) for step in steps]
    kernel_call = None
    if kernel_indices:
        picked = [[t[i] for i in kernel_indices] for t in lists] + ([] if preconditioned else [[], []])
        picked.append([state_steps[i] for i in kernel_indices])
        kernel_call = _KernelCall(
            picked,
            [neg_step_size[i] for i in kernel_indices],
            scalar_values + [0.0] * (_SLOTS - len(scalar_values)),
            modes,
            _KERNEL_REFRESH_MODES[gamma_mode] if refreshing else 0,
            weighted,
        )
    reason = fused_unavailable_reason() if others else None
    if reason is not None:
        _log_once(logging.INFO, "Anon fused=True: %s; these tensors take the foreach path.", reason)
        chunks = []
        eager_only = [i for i in others if params[i].numel() > 0]
        done = [i for i in others if params[i].numel() == 0]
    else:
        chunks, eager_only, done = _plan(params, grads, exp_avgs, exp_avg_sqs, preconds, others)
    work = []
    for group_key, indices in chunks:
        device, dtype = group_key[0], group_key[1]
        compute = torch.promote_types(dtype, torch.float32)
        scalars = torch.tensor(scalar_values, dtype=compute, device=device)
        neg_step_sizes = torch.tensor([neg_step_size[i] for i in indices], dtype=compute, device=device)
        torch._dynamo.mark_static(scalars)
        torch._dynamo.mark_static(neg_step_sizes)
        # detach(): plain tensors (dynamo keeps an nn.Parameter's shape static) that are not views (dynamo guards
        # on a view's base), so one graph with dynamic shapes serves every shape of a rank.
        tensors = [[t[i].detach() for i in indices] for t in lists]
        tensors += [] if preconditioned else [[], []]
        work.append((group_key + (modes, len(indices)), indices, tensors, scalars, neg_step_sizes))

    keeps = []
    if refreshing:
        # Every verdict first, so that a raise leaves the step unwritten.
        if kernel_call is not None:
            bad = [i for i, ok in zip(kernel_indices, kernel_call.check(), strict=True) if not ok]
            if bad and on_nonfinite == "raise":
                raise NonFinitePreconditionerError(steps[0], bad[0], tuple(preconds[bad[0]].shape))
        for key, indices, tensors, scalars, _ in work:
            try:
                flags = _run(("flags", gamma_mode, has_prev) + key, *tensors, scalars, key[-2], gamma_mode, has_prev)
            except _CompileFailed:
                stats["fallback"] += 1
                return eager()
            bad = [position for position, ok in enumerate(flags.tolist()) if not ok]
            if bad and on_nonfinite == "raise":
                raise NonFinitePreconditionerError(steps[0], indices[bad[0]], tuple(preconds[indices[bad[0]]].shape))
            keeps.append(flags)

    if kernel_call is not None:
        kernel_call.write()  # advances its tensors' step counters too
        stats["kernel"] += 1
    for number, (key, indices, tensors, scalars, neg_step_sizes) in enumerate(work):
        try:
            if refreshing:
                run_key = ("refresh", gamma_mode, has_prev) + key
                _run(run_key, *tensors, scalars, neg_step_sizes, keeps[number], key[-2], gamma_mode, has_prev)
            else:
                _run(("step",) + key, *tensors, scalars, neg_step_sizes, key[-2])
        except _CompileFailed:  # nothing of this call was written: it and the rest take the foreach path
            eager_only += [i for _, later, *_ in work[number:] for i in later]
            break
        done += indices
        stats["compiled"] += 1
        _log_once(
            logging.INFO,
            "Anon fused=True: steps run torch.compile'd graphs (inductor), compiled on first use per dtypes, chunk "
            "size and kind of step (ordinary, refresh).",
        )
    if done:
        torch._foreach_add_([state_steps[i] for i in done], 1)
    if eager_only:
        stats["fallback"] += 1
        eager(sorted(eager_only))
    return [steps[0]] if refreshing else []


# Refresh modes of the C++ kernel (0: an ordinary step); it picks log space per block where needed.
_KERNEL_REFRESH_MODES = {"one": 1, "pow": 2, "log": 2}
_SLOTS = 13


def _kernel_indices(params, grads, exp_avgs, exp_avg_sqs, preconds) -> tuple[list[int], list[int]]:
    """Split tensor indices into those the C++ kernel steps and the rest (``anon_hf._cpu_kernel``)."""
    from . import _cpu_kernel

    if not any(p.device.type == "cpu" for p in params) or _cpu_kernel.kernel_unavailable_reason() is not None:
        return [], list(range(len(params)))
    kernel_indices, others = [], []
    for i, supported in enumerate(_cpu_kernel.kernel().anon_supported(params, grads, exp_avgs, exp_avg_sqs, preconds)):
        (kernel_indices if supported else others).append(i)
    return kernel_indices, others


class _KernelCall:
    """One step of the C++ kernel over lists of CPU tensors (params, grads, exp_avgs, exp_avg_sqs, preconds, step
    counters): ``check()`` returns a refresh's verdicts and writes nothing, then ``write()``."""

    def __init__(self, tensors, neg_step_sizes, scalars, modes, refresh_mode: int, weighted: bool):
        self.tensors = tensors
        self.args = (neg_step_sizes, scalars, modes[0], modes[1], refresh_mode, weighted)
        self.keep: list[bool] = []

    def check(self) -> list[bool]:
        from ._cpu_kernel import kernel

        self.keep = kernel().anon_step(*self.tensors, *self.args, True, [])
        return self.keep

    def write(self) -> None:
        from ._cpu_kernel import kernel

        kernel().anon_step(*self.tensors, *self.args, False, self.keep)


def _eager_with_reason(eager: Callable, reason: str) -> list[int]:
    stats["fallback"] += 1
    _log_once(logging.INFO, "Anon fused=True: %s; these tensors take the foreach path.", reason)
    return eager()


def _chunk_sizes(count: int, numel: int) -> list[int]:
    """Split ``count`` tensors of ``numel`` elements into graph calls of 16, 4 or 1 tensors.

    Calls hold up to ~2**22 elements (16 tensors up to 262144 elements, 4 up to 2**20, 1 above), so the Python
    overhead of a call (~30 us) stays small against its memory traffic, and only three graphs per kind of step
    serve every model.
    """
    largest = 16 if numel * 16 <= _CHUNK_ELEMENTS else 4 if numel * 4 <= _CHUNK_ELEMENTS else 1
    sizes = []
    for size in (16, 4, 1):
        if size <= largest:
            sizes += [size] * (count // size)
            count %= size
    return sizes


_CHUNK_ELEMENTS = 1 << 22


def _plan(
    params, grads, exp_avgs, exp_avg_sqs, preconds, indices: list[int]
) -> tuple[list[tuple[tuple, list[int]]], list[int], list[int]]:
    """Group the tensors at ``indices`` into graph calls: same device, dtypes and shape, then chunks
    (``_chunk_sizes``).

    Returns ``(chunks, eager_only, empty)``: each chunk is ``(key, indices)`` with tensors of one shape, the key
    naming the graph (device, dtypes, preconditioned, rank); tensors that are not all contiguous (a transposed
    param, a gradient laid out differently) are in ``eager_only``; empty tensors (only their step counter advances)
    in ``empty``.
    """
    preconditioned = len(preconds) > 0
    groups: dict[tuple, list[int]] = {}
    eager_only, empty = [], []
    for i in indices:
        param = params[i]
        numel = param.numel()
        if numel == 0:
            empty.append(i)
            continue
        state = (exp_avgs[i], exp_avg_sqs[i], preconds[i]) if preconditioned else (exp_avgs[i],)
        if not (param.is_contiguous() and grads[i].is_contiguous() and all(t.is_contiguous() for t in state)):
            eager_only.append(i)
            continue
        dtypes = (grads[i].dtype,) + tuple(t.dtype for t in state)
        # A chunk holds tensors of one shape: their sizes share symbols, and the graph is the same for every shape
        # of that rank (dims equal to each other or to 1 add a variant or two).
        groups.setdefault((param.device, param.dtype, dtypes, preconditioned, tuple(param.shape)), []).append(i)
    chunks = []
    for key, indices in groups.items():
        start = 0
        for size in _chunk_sizes(len(indices), params[indices[0]].numel()):
            chunks.append((key[:4] + (len(key[4]),), indices[start : start + size]))
            start += size
    return chunks, eager_only, empty
