"""Anon8bit's FSDP2 state through torch.distributed.checkpoint, saved on one world size and loaded on another.

Usage: ``torchrun --nproc_per_node W tests/distributed/reshard8_worker.py OUT_DIR save`` trains a small model under
raw FSDP2 for ``SAVE_AT`` steps, saves model and optimizer with DCP to ``OUT_DIR/ckpt_wW``, and trains on to
``STEPS``. Rank 0 also writes what the load side compares against (``ckpt_wW.reference.pt``): the parameters and the
decoded moments at the save, gathered whole, the codes and block scales of the tensors whose rows are multiples of
256 elements gathered whole too, and the final parameters of the uninterrupted run.

``torchrun --nproc_per_node W ... OUT_DIR load S [_upgraded]`` loads ``ckpt_wS`` (or ``ckpt_wS_upgraded``: the same
state saved in the form written before the state resharded, ``ckpt_wS_older``, then upgraded by
``shard8.upgrade_dcp_checkpoint``) into a fresh model and optimizer on W ranks and
reports, per 8-bit tensor and state key, whether the decoded moments equal the saved ones (and by how much they
differ), whether its 8-bit state equals a reference built here without ``anon_hf.storage.shard8`` (the saved codes of
row-aligned tensors cut to this shard's rows; the saved decoded moments of the others encoded by ``quant8`` in this
shard's blocks), then trains to ``STEPS``: against the uninterrupted run, and against a second fresh optimizer loaded
with that reference state per rank (``load_state_dict``), which must match bitwise.

The model mixes the layouts: rows of 256 with even and uneven shards and one rank without rows, rows of 48, 200 and
320 elements that blocks straddle, a 1-D tensor of 5,000, and a small tensor with full-precision state.
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Report, init_process_group, run_cases  # noqa: E402

from anon_hf import Anon8bit  # noqa: E402
from anon_hf.storage import quant8  # noqa: E402

SAVE_AT, STEPS, GLOBAL_BATCH = 6, 20, 4
KWARGS = dict(lr=1e-3, betas=(0.9, 0.999), gamma=1.0, weight_decay=0.01)
KEYS = list(quant8.QUANTIZED_KEYS)


class Net(torch.nn.Module):
    """Parameters of every row layout (see the module docstring); the loss touches all of them."""

    def __init__(self, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)

        def weight(*shape):
            return torch.nn.Parameter(torch.randn(*shape, generator=generator) * 0.05)

        self.a = weight(48, 256)  # rows of 256, even shards
        self.c = weight(33, 256)  # rows of 256, shards of 17 and 16 rows
        self.u = weight(1, 4608)  # rows of 4,608: rank 1 of 2 holds no row
        self.b = weight(200, 48)  # blocks straddle rows
        self.e = weight(13, 4, 80)  # rows of 320, shards of 7 and 6 rows
        self.d = weight(5000)  # 1-D, shards of 2,500
        self.norm = torch.nn.Parameter(1 + 0.1 * torch.randn(256, generator=generator))  # full precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(torch.tanh(x @ self.a.T) @ self.b.T)
        scaled = x * self.norm
        return (
            h.pow(2).mean()
            + torch.tanh(x @ self.c.T).pow(2).mean()
            + (x[:, :250] @ self.d.view(20, 250).T).pow(2).mean()
            + (scaled[:, :80] @ self.e.reshape(52, 80).T).pow(2).mean()
            + (x @ self.u.view(18, 256).T).pow(2).mean()
        )


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randn(GLOBAL_BATCH, 256, generator=generator) for _ in range(STEPS)]


def sharded(seed: int) -> Net:
    from torch.distributed.fsdp import fully_shard

    model = Net(seed)
    fully_shard(model)
    return model


def train(model, opt, chunk, rank, world) -> None:
    per_rank = GLOBAL_BATCH // world
    for x in chunk:
        model(x[rank * per_rank : (rank + 1) * per_rank]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def whole(value: torch.Tensor, param) -> torch.Tensor:
    """A new local tensor shaped like ``param``'s local shard, gathered whole (rows in mesh order). A copy: on one rank
    ``full_tensor()`` returns the shard's own storage, which the optimizer goes on updating in place."""
    from torch.distributed.tensor import DTensor

    shape = (param.shape[0], *value.shape[1:])
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return (
        DTensor.from_local(value, param.device_mesh, param.placements, run_check=False, shape=shape, stride=stride)
        .full_tensor()
        .clone()
    )


def eightbit(opt, model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "exp_avg_absmax" in opt.state[p]}


