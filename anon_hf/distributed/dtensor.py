"""DTensor helpers that work whether or not a tensor is a DTensor (FSDP2 shards), and on torch without distributed."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "agreed_verdicts",
    "all_ranks_agree",
    "device_meshes",
    "full",
    "is_dtensor",
    "local",
    "local_shards",
    "shards_of",
]


@functools.cache
def _dtensor_class() -> type | None:
    """torch's DTensor class, None on torch without it (imported once: optimizers ask for every tensor every step)."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing can be one
        return None
    return DTensor


def is_dtensor(tensor: Tensor) -> bool:
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (no collective), the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def full(value: Tensor) -> Tensor:
    """The whole of a DTensor (a collective every rank must run: a Partial reduction becomes one verdict)."""
    full_tensor = getattr(value, "full_tensor", None)
    return full_tensor() if full_tensor is not None else value


def local_shards(tensors: list[Tensor]) -> list[Tensor]:
    """Each tensor's :func:`local` shard. For FSDP2 parameters, gradients and the state made with ``zeros_like`` of
    them, these are plain tensors sharing storage with the DTensor, so an elementwise update of the shard is the
    update of the DTensor, with none of DTensor's per-op dispatch."""
    return [local(tensor) for tensor in tensors]


def device_meshes(tensors: list[Tensor]) -> list:
    """The distinct device meshes of the DTensors among ``tensors``, in order of first appearance ([] if none)."""
    meshes: list = []
    for tensor in tensors:
        mesh = getattr(tensor, "device_mesh", None) if is_dtensor(tensor) else None
        if mesh is not None and all(mesh is not seen for seen in meshes):
            meshes.append(mesh)
    return meshes


def all_ranks_agree(flags: list[bool], meshes: list, device: torch.device) -> list[bool]:
    """``flags`` AND-ed over every rank of ``meshes`` (each dimension of each mesh): one all-reduce per mesh
    dimension, which every rank must call with as many flags, in the same order."""
    import torch.distributed as dist

    reduced = torch.tensor(flags, dtype=torch.uint8, device=device)
    for mesh in meshes:
        for dim in range(mesh.ndim):
            dist.all_reduce(reduced, op=dist.ReduceOp.MIN, group=mesh.get_group(dim))
    return [bool(flag) for flag in reduced.tolist()]


# The meshes whose ranks hold the other shards of the tensors being stepped (set by anon_hf.functional.anon around a
# backend call on local shards; empty otherwise).
_MESHES: contextvars.ContextVar[tuple] = contextvars.ContextVar("anon_hf_shard_meshes", default=())


@contextlib.contextmanager
def shards_of(meshes: list) -> Iterator[None]:
    """While active, :func:`agreed_verdicts` AND-s a refresh's verdicts over the ranks of ``meshes``."""
    token = _MESHES.set(tuple(meshes))
    try:
        yield
    finally:
        _MESHES.reset(token)


def agreed_verdicts(verdicts: dict[int, bool], device: torch.device) -> dict[int, bool]:
    """``verdicts`` (tensor index -> finite) as every rank of the active :func:`shards_of` meshes sees them: one
    all-reduce per mesh dimension, which every rank reaches with the same indices; unchanged outside them."""
    meshes = _MESHES.get()
    if not meshes or not verdicts:
        return verdicts
    order = sorted(verdicts)
    return dict(zip(order, all_ranks_agree([verdicts[i] for i in order], list(meshes), device), strict=True))
