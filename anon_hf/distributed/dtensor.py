"""DTensor helpers that work whether or not a tensor is a DTensor (FSDP2 shards), and on torch without distributed."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["full", "is_dtensor", "local"]


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
