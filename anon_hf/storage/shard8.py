"""Anon8bit's 8-bit state of FSDP2 shards in state dicts: DTensors that ``torch.distributed.checkpoint`` saves and
reshards to another world size.

Under FSDP2 a parameter is a DTensor sharded on dim 0 (rows; a 1-D tensor's rows are its elements) and ``Anon8bit``
quantizes this rank's local shard: its codes are shaped like the local shard and its side values hold one entry per
block of 256 elements of that shard's flat layout. For a state dict every entry gets a global shape that does not
depend on the world size, sharded ``Shard(0)`` like the parameter, so DCP can save and load it on any number of ranks:

* the codes keep the parameter's shape, mesh and placements;
* each side-value vector becomes ``(rows, width)``: row ``i`` holds the side values of the blocks that row ``i``'s
  elements lie in (in the writer's layout), zero-padded to ``width`` (:func:`row_width`);
* :data:`ROWS_KEY`, int32 ``(rows, 4)``: per row its global index, the position of its first element in its block,
  and the writer's mesh coordinate and mesh size.

When the row length is a multiple of 256 (the usual LLM matrix) every block lies inside one row, in any layout: the
side values are then just ``(rows, row_length / 256)`` and a checkpoint reshards bitwise, with no decoding. Other
tensors (a row length that is not a multiple of 256, 1-D tensors) have blocks that straddle rows, cut where the
writer's shards ended. Loaded on the world size that wrote them they come back bitwise; loaded on another, each
element is decoded exactly with its own block's side values and the shard is encoded again in this rank's blocks:
one more rounding, within the codec's bound per element (``docs/distributed.md``, "Resizing a job").

Row-aligned tensors' side values take in a checkpoint the bytes they take in memory; a block that straddles rows has
its side values repeated in each row it touches. The record adds 16 bytes per row: 0.1 % of the codes for rows of
4,096 elements, but for a 1-D tensor (rows of one element) side values and record come to 32 bytes per element. A
state dict loaded on another shard than the one its rows say (a per-rank ``torch.save`` file on another rank) is
refused. Meshes other than FSDP2's
one dimension with ``Shard(0)`` keep plain per-rank tensors and the :data:`SHARD_KEY` record, checked by
:func:`check_shard`.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..distributed.dtensor import is_dtensor, local
from . import quant8

__all__ = [
    "ROWS_KEY",
    "SHARD_KEY",
    "Rows",
    "as_dtensors",
    "as_local",
    "check_shard",
    "dequantize_rows",
    "from_rows",
    "row_width",
    "rows_of",
    "shard_identity",
    "to_rows",
    "upgrade_dcp_checkpoint",
]

#: The state key of the shard record (int64 ``[mesh coordinate..., mesh shape..., local numel]``) in the optimizer's
#: own state and in plain per-rank state dicts.
SHARD_KEY = "local_shard"
#: The state key of the per-row record of the DTensor form (int32 ``(rows, 4)``: global row, position of the row's
#: first element in its block, writer's mesh coordinate, writer's mesh size).
ROWS_KEY = "block_rows"

_SIDE_KEYS = frozenset(key for keys in quant8.QUANTIZED_KEYS.values() for key in keys)
_ROW, _OFFSET, _COORDINATE, _WORLD = range(4)


def shard_identity(param: Tensor) -> Tensor | None:
    """For a DTensor ``param``: int64 ``[this rank's coordinates on the mesh..., the mesh's shape..., the local shard's
    numel]``; None for a plain tensor."""
    if not is_dtensor(param):
        return None
    mesh = param.device_mesh
    return torch.tensor([*mesh.get_coordinate(), *mesh.shape, local(param).numel()], dtype=torch.int64)


def _refusal(saved_id: Any, written: str, here: str) -> ValueError:
    return ValueError(
        f"Anon8bit's 8-bit state of param {saved_id} was written for {written}, but this rank holds {here}. A "
        "per-rank state dict holds one shard's 8-bit codes and block scales: load the checkpoint on the same world "
        "size and rank that wrote it (torch.save(optimizer.state_dict()) per rank), or save it with "
        "torch.distributed.checkpoint (get_optimizer_state_dict under FSDP2), which reshards to any world size."
    )


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
    raise _refusal(saved_id, written, here)


def row_width(row_numel: int) -> int:
    """The most blocks of 256 that one row of ``row_numel`` elements can touch in any shard layout: its rows start at
    multiples of ``row_numel``, so at positions in a block that are multiples of ``gcd(row_numel, 256)``."""
    return -(-(row_numel + quant8.BLOCK - math.gcd(row_numel, quant8.BLOCK)) // quant8.BLOCK)


class Rows(NamedTuple):
    """An FSDP2 parameter seen as rows: ``rows`` (global), ``row_numel``, :func:`row_width`, this rank's first row,
    its row count, its mesh coordinate and the mesh size."""

    rows: int
    row_numel: int
    width: int
    start: int
    count: int
    coordinate: int
    world: int


def rows_of(shape: tuple[int, ...], coordinate: int, world: int) -> Rows | None:
    """The rows of a tensor of global ``shape`` that mesh coordinate ``coordinate`` of ``world`` holds when dim 0 is
    split as torch.chunk (FSDP2, DTensor's ``Shard(0)``) splits it; None for a tensor without elements."""
    if not shape:
        return None
    rows = shape[0]
    row_numel = math.prod(shape[1:]) if rows else 0
    if row_numel == 0:
        return None
    chunk = -(-rows // world)
    start = min(coordinate * chunk, rows)
    count = min(chunk, rows - start)
    return Rows(rows, row_numel, row_width(row_numel), start, count, coordinate, world)


def _fsdp_rows(param: Tensor) -> Rows | None:
    """``param`` as :func:`rows_of` when it is sharded as FSDP2 shards (one mesh dimension, ``Shard(0)``, the local
    shard torch.chunk's), else None."""
    from torch.distributed.tensor import Shard

    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        return None
    layout = rows_of(tuple(param.shape), param.device_mesh.get_coordinate()[0], param.device_mesh.size())
    shard = local(param)
    if layout is None or shard.dim() == 0 or shard.shape[0] != layout.count:
        return None  # not torch.chunk's split: nothing here knows which rows this shard holds
    return layout


def _dtensor(local_rows: Tensor, like: Tensor, rows: int) -> Tensor:
    """``local_rows`` (this rank's rows of a ``(rows, width)`` tensor) as a DTensor sharded like ``like``'s dim 0."""
    from torch.distributed.tensor import DTensor, Shard

    width = local_rows.shape[1]
    return DTensor.from_local(
        local_rows, like.device_mesh, [Shard(0)], run_check=False, shape=(rows, width), stride=(width, 1)
    )


def _decode_rows(plain: dict[str, Any], key: str, offsets: Tensor, row_numel: int) -> Tensor:
    """The fp32 values of state ``key`` of this shard's rows in the DTensor form (plain local tensors; ``offsets``:
    where each row starts in its block), each element decoded with the side values of the block it was encoded in."""
    codes = plain[key]
    count = offsets.numel()
    within = torch.arange(row_numel, device=offsets.device)
    slot = ((offsets.unsqueeze(1) + within) // quant8.BLOCK).reshape(-1)
    row = torch.arange(count, device=offsets.device).repeat_interleave(row_numel)
    sides = tuple(plain[side][row, slot].reshape(codes.shape).float() for side in quant8.QUANTIZED_KEYS[key])
    return quant8.dequantize_elements(key, codes, sides)


def _local_offsets(layout: Rows, device: torch.device) -> Tensor:
    """Where each of this rank's rows starts in its block, in this rank's own (local, flat) blocks."""
    return (torch.arange(layout.count, device=device, dtype=torch.int64) * layout.row_numel) % quant8.BLOCK


def _per_row(side: Tensor, layout: Rows) -> Tensor:
    """This shard's side values (one per local block) as ``(count, width)``: row i holds those of the blocks that its
    elements lie in, in order, then zeros."""
    first = torch.arange(layout.count, device=side.device, dtype=torch.int64) * layout.row_numel // quant8.BLOCK
    slot = torch.arange(layout.width, device=side.device)
    last = (
        torch.arange(1, layout.count + 1, device=side.device, dtype=torch.int64) * layout.row_numel - 1
    ) // quant8.BLOCK
    flat = side.reshape(-1)
    if flat.numel() == 0:  # a shard without rows
        return flat.new_zeros((layout.count, layout.width))
    index = first.unsqueeze(1) + slot
    gathered = flat[index.clamp(max=flat.numel() - 1)]
    return torch.where(index <= last.unsqueeze(1), gathered, torch.zeros((), dtype=flat.dtype, device=flat.device))


def as_dtensors(tensor_state: dict[str, Any], param: Tensor) -> dict[str, Any]:
    """``tensor_state`` (8-bit, of the DTensor ``param``'s local shard) with its codes, side values and shard record
    in the DTensor form of the module docstring; unchanged where the mesh is not FSDP2's. A new dict."""
    from torch.distributed.tensor import DTensor

    layout = _fsdp_rows(param)
    if layout is None:
        return dict(tensor_state)
    out = to_rows(tensor_state, layout)
    for key, value in list(out.items()):
        if key in quant8.QUANTIZED_KEYS:
            out[key] = DTensor.from_local(
                value, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
            )
        elif key in _SIDE_KEYS or key == ROWS_KEY:
            out[key] = _dtensor(value, param, layout.rows)
    return out


def to_rows(tensor_state: dict[str, Any], layout: Rows) -> dict[str, Any]:
    """The local part of :func:`as_dtensors` (plain tensors): side values as ``(count, width)`` per row, the shard
    record replaced by this shard's rows of :data:`ROWS_KEY`. A new dict."""
    out = {key: value for key, value in tensor_state.items() if key != SHARD_KEY}
    for key in _SIDE_KEYS & set(tensor_state):
        out[key] = _per_row(tensor_state[key], layout)
    codes = next((tensor_state[key] for key in quant8.QUANTIZED_KEYS if key in tensor_state), None)
    device = codes.device if codes is not None else None
    out[ROWS_KEY] = torch.stack(
        [
            torch.arange(layout.start, layout.start + layout.count, dtype=torch.int64, device=device),
            _local_offsets(layout, device),
            torch.full((layout.count,), layout.coordinate, dtype=torch.int64, device=device),
            torch.full((layout.count,), layout.world, dtype=torch.int64, device=device),
        ],
        dim=1,
    ).to(torch.int32)
    return out


def as_local(tensor_state: dict[str, Any], param: Tensor, saved_id: Any = None) -> dict[str, Any]:
    """The inverse of :func:`as_dtensors` on this rank: plain codes and side values of this rank's local shard in its
    own blocks, with this shard's :data:`SHARD_KEY` record (see :func:`from_rows`). Entries of the older form (side
    values as one row per rank, :data:`SHARD_KEY` as a DTensor) are cut to this shard. A new dict.

    Raises:
        ValueError: for rows that are not this shard's (another rank's file) or entries of the wrong shape.
    """
    if ROWS_KEY not in tensor_state:
        return _older_form_as_local(tensor_state, param)
    layout = _fsdp_rows(param)
    if layout is None:
        raise ValueError(
            f"State of param {saved_id} is FSDP2 8-bit state (key '{ROWS_KEY}'), but this parameter is not sharded "
            "as FSDP2 shards (one mesh dimension, Shard(0)): load it into the model FSDP2 sharded."
        )
    out = from_rows({key: local(value) for key, value in tensor_state.items()}, layout, saved_id)
    out[SHARD_KEY] = shard_identity(param)
    return out


def from_rows(tensor_state: dict[str, Any], layout: Rows, saved_id: Any = None) -> dict[str, Any]:
    """The local part of :func:`as_local` (plain tensors, this shard's rows of the DTensor form): codes and one side
    value per block of this shard. Rows written in this shard's own blocks (the same layout, or rows of a multiple of
    256 elements) are taken bitwise; others are decoded per element, each with its own block's side values, and
    encoded again in this shard's blocks. A new dict, without :data:`ROWS_KEY`."""
    record = tensor_state[ROWS_KEY]
    _check_rows(record, layout, saved_id)
    plain = {key: value for key, value in tensor_state.items() if key != ROWS_KEY}
    for key, value in plain.items():
        if key in quant8.QUANTIZED_KEYS and value.numel() != layout.count * layout.row_numel:
            raise ValueError(
                f"State '{key}' of param {saved_id} holds {value.numel()} codes on this rank, but its rows hold "
                f"{layout.count * layout.row_numel} elements: the state dict belongs to another model, or is corrupted."
            )
        if key in _SIDE_KEYS and tuple(value.shape) != (layout.count, layout.width):
            raise ValueError(
                f"State '{key}' of param {saved_id} must be {(layout.count, layout.width)} on this rank (the side "
                f"values of the blocks of each of its rows), not {tuple(value.shape)}: the state dict belongs to "
                "another model, or is corrupted."
            )
    offsets = record[:, _OFFSET].to(torch.int64)
    same_blocks = layout.row_numel % quant8.BLOCK == 0 or bool(
        ((record[:, _COORDINATE] == layout.coordinate) & (record[:, _WORLD] == layout.world)).all()
    )
    out = {key: value for key, value in plain.items() if key not in _SIDE_KEYS}
    if same_blocks:
        blocks = _own_blocks(layout, offsets)
        for side in _SIDE_KEYS & set(plain):
            out[side] = plain[side].reshape(-1)[blocks].to(torch.float32)
        return out
    for key, sides in quant8.QUANTIZED_KEYS.items():
        if key in plain and all(side in plain for side in sides):
            out.update(quant8.quantize(key, _decode_rows(plain, key, offsets, layout.row_numel)))
    return out


def dequantize_rows(tensor_state: dict[str, Any]) -> dict[str, Any]:
    """Entries of the DTensor form (this rank's, as :func:`as_dtensors` gives them) decoded: each 8-bit key an fp32
    DTensor with its codes' shape and placements, as ``anon_hf.Anon`` keeps its state under FSDP2; side values and
    the record dropped. No collective. A new dict."""
    from torch.distributed.tensor import DTensor

    offsets = local(tensor_state[ROWS_KEY])[:, _OFFSET].to(torch.int64)
    plain = {key: local(value) for key, value in tensor_state.items()}
    out = {key: value for key, value in tensor_state.items() if key not in _SIDE_KEYS and key != ROWS_KEY}
    for key in quant8.QUANTIZED_KEYS.keys() & tensor_state.keys():
        codes = tensor_state[key]
        values = _decode_rows(plain, key, offsets, codes.numel() // codes.shape[0])
        out[key] = DTensor.from_local(
            values, codes.device_mesh, codes.placements, run_check=False, shape=codes.shape, stride=codes.stride()
        )
    return out


def _check_rows(record: Tensor, layout: Rows, saved_id: Any) -> None:
    """Refuse rows that are not this shard's: the state dict of another rank (or of another world size) loaded here."""
    expected = torch.arange(layout.start, layout.start + layout.count, dtype=torch.int64)
    if record.dim() == 2 and record.shape == (layout.count, 4):
        found = record[:, _ROW].to(torch.int64).cpu()
        if torch.equal(found, expected):
            return
    here = f"[{layout.coordinate}, {layout.world}, {layout.count * layout.row_numel}] (rows {_span(expected)})"
    if record.dim() == 2 and record.shape[1:] == (4,) and record.shape[0] > 0:
        coordinate, world = (int(v) for v in record[0, _COORDINATE:].tolist())
        written = (
            f"[coordinates, mesh shape, numel] [{coordinate}, {world}, {record.shape[0] * layout.row_numel}] "
            f"(rows {_span(record[:, _ROW])})"
        )
    else:
        written = f"a record of shape {tuple(record.shape)}"
    raise _refusal(saved_id, written, here)


def _span(rows: Tensor) -> str:
    return f"{int(rows[0])} to {int(rows[-1])}" if rows.numel() else "none"


def _own_blocks(layout: Rows, offsets: Tensor) -> Tensor:
    """For each of this shard's blocks, the flat index into ``(count, width)`` per-row side values where the row its
    first element lies in keeps that block's side values (rows written in this rank's blocks)."""
    first = torch.arange(0, layout.count * layout.row_numel, quant8.BLOCK, device=offsets.device, dtype=torch.int64)
    row = first // layout.row_numel
    slot = (offsets[row] + first - row * layout.row_numel) // quant8.BLOCK
    return row * layout.width + slot


def _older_form_as_local(tensor_state: dict[str, Any], param: Tensor) -> dict[str, Any]:
    """Entries of the form written before :data:`ROWS_KEY` (side values as a ``(world, max_blocks)`` DTensor, one row
    per rank; the shard record likewise) as this rank's plain tensors; :func:`check_shard` then checks the record."""
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


def upgrade_dcp_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Rewrite a ``torch.distributed.checkpoint`` directory whose Anon8bit FSDP2 state has the older form (side
    values and the :data:`SHARD_KEY` record as one row per rank, written before the state resharded) into the current
    form at ``target``, which then loads on any world size. Everything else is copied as it is. Returns the state
    entries upgraded (their paths in the state dict). One process, no process group; it holds the whole checkpoint in
    memory and writes a temporary copy of it beside ``target``.

    Raises:
        ValueError: for an older-form entry whose record does not describe torch.chunk's split of its rows.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    target = os.fspath(target)
    os.makedirs(target, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as scratch:
        whole = os.path.join(scratch, "whole.pt")
        dcp_to_torch_save(source, whole)
        state_dict = torch.load(whole, weights_only=False)  # written just now by torch's own converter
        upgraded = []
        for path, entries in _older_form_entries(state_dict, ()):
            entries.update(_upgraded(entries, path))
            entries.pop(SHARD_KEY)
            upgraded.append(".".join(map(str, path)))
        torch.save(state_dict, whole)
        torch_save_to_dcp(whole, target)
    return upgraded


def _older_form_entries(node: Any, path: tuple) -> Iterator[tuple[tuple, dict[str, Any]]]:
    """Each dict under ``node`` that holds 8-bit state in the older form (a ``(world, 3)`` :data:`SHARD_KEY`)."""
    if not isinstance(node, dict):
        return
    record = node.get(SHARD_KEY)
    if isinstance(record, Tensor) and record.dim() == 2 and record.shape[1] == 3 and _SIDE_KEYS & set(node):
        yield path, node
        return
    for key, value in node.items():
        yield from _older_form_entries(value, (*path, key))


def _upgraded(entries: dict[str, Any], path: tuple) -> dict[str, Tensor]:
    """The side values and :data:`ROWS_KEY` of the current form for whole older-form ``entries``: each rank's row of
    side values cut to its blocks and spread over its rows by :func:`to_rows`, the ranks' rows in order."""
    record = entries[SHARD_KEY]
    codes = next(entries[key] for key in quant8.QUANTIZED_KEYS if key in entries)
    world = int(record[0, 1])
    parts = []
    for coordinate in range(world):
        layout = rows_of(tuple(codes.shape), coordinate, world)
        numel = layout.count * layout.row_numel if layout is not None else -1
        if layout is None or record[coordinate].tolist() != [coordinate, world, numel]:
            raise ValueError(
                f"Anon8bit state {'.'.join(map(str, path))} in the older form records the shards "
                f"{record.tolist()}, not torch.chunk's split of {tuple(codes.shape)} over {world} ranks: it cannot "
                "be upgraded."
            )
        blocks = -(-numel // quant8.BLOCK)
        local_state = {key: value[coordinate, :blocks] for key, value in entries.items() if key in _SIDE_KEYS}
        local_state.update(
            {
                key: entries[key][layout.start : layout.start + layout.count]
                for key in quant8.QUANTIZED_KEYS
                if key in entries
            }
        )
        parts.append(to_rows(local_state, layout))
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0] if key in _SIDE_KEYS or key == ROWS_KEY}
