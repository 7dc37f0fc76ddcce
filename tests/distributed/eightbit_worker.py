"""Anon8bit on 2 gloo ranks: DeepSpeed ZeRO-1/2/3 (``"type": "Anon8bit"``) and raw FSDP2, each with a resume.

Usage: ``torchrun --nproc_per_node 2 tests/distributed/eightbit_worker.py OUT_DIR [zero1] [zero2] [zero3]
[zero2_offload_fused] [fsdp2]``

Each engine trains the tiny Llama for 20 steps on fixed data with a checkpoint at step 6; a fresh model and optimizer
resume from it and run to step 20. Each rank records the largest difference of the final parameters from
single-process Anon8bit and from single-process fp32 Anon on the same global batch, the difference of the resumed run
from the uninterrupted one, and the dtypes of its state. The blocks of 256 follow the tensors in one process, ZeRO's
flat partitions under ZeRO and the local shards under FSDP2, so the codes differ between layouts: parity is within
the 8-bit noise, not bitwise (the test states the bound).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    ANON_KWARGS,
    SAVE_AT,
    Report,
    causal_lm_loss,
    global_batches,
    init_process_group,
    local_rows,
    max_abs_diff,
    reference_run,
    run_cases,
    tiny_llama,
)
from engines_worker import ds_config, ds_train, zero_full_params, zero_partitions  # noqa: E402

from anon_hf import Anon8bit  # noqa: E402


def reference_8bit_run(batches, fused: bool = False) -> dict[str, torch.Tensor]:
    """Single-process Anon8bit on the full global batch: the final parameters by name."""
    model = tiny_llama()
    opt = Anon8bit(model.parameters(), **ANON_KWARGS, fused=fused, verify_sync=False)
    for batch in batches:
        causal_lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def state_dtypes(optimizer) -> dict[str, str]:
    return {key: str(value.dtype) for state in optimizer.state.values() for key, value in state.items()}


def run_zero(rank, world, batches, references, report, out_dir, stage, offload=False):
    import deepspeed

    from anon_hf.backends.fused import stats as fused_stats

    name = f"zero{stage}_offload_fused" if offload else f"zero{stage}"
    config = ds_config(stage, world, offload=offload)
    config["optimizer"]["type"] = "Anon8bit"
    if offload:  # ZeRO-Offload: the CPU partitions go through the 8-bit C++ kernel between refreshes
        config["optimizer"]["params"]["fused"] = True
    kernel_calls = fused_stats["kernel_8bit"]
    model = tiny_llama()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    inner = engine.optimizer.optimizer
    ckpt_dir = os.path.join(out_dir, f"{name}_8bit_ckpt")
    ds_train(engine, batches[:SAVE_AT], rank, world)
    engine.save_checkpoint(ckpt_dir, tag=f"step{SAVE_AT}")
    ds_train(engine, batches[SAVE_AT:], rank, world)
    final = zero_full_params(engine, stage)
    result = {
        "inner_type": type(inner).__name__,
        "state_dtypes": state_dtypes(inner),
        "partition_numel": [flat.numel() for flat in zero_partitions(engine, stage)],
        "parity_8bit": max_abs_diff(final, references["8bit"]),
        "parity_fp32": max_abs_diff(final, references["fp32"]),
        "refresh_history": inner.refresh_history,
        "partition_devices": sorted({str(flat.device) for flat in zero_partitions(engine, stage)}),
        "kernel_calls": fused_stats["kernel_8bit"] - kernel_calls,
    }
    del engine, inner
    resumed_model = tiny_llama(seed=1)
    resumed, *_ = deepspeed.initialize(model=resumed_model, model_parameters=resumed_model.parameters(), config=config)
    resumed.load_checkpoint(ckpt_dir, tag=f"step{SAVE_AT}")
    ds_train(resumed, batches[SAVE_AT:], rank, world)
    result["resume"] = max_abs_diff(zero_full_params(resumed, stage), final)
    report[name] = result


def run_fsdp2(rank, world, batches, references, report, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    def sharded_model(seed):
        model = tiny_llama(seed)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model

    def train(model, opt, chunk):
        for batch in chunk:
            causal_lm_loss(model, local_rows(batch, rank, world)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def full_params(model):
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}

    model = sharded_model(0)
    opt = Anon8bit(model.parameters(), **ANON_KWARGS)
    train(model, opt, batches[:SAVE_AT])
    # This rank's shards and its optimizer state (8-bit codes of its local shards), as a per-rank checkpoint.
    path = os.path.join(out_dir, f"fsdp2_8bit_step{SAVE_AT}.rank{rank}.pt")
    shards = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    torch.save({"shards": shards, "optimizer": opt.state_dict()}, path)
    # The same checkpoint through torch.distributed.checkpoint, as accelerate's FSDP2 save_state writes it.
    dcp_dir = os.path.join(out_dir, f"fsdp2_8bit_dcp_step{SAVE_AT}")
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=dcp_dir
    )
    train(model, opt, batches[SAVE_AT:])
    final = full_params(model)
    result = {
        "state_dtypes": state_dtypes(opt),
        "parity_8bit": max_abs_diff(final, references["8bit"]),
        "parity_fp32": max_abs_diff(final, references["fp32"]),
        "refresh_history": opt.refresh_history,
    }
    saved = torch.load(path, weights_only=True)
    resumed = sharded_model(1)
    with torch.no_grad():
        for n, p in resumed.named_parameters():
            p.to_local().copy_(saved["shards"][n])
    ropt = Anon8bit(resumed.parameters(), **ANON_KWARGS)
    ropt.load_state_dict(saved["optimizer"])
    train(resumed, ropt, batches[SAVE_AT:])
    result["resume"] = max_abs_diff(full_params(resumed), final)

    fresh = sharded_model(1)
    fresh_opt = Anon8bit(fresh.parameters(), **ANON_KWARGS)
    state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(state, checkpoint_id=dcp_dir)
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
    train(fresh, fresh_opt, batches[SAVE_AT:])
    result["dcp_resume"] = max_abs_diff(full_params(fresh), final)

    # Another rank's per-rank file: its codes describe another shard, and the load says so.
    other = torch.load(path.replace(f".rank{rank}.", f".rank{1 - rank}."), weights_only=True)
    try:
        Anon8bit(sharded_model(1).parameters(), **ANON_KWARGS).load_state_dict(other["optimizer"])
        result["other_rank_load"] = "loaded"
    except ValueError as err:
        result["other_rank_load"] = str(err)
    report["fsdp2"] = result


def run_fsdp2_fused(rank, world, batches, references, report):
    """Anon8bit(fused=True) on FSDP2: between refreshes the 8-bit kernel steps each DTensor's local shard."""
    from torch.distributed.fsdp import fully_shard

    from anon_hf.backends.fused import stats

    model = tiny_llama(0)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = Anon8bit(model.parameters(), **ANON_KWARGS, fused=True)
    kernel_calls = stats["kernel"]
    for batch in batches:
        causal_lm_loss(model, local_rows(batch, rank, world)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    final = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    report["fsdp2_fused"] = {
        "kernel_calls": stats["kernel"] - kernel_calls,
        "parity_8bit_fused": max_abs_diff(final, reference_8bit_run(batches, fused=True)),
        "refresh_history": opt.refresh_history,
    }


def main(out_dir: str, only: list[str]) -> None:
    rank, world = init_process_group()
    report = Report(out_dir, "eightbit", rank)
    batches = global_batches()
    references = {"8bit": reference_8bit_run(batches), "fp32": reference_run()}
    runs = {
        "zero1": lambda: run_zero(rank, world, batches, references, report, out_dir, 1),
        "zero2": lambda: run_zero(rank, world, batches, references, report, out_dir, 2),
        "zero3": lambda: run_zero(rank, world, batches, references, report, out_dir, 3),
        "zero2_offload_fused": lambda: run_zero(rank, world, batches, references, report, out_dir, 2, offload=True),
        "fsdp2": lambda: run_fsdp2(rank, world, batches, references, report, out_dir),
        "fsdp2_fused": lambda: run_fsdp2_fused(rank, world, batches, references, report),
    }
    if not only or any(name.startswith("zero") for name in only):
        import deepspeed  # `import anon_hf` registered its hooks: ZeRO accepts Anon8bit from here on

        deepspeed.init_distributed(dist_backend="gloo")
    run_cases(runs, only, report)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
