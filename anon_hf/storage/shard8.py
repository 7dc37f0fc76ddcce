"""Anon8bit's 8-bit state of FSDP2 shards in state dicts: DTensors that ``torch.distributed.checkpoint`` can save.

Under FSDP2 a parameter is a DTensor sharded on dim 0 and ``Anon8bit`` quantizes this rank's local shard: its codes
are shaped like the local shard and its side values hold one entry per block of 256 of that shard. As plain tensors,
``torch.distributed.checkpoint`` (``get/set_optimizer_state_dict``, what accelerate's FSDP2 ``save_state`` calls)
would keep one copy of them, another rank's for most ranks. In a state dict they are therefore DTensors:

* the codes, with the parameter's own mesh and placements (each rank holds its shard, as for ``Anon``'s state);
* each side-value vector as a ``(world, max_blocks)`` DTensor sharded on dim 0: row r holds rank r's side values,
  zero-padded to the longest rank's count, so every row has one length as DTensor's even split needs;
* a record of the shard (:data:`SHARD_KEY`: mesh coordinate, mesh size, local numel), ``(world, 3)`` the same way.

A checkpoint saved so loads back bitwise on the same world size. On another world size the side values' global
shape differs and ``torch.distributed.checkpoint`` refuses the load; a per-rank file loaded on the wrong rank is
refused by :func:`check_shard`. Blocks are never resharded: they follow local shards, which another world size cuts
differently. Meshes other than FSDP2's one dimension with ``Shard(0)`` keep plain per-rank tensors and the record.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..distributed.dtensor import is_dtensor, local
from . import quant8

__all__ = ["SHARD_KEY", "as_dtensors", "as_local", "check_shard", "shard_identity"]

#: The state key of the shard record (int64 ``[mesh coordinate..., mesh shape..., local numel]``).
SHARD_KEY = "local_shard"

_SIDE_KEYS = frozenset(key for keys in quant8.QUANTIZED_KEYS.values() for key in keys)


def shard_identity(param: Tensor) -> Tensor | None:
    """For a DTensor ``param``: int64 ``[this rank's coordinates on the mesh..., the mesh's shape..., the local shard's
    numel]``; None for a plain tensor."""
    if not is_dtensor(param):
        return None
    mesh = param.device_mesh
    return torch.tensor([*mesh.get_coordinate(), *mesh.shape, local(param).numel()], dtype=torch.int64)


def check_shard(saved: Any, param: Tensor, saved_id: Any) -> None:
    """Refuse 8-bit state written for another shard than ``param``'s local one. State without the record (written
    before it existed, or for a plain tensor) is taken as it is."""
    expected = shard_identity(param)
    if saved is None:
        return
    if expected is not None and isinstance(saved, Tensor) and torch.equal(saved.detach().cpu(), expected):
        return
    written = f"[coordinates, mesh shape, numel] {saved.tolist()}" if isinstance(saved, Tensor) else repr(saved)
    here = "no shard (a plain tensor)" if expected is None else f"{expected.tolist()}"
    raise ValueError(
        f"Anon8bit's 8-bit state of param {saved_id} was written for {written}, but this rank holds {here}. Under "
        "FSDP2 each rank's 8-bit codes and block scales describe its own local shard and cannot be resharded: load "
        "the checkpoint on the same world size (torch.distributed.checkpoint, or torch.save(optimizer.state_dict()) "
        "per rank loaded on the same rank), or use anon_hf.Anon for checkpoints that reshard "
        "(anon_hf.dequantize_state_dict converts a per-rank Anon8bit state dict)."
    )


def _fsdp_layout(param: Tensor) -> tuple[int, int] | None:
    """``(world, max_blocks)`` when ``param`` is sharded as FSDP2 does (one mesh dimension, ``Shard(0)``), else None.
    ``max_blocks``: the most blocks any rank's local shard has, from torch.chunk's split of dim 0."""
    from torch.distributed.tensor import Shard

    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),) or param.dim() == 0:
        return None
    world, rows = param.device_mesh.size(), param.shape[0]
    row_numel = param.numel() // rows if rows else 0
    chunk = -(-rows // world)
    blocks = [-(-max(0, min(chunk, rows - r * chunk)) * row_numel // quant8.BLOCK) for r in range(world)]
    return world, max(blocks)


def as_dtensors(tensor_state: dict[str, Any], param: Tensor) -> dict[str, Any]:
    """``tensor_state`` (8-bit, of the DTensor ``param``'s local shard) with its codes, side values and shard record
    as DTensors (see the module docstring); unchanged where the mesh is not FSDP2's. A new dict."""
    from torch.distributed.tensor import DTensor, Shard

    layout = _fsdp_layout(param)
    if layout is None:
        return dict(tensor_state)
    world, max_blocks = layout
    mesh, out = param.device_mesh, dict(tensor_state)
    for key, value in tensor_state.items():
        if key in quant8.QUANTIZED_KEYS:
            out[key] = DTensor.from_local(
                value, mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
            )
        elif key in _SIDE_KEYS or key == SHARD_KEY:
            width = max_blocks if key in _SIDE_KEYS else value.numel()
            row = torch.nn.functional.pad(value.reshape(-1), (0, width - value.numel())).unsqueeze(0)
            out[key] = DTensor.from_local(
                row, mesh, [Shard(0)], run_check=False, shape=(world, width), stride=(width, 1)
            )
    return out


def as_local(tensor_state: dict[str, Any], param: Tensor) -> dict[str, Any]:
    """The inverse of :func:`as_dtensors` on this rank: plain local codes, side values cut to this shard's block
    count, the shard record as a vector. Entries that are not DTensors are kept. A new dict."""
    blocks = -(-local(param).numel() // quant8.BLOCK)
    out = dict(tensor_state)
    for key, value in tensor_state.items():
        if not is_dtensor(value):
            continue
        value = value.to_local()
        if key in _SIDE_KEYS:
            value = value.reshape(-1)[:blocks]
        elif key == SHARD_KEY:
            value = value.reshape(-1)
        out[key] = value
    return out
