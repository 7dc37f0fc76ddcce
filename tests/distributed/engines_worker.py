"""One torchrun launch for the engine matrix: DDP, FSDP2, ZeRO-1/2/3 and ZeRO-2 with CPU offload.

Usage: ``torchrun --nproc_per_node 2 tests/distributed/engines_worker.py OUT_DIR``

For each engine: 20 steps of the tiny Llama on fixed data, with a checkpoint at step 6; then a fresh model and
optimizer resume from that checkpoint and run to step 20. Each rank records, per engine, the largest difference
of the final parameters from single-process Anon on the same global batch, the difference of the resumed run
from the uninterrupted one, the sizes of its state tensors next to the sizes of its partitions, and the steps
at which Anon refreshed. The FSDP2 (sharded DCP) and ZeRO-2/3 checkpoints, the step-6 preconditioners and the
final parameters stay in OUT_DIR for the resumes on other world sizes (universal_worker.py, multinode_worker.py).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    ANON_KWARGS,
    GLOBAL_BATCH,
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

from anon_hf import Anon  # noqa: E402


def state_sizes(optimizer: Anon, expected_numel) -> list[dict]:
    """For each state tensor: its key, numel and the numel of the tensor it updates (this rank's partition)."""
    rows = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state[p].items():
                if key == "step":
                    continue
                rows.append({"key": key, "numel": value.numel(), "partition": expected_numel(p)})
    return rows


def named_state_keys(optimizer: Anon) -> list[str]:
    return sorted({key for state in optimizer.state.values() for key in state})


# ---------------------------------------------------------------- DDP


def run_ddp(rank, world, batches, reference, report):
    from torch.nn.parallel import DistributedDataParallel as DDP

    def train(model, opt, chunk):
        ddp = DDP(model)
        for batch in chunk:
            causal_lm_loss(ddp, local_rows(batch, rank, world)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    model = tiny_llama()
    opt = Anon(model.parameters(), **ANON_KWARGS)
    train(model, opt, batches[:SAVE_AT])
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = torch.load(_roundtrip(opt.state_dict(), report, "ddp"), weights_only=True)
    train(model, opt, batches[SAVE_AT:])
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    resumed = tiny_llama(seed=1)
    resumed.load_state_dict(saved_model)
    ropt = Anon(resumed.parameters(), **ANON_KWARGS)
    ropt.load_state_dict(saved_opt)
    train(resumed, ropt, batches[SAVE_AT:])
    report["ddp"] = {
        "parity": max_abs_diff(final, reference),
        "resume": max_abs_diff({n: p.detach() for n, p in resumed.named_parameters()}, final),
        "state": state_sizes(opt, lambda p: p.numel()),
        "state_keys": named_state_keys(opt),
        "refresh_history": opt.refresh_history,
    }


def _roundtrip(state_dict, report, name):
    path = os.path.join(os.path.dirname(report.path), f"{name}_optim.rank{dist.get_rank()}.pt")
    torch.save(state_dict, path)
    return path


# ---------------------------------------------------------------- FSDP2


def fsdp2_model(seed: int = 0) -> torch.nn.Module:
    """The tiny Llama with each decoder layer and the whole model under raw ``fully_shard`` (any world size)."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(seed)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def fsdp2_train(model, opt, chunk, rank: int, world: int) -> None:
    for batch in chunk:
        causal_lm_loss(model, local_rows(batch, rank, world)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter gathered from its DTensor shards (a collective), by name."""
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def fsdp2_full_state(model, opt: Anon, key: str) -> dict[str, torch.Tensor]:
    """One optimizer state key of every parameter, gathered from the DTensor shards (a collective), by name."""
    return {n: opt.state[p][key].full_tensor().detach().clone() for n, p in model.named_parameters()}


def run_fsdp2(rank, world, batches, reference, report, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    def train(model, opt, chunk):
        fsdp2_train(model, opt, chunk, rank, world)

    model = fsdp2_model()
    opt = Anon(model.parameters(), **ANON_KWARGS)
    train(model, opt, batches[:SAVE_AT])
    precond = fsdp2_full_state(model, opt, "precond")
    if rank == 0:  # what a resume on another world size must load
        torch.save(precond, os.path.join(out_dir, f"fsdp2_precond_step{SAVE_AT}.pt"))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # Written to disk at once, as a checkpoint would be: the "step" tensors of the returned dict are the
    # optimizer's own CPU tensors, which the next steps increment in place.
    full_path = os.path.join(out_dir, f"fsdp2_full_step{SAVE_AT}.rank{rank}.pt")
    torch.save(
        {
            "model": get_model_state_dict(model, options=full),
            "optim": get_optimizer_state_dict(model, opt, options=full),
        },
        full_path,
    )
    sharded_dir = os.path.join(out_dir, "fsdp2_dcp_step6")
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=sharded_dir,
    )
    train(model, opt, batches[SAVE_AT:])
    final = full_params(model)
    if rank == 0:
        torch.save(final, os.path.join(out_dir, "fsdp2_final.pt"))

    layout = []
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if key == "step":
                continue
            layout.append(
                {
                    "key": key,
                    "dtensor": isinstance(value, DTensor),
                    "same_placements": isinstance(value, DTensor) and value.placements == p.placements,
                    "numel": value.to_local().numel() if isinstance(value, DTensor) else value.numel(),
                    "partition": p.to_local().numel(),
                    "full": p.numel(),
                }
            )

    # Resume from the full (gathered) state dicts: rank 0's copy is broadcast.
    resumed_full = fsdp2_model(seed=1)
    ropt_full = Anon(resumed_full.parameters(), **ANON_KWARGS)
    load_full = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    saved = torch.load(full_path, weights_only=True)
    full_model_sd, full_optim_sd = saved["model"], saved["optim"]
    set_model_state_dict(resumed_full, full_model_sd if rank == 0 else {}, options=load_full)
    set_optimizer_state_dict(resumed_full, ropt_full, full_optim_sd if rank == 0 else {}, options=load_full)
    after_load_full = [int(s["step"].item()) for s in ropt_full.state.values()]
    train(resumed_full, ropt_full, batches[SAVE_AT:])

    # Resume from the sharded DCP checkpoint: building the state dict of an empty optimizer runs torch's
    # zero-gradient, lr = 0 initialisation step, which must create every key and change nothing.
    resumed_sharded = fsdp2_model(seed=1)
    ropt_sharded = Anon(resumed_sharded.parameters(), **ANON_KWARGS)
    state = {
        "model": get_model_state_dict(resumed_sharded),
        "optim": get_optimizer_state_dict(resumed_sharded, ropt_sharded),
    }
    init_step_keys = named_state_keys(ropt_sharded)
    dcp.load(state, checkpoint_id=sharded_dir)
    set_model_state_dict(resumed_sharded, state["model"])
    set_optimizer_state_dict(resumed_sharded, ropt_sharded, state["optim"])
    after_load_sharded = [int(s["step"].item()) for s in ropt_sharded.state.values()]
    train(resumed_sharded, ropt_sharded, batches[SAVE_AT:])

    report["fsdp2"] = {
        "parity": max_abs_diff(final, reference),
        "resume_full": max_abs_diff(full_params(resumed_full), final),
        "resume_sharded": max_abs_diff(full_params(resumed_sharded), final),
        "steps_after_load_full": sorted(set(after_load_full)),
        "steps_after_load_sharded": sorted(set(after_load_sharded)),
        "init_step_state_keys": init_step_keys,
        "full_optim_sd_keys": sorted({k for s in full_optim_sd.get("state", {}).values() for k in s})
        if rank == 0
        else None,
        "state": layout,
        "state_keys": named_state_keys(opt),
        "refresh_history": opt.refresh_history,
    }


def run_fsdp2_fused(rank, world, batches, reference, report):
    """Anon(fused=True) on FSDP2: each DTensor parameter steps its local shard through the C++ kernel."""
    from anon_hf.backends import fused as _fused

    model = fsdp2_model()
    opt = Anon(model.parameters(), **ANON_KWARGS, fused=True)
    before = dict(_fused.stats)
    fsdp2_train(model, opt, batches, rank, world)
    report["fsdp2_fused"] = {
        "parity": max_abs_diff(full_params(model), reference),
        "kernel_steps": _fused.stats["kernel"] - before.get("kernel", 0),
        "eager_fallbacks": _fused.stats["fallback"] - before.get("fallback", 0),
        "state_keys": named_state_keys(opt),
        "refresh_history": opt.refresh_history,
    }


def run_fsdp2_nonfinite(rank, world, batches, report):
    """Only rank 1's shard of one gradient holds inf at the refresh of step 4: every rank must raise there."""
    from anon_hf import NonFinitePreconditionerError

    model = fsdp2_model()
    opt = Anon(model.parameters(), **ANON_KWARGS, fused=True)
    weight = model.model.embed_tokens.weight
    raised = None
    for step, batch in enumerate(batches[:6], start=1):
        causal_lm_loss(model, local_rows(batch, rank, world)).backward()
        if step == 4 and rank == 1:
            weight.grad.to_local()[0, 0] = float("inf")
        try:
            opt.step()
        except NonFinitePreconditionerError as err:
            raised = {"step": step, "error_step": err.step, "shape": list(err.shape)}
            break
        opt.zero_grad(set_to_none=True)
    report["fsdp2_nonfinite"] = {"raised": raised, "full_shape": list(weight.shape)}


# ---------------------------------------------------------------- DeepSpeed ZeRO


def ds_config(stage: int, world: int, offload: bool = False, **extra) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "Anon",
            "params": {**ANON_KWARGS, "betas": list(ANON_KWARGS["betas"])},
        },
        "zero_optimization": {"stage": stage},
        # DeepSpeed 0.19 clips gradients at norm 1.0 unless told otherwise; the reference does not clip.
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    config.update(extra)
    return config


def zero_partitions(engine, stage: int) -> list[torch.Tensor]:
    """The flat fp32 tensors DeepSpeed hands to the inner optimizer on this rank."""
    if stage == 3:
        return list(engine.optimizer.fp32_partitioned_groups_flat)
    return list(engine.optimizer.single_partition_of_fp32_groups)


def zero_full_params(engine, stage: int) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone().float() for n, p in engine.module.named_parameters()}
    return {n: p.detach().clone().float() for n, p in engine.module.named_parameters()}


