"""``AnonCallback``: Anon's refreshes and preconditioner statistics in the Trainer's logs.

At each refresh of the preconditioner the callback measures, per param group, the minimum, median and maximum
of the preconditioner ``v`` (``optimizer.state[p]["precond"]``) and the resulting per-element step sizes
``lr * v``, and forces a log line at that step. The values join that line's ``logs`` dict, so they reach
``trainer.state.log_history`` and every reporting integration (TensorBoard, W&B, ...) beside ``loss`` and
``grad_norm``. With the default ``refresh="pow2"`` that is O(log T) extra log lines in a run of T steps.

Logged keys (``i`` is the index of the param group; the Trainer builds group 0 with weight decay and group 1,
biases and norm weights, without; groups with ``gamma == 0`` have ``v == 1`` and are left out):

* ``anon/refresh_step``: the optimizer step at which the preconditioner was rebuilt;
* ``anon/group{i}/precond_min``, ``anon/group{i}/precond_median``, ``anon/group{i}/precond_max``;
* ``anon/group{i}/step_size_median``: ``lr * median(v)``, the typical per-element step applied to the
  bias-corrected momentum;
* ``anon/group{i}/step_size_spread``: ``max(v) / min(v)``, how far apart the largest and smallest per-element
  step sizes are (1 for SGD-like, large for strongly adaptive steps);
* ``anon/group{i}/unseen_fraction``: the fraction of elements no refresh has seen a gradient of yet (``v == 0``
  with ``keep_unseen``, e.g. embedding rows of tokens not met so far); min, median and max are over the others.

Min and max are exact. The median comes from a histogram of ``log v`` with ``bins`` bins between the min and
the max, so its relative error is at most ``(max / min) ** (1 / (2 * bins)) - 1`` (0.7 % for a spread of 1e6
with the default 1024 bins), without gathering or sorting the state.

In a distributed run (DDP, DeepSpeed ZeRO's flat partitions, FSDP2's DTensor shards) each rank measures its
local tensors and two all-reduces (max, then sum of histograms) over the default process group combine them.
Every rank runs them: the Trainer calls callbacks on every rank and all ranks refresh at the same step.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from transformers.trainer_callback import TrainerCallback

from ..distributed.dtensor import local
from ..optimizer import Anon
from ..storage import quant8
from .final_optimizer import RequestedAnon, check_optimizer_that_trains
from .routes import find_anon

__all__ = ["AnonCallback", "add_anon_callback", "find_anon", "preconditioner_stats", "zero3_group_tensors"]

logger = logging.getLogger(__name__)

_MAX_WRAPPERS = 8


def zero3_group_tensors(optimizer: Any) -> dict[int, list[Tensor]] | None:
    """Param group index -> its flat fp32 partitions, when ``optimizer`` wraps DeepSpeed's ZeRO-3 optimizer.

    ZeRO-3 puts a sub-group's partition into the inner optimizer's param group only for the duration of that
    ``step()`` call and empties the group afterwards, so the groups hold no tensors when a callback looks. The
    partitions and their group stay on the ZeRO-3 object. None for anything else.
    """
    for _ in range(_MAX_WRAPPERS):
        if optimizer is None:
            return None
        flats = getattr(optimizer, "fp32_partitioned_groups_flat", None)
        mapping = getattr(optimizer, "sub_group_to_group_id", None)
        if isinstance(flats, list) and isinstance(mapping, dict):
            groups: dict[int, list[Tensor]] = {}
            for sub_group, flat in enumerate(flats):
                if flat is not None:
                    groups.setdefault(mapping[sub_group], []).append(flat)
            return groups
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _collective_device(tensor_device: torch.device) -> torch.device:
    backend = str(dist.get_backend())
    if tensor_device.type == "cpu" and "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return tensor_device


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _precond(state: dict) -> Tensor:
    """A tensor's preconditioner v as this rank's float tensor; Anon8bit's 8-bit codes are decoded (one at a time)."""
    if "precond_log2_min" in state:
        return quant8.dequantize("precond", state)
    return local(state["precond"]).detach()


