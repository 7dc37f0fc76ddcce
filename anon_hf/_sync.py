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
"""

from __future__ import annotations

import itertools
import logging

import torch.distributed as dist

__all__ = ["RefreshOutOfSyncError", "RefreshSyncChecker"]

logger = logging.getLogger(__name__)

_instance_ids = itertools.count()


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
        self._store_failed = False

    def count_call(self) -> None:
        self.calls += 1

    def _get_store(self):
        if self._store is None and not self._store_failed:
            try:
                from torch.distributed.distributed_c10d import _get_default_store

                self._store = dist.PrefixStore(f"anon_hf/optimizer{self.instance_id}/", _get_default_store())
            except Exception as err:  # a private torch helper: degrade to no check, loudly, once
                self._store_failed = True
                logger.warning("Anon cannot reach the process group's store (%s); refresh sync is not verified.", err)
        return self._store

    def check(self, step: int) -> None:
        """Publish this rank's n-th refresh at ``step`` and compare with the neighbours that published theirs."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        store = self._get_store()
        if store is None:
            return
        rank, world = dist.get_rank(), dist.get_world_size()
        index = self._refreshes
        self._refreshes += 1
        store.set(f"refresh{index}/rank{rank}", f"{self.calls},{step}")
        for other in {(rank - 1) % world, (rank + 1) % world} - {rank}:
            key = f"refresh{index}/rank{other}"
            if not store.check([key]):
                continue
            other_calls, other_step = (int(v) for v in store.get(key).decode().split(","))
            if other_calls != self.calls or other_step != step:
                lead = step - self.calls - (other_step - other_calls)
                raise RefreshOutOfSyncError(
                    f"Anon's preconditioner refresh is out of sync across ranks: refresh #{index + 1} ran on rank "
                    f"{rank} at step {step} (its step() call {self.calls}) but on rank {other} at step "
                    f"{other_step} (its step() call {other_calls}); rank {rank}'s step counter is "
                    f"{'ahead of' if lead > 0 else 'behind'} rank {other}'s by {abs(lead)}. Every rank must load the "
                    "same optimizer checkpoint and step together. Pass verify_sync=False to Anon to skip this check "
                    "(e.g. when ranks train independent models)."
                )
