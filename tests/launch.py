"""Running multi-process commands (``torchrun``, ``accelerate launch``, ``deepspeed``, ``anon-hf run``) from tests.

No retry: a rank that aborts while it exits ("terminate called without an active exception", SIGABRT) fails the
test. That abort, and the hang at exit that is its twin, came from gloo's worker threads releasing a finished
collective's tensors while the interpreter finalized; ``anon_hf.distributed.sync.drain_gloo_workers`` now lets them
finish before it does (see docs/distributed.md, "A clean exit").
"""

from __future__ import annotations

import subprocess


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, **kwargs)``."""
    return subprocess.run(command, capture_output=True, text=True, **kwargs)