def aligned(param) -> bool:
    return (param.numel() // param.shape[0]) % quant8.BLOCK == 0


def decoded_whole(opt, model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in eightbit(opt, model).items():
        for key in KEYS:
            out[f"{name}.{key}"] = whole(quant8.dequantize(key, opt.state[p]).reshape(p.to_local().shape), p)
    return out


def full_params(model) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def dcp_state(model, opt):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def run_save(rank, world, out_dir, report) -> None:
    import torch.distributed.checkpoint as dcp

    data = batches()
    model = sharded(0)
    opt = Anon8bit(model.parameters(), **KWARGS)
    train(model, opt, data[:SAVE_AT], rank, world)
    path = os.path.join(out_dir, f"ckpt_w{world}")
    dcp.save(dcp_state(model, opt), checkpoint_id=path)
    full = full_state(model, opt)  # the other DCP form: gathered whole (rank 0 keeps it)
    if rank == 0:
        torch.save(full, path + ".full.pt")
    older = older_form_reloaded(model, opt, os.path.join(out_dir, f"older_w{world}.rank{rank}.pt"))
    # The same state as a DCP checkpoint of the older form (upgraded by the test, then loaded as "2_upgraded").
    older_state = dcp_state(model, opt)
    for name, p in eightbit(opt, model).items():
        older_state["optim"]["state"][name] = older_form(opt.state[p], p)
    dcp.save(older_state, checkpoint_id=path + "_older")
    reference = {"params": full_params(model), "decoded": decoded_whole(opt, model), "codes": {}}
    for name, p in eightbit(opt, model).items():
        if aligned(p):  # blocks lie inside rows: the whole tensor's codes and scales are the shards' in row order
            state, rows, width = opt.state[p], p.to_local().shape[0], p.numel() // p.shape[0] // quant8.BLOCK
            for key, sides in quant8.QUANTIZED_KEYS.items():
                reference["codes"][f"{name}.{key}"] = whole(state[key], p)
                for side in sides:
                    reference["codes"][f"{name}.{side}"] = whole(state[side].reshape(rows, width), p).reshape(-1)
    train(model, opt, data[SAVE_AT:], rank, world)
    reference["final"] = full_params(model)
    if rank == 0:
        torch.save(reference, path + ".reference.pt")
    report["save"] = {
        "older_form_mismatches": older,
        "eightbit": sorted(eightbit(opt, model)),
        "aligned": sorted(n for n, p in eightbit(opt, model).items() if aligned(p)),
    }


def full_state(model, opt):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "model": get_model_state_dict(model, options=options),
        "optim": get_optimizer_state_dict(model, opt, options=options),
    }


def older_form(state: dict, p) -> dict:
    """The DTensor form Anon8bit's state_dict() wrote before it resharded: each side-value vector and the shard
    record as a ``(world, max_blocks)`` DTensor, one row per rank."""
    from torch.distributed.tensor import DTensor, Shard

    mesh, world, rows = p.device_mesh, p.device_mesh.size(), p.shape[0]
    row_numel, chunk = p.numel() // rows, -(-rows // world)
    max_blocks = max(-(-max(0, min(chunk, rows - r * chunk)) * row_numel // quant8.BLOCK) for r in range(world))
    out = dict(state)
    for key, value in state.items():
        if key in KEYS:
            out[key] = DTensor.from_local(value, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        elif key != "step":
            width = max_blocks if key != "local_shard" else value.numel()
            row = torch.nn.functional.pad(value.reshape(-1), (0, width - value.numel())).unsqueeze(0)
            out[key] = DTensor.from_local(
                row, mesh, [Shard(0)], run_check=False, shape=(world, width), stride=(width, 1)
            )
    return out


def older_form_reloaded(model, opt, path) -> list[str]:
    """A per-rank file of :func:`older_form` entries, loaded into a fresh optimizer: the entries that differ."""
    saved = opt.state_dict()
    ids = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    for name, p in eightbit(opt, model).items():
        saved["state"][ids[name]] = older_form(opt.state[p], p)
    torch.save(saved, path)
    fresh = Anon8bit(model.parameters(), **KWARGS)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    return state_mismatches(opt, fresh, model)


def state_mismatches(opt, other, model) -> list[str]:
    """``name.key`` of every state entry (8-bit and full precision) where ``other`` differs from ``opt``."""
    from anon_hf.distributed.dtensor import local

    out = []
    for (name, p), q in zip(model.named_parameters(), other.param_groups[0]["params"], strict=True):
        mine, theirs = opt.state[p], other.state[q]
        if mine.keys() != theirs.keys():
            out.append(f"{name}: keys {sorted(mine)} != {sorted(theirs)}")
            continue
        out += [f"{name}.{k}" for k in mine if not torch.equal(local(mine[k]), local(theirs[k]))]
    return out


def reference_state(p, reference, name) -> dict[str, torch.Tensor]:
    """This rank's 8-bit state of ``p`` from the saved whole tensors, built with quant8 and slicing only."""
    local = p.to_local()
    chunk = -(-p.shape[0] // p.device_mesh.size())
    start = min(p.device_mesh.get_coordinate()[0] * chunk, p.shape[0])
    rows = slice(start, start + local.shape[0])
    row_blocks = (p.numel() // p.shape[0]) // quant8.BLOCK
    out = {}
    for key in KEYS:
        if aligned(p):
            out[key] = reference["codes"][f"{name}.{key}"][rows].clone()
            for side in quant8.QUANTIZED_KEYS[key]:
                out[side] = reference["codes"][f"{name}.{side}"][start * row_blocks : rows.stop * row_blocks].clone()
        else:
            out.update(quant8.quantize(key, reference["decoded"][f"{name}.{key}"][rows]))
    return out


def within_one_rounding(key: str, loaded: torch.Tensor, saved: torch.Tensor) -> bool:
    """``tests/test_shard8.py``'s bound of one more rounding by the codec of ``key``."""
    from test_shard8 import assert_within_one_rounding

    try:
        assert_within_one_rounding(key, loaded, saved)
    except AssertionError:
        return False
    return True


def run_load(rank, world, out_dir, report, source_world: int, suffix: str = "") -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    base = os.path.join(out_dir, f"ckpt_w{source_world}")
    reference = torch.load(base + ".reference.pt", weights_only=True)
    path = base + suffix  # "_upgraded": the older-form checkpoint of the same state, after upgrade_dcp_checkpoint
    data = batches()
    model = sharded(1)
    opt = Anon8bit(model.parameters(), **KWARGS)
    state = dcp_state(model, opt)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    result = {"steps": sorted({int(s["step"].item()) for s in opt.state.values()})}
    # The gathered form (full_state_dict=True), broadcast from rank 0: the same state as through dcp.load.
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    gathered = sharded(1)
    gathered_opt = Anon8bit(gathered.parameters(), **KWARGS)
    full = torch.load(base + ".full.pt", weights_only=True) if rank == 0 else {"model": {}, "optim": {}}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(gathered, full["model"], options=options)
    set_optimizer_state_dict(gathered, gathered_opt, full["optim"], options=options)
    result["full_state_dict_mismatches"] = state_mismatches(opt, gathered_opt, model)
    loaded = decoded_whole(opt, model)
    result["moments"] = {
        name: {
            "bitwise": torch.equal(value, reference["decoded"][name]),
            "max_rel": ((value - reference["decoded"][name]).abs() / reference["decoded"][name].abs())
            .nan_to_num(0.0, posinf=float("inf"))
            .max()
            .item()
            if value.numel()
            else 0.0,
            "zeros_kept": torch.equal(value == 0, reference["decoded"][name] == 0),
            "within_one_rounding": within_one_rounding(name.rsplit(".", 1)[1], value, reference["decoded"][name]),
        }
        for name, value in loaded.items()
    }
    result["params_bitwise"] = all(torch.equal(v, reference["params"][n]) for n, v in full_params(model).items())
    # The 8-bit state against the reference built without shard8, on every rank's shard.
    mismatched = []
    references = {}
    for name, p in eightbit(opt, model).items():
        references[name] = reference_state(p, reference, name)
        for key, value in references[name].items():
            if not torch.equal(opt.state[p][key], value):
                mismatched.append(f"{name}.{key}")
    result["state_mismatches"] = mismatched
    # dequantize_state_dict of the DTensor form: each shard's decoded state, as fp32 DTensors that Anon loads.
    from anon_hf import Anon, dequantize_state_dict

    fp32 = dequantize_state_dict(opt.state_dict())
    ids = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    result["dequantized_mismatches"] = [
        f"{name}.{key}"
        for name, p in eightbit(opt, model).items()
        for key in KEYS
        if not torch.equal(
            fp32["state"][ids[name]][key].to_local(),
            quant8.dequantize(key, opt.state[p]).reshape(p.to_local().shape),
        )
    ]
    Anon(model.parameters(), **KWARGS).load_state_dict(fp32)
    # A second optimizer, loaded per rank with the reference state (full-precision tensors: as DCP loaded them).
    twin = sharded(1)
    set_model_state_dict(twin, state["model"])
    twin_opt = Anon8bit(twin.parameters(), **KWARGS)
    plain = opt.state_dict()
    plain["state"] = {i: {k: v.clone() for k, v in entries.items()} for i, entries in plain["state"].items()}
    for name, p in eightbit(opt, model).items():
        plain["state"][ids[name]] = {"step": opt.state[p]["step"].clone(), **references[name]}
    twin_opt.load_state_dict(plain)
    train(model, opt, data[SAVE_AT:], rank, world)
    train(twin, twin_opt, data[SAVE_AT:], rank, world)
    final, twin_final = full_params(model), full_params(twin)
    result["vs_uninterrupted"] = max((final[n] - reference["final"][n]).abs().max().item() for n in final)
    result["vs_reference"] = max((final[n] - twin_final[n]).abs().max().item() for n in final)
    result["refresh_history"] = opt.refresh_history
    report[f"load_from_w{source_world}{suffix}"] = result


def main(out_dir: str, mode: str, *args: str) -> None:
    rank, world = init_process_group()
    source = "".join(args)  # "2", or "2_upgraded"
    name = f"reshard8_{mode}_w{world}" + (f"_from_w{source}" if args else "")
    report = Report(out_dir, name, rank)
    if mode == "save":
        runs = {"save": lambda: run_save(rank, world, out_dir, report)}
    else:
        suffix = source[len(args[0]) :]
        runs = {f"load_from_w{source}": lambda: run_load(rank, world, out_dir, report, int(args[0]), suffix)}
    run_cases(runs, [], report)


if __name__ == "__main__":
    main(*sys.argv[1:])
