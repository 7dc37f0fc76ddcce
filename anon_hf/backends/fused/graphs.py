"""The compiled backend: ``torch.compile``'d graphs that update a chunk of same-shaped tensors in one pass each.

Dynamo traces the update of a chunk once and inductor compiles it into one loop per tensor that touches each byte
once. This is what CUDA tensors run, and CPU tensors the C++ kernel does not take.

* Graphs are compiled with dynamic shapes, so a graph depends only on the dtypes, the rank, whether a
  preconditioner exists, whether L2 decay and bounds are on, the number of tensors in a call (16, 4 or 1, all of one
  shape) and the kind of step: a few graphs serve every model, param group and optimizer of the process.
* Every hyperparameter that may change between steps enters through the ``scalars`` tensor
  (``anon_hf.backends.fused.scalars``), so nothing recompiles when a scheduler moves lr.
* A refresh runs two graphs: a reduction that tells, per tensor, whether the new accumulator and preconditioner are
  finite as stored (:meth:`GraphCalls.check`), then the step with the refresh folded in (:meth:`GraphCalls.write`).
  How ``sigma**gamma`` is computed is decided by ``anon_hf.refresh.refresh_mode`` and handed in.
* Each graph gets a code object of its own, because dynamo keeps its cache and recompile limit per code object.

A failure of dynamo or inductor disables the graphs for the process (one warning); the tensors then take the eager
foreach path.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
import types
from collections.abc import Callable

import torch
from torch import Tensor

from ...distributed.dtensor import is_dtensor
from ...storage import quant8
from .scalars import SLOT
from .telemetry import log_once, logger, stats

__all__ = ["CompileFailed", "GraphCalls", "fused_unavailable_reason", "step_8bit"]

# Compiled graphs, least recently used first. Each holds one chunk's kernels; 64 covers many optimizers and groups.
_MAX_GRAPHS = 64
_graphs: collections.OrderedDict[tuple, Callable] = collections.OrderedDict()
_ran: set[tuple] = set()  # keys whose graph has compiled and run at least once
_graph_ids = itertools.count()
_disabled_reason: str | None = None

_DECAY, _WEIGHT1, _BETA2, _WEIGHT2 = SLOT["decay"], SLOT["weight1"], SLOT["beta2"], SLOT["weight2"]
_SIGN, _L2, _LO, _HI = SLOT["sign"], SLOT["l2"], SLOT["lo"], SLOT["hi"]
_EPS, _GAMMA, _MAX_RATIO = SLOT["eps"], SLOT["gamma"], SLOT["max_ratio"]
_WEIGHT_PREV, _WEIGHT_NEW = SLOT["weight_prev"], SLOT["weight_new"]


def _moments(params, grads, exp_avgs, exp_avg_sqs, i: int, scalars: Tensor, modes: tuple, preconditioned: bool):
    """Tensor ``i``'s param, new first moment and new accumulator (``None`` without a preconditioner), in
    ``scalars.dtype``; nothing is written."""
    compute = scalars.dtype
    param = params[i].to(compute)
    grad = grads[i].to(compute) * scalars[_SIGN]
    if modes[0]:  # L2 decay
        grad = grad + param * scalars[_L2]
    exp_avg = exp_avgs[i].to(compute)
    # torch.lerp's own formula for weights < 0.5 (beta1 > 0.5), without its per-element branch.
    exp_avg = exp_avg + (grad - exp_avg) * scalars[_WEIGHT1]
    exp_avg_sq = None
    if preconditioned:
        exp_avg_sq = exp_avg_sqs[i].to(compute) * scalars[_BETA2] + grad * grad * scalars[_WEIGHT2]
    return param, exp_avg, exp_avg_sq


def _new_precond(exp_avg_sq: Tensor, precond: Tensor, scalars: Tensor, inv_bias2: Tensor, refresh: tuple) -> Tensor:
    """The refreshed preconditioner as ``anon_hf.refresh.refreshed_preconditioner`` defines it, in
    ``scalars.dtype``. ``refresh = (mode, averaging, keep_unseen)``: the mode of ``refresh_mode``, whether
    ``beta3 > 0`` (the first refresh then has ``weight_prev == 0``) and the keep rule."""
    mode, averaging, keep_unseen = refresh
    previous = precond.to(scalars.dtype)
    sigma = exp_avg_sq * inv_bias2 + scalars[_EPS]
    # The mean starts where there is no previous estimate: the first refresh, or (keep_unseen) v still 0.
    averaged = scalars[_WEIGHT_PREV] > 0
    if keep_unseen:
        averaged = averaged & (previous > 0)
    if mode == "log":
        log_power = torch.log(sigma) * scalars[_GAMMA]
        log_u = log_power
        if averaging:
            log_prev = torch.log(previous) * -2.0 + torch.log(scalars[_WEIGHT_PREV])
            log_mean = torch.logaddexp(log_prev, log_power + torch.log(scalars[_WEIGHT_NEW]))
            log_u = torch.where(averaged, log_mean, log_power)
        new = torch.exp(log_u * -0.5)
    else:
        power = sigma if mode == "one" else torch.pow(sigma, scalars[_GAMMA])
        u = power
        if averaging:
            inverse = torch.reciprocal(previous)
            u = torch.where(averaged, power * scalars[_WEIGHT_NEW] + inverse * inverse * scalars[_WEIGHT_PREV], power)
        new = torch.rsqrt(u)
    return torch.where(exp_avg_sq == 0, previous, new) if keep_unseen else new


def _between_refreshes(exp_avg_sq: Tensor, precond: Tensor, scalars: Tensor, inv_bias2: Tensor, rule) -> Tensor:
    """What a step between refreshes multiplies the first moment by, as ``anon_hf.refresh.StepRule`` defines it, in
    ``scalars.dtype``; ``rule`` is the group's ``StepRule`` (its ``estimate_mode`` not None)."""
    previous = precond.to(scalars.dtype)
    sigma = exp_avg_sq * inv_bias2 + scalars[_EPS]
    if rule.estimate_mode == "one":
        estimate = torch.rsqrt(sigma)
    elif rule.estimate_mode == "pow":
        estimate = torch.pow(sigma, scalars[_GAMMA] * -0.5)
    else:
        estimate = torch.exp(torch.log(sigma) * (scalars[_GAMMA] * -0.5))
    used = torch.minimum(previous, estimate * scalars[_MAX_RATIO]) if rule.limit else previous
    if rule.late_seen:
        # A select, not a product: est may be inf where s == 0, and 0 * inf would be nan.
        late = torch.where(exp_avg_sq > 0, estimate, torch.zeros_like(estimate))
        used = torch.where(previous == 0, late, used)
    return used


