"""The FSDP2 form of Anon8bit's 8-bit state (``anon_hf.storage.shard8``) moved between world sizes, in one process.

A writer of ``W_s`` ranks turns each shard's 8-bit state into rows (:func:`shard8.to_rows`, what ``state_dict()``
wraps as DTensors); the rows of all ranks together are what ``torch.distributed.checkpoint`` stores; a reader of
``W_l`` ranks takes its rows of them (what DCP hands each rank) and :func:`shard8.from_rows` turns them into its own
shard's codes and block scales. The multi-process path through DCP itself is ``tests/test_reshard8.py``.

Promises checked here for every shape and pair of world sizes below:

* the same world size, or rows of a multiple of 256 elements: the codes and block scales come back bitwise;
* otherwise the state is decoded exactly (each element with its own block's scales) and encoded once more in the
  reader's blocks: bitwise what ``quant8.quantize`` gives for the writer's decoded values, and within one rounding of
  them (:func:`assert_within_one_rounding`);
* rows of another shard (a per-rank file on the wrong rank) are refused.
"""

from __future__ import annotations

import math

import pytest
import torch

from anon_hf.storage import quant8, shard8

SHAPES = [(48, 256), (3, 16, 256), (1, 4608), (200, 48), (33, 200), (7, 896), (5000,), (16, 4, 80)]
WORLDS = [(1, 2), (2, 1), (2, 2), (2, 3), (3, 2), (4, 1), (1, 4), (2, 8), (8, 8)]
KEYS = list(quant8.QUANTIZED_KEYS)


def full_state(shape, seed=0):
    """m, s and v of a tensor: values over several decades, some exact zeros (s and v of unseen elements)."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-12, 4, shape, generator=generator).float())
    m = torch.randn(shape, generator=generator) * scale
    s = torch.rand(shape, generator=generator) * scale**2
    v = torch.exp2(torch.rand(shape, generator=generator) * 20 - 4)
    unseen = torch.rand(shape, generator=generator) < 0.05
    return {"exp_avg": m, "exp_avg_sq": torch.where(unseen, 0.0, s), "precond": torch.where(unseen, 0.0, v)}


def shards(shape, world):
    return [shard8.rows_of(shape, rank, world) for rank in range(world)]


def write(values, shape, world):
    """Each rank's 8-bit state of its rows, and the rows of all ranks put together (the checkpoint)."""
    local_states, rows = [], []
    for layout in shards(shape, world):
        state = {"step": torch.tensor(6.0)}
        for key in KEYS:
            state.update(quant8.quantize(key, values[key][layout.start : layout.start + layout.count]))
        local_states.append(state)
        rows.append(shard8.to_rows(state, layout))
    saved = {key: torch.cat([r[key] for r in rows]) for key in rows[0] if key != "step"}
    return local_states, saved


def read(saved, layout):
    """The rows of ``saved`` that DCP gives the reader ``layout``, through :func:`shard8.from_rows`."""
    mine = {key: value[layout.start : layout.start + layout.count] for key, value in saved.items()}
    return shard8.from_rows({"step": torch.tensor(6.0), **mine}, layout, saved_id=0)


def decoded(state):
    return {key: quant8.dequantize(key, state) for key in KEYS}


def assert_within_one_rounding(key, loaded, reference):
    """One more rounding of each codec (``anon_hf/storage/quant8.py``), with the reader's block scales bounded by the
    whole tensor's: m within 1/16 of itself plus 2**-16 of the largest |m| (below half the smallest code m rounds to 0);
    s within 1/16 plus 2**-31 of the largest s (a positive s below the smallest code, 1.25 * 2**-32, takes it); v
    within (log2 range of v) / 508 in log2. Exact zeros of s and v stay zeros (the refresh rule reads them)."""
    if reference.numel() == 0:  # a rank without rows
        return
    if key == "exp_avg":
        bound = reference.abs() / 16 + 2.0**-16 * reference.abs().max()
        assert bool(((loaded - reference).abs() <= bound).all()), key
        return
    assert torch.equal(loaded == 0, reference == 0), key
    positive = reference > 0
    if key == "exp_avg_sq":
        bound = reference / 16 + 2.0**-31 * reference.max()
        assert bool(((loaded - reference).abs() <= bound).all()), key
        return
    log_ref, log_loaded = reference[positive].log2(), loaded[positive].log2()
    span = (log_ref.max() - log_ref.min()).item()
    assert (log_loaded - log_ref).abs().max().item() <= span / 508 + 1e-5, key


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("worlds", WORLDS, ids=lambda w: f"{w[0]}to{w[1]}")
def test_rows_reshard_bitwise_when_the_blocks_agree_and_within_one_rounding_otherwise(shape, worlds):
    saved_world, loaded_world = worlds
    values = full_state(shape)
    written, saved = write(values, shape, saved_world)
    saved_decoded = {key: torch.cat([decoded(state)[key] for state in written]) for key in KEYS}
    row_numel = math.prod(shape[1:])
    for rank, layout in enumerate(shards(shape, loaded_world)):
        state = read(saved, layout)
        assert shard8.ROWS_KEY not in state and torch.equal(state["step"], torch.tensor(6.0))
        rows = slice(layout.start, layout.start + layout.count)
        if saved_world == loaded_world:
            assert state.keys() == written[rank].keys()
            for key, value in written[rank].items():
                assert torch.equal(state[key], value), (key, rank)
            continue
        mine = decoded(state)
        if row_numel % quant8.BLOCK == 0:  # blocks lie inside rows: nothing is decoded, the values are the saved ones
            for key in KEYS:
                assert torch.equal(mine[key], saved_decoded[key][rows]), key
            continue
        for key in KEYS:
            # The reference: the writer's decoded values, encoded in this shard's blocks by quant8 itself.
            expected = quant8.quantize(key, saved_decoded[key][rows])
            for name, value in expected.items():
                assert torch.equal(state[name], value), (name, rank)
            assert_within_one_rounding(key, mine[key], saved_decoded[key][rows])


