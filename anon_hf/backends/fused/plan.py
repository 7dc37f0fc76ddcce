"""Which backend steps which tensor: a pure function of the tensors' properties, testable without running anything.

The C++ kernel takes the CPU tensors it supports (``anon_hf.backends.cpu_kernel``); the compiled graphs take the rest,
grouped into chunks of one device, dtypes and shape; the eager foreach path takes what neither covers (complex
parameters, non-contiguous layouts, and everything when the compiler is unavailable). DTensor (FSDP2) tensors arrive
here as their local shards (:func:`anon_hf.functional.anon`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Plan", "chunk_sizes", "make_plan"]

# Elements per graph call (see chunk_sizes).
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class Plan:
    """Tensor indices per backend. ``chunks`` holds ``(key, indices)`` with tensors of one shape, the key naming the
    graph (device, dtype, dtypes of grad and state, preconditioned, rank); ``empty`` tensors only advance their step
    counters; ``eager_reason`` says why some tensors take the eager path (``None`` when none do or it goes unsaid)."""

    kernel: list[int] = field(default_factory=list)
    chunks: list[tuple[tuple, list[int]]] = field(default_factory=list)
    eager: list[int] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)
    eager_reason: str | None = None


def chunk_sizes(count: int, numel: int) -> list[int]:
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


def _eager_reason(param: Tensor) -> str | None:
    if torch.is_complex(param):
        return "complex parameters are not handled by the fused path"
    return None


_NON_CONTIGUOUS = (
    "non-contiguous tensors (e.g. a DTensor sharded on a dimension other than 0, whose local shard is a strided view) "
    "are not handled by the fused path"
)


def make_plan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    preconds: list[Tensor],
    *,
    kernel_supported: list[bool],
    cpu_eager_reason: str | None,
    graphs_unavailable,
) -> Plan:
    """Assign every index of ``params`` to one backend. ``kernel_supported[i]`` says whether the C++ kernel takes
    tensor ``i``; ``cpu_eager_reason``, when set, sends the other CPU tensors to the eager path (the kernel's build
    failed); ``graphs_unavailable()`` returns why the compiled graphs cannot run (``None`` if they can) and is called
    only when some tensor needs them. ``exp_avg_sqs``/``preconds`` are empty without a preconditioner."""
    plan = Plan()
    preconditioned = len(preconds) > 0
    groups: dict[tuple, list[int]] = {}
    graphs_reason: str | None = None
    for i, param in enumerate(params):
        if kernel_supported[i]:
            plan.kernel.append(i)
            continue
        if param.numel() == 0:
            plan.empty.append(i)
            continue
        reason = _eager_reason(param) or (cpu_eager_reason if param.device.type == "cpu" else None)
        if reason is None and graphs_reason is None:
            graphs_reason = graphs_unavailable()
        reason = reason or graphs_reason
        state = (exp_avgs[i], exp_avg_sqs[i], preconds[i]) if preconditioned else (exp_avgs[i],)
        if reason is None and not all(t.is_contiguous() for t in (param, grads[i], *state)):
            reason = _NON_CONTIGUOUS
        if reason is not None:
            plan.eager.append(i)
            plan.eager_reason = plan.eager_reason or reason
            continue
        dtypes = (grads[i].dtype,) + tuple(t.dtype for t in state)
        # A chunk holds tensors of one shape: their sizes share symbols, and the graph is the same for every shape
        # of that rank (dims equal to each other or to 1 add a variant or two).
        groups.setdefault((param.device, param.dtype, dtypes, preconditioned, tuple(param.shape)), []).append(i)
    for key, indices in groups.items():
        start = 0
        for size in chunk_sizes(len(indices), params[indices[0]].numel()):
            plan.chunks.append((key[:4] + (len(key[4]),), indices[start : start + size]))
            start += size
    return plan