def _project(new_param: Tensor, scalars: Tensor, modes: tuple) -> Tensor:
    """Clamp to the box ``[lo, hi]`` when ``bounds`` is set (``modes[1]``)."""
    return torch.clamp(new_param, scalars[_LO], scalars[_HI]) if modes[1] else new_param


def _step_graph(
    params, grads, exp_avgs, exp_avg_sqs, preconds, scalars, neg_step_sizes, inv_bias2s, modes: tuple, rule
) -> None:
    """The update between refreshes, rounded once into each storage. ``neg_step_sizes[i] = -lr / (1 - beta1**t_i)``,
    ``inv_bias2s[i]`` the accumulator's inverse bias correction at that step; ``exp_avg_sqs`` and ``preconds`` are
    both empty when the preconditioner is all ones (gamma == 0); ``rule`` is the group's
    ``anon_hf.refresh.StepRule``, or ``None`` where it leaves ``v`` as it is."""
    preconditioned = len(preconds) > 0
    for i in range(len(params)):
        param, exp_avg, exp_avg_sq = _moments(params, grads, exp_avgs, exp_avg_sqs, i, scalars, modes, preconditioned)
        exp_avgs[i].copy_(exp_avg)
        update = exp_avg
        if preconditioned:
            exp_avg_sqs[i].copy_(exp_avg_sq)
            precond = preconds[i].to(scalars.dtype)
            if rule is not None:
                precond = _between_refreshes(exp_avg_sq, precond, scalars, inv_bias2s[i], rule)
            update = exp_avg * precond
        new_param = param * scalars[_DECAY] + update * neg_step_sizes[i]
        params[i].copy_(_project(new_param, scalars, modes))


def _flags_graph(params, grads, exp_avgs, exp_avg_sqs, preconds, scalars, inv_bias2s, modes: tuple, refresh: tuple):
    """Per tensor, whether this refresh's accumulator and new preconditioner, as stored, are all finite; writes
    nothing."""
    flags = []
    for i in range(len(params)):
        _, _, exp_avg_sq = _moments(params, grads, exp_avgs, exp_avg_sqs, i, scalars, modes, True)
        new = _new_precond(exp_avg_sq, preconds[i], scalars, inv_bias2s[i], refresh)
        stored = new.to(preconds[i].dtype).to(scalars.dtype)
        # s * 0 is nan exactly where s is inf or nan: one reduction covers both tensors, with no temporary.
        flags.append(torch.isfinite(exp_avg_sq * 0.0 + stored).all())
    return torch.stack(flags)


