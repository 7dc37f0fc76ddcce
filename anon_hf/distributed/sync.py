"""Checks that every rank of a distributed run refreshes Anon's preconditioner on the same step.

Anon's refresh is driven by each tensor's own step counter, which all ranks advance together in a healthy run
(ZeRO skips the inner ``step()`` on every rank at once on fp16 overflow). If one rank's counters drift (a
partial checkpoint load, a hand-edited state), its preconditioner is rebuilt at different moments and its
shards quietly disagree with the rest of the model.

The check must not hang when ranks disagree, which a collective would: the rank that refreshes would wait for
one that does not. So it uses the process group's key-value store, without blocking. At its n-th refresh, each
rank publishes how many times ``step()`` had been called and the step it refreshed at; it then compares
itself with its two neighbours (rank - 1 and rank + 1) if they have already published their n-th refresh.
Whichever rank of a disagreeing pair publishes second sees the mismatch and raises. That costs a few store
round trips per refresh, O(log T) over a ``"pow2"`` run, and nothing between refreshes.

DTensor parameters (FSDP2, tensor parallel) change that: the refresh itself runs collectives (the finiteness
verdict on a sharded preconditioner is reduced across ranks), so a rank that refreshes alone blocks in them
while its neighbours block in the next forward, and nobody reaches the check. For those, the check runs
*before* the refresh and waits (at most ``ANON_HF_SYNC_TIMEOUT`` seconds, default 60) for the neighbours to
publish the same refresh; a neighbour that does not arrive is out of sync. In a healthy run the wait is the
skew between ranks, which the refresh's own collectives would have waited for anyway.

Across machines the store is the job's own: the one torchrun's rendezvous (or the launcher's MASTER_ADDR and
MASTER_PORT) gives the process group, served by the launcher of node 0. At its first refresh each rank also
publishes where it runs (node rank, host name, local rank, from the variables the launchers set), so that an
error can name the node of a rank that stepped differently or never arrived.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..schedule import is_refresh_step
from .dtensor import is_dtensor

__all__ = ["RefreshOutOfSyncError", "RefreshSyncChecker", "drain_gloo_workers", "upcoming_collective_refresh"]

logger = logging.getLogger(__name__)

_instance_ids = itertools.count()

TIMEOUT_ENV = "ANON_HF_SYNC_TIMEOUT"
_DEFAULT_TIMEOUT_S = 60.0
# The node rank as each launcher names it: torchrun and accelerate (GROUP_RANK), the deepspeed launcher
# (CROSS_RANK), SLURM (SLURM_NODEID).
_NODE_RANK_ENVS = ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID")


def _wait_timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else _DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"Invalid {TIMEOUT_ENV} value: {raw!r} (allowed: a number of seconds > 0)") from None
    if not seconds > 0:
        raise ValueError(f"Invalid {TIMEOUT_ENV} value: {raw!r} (allowed: a number of seconds > 0)")
    return timedelta(seconds=seconds)


def _node_identity() -> str:
    """Where this process runs, e.g. ``"node 1, host gpu-07, local rank 0"`` (``node ?`` under no known launcher)."""
    node = next((os.environ[name] for name in _NODE_RANK_ENVS if os.environ.get(name)), "?")
    where = f"node {node}, host {socket.gethostname()}"
    local_rank = os.environ.get("LOCAL_RANK")
    return f"{where}, local rank {local_rank}" if local_rank else where


def upcoming_collective_refresh(param_groups: list[dict[str, Any]], state: Any) -> int | None:
    """The step this ``step()`` call will refresh at, if the refresh runs collectives (DTensor params); else None.

    Mirrors the refresh rule of :func:`anon_hf.functional.anon`: a tensor with a gradient refreshes at its next
    step when that step is on its group's schedule and the group keeps a preconditioner.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    upcoming = None
    for group in param_groups:
        for p in group["params"]:
            if p.grad is None or not is_dtensor(p):
                continue
            tensor_state = state[p] if p in state else {}
            if group["gamma"] == 0 and "precond" not in tensor_state:
                continue
            step = int(tensor_state["step"].item()) + 1 if "step" in tensor_state else 1
            if is_refresh_step(step, group["refresh"]):
                upcoming = step if upcoming is None else max(upcoming, step)
    return upcoming


