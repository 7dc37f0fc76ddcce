"""Anon across two launcher agents ("nodes") on one machine, and a job resized between world sizes.

Usage, once per agent (``tests/test_multinode.py`` starts both, meeting at a free port of 127.0.0.1)::

    torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT --rdzv_id JOB \\
        -m anon_hf run tests/distributed/multinode_worker.py OUT_DIR [--from SOURCE_DIR] RUN ...

RUN is any of:

* ``ddp``, ``fsdp2``, ``zero2``, ``zero3``: the engine runs of ``engines_worker.py`` (20 steps against one process
  on the same global batch, checkpoint at step 6, resume at the same world size). ``fsdp2``, ``zero2`` and
  ``zero3`` leave their step-6 checkpoints, the step-6 preconditioner and the final weights in OUT_DIR;
* ``resize_fsdp2``: load SOURCE_DIR's sharded step-6 DCP checkpoint (written at another world size) into a fresh
  FSDP2 model and Anon, reshard it onto this world size, train to step 20;
* ``resize_zero2``, ``resize_zero3``: the same from SOURCE_DIR's universal checkpoint ``zero<stage>_ckpt/
  step6_universal`` (made by ``python -m anon_hf.integrations.deepspeed_universal``);
* ``refuse_zero2``: load SOURCE_DIR's ZeRO-2 checkpoint as is (not universal) on this world size;
* ``gamma0_zero2``, ``gamma0_zero3``: 3 steps of Anon with ``gamma=0`` (no ``exp_avg_sq``), checkpointed to
  ``OUT_DIR/gamma0_zero<stage>_ckpt/step3`` for the converter to refuse.

Each rank writes ``OUT_DIR/multinode.rank<r>.json`` with where it ran (node rank, local rank) and whether Anon
was registered before the worker imported anything of anon_hf (true under ``-m anon_hf run``).
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

# Before any import of anon_hf here: only a launcher wrapper (`-m anon_hf run`) can have registered Anon by now.
PRELOADED = hasattr(torch.optim, "Anon")

import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    ANON_KWARGS,
    SAVE_AT,
    Report,
    finish,
    global_batches,
    init_process_group,
    max_abs_diff,
    reference_run,
    tiny_llama,
)
from engines_worker import (  # noqa: E402
    ds_config,
    ds_train,
    fsdp2_full_state,
    fsdp2_model,
    fsdp2_train,
    full_params,
    run_ddp,
    run_fsdp2,
    run_zero,
)
from universal_worker import TAG, resume_universal  # noqa: E402

from anon_hf import Anon  # noqa: E402


def resize_fsdp2(rank: int, world: int, source: str) -> dict:
    """SOURCE's sharded DCP checkpoint of step 6, resharded onto ``world`` ranks, then steps 7 to 20."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = fsdp2_model(seed=1)
    opt = Anon(model.parameters(), **ANON_KWARGS)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=os.path.join(source, f"fsdp2_dcp_step{SAVE_AT}"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    steps_after_load = sorted({int(s["step"].item()) for s in opt.state.values()})
    # Building the state dict of the empty optimizer ran torch's zero-gradient step, which refreshed at its step 1.
    refreshes_before_load = len(opt.refresh_history)
    loaded = fsdp2_full_state(model, opt, "precond")
    expected = torch.load(os.path.join(source, f"fsdp2_precond_step{SAVE_AT}.pt"), weights_only=True)
    fsdp2_train(model, opt, global_batches()[SAVE_AT:], rank, world)
    final = torch.load(os.path.join(source, "fsdp2_final.pt"), weights_only=True)
    return {
        "steps_after_load": steps_after_load,
        "precond": max_abs_diff(loaded, expected),
        "resume": max_abs_diff(full_params(model), final),
        "refreshes_after_load": opt.refresh_history[refreshes_before_load:],
    }


def refuse_zero2(world: int, source: str) -> str:
    """Load SOURCE's ZeRO-2 checkpoint without conversion; returns the error (or "no error")."""
    import deepspeed

    model = tiny_llama(seed=1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(2, world))
    try:
        engine.load_checkpoint(os.path.join(source, "zero2_ckpt"), tag=TAG, load_optimizer_states=True)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def gamma0_checkpoint(stage: int, rank: int, world: int, out_dir: str) -> str:
    """A ZeRO checkpoint of Anon with gamma=0 after 3 steps; returns its folder."""
    import deepspeed

    config = ds_config(stage, world)
    config["optimizer"]["params"]["gamma"] = 0.0
    model = tiny_llama()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ds_train(engine, global_batches(3), rank, world)
    ckpt_root = os.path.join(out_dir, f"gamma0_zero{stage}_ckpt")
    engine.save_checkpoint(ckpt_root, tag="step3")
    return os.path.join(ckpt_root, "step3")


def main(out_dir: str, source: str | None, runs: list[str]) -> None:
    rank, world = init_process_group()
    report = Report(out_dir, "multinode", rank)
    report["where"] = {
        "group_rank": os.environ.get("GROUP_RANK", os.environ.get("CROSS_RANK")),  # torchrun, deepspeed
        "local_rank": os.environ.get("LOCAL_RANK"),
        "world": world,
        "local_world": os.environ.get("LOCAL_WORLD_SIZE"),
        "preloaded": PRELOADED,
    }
    if any("zero" in name for name in runs):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    batches = global_batches()
    reference = reference_run() if any(name in ("ddp", "fsdp2", "zero2", "zero3") for name in runs) else None
    engine_runs = {  # each writes its own section of the report
        "ddp": lambda: run_ddp(rank, world, batches, reference, report),
        "fsdp2": lambda: run_fsdp2(rank, world, batches, reference, report, out_dir),
        "zero2": lambda: run_zero(2, rank, world, batches, reference, report, out_dir),
        "zero3": lambda: run_zero(3, rank, world, batches, reference, report, out_dir),
    }
    resize_runs = {
        "resize_fsdp2": lambda: resize_fsdp2(rank, world, source),
        "resize_zero2": lambda: _resize_zero(2, rank, world, source),
        "resize_zero3": lambda: _resize_zero(3, rank, world, source),
        "refuse_zero2": lambda: refuse_zero2(world, source),
        "gamma0_zero2": lambda: gamma0_checkpoint(2, rank, world, out_dir),
        "gamma0_zero3": lambda: gamma0_checkpoint(3, rank, world, out_dir),
    }
    for name in runs:
        try:
            if name in engine_runs:
                engine_runs[name]()
            else:
                report[name] = resize_runs[name]()
        except Exception:
            report[f"{name}_error"] = traceback.format_exc()
            traceback.print_exc()
        dist.barrier()
    finish()


def _resize_zero(stage: int, rank: int, world: int, source: str) -> dict:
    ckpt_root = os.path.join(source, f"zero{stage}_ckpt")
    return resume_universal(stage, ckpt_root, f"{TAG}_universal", source, rank, world)


if __name__ == "__main__":
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]  # the deepspeed launcher's
    source_dir = None
    if len(args) > 2 and args[1] == "--from":
        source_dir = args[2]
        args = [args[0], *args[3:]]
    main(args[0], source_dir, args[1:])