def zero_full_state(engine, stage: int, key: str) -> dict[str, torch.Tensor]:
    """One optimizer state key of every parameter, gathered from the partitions (a collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    return {n: safe_get_full_optimizer_state(p, key).detach().clone() for n, p in engine.module.named_parameters()}


def ds_train(engine, chunk, rank, world):
    for batch in chunk:
        loss = causal_lm_loss(engine, local_rows(batch, rank, world))
        engine.backward(loss)
        engine.step()


def run_zero(stage, rank, world, batches, reference, report, out_dir, offload=False, name=None, fused=False):
    import deepspeed

    from anon_hf.backends import fused as _fused

    name = name or f"zero{stage}"
    config = ds_config(stage, world, offload=offload)
    if fused:  # on CPU partitions (offload), anon_hf's C++ kernel steps them
        config["optimizer"]["params"]["fused"] = True
    kernel_steps_before = _fused.stats["kernel"]
    model = tiny_llama()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    anon = engine.optimizer.optimizer
    ckpt_dir = os.path.join(out_dir, f"{name}_ckpt")
    ds_train(engine, batches[:SAVE_AT], rank, world)
    engine.save_checkpoint(ckpt_dir, tag=f"step{SAVE_AT}")
    precond = zero_full_state(engine, stage, "precond")
    if rank == 0:  # what a universal resume on another world size must load
        torch.save(precond, os.path.join(out_dir, f"{name}_precond_step{SAVE_AT}.pt"))
    calls_before = anon._sync.calls
    ds_train(engine, batches[SAVE_AT : SAVE_AT + 1], rank, world)
    calls_per_iteration = anon._sync.calls - calls_before
    ds_train(engine, batches[SAVE_AT + 1 :], rank, world)
    final = zero_full_params(engine, stage)
    if rank == 0:
        torch.save(final, os.path.join(out_dir, f"{name}_final.pt"))
    partitions = zero_partitions(engine, stage)
    sizes = [
        {"key": key, "numel": value.numel(), "partition": flat.numel()}
        for flat in partitions
        for key, value in anon.state[flat].items()
        if key != "step"
    ]
    result = {
        "inner_type": type(anon).__name__,
        "parity": max_abs_diff(final, reference),
        "state": sizes,
        "state_keys": named_state_keys(anon),
        "total_params": sum(p.numel() for p in reference.values()),
        "refresh_history": anon.refresh_history,
        "inner_step_calls_per_iteration": calls_per_iteration,
        "partition_devices": sorted({str(flat.device) for flat in partitions}),
        "kernel_steps": _fused.stats["kernel"] - kernel_steps_before,
    }
    del engine, anon

    resumed_model = tiny_llama(seed=1)
    resumed, *_ = deepspeed.initialize(model=resumed_model, model_parameters=resumed_model.parameters(), config=config)
    resumed.load_checkpoint(ckpt_dir, tag=f"step{SAVE_AT}")
    ds_train(resumed, batches[SAVE_AT:], rank, world)
    result["resume"] = max_abs_diff(zero_full_params(resumed, stage), final)
    result["resume_refresh_history"] = resumed.optimizer.optimizer.refresh_history
    report[name] = result


def run_client_offload_checks(rank, world, report):
    """A client Anon under offload: DeepSpeed's own refusal while zero_force_ds_cpu_optimizer is left true,
    and a working engine once it is false."""
    import deepspeed

    config = ds_config(2, world, offload=True)
    del config["optimizer"]
    model = tiny_llama()
    outcome = {}
    try:
        deepspeed.initialize(model=model, optimizer=Anon(model.parameters(), **ANON_KWARGS), config=config)
        outcome["default_flag"] = "no error"
    except Exception as err:  # DeepSpeed's ZeRORuntimeException
        outcome["default_flag"] = f"{type(err).__name__}: {err}"
    model = tiny_llama()
    config["zero_force_ds_cpu_optimizer"] = False
    engine, *_ = deepspeed.initialize(model=model, optimizer=Anon(model.parameters(), **ANON_KWARGS), config=config)
    ds_train(engine, global_batches(3), rank, world)
    outcome["flag_false_inner_type"] = type(engine.optimizer.optimizer).__name__
    outcome["flag_false_steps"] = sorted({int(s["step"].item()) for s in engine.optimizer.optimizer.state.values()})
    report["client_offload"] = outcome


def main(out_dir: str, only: list[str]) -> None:
    rank, world = init_process_group()
    report = Report(out_dir, "engines", rank)
    batches = global_batches()
    reference = reference_run()
    runs = {
        "ddp": lambda: run_ddp(rank, world, batches, reference, report),
        "fsdp2": lambda: run_fsdp2(rank, world, batches, reference, report, out_dir),
        "fsdp2_fused": lambda: run_fsdp2_fused(rank, world, batches, reference, report),
        "fsdp2_nonfinite": lambda: run_fsdp2_nonfinite(rank, world, batches, report),
        "zero1": lambda: run_zero(1, rank, world, batches, reference, report, out_dir),
        "zero2": lambda: run_zero(2, rank, world, batches, reference, report, out_dir),
        "zero3": lambda: run_zero(3, rank, world, batches, reference, report, out_dir),
        "zero2_offload": lambda: run_zero(
            2, rank, world, batches, reference, report, out_dir, offload=True, name="zero2_offload"
        ),
        "zero2_offload_fused": lambda: run_zero(
            2, rank, world, batches, reference, report, out_dir, offload=True, name="zero2_offload_fused", fused=True
        ),
        "client_offload": lambda: run_client_offload_checks(rank, world, report),
    }
    if any(name.startswith("zero") or name == "client_offload" for name in (only or runs)):
        import deepspeed  # `import anon_hf` above registered its hooks: ZeRO accepts Anon from here on

        deepspeed.init_distributed(dist_backend="gloo")
    run_cases(runs, only, report)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