def preconditioner_stats(
    optimizer: Anon, *, bins: int = 1024, params_by_group: dict[int, list[Tensor]] | None = None
) -> dict[str, float]:
    """Per param group min/median/max of the preconditioner and the spread of the step sizes ``lr * v``.

    In a distributed run this is a collective: every rank must call it, at the same point. Returns ``{}`` when no
    group holds a preconditioner yet (before the first step, or ``gamma == 0`` everywhere).

    Args:
        optimizer: an :class:`~anon_hf.Anon` (unwrap accelerate/DeepSpeed wrappers with :func:`find_anon`).
        bins: histogram bins for the median; its relative error is at most ``spread ** (1 / (2 * bins)) - 1``.
        params_by_group: the tensors of a param group whose ``"params"`` list is empty between steps (DeepSpeed
            ZeRO-3, see :func:`zero3_group_tensors`); groups with tensors of their own use those.

    Returns:
        ``{"anon/group{i}/precond_min": float, ..._median, ..._max, ...step_size_median, ...step_size_spread}``.
    """
    groups = _groups_with_preconditioners(optimizer, params_by_group)
    distributed = _distributed()
    if not groups or (not distributed and not any(tensors for _, _, tensors in groups)):
        return {}
    first = next((_precond(state) for _, _, states in groups for state in states), None)
    device = first.device if first is not None else torch.device("cpu")
    if distributed:
        device = _collective_device(device)
    lows, highs = _extremes(groups, device, distributed)
    counts = _log_histograms(groups, lows, highs, bins, device, distributed)
    stats: dict[str, float] = {}
    for row, (index, lr, _) in enumerate(groups):
        lo, hi = lows[row], highs[row]
        unseen, total = counts[row, bins].item(), counts[row, bins + 1].item()
        if not lo <= hi:  # no elements on any rank, or none seen yet
            if total > 0:
                stats[f"anon/group{index}/unseen_fraction"] = unseen / total
            continue
        median = _histogram_median(counts[row, :bins], lo, hi)
        prefix = f"anon/group{index}/"
        stats[prefix + "precond_min"] = lo
        stats[prefix + "precond_median"] = median
        stats[prefix + "precond_max"] = hi
        stats[prefix + "step_size_median"] = lr * median
        stats[prefix + "step_size_spread"] = hi / lo if lo > 0 else math.inf
        stats[prefix + "unseen_fraction"] = unseen / total
    return stats


def _groups_with_preconditioners(optimizer: Anon, params_by_group) -> list[tuple[int, float, list[dict]]]:
    """``(group index, lr, states with a non-empty local preconditioner)`` for each group that keeps one."""
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        params = group["params"] or (params_by_group or {}).get(index, [])
        states = [optimizer.state[p] for p in params if "precond" in optimizer.state.get(p, {})]
        if group["gamma"] == 0 and not states:
            continue
        lr = group["lr"].item() if isinstance(group["lr"], Tensor) else float(group["lr"])
        groups.append((index, lr, [state for state in states if local(state["precond"]).numel() > 0]))
    return groups


def _extremes(groups, device: torch.device, distributed: bool) -> tuple[list[float], list[float]]:
    """Per group the exact min (over v > 0: v == 0 marks an element not seen yet) and max of v over every rank, as
    one max-reduction over (-min, max) pairs; inf/-inf mark "no elements here"."""
    extremes = torch.full((len(groups), 2), -math.inf, dtype=torch.float64, device=device)
    for row, (_, _, states) in enumerate(groups):
        for t in map(_precond, states):
            smallest_seen = torch.where(t > 0, t, math.inf).min()
            extremes[row, 0] = torch.maximum(extremes[row, 0], -smallest_seen.to(device, torch.float64))
            extremes[row, 1] = torch.maximum(extremes[row, 1], t.max().to(device, torch.float64))
    if distributed:
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    return (-extremes[:, 0]).tolist(), extremes[:, 1].tolist()


def _log_histograms(groups, lows, highs, bins: int, device: torch.device, distributed: bool) -> Tensor:
    """Per group (rows, float64 on CPU) a histogram of log v between the global min and max in ``bins`` columns,
    summed over ranks (histc leaves out log 0 = -inf), then the count of unseen elements and of all elements."""
    counts = torch.zeros((len(groups), bins + 2), dtype=torch.float64, device=device)
    for row, (_, _, states) in enumerate(groups):
        lo, hi = lows[row], highs[row]
        for t in map(_precond, states):
            counts[row, bins] += (t == 0).sum().to(device, torch.float64)
            counts[row, bins + 1] += t.numel()
            if 0.0 < lo < hi < math.inf:
                hist = torch.histc(t.float().log(), bins=bins, min=math.log(lo), max=math.log(hi))
                counts[row, :bins] += hist.to(device, torch.float64)
    if distributed:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts.cpu()