class RefreshOutOfSyncError(RuntimeError):
    """Two ranks refreshed the preconditioner at different optimizer steps."""


class RefreshSyncChecker:
    """Per-optimizer bookkeeping for the cross-rank refresh check.

    Every rank must construct its optimizers in the same order (as SPMD training code does), so that the n-th
    optimizer of each rank shares a key prefix in the store.
    """

    def __init__(self) -> None:
        self.instance_id = next(_instance_ids)
        self.calls = 0
        self._refreshes = 0
        self._store = None
        self._ranks = None  # where each rank runs, shared by every optimizer of the job
        self._store_failed = False

    def count_call(self) -> None:
        self.calls += 1
        if self.calls == 1 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            _drain_gloo_workers_at_exit()

    def _get_store(self):
        if self._store is None and not self._store_failed:
            try:
                from torch.distributed.distributed_c10d import _get_default_store

                default_store = _get_default_store()
                self._store = dist.PrefixStore(f"anon_hf/optimizer{self.instance_id}/", default_store)
                self._ranks = dist.PrefixStore("anon_hf/ranks/", default_store)
            except Exception as err:  # a private torch helper: degrade to no check, loudly, once
                self._store_failed = True
                logger.warning("Anon cannot reach the process group's store (%s); refresh sync is not verified.", err)
        return self._store

    def check(self, step: int, *, wait: bool = False) -> None:
        """Publish this rank's n-th refresh at ``step`` and compare with the neighbours that published theirs.

        With ``wait=True`` (before a refresh that runs collectives) the neighbours' n-th refresh is awaited, up to
        ``ANON_HF_SYNC_TIMEOUT`` seconds; a neighbour that does not publish it by then is out of sync.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        store = self._get_store()
        if store is None:
            return
        try:
            self._check(store, step, wait)
        finally:
            # Hold the job's store only during a check: it must not outlive the process group that owns it.
            self._store = self._ranks = None

    def _check(self, store, step: int, wait: bool) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        index = self._refreshes
        self._refreshes += 1
        try:
            if index == 0:
                self._ranks.set(f"rank{rank}", _node_identity())
            store.set(f"refresh{index}/rank{rank}", f"{self.calls},{step}")
        except Exception as err:  # the store's error types differ across torch versions
            raise RuntimeError(_store_lost_message(rank, err)) from err
        for other in sorted({(rank - 1) % world, (rank + 1) % world} - {rank}):
            key = f"refresh{index}/rank{other}"
            if wait:
                self._wait_for(store, key, index, rank, other, step)
            published = _published(store, key, rank)
            if published is None:
                continue
            other_calls, other_step = published
            if other_calls != self.calls or other_step != step:
                lead = step - self.calls - (other_step - other_calls)
                raise RefreshOutOfSyncError(
                    f"Anon's preconditioner refresh is out of sync across ranks: refresh #{index + 1} ran on "
                    f"{self._describe(rank)} at step {step} (its step() call {self.calls}) but on "
                    f"{self._describe(other)} at step {other_step} (its step() call {other_calls}); rank {rank}'s "
                    f"step counter is {'ahead of' if lead > 0 else 'behind'} rank {other}'s by {abs(lead)}. {_ADVICE}"
                )

    def _wait_for(self, store, key: str, index: int, rank: int, other: int, step: int) -> None:
        """Block until ``key`` is published, at most ``ANON_HF_SYNC_TIMEOUT`` seconds; raise naming the missing rank."""
        timeout = _wait_timeout()
        try:
            store.wait([key], timeout)
        except Exception as err:  # a timeout or a lost store: the error types differ across torch versions
            try:
                store.check([key])
            except Exception:
                raise RuntimeError(_store_lost_message(rank, err)) from err
            raise RefreshOutOfSyncError(self._missing_message(store, index, rank, other, step, timeout)) from err

    def _describe(self, rank: int) -> str:
        """``"rank 3 (node 1, host gpu-07, local rank 1)"``, from what that rank published at its first refresh."""
        try:
            if self._ranks.check([f"rank{rank}"]):
                return f"rank {rank} ({self._ranks.get(f'rank{rank}').decode()})"
        except Exception:  # naming the node is a courtesy: never let it mask the error being reported
            pass
        return f"rank {rank} (its node is unknown: it never reached its first refresh)"

    def _missing_message(self, store, index: int, rank: int, other: int, step: int, timeout: timedelta) -> str:
        last = "it has not refreshed yet"
        if index > 0 and store.check([f"refresh{index - 1}/rank{other}"]):
            other_calls, other_step = store.get(f"refresh{index - 1}/rank{other}").decode().split(",")
            last = f"its last refresh, #{index}, was at step {other_step} (its step() call {other_calls})"
        return (
            f"Anon's preconditioner refresh is out of sync across ranks: {self._describe(rank)} is about to run "
            f"refresh #{index + 1} at step {step} (its step() call {self.calls}), but {self._describe(other)} did not "
            f"reach its refresh #{index + 1} within {timeout.total_seconds():g} s ({last}): its step counter "
            f"differs, or it stopped or hangs, so it will not join this refresh's collectives. (A rank slower than "
            f"that is also reported here: raise {TIMEOUT_ENV}.) {_ADVICE}"
        )


_GLOO_WORKER = "pt_gloo_runloop"  # the name torch gives ProcessGroupGloo's worker threads
_drain_registered = False


def _drain_gloo_workers_at_exit() -> None:
    """Once per process: run :func:`drain_gloo_workers` when the interpreter exits, before it finalizes."""
    global _drain_registered
    if not _drain_registered:
        _drain_registered = True
        atexit.register(drain_gloo_workers)


def _gloo_worker_activity() -> dict[str, tuple[str, str]] | None:
    """Per gloo worker thread of this process: (scheduler state, context switches); None where /proc is missing."""
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return None
    activity = {}
    for task in tasks:
        try:
            if (task / "comm").read_text().strip() != _GLOO_WORKER:
                continue
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            switches = [line for line in (task / "status").read_text().splitlines() if "ctxt_switches" in line]
        except OSError:  # the thread ended meanwhile
            continue
        activity[task.name] = (state, " ".join(switches))
    return activity


def drain_gloo_workers(timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Wait, releasing the GIL, until gloo's worker threads are idle; True if they are (or there are none).

    Why: a gloo worker releases a finished collective's work object itself. When the Python side has already dropped
    the work and its tensors (``dist.all_gather`` returns, the caller drops the output list: the Trainer does this at
    the end of every run), the tensors' Python objects die on that worker thread, which must take the GIL. If the
    interpreter is finalizing by then, that thread either ends inside a C++ destructor ("terminate called without an
    active exception", SIGABRT) or waits forever for a GIL that the main thread holds while it destroys the process
    group (``~ProcessGroupGloo`` from DDP's ``~Reducer`` joins the worker): the hang at exit. Run at exit, before
    finalizing, this lets a worker that needs the GIL take it. A worker is idle when it sleeps and its context
    switch counts stand still over ``interval`` seconds (a thread waiting for the GIL wakes every 5 ms).
    """
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        time.sleep(interval)  # releases the GIL
        activity = _gloo_worker_activity()
        if not activity:  # no gloo workers, or no /proc to watch them: the sleep above was the best effort
            return activity is not None
        if activity == previous and all(state == "S" for state, _ in activity.values()):
            return True
        previous = activity
    logger.info("anon_hf: gloo's worker threads were still busy at exit after %.0f s.", timeout)
    return False


def _published(store, key: str, rank: int) -> tuple[int, int] | None:
    """A neighbour's published ``(step() calls, step)`` under ``key``, or None if it has not published it yet."""
    try:
        if not store.check([key]):
            return None
        calls, step = (int(v) for v in store.get(key).decode().split(","))
    except Exception as err:  # the store's error types differ across torch versions
        raise RuntimeError(_store_lost_message(rank, err)) from err
    return calls, step


def _store_lost_message(rank: int, err: Exception) -> str:
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return (
        f"Anon's refresh sync check on rank {rank} ({_node_identity()}) lost the job's key-value store "
        f"(MASTER_ADDR:MASTER_PORT {address}, served by the launcher of node 0: that node may have failed): {err}"
    )


_ADVICE = (
    "Every rank must load the same optimizer checkpoint and step together. Pass verify_sync=False to Anon to skip "
    "this check (e.g. when ranks train independent models)."
)
