"""Trainer runs for the crash-and-resume tests: uninterrupted, SIGKILLed after the step-6 checkpoint, resumed.

Usage::

    python tests/crash/trainer_worker.py OUT_DIR PHASE [PHASE ...]                      # one process
    torchrun --nproc_per_node 2 tests/crash/trainer_worker.py OUT_DIR PHASE ... --deepspeed CONFIG.json

Phases, run in the order given in one process (the transformers import, ~10 s, is paid once):

* ``full``: 20 steps without interruption in ``OUT_DIR/full``; writes ``OUT_DIR/full/result.rank{r}.pt``.
* ``crash-at-save``: the same run in ``OUT_DIR/crash``, SIGKILLed from ``on_save`` at step 6, once every rank
  has checked that its part of ``checkpoint-6`` is on disk and all ranks have passed a barrier.
* ``crash-in-step8``: the same, SIGKILLed during step 8, right after ``optimizer.step()`` (so after the step-8
  refresh of the preconditioner in memory), two steps after the checkpoint.
* ``resume``: a fresh model (other seed) and Trainer, ``train(resume_from_checkpoint=OUT_DIR/crash/checkpoint-6)``
  to step 20; writes ``OUT_DIR/crash/result.rank{r}.pt``.
* ``resume-without-optimizer``: the control (single process only): the same resume from a copy of
  ``checkpoint-6`` without ``optimizer.pt``, which the Trainer accepts silently and continues with a fresh Anon;
  writes ``OUT_DIR/no_optimizer/result.rank0.pt``. It shows that the comparison sees the optimizer state.

Before a kill, each rank writes ``OUT_DIR/killed.rank{r}.json`` (the step and what was checked). A result file
holds the final parameters by name, Anon's state by parameter name (single process) or the full state gathered
from the ZeRO partitions plus this rank's partition state (DeepSpeed), the refresh history and the global step.
The test compares the files; nothing is asserted here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import sys

import torch
import torch.distributed as dist

import anon_hf  # noqa: F401  (registers --optim anon and the DeepSpeed hooks before transformers is imported)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny import TokenDataset, tiny_llama  # noqa: E402

STEPS = 20
SAVE_AT = 6
KILL_STEP = 8


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def expected_checkpoint_files(checkpoint: str, deepspeed: bool) -> list[str]:
    """What this rank's part of a complete Trainer checkpoint holds (rank 0 also the shared files)."""
    rank, world = rank_and_world()
    files = ["model.safetensors", "trainer_state.json", "training_args.bin"] if rank == 0 else []
    if deepspeed:
        step_dir = f"global_step{SAVE_AT}"
        files.append(os.path.join(step_dir, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        files.append(f"rng_state_{rank}.pth")
        if rank == 0:
            files += ["latest", os.path.join(step_dir, "mp_rank_00_model_states.pt")]
    else:
        files += ["optimizer.pt", "scheduler.pt", "rng_state.pth"]
    return [os.path.join(checkpoint, name) for name in files]


def make_kill_callback(out_dir: str, mode: str, deepspeed: bool):
    from transformers import TrainerCallback

    def die(step: int, checked: list[str]) -> None:
        rank, _ = rank_and_world()
        with open(os.path.join(out_dir, f"killed.rank{rank}.json"), "w") as handle:
            json.dump({"mode": mode, "global_step": step, "checked": checked}, handle)
        if dist.is_initialized():
            # Every rank has written its part of the checkpoint and its marker: the first SIGKILL (after which
            # torchrun tears the others down) can no longer cut a write short.
            dist.barrier()
        os.kill(os.getpid(), signal.SIGKILL)

    class KillCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if mode != "crash-at-save" or state.global_step != SAVE_AT:
                return
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{SAVE_AT}")
            if dist.is_initialized():
                dist.barrier()  # rank 0 writes trainer_state.json after the others may have reached on_save
            files = expected_checkpoint_files(checkpoint, deepspeed)
            missing = [f for f in files if not os.path.isfile(f) or os.path.getsize(f) == 0]
            if missing:
                raise RuntimeError(f"checkpoint-{SAVE_AT} is incomplete at on_save: {missing}")
            json.load(open(os.path.join(checkpoint, "trainer_state.json")))  # a complete, parseable file
            die(state.global_step, [os.path.relpath(f, checkpoint) for f in files])

        def on_optimizer_step(self, args, state, control, **kwargs):
            # global_step is incremented after this event: it still reads 7 during the 8th step.
            if mode == "crash-in-step8" and state.global_step + 1 == KILL_STEP:
                die(KILL_STEP, [])

    return KillCallback()


def build_trainer(run_dir: str, deepspeed: str | None, seed: int, callbacks=()):
    from transformers import Trainer, TrainingArguments

    _, world = rank_and_world()
    args = TrainingArguments(
        output_dir=run_dir,
        max_steps=STEPS,
        per_device_train_batch_size=4 // world,
        learning_rate=2e-3,
        weight_decay=0.1,
        save_strategy="steps",
        save_steps=SAVE_AT,
        logging_steps=1000,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        # No GPU here: without use_cpu, accelerate finds no backend under DeepSpeed and counts one process per rank.
        use_cpu=True,
        # Without DeepSpeed: --optim anon with Anon's own hyperparameters in optim_args. With it: the config's
        # optimizer block {"type": "Anon", "params": {"lr": "auto", ...}} builds Anon inside DeepSpeed.
        **(dict(deepspeed=deepspeed) if deepspeed else dict(optim="anon", optim_args="gamma=0.5,refresh=pow2")),
    )
    return Trainer(model=tiny_llama(seed), args=args, train_dataset=TokenDataset(), callbacks=list(callbacks))


def collect(trainer, deepspeed: bool) -> dict:
    from anon_hf.integrations.trainer_callback import find_anon

    anon = find_anon(trainer.optimizer)
    model = trainer.model
    result = {
        "optimizer": type(anon).__name__,
        "global_step": trainer.state.global_step,
        "world_size": trainer.args.world_size,
        "refresh_history": list(anon.refresh_history),
        "steps": sorted({int(s["step"].item()) for s in anon.state.values()}),
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
    }
    if deepspeed:
        result["zero_stage"] = trainer.model_wrapped.zero_optimization_stage()
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        # Collectives: every rank gathers, so every rank holds the full tensors.
        result["fp32_params"] = {n: safe_get_full_fp32_param(p).clone() for n, p in model.named_parameters()}
        result["state"] = {
            n: {key: safe_get_full_optimizer_state(p, key).clone() for key in ("exp_avg", "exp_avg_sq", "precond")}
            for n, p in model.named_parameters()
        }
        # This rank's flat partitions, exactly as Anon holds them.
        result["partition_state"] = [
            {key: value.clone() for key, value in anon.state[flat].items()}
            for group in anon.param_groups
            for flat in group["params"]
        ]
    else:
        result["state"] = {
            n: {key: value.clone() for key, value in anon.state[p].items()} for n, p in model.named_parameters()
        }
    return result


def reset_between_trainers() -> None:
    """Let the next Trainer build its own accelerate state and DeepSpeed plugin in this process."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state()
    unset_hf_deepspeed_config()
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument(
        "phases", nargs="+", choices=["full", "crash-at-save", "crash-in-step8", "resume", "resume-without-optimizer"]
    )
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config; needs torchrun")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        if cli.deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
    rank, _ = rank_and_world()
    for phase in cli.phases:
        if phase == "full":
            run_dir = os.path.join(cli.out_dir, "full")
            trainer = build_trainer(run_dir, cli.deepspeed, seed=0)
            trainer.train()
        elif phase.startswith("crash"):
            run_dir = os.path.join(cli.out_dir, "crash")
            kill = make_kill_callback(cli.out_dir, phase, bool(cli.deepspeed))
            trainer = build_trainer(run_dir, cli.deepspeed, seed=0, callbacks=[kill])
            trainer.train()
            raise RuntimeError(f"{phase}: the run was not killed")
        elif phase == "resume-without-optimizer":
            run_dir = os.path.join(cli.out_dir, "no_optimizer")
            checkpoint = os.path.join(run_dir, f"checkpoint-{SAVE_AT}")
            shutil.copytree(os.path.join(cli.out_dir, "crash", f"checkpoint-{SAVE_AT}"), checkpoint)
            os.remove(os.path.join(checkpoint, "optimizer.pt"))
            trainer = build_trainer(run_dir, cli.deepspeed, seed=1)
            trainer.train(resume_from_checkpoint=checkpoint)
        else:
            run_dir = os.path.join(cli.out_dir, "crash")
            # Another seed: every weight must come from the checkpoint for the comparison to pass.
            trainer = build_trainer(run_dir, cli.deepspeed, seed=1)
            trainer.train(resume_from_checkpoint=os.path.join(run_dir, f"checkpoint-{SAVE_AT}"))
        torch.save(collect(trainer, bool(cli.deepspeed)), os.path.join(run_dir, f"result.rank{rank}.pt"))
        del trainer
        reset_between_trainers()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