def _refresh_graph(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    preconds,
    scalars,
    neg_step_sizes,
    inv_bias2s,
    keep,
    modes: tuple,
    refresh: tuple,
) -> None:
    """A refresh step: moments, the new preconditioner (the old one where ``keep[i]`` is False), accumulator reset,
    then the update with the preconditioner as stored."""
    compute = scalars.dtype
    for i in range(len(params)):
        param, exp_avg, exp_avg_sq = _moments(params, grads, exp_avgs, exp_avg_sqs, i, scalars, modes, True)
        exp_avgs[i].copy_(exp_avg)
        precond = _new_precond(exp_avg_sq, preconds[i], scalars, inv_bias2s[i], refresh)
        preconds[i].copy_(torch.where(keep[i], precond, preconds[i].to(compute)))
        exp_avg_sqs[i].zero_()
        new_param = param * scalars[_DECAY] + exp_avg * preconds[i].to(compute) * neg_step_sizes[i]
        params[i].copy_(_project(new_param, scalars, modes))


def _step_8bit_graph(params, grads, states, scalars, neg_step_sizes, inv_bias2s, modes: tuple, rule) -> None:
    """``Anon8bit``'s step between refreshes, one pass per tensor: decode the 8-bit state with ``anon_hf.storage.quant8``'s
    maps, Anon's update in ``scalars.dtype``, encode ``exp_avg`` and ``exp_avg_sq`` again; ``precond`` is only read.
    ``states[i]`` is tensor ``i``'s state dict (codes and side values, as ``Anon8bit`` stores them); without
    ``precond`` (gamma == 0) the preconditioner is all ones."""
    for i in range(len(params)):
        state = states[i]
        preconditioned = "precond" in state
        decoded = {key: quant8.dequantize(key, state) for key in quant8.QUANTIZED_KEYS if key in state}
        moments = ([params[i]], [grads[i]], [decoded["exp_avg"]], [decoded["exp_avg_sq"]] if preconditioned else [])
        param, exp_avg, exp_avg_sq = _moments(*moments, 0, scalars, modes, preconditioned)
        update = exp_avg
        if preconditioned:
            precond = decoded["precond"]
            if rule is not None:
                precond = _between_refreshes(exp_avg_sq, precond, scalars, inv_bias2s[i], rule)
            update = exp_avg * precond
        params[i].copy_(_project(param * scalars[_DECAY] + update * neg_step_sizes[i], scalars, modes))
        for key, value in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            if value is not None:
                for name, encoded in quant8.quantize(key, value).items():
                    state[name].copy_(encoded)


_KINDS = {"step": _step_graph, "flags": _flags_graph, "refresh": _refresh_graph, "step_8bit": _step_8bit_graph}


def _graph_for(key: tuple) -> Callable:
    graph = _graphs.get(key)
    if graph is not None:
        _graphs.move_to_end(key)
        return graph
    # A code object of its own per chunk key: dynamo's cache and recompile limit live on the code object.
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


class CompileFailed(Exception):
    """Dynamo or inductor failed; nothing of the call was written."""