def _histogram_median(counts: Tensor, lo: float, hi: float) -> float:
    """The median of values whose log histogram between ``lo`` and ``hi`` is ``counts`` (1-D, float64)."""
    if 0.0 < lo < hi < math.inf:
        cumulative = counts.cumsum(0)
        k = int(torch.searchsorted(cumulative, cumulative[-1] / 2).item())
        width = (math.log(hi) - math.log(lo)) / len(counts)
        return math.exp(math.log(lo) + (k + 0.5) * width)
    return lo if lo == hi else float("nan")  # all equal (e.g. v == 1), or an inf entry: no log histogram


class AnonCallback(TrainerCallback):
    """Logs each refresh of Anon's preconditioner and its statistics per param group into the Trainer's logs.

    Added automatically to every ``Trainer`` built with ``optim="anon"`` (or given an Anon optimizer); remove
    it with ``trainer.remove_callback(AnonCallback)``. To add it yourself, prefer :func:`add_anon_callback`,
    which puts it first so the reporting integrations see its keys. Nothing is logged when
    ``logging_strategy="no"``. The keys are listed in this module's docstring.

    Args:
        bins (int, optional): histogram bins for the median (default: 1024).
    """

    def __init__(self, bins: int = 1024):
        if not isinstance(bins, int) or bins < 2:
            raise ValueError(f"Invalid bins value: {bins!r} (allowed: an integer >= 2)")
        self.bins = bins
        self._last_refresh: int | None = None
        self._pending: dict[str, float] | None = None
        self._requested: RequestedAnon | None = None
        self._trainer: weakref.ref | None = None

    def expect(self, requested: RequestedAnon | None, trainer: Any = None) -> None:
        """Check at ``on_train_begin`` that the optimizer which trains is ``requested`` (see ``final_optimizer.py``).

        The Trainer patch calls this with what the Trainer was asked for; ``trainer`` (kept as a weak reference)
        lets the error say what replaced Anon.
        """
        self._requested = requested
        self._trainer = None if trainer is None else weakref.ref(trainer)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self._requested is not None:
            trainer = self._trainer() if self._trainer is not None else None
            check_optimizer_that_trains(self._requested, optimizer, trainer, args)
        anon = find_anon(optimizer)
        self._last_refresh = anon.refresh_history[-1] if anon is not None and anon.refresh_history else None
        self._pending = None
        if anon is not None and state.global_step > 0 and not any(anon.state.values()) and state.is_world_process_zero:
            # The Trainer resumes from a checkpoint without optimizer.pt without a word; for Anon that restarts the
            # preconditioner, its average and the refresh schedule from step 1.
            logger.warning(
                "Resuming at step %d with no Anon optimizer state (the checkpoint has no optimizer.pt?): Anon starts "
                "its moments, preconditioner and refresh schedule afresh, so the run will not continue the one that "
                "wrote the checkpoint.",
                state.global_step,
            )

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if str(getattr(args.logging_strategy, "value", args.logging_strategy)) == "no":
            return
        anon = find_anon(optimizer)
        if anon is None or not anon.refresh_history or anon.refresh_history[-1] == self._last_refresh:
            return
        self._last_refresh = anon.refresh_history[-1]
        stats = preconditioner_stats(anon, bins=self.bins, params_by_group=zero3_group_tensors(optimizer))
        self._pending = {"anon/refresh_step": self._last_refresh, **stats}
        control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None or logs is None:
            return
        logs.update(self._pending)
        # Trainer.log appended a copy of `logs` to the history just before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        if state.is_world_process_zero:
            logger.info("Anon refreshed its preconditioner at step %d", self._pending["anon/refresh_step"])
        self._pending = None


def add_anon_callback(trainer: Any, callback: AnonCallback | None = None) -> AnonCallback:
    """Insert an :class:`AnonCallback` first in ``trainer``'s callbacks, so every reporter's ``on_log`` sees its keys.

    Returns the callback; ``trainer.remove_callback(AnonCallback)`` takes it out again.
    """
    callback = callback if callback is not None else AnonCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