def test_row_width_bounds_the_blocks_a_row_touches():
    assert [shard8.row_width(n) for n in (1, 48, 64, 256, 512, 896, 4096, 2880)] == [1, 2, 1, 1, 2, 4, 16, 12]
    for row_numel in (1, 3, 48, 100, 200, 300, 896):
        for first in range(0, 4 * 256, row_numel):  # every place a row can start in some layout
            touched = (first % 256 + row_numel - 1) // 256 + 1
            assert touched <= shard8.row_width(row_numel), (row_numel, first)


def test_rows_of_another_shard_are_refused_naming_both():
    shape = (200, 48)
    _, saved = write(full_state(shape), shape, 2)
    theirs, mine = shards(shape, 2)
    wrong = {key: value[theirs.start : theirs.start + theirs.count] for key, value in saved.items()}
    with pytest.raises(ValueError) as raised:
        shard8.from_rows(wrong, mine, saved_id=3)
    message = str(raised.value)
    assert "state of param 3 was written for [coordinates, mesh shape, numel] [0, 2, 4800] (rows 0 to 99)" in message
    assert "this rank holds [1, 2, 4800] (rows 100 to 199)" in message
    assert "load the checkpoint on the same world size" in message
    assert "torch.distributed.checkpoint" in message


def test_codes_of_the_wrong_size_are_refused():
    shape = (200, 48)
    _, saved = write(full_state(shape), shape, 1)
    (layout,) = shards(shape, 1)
    saved["exp_avg"] = saved["exp_avg"][:, :40]
    with pytest.raises(ValueError, match=r"State 'exp_avg' of param 0 holds 8000 codes on this rank, but its rows"):
        read(saved, layout)


def test_side_values_of_the_wrong_width_are_refused():
    shape = (200, 48)
    _, saved = write(full_state(shape), shape, 1)
    (layout,) = shards(shape, 1)
    saved["exp_avg_absmax"] = saved["exp_avg_absmax"][:, :1]
    with pytest.raises(ValueError, match=r"State 'exp_avg_absmax' of param 0 must be \(200, 2\) on this rank"):
        read(saved, layout)


@pytest.mark.parametrize("worlds", [(2, 2), (2, 1)], ids=["2to2", "2to1"])
def test_state_with_only_exp_avg_moves_too(worlds):
    # gamma = 0 keeps no exp_avg_sq or precond: only the keys present are moved.
    shape, (saved_world, loaded_world) = (200, 48), worlds
    m = full_state(shape)["exp_avg"]
    written, rows = [], []
    for layout in shards(shape, saved_world):
        state = {
            "step": torch.tensor(6.0),
            **quant8.quantize("exp_avg", m[layout.start : layout.start + layout.count]),
        }
        written.append(quant8.dequantize("exp_avg", state))
        rows.append(shard8.to_rows(state, layout))
    saved = {key: torch.cat([r[key] for r in rows]) for key in rows[0] if key != "step"}
    assert set(saved) == {"exp_avg", "exp_avg_absmax", shard8.ROWS_KEY}
    saved_decoded = torch.cat(written)
    for layout in shards(shape, loaded_world):
        state = read(saved, layout)
        assert set(state) == {"step", "exp_avg", "exp_avg_absmax"}
        mine = quant8.dequantize("exp_avg", state)
        reference = saved_decoded[layout.start : layout.start + layout.count]
        if saved_world == loaded_world:
            assert torch.equal(mine, reference)
        assert_within_one_rounding("exp_avg", mine, reference)
