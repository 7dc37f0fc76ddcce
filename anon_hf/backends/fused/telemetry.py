"""Counters and once-per-process log lines of the fused path (for tests, benchmarks and users' logs)."""

from __future__ import annotations

import collections
import logging

__all__ = ["log_once", "stats"]

logger = logging.getLogger("anon_hf.backends.fused")

#: How often each path ran in this process: ``"kernel"`` (a C++ kernel call), ``"kernel_8bit"`` (an 8-bit C++ kernel
#: call), ``"compiled"`` (a chunk's step or refresh graph ran), ``"compiled_8bit"`` (an 8-bit graph ran),
#: ``"refresh_eager"`` (a refresh of tensors at different steps ran the eager foreach path), ``"fallback"`` (some
#: tensors could not take the fused path and foreach ran for them) and ``"compiles"`` (graphs built).
stats: collections.Counter = collections.Counter()

_logged: set[str] = set()


def log_once(level: int, message: str, *args) -> None:
    """Log ``message`` the first time it is seen in this process."""
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message, *args)
