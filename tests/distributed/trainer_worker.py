"""The Trainer under DeepSpeed with Anon, in one torchrun launch: several Trainers one after the other.

Usage: ``torchrun --nproc_per_node 2 tests/distributed/trainer_worker.py OUT_DIR [case ...]``

Cases (all by default):
* ``zero2_block``, ``zero3_block``, ``zero3_offload_block``: ``--deepspeed recipes/configs/ds_*.json`` whose
  optimizer block names Anon with "auto" lr/betas/weight_decay; the inner optimizer must be Anon with the
  TrainingArguments' values and Anon's own eps (1e-16 by default, or the config's explicit number);
* ``zero2_optim_anon``, ``zero3_optim_anon``: ``--optim anon`` and no optimizer block (Trainer-built Anon with
  its decay/no-decay groups, so ZeRO calls the inner ``step()`` twice per iteration);
* ``offload_swap``: ``--optim anon`` with offload_optimizer and ``zero_force_ds_cpu_optimizer`` left true, where
  accelerate would swap Anon for DeepSpeedCPUAdam: must stop with the error naming that setting;
* ``offload_flag_false``: the same with ``"zero_force_ds_cpu_optimizer": false``: runs Anon on CPU partitions;
* ``config_checks``: ``"eps": "auto"`` and an unknown key in the optimizer block fail when TrainingArguments is
  built; an explicit eps stays as given while "auto" lr and betas are filled.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Report, init_process_group, tiny_llama  # noqa: E402

from anon_hf import Anon  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 20
ARGS = dict(learning_rate=2e-3, adam_beta1=0.8, adam_beta2=0.99, weight_decay=0.05)


def recipe(name: str) -> dict:
    with open(os.path.join(ROOT, "recipes", "configs", name)) as handle:
        return json.load(handle)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, size=64, length=16):
        self.ids = torch.randint(0, 256, (size, length), generator=torch.Generator().manual_seed(1234))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def reset_accelerate_state() -> None:
    """Let the next Trainer build its own DeepSpeed plugin in this process."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state()
    unset_hf_deepspeed_config()
    gc.collect()


def training_args(out_dir: str, deepspeed, max_steps: int = STEPS, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=out_dir,
        deepspeed=deepspeed,
        max_steps=max_steps,
        per_device_train_batch_size=2,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        seed=0,
        # On a machine without GPUs, --use_cpu is what makes accelerate see 2 processes under DeepSpeed: without
        # it its backend stays None, world_size is 1 and "auto" batch sizes come out wrong.
        use_cpu=True,
        **ARGS,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def train(out_dir: str, deepspeed, max_steps: int = STEPS, **overrides) -> dict:
    from transformers import Trainer

    args = training_args(out_dir, deepspeed, max_steps, **overrides)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset())
    calls = {}
    original_step = Anon.step
    current = {"trainer": trainer}  # train() replaces trainer.state, so look it up at each call

    def counting_step(self, *a, **k):  # how many times ZeRO calls the inner step() in one iteration
        step = current["trainer"].state.global_step
        calls[step] = calls.get(step, 0) + 1
        return original_step(self, *a, **k)

    Anon.step = counting_step
    try:
        output = trainer.train()
    finally:
        Anon.step = original_step
    inner = trainer.model_wrapped.optimizer.optimizer
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    result = {
        "inner_type": type(inner).__name__,
        "global_step": trainer.state.global_step,
        "train_loss": output.training_loss,
        "groups": json.loads(json.dumps(groups, default=str)),
        "refresh_history": inner.refresh_history,
        "inner_step_calls_per_iteration": sorted(set(calls.values())),
        "callbacks": [type(callback).__name__ for callback in trainer.callback_handler.callbacks],
        "anon_log": [
            {key: value for key, value in entry.items() if key.startswith("anon/")}
            for entry in trainer.state.log_history
            if "anon/refresh_step" in entry
        ],
    }
    current.clear()
    del trainer, inner
    reset_accelerate_state()
    return result


def expect_error(build) -> str:
    try:
        build()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    finally:
        reset_accelerate_state()
    return "no error"


def explicit_eps_after_auto_filling(out_dir: str, config: dict):
    """The eps the Trainer leaves in the optimizer block (it must not compare it with adam_epsilon or replace it)."""
    try:
        params = training_args(out_dir, config).hf_deepspeed_config.config["optimizer"]["params"]
        return {"eps": params.get("eps"), "lr": params["lr"], "betas": params["betas"]}
    finally:
        reset_accelerate_state()


def without_optimizer(config: dict, **extra) -> dict:
    config = copy.deepcopy(config)
    del config["optimizer"]
    config.update(extra)
    return config


def offloaded(config: dict) -> dict:
    config = copy.deepcopy(config)
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return config


def main(out_dir: str, cases: list[str]) -> None:
    rank, _ = init_process_group()
    report = Report(out_dir, "trainer", rank)
    run_dir = os.path.join(out_dir, "trainer_runs")
    explicit_eps = recipe("ds_zero3.json")
    explicit_eps["optimizer"]["params"]["eps"] = 1e-12
    bad_eps = recipe("ds_zero2.json")
    bad_eps["optimizer"]["params"]["eps"] = "auto"
    bad_key = recipe("ds_zero2.json")
    bad_key["optimizer"]["params"]["momentum"] = 0.9
    runs = {
        "zero2_block": lambda: train(run_dir, os.path.join(ROOT, "recipes", "configs", "ds_zero2.json")),
        "zero3_block": lambda: train(run_dir, os.path.join(ROOT, "recipes", "configs", "ds_zero3.json")),
        "zero3_offload_block": lambda: train(
            run_dir, os.path.join(ROOT, "recipes", "configs", "ds_zero3_offload.json")
        ),
        "zero2_optim_anon": lambda: train(
            run_dir, without_optimizer(recipe("ds_zero2.json")), optim="anon", optim_args="gamma=0.5"
        ),
        "zero3_optim_anon": lambda: train(
            run_dir, without_optimizer(recipe("ds_zero3.json")), optim="anon", optim_args="gamma=0.5"
        ),
        "offload_swap": lambda: {
            "error": expect_error(
                lambda: train(run_dir, offloaded(without_optimizer(recipe("ds_zero2.json"))), 3, optim="anon")
            )
        },
        "offload_flag_false": lambda: train(
            run_dir,
            offloaded(without_optimizer(recipe("ds_zero2.json"), zero_force_ds_cpu_optimizer=False)),
            3,
            optim="anon",
        ),
        "config_checks": lambda: {
            "eps_auto": expect_error(lambda: training_args(run_dir, bad_eps)),
            "unknown_key": expect_error(lambda: training_args(run_dir, bad_key)),
            "explicit_eps": explicit_eps_after_auto_filling(run_dir, explicit_eps),
        },
    }
    for name, run in runs.items():
        if cases and name not in cases:
            continue
        try:
            report[name] = run()
        except Exception:
            report[f"{name}_error"] = traceback.format_exc()
            traceback.print_exc()
            reset_accelerate_state()
        torch.distributed.barrier()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