def _run(key: tuple, *args):
    """Run the graph for ``key``, raising :class:`CompileFailed` (nothing written) when dynamo or inductor fail.

    A failure, on a graph's first call or on a recompile for new shapes (one that fails or exceeds dynamo's
    recompile limit), disables the graphs for the process: the foreach path takes over from there.
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
        raise CompileFailed from err
    if first:
        _ran.add(key)
        stats["compiles"] += 1
        logger.info(
            "Anon fused=True: compiled a %s graph for %d tensors in %.1f s (inductor's cache: TORCHINDUCTOR_CACHE_DIR)",
            key[0],
            len(args[0]),
            time.perf_counter() - started,
        )
    return result


def _disable(reason: str) -> None:
    global _disabled_reason
    _disabled_reason = reason
    logger.warning("Anon fused=True: %s; every later step takes the foreach path instead.", reason)


def fused_unavailable_reason(params: list[Tensor] | None = None) -> str | None:
    """Why the compiled graphs cannot run (for ``params``, if given) in this process, or ``None`` if they can."""
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


class GraphCalls:
    """One step of the compiled graphs over ``chunks`` (``(key, indices)`` from ``anon_hf.backends.fused.plan``).

    ``lists`` are the parallel tensor lists ``(params, grads, exp_avgs, exp_avg_sqs, preconds)``, the last two empty
    without a preconditioner; ``per_tensor`` is ``(neg_step_sizes, inv_bias2s)``, indexed like ``lists``;
    ``refresh`` is ``(mode, averaging, keep_unseen)`` on a refresh step, else ``None``; ``rule`` is the group's
    ``anon_hf.refresh.StepRule`` on an ordinary step, else ``None`` (also where it leaves ``v`` as it is).
    """

    def __init__(self, chunks, lists, scalar_values, per_tensor, modes: tuple, refresh: tuple | None, rule):
        self.refresh, self.modes, self.rule = refresh, modes, rule
        self.calls = []
        preconditioned = len(lists[4]) > 0
        for key, indices in chunks:
            device, dtype = key[0], key[1]
            compute = torch.promote_types(dtype, torch.float32)
            scalars = torch.tensor(scalar_values, dtype=compute, device=device)
            sizes, inv_bias2s = (
                torch.tensor([values[i] for i in indices], dtype=compute, device=device) for values in per_tensor
            )
            for static in (scalars, sizes, inv_bias2s):
                torch._dynamo.mark_static(static)
            # detach(): plain tensors (dynamo keeps an nn.Parameter's shape static) that are not views (dynamo guards
            # on a view's base), so one graph with dynamic shapes serves every shape of a rank.
            tensors = [[t[i].detach() for i in indices] for t in lists[: 5 if preconditioned else 3]]
            tensors += [] if preconditioned else [[], []]
            self.calls.append((key + (modes, len(indices)), indices, tensors, scalars, (sizes, inv_bias2s)))
        self.keeps: list[Tensor] = []

    def check(self) -> dict[int, bool]:
        """A refresh's verdict per tensor index (finite as stored); writes nothing. Raises :class:`CompileFailed`."""
        verdicts = {}
        for key, indices, tensors, scalars, (_, inv_bias2s) in self.calls:
            flags = _run(("flags", self.refresh) + key, *tensors, scalars, inv_bias2s, self.modes, self.refresh)
            self.keeps.append(flags)
            verdicts.update(zip(indices, flags.tolist(), strict=True))
        return verdicts

    def write(self) -> tuple[list[int], list[int]]:
        """Step every chunk (after :meth:`check` on a refresh). Returns ``(done, left)``: the indices stepped, and
        those left for the eager path because the compiler failed (nothing of theirs was written)."""
        done: list[int] = []
        for number, (key, indices, tensors, scalars, per_tensor) in enumerate(self.calls):
            try:
                if self.refresh is not None:
                    keep = self.keeps[number]
                    args = (*tensors, scalars, *per_tensor, keep, self.modes, self.refresh)
                    _run(("refresh", self.refresh) + key, *args)
                else:
                    _run(("step", self.rule) + key, *tensors, scalars, *per_tensor, self.modes, self.rule)
            except CompileFailed:
                return done, [i for _, later, *_ in self.calls[number:] for i in later]
            done += indices
            stats["compiled"] += 1
            log_once(
                logging.INFO,
                "Anon fused=True: steps run torch.compile'd graphs (inductor), compiled on first use per dtypes, "
                "chunk size and kind of step (ordinary, refresh).",
            )
        return done, []


def step_8bit(params, grads, states, scalar_values, per_tensor, modes: tuple, rule) -> None:
    """Step ``Anon8bit``'s tensors between refreshes through a compiled graph (:func:`_step_8bit_graph`); their step
    counters are the caller's. ``per_tensor`` is ``(neg_step_sizes, inv_bias2s)``; ``rule`` as in :class:`GraphCalls`.
    Raises :class:`CompileFailed` with nothing written."""
    device = params[0].device
    compute = torch.promote_types(params[0].dtype, torch.float32)
    scalars = torch.tensor(scalar_values, dtype=compute, device=device)
    sizes, inv_bias2s = (torch.tensor(values, dtype=compute, device=device) for values in per_tensor)
    for static in (scalars, sizes, inv_bias2s):
        torch._dynamo.mark_static(static)
    preconditioned = "precond" in states[0]
    key = ("step_8bit", rule, device, params[0].dtype, preconditioned, modes, len(params))
    _run(key, [p.detach() for p in params], list(grads), states, scalars, sizes, inv_bias2s, modes, rule)
    stats["compiled_8bit"] += 1
