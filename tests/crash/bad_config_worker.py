"""Bad Anon configuration through DeepSpeed: ``deepspeed.initialize`` and the Trainer with ``deepspeed=``.

Usage: ``python tests/crash/bad_config_worker.py OUT_DIR`` (one process: it sets up a world of size 1 on gloo;
``MASTER_PORT`` must be set).

Each case builds an engine or a Trainer from a config whose Anon block is wrong and records the error (type and
message), whether the model's weights are what they were before, and for the Trainer the global step reached.
Writes ``OUT_DIR/bad_config.json``; the test asserts.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys

import torch
import torch.distributed as dist

import anon_hf  # noqa: F401  (registers the DeepSpeed and transformers hooks)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trainer_worker import TokenDataset, tiny_llama  # noqa: E402

BASE = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2},
    "gradient_clipping": 0.0,
    "steps_per_print": 10**9,
    "optimizer": {"type": "Anon", "params": {"lr": 1e-3, "gamma": 1.0}},
}


def config(params: dict | None = None, type_: str = "Anon", **extra) -> dict:
    result = copy.deepcopy(BASE)
    result["optimizer"] = {"type": type_, "params": {**BASE["optimizer"]["params"], **(params or {})}}
    result.update(extra)
    return result


def recipe(params: dict) -> dict:
    """recipes/configs/ds_zero2.json (all "auto", for the Trainer) with its Anon params updated."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "recipes", "configs", "ds_zero2.json")) as handle:
        result = json.load(handle)
    result["optimizer"]["params"].update(params)
    return result


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def engine_case(ds_config: dict) -> dict:
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    before = weights(model)
    try:
        deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        error = "no error"
    except Exception as err:  # the test reads the type and the message
        error = f"{type(err).__name__}: {err}"
    return {"error": error, "weights_unchanged": same(before, weights(model))}


def trainer_case(ds_config: dict) -> dict:
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    model = tiny_llama(0)
    before = weights(model)
    trainer = None
    try:
        args = TrainingArguments(
            output_dir=os.path.join(OUT_DIR, "trainer"), deepspeed=ds_config, max_steps=3,
            per_device_train_batch_size=4, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset())
        trainer.train()
        error = "no error"
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
    result = {
        "error": error,
        "weights_unchanged": same(before, weights(model)),
        "global_step": trainer.state.global_step if trainer is not None else None,
        "reached_train": trainer is not None,
    }
    del trainer
    AcceleratorState._reset_state()
    unset_hf_deepspeed_config()
    gc.collect()
    return result


OUT_DIR = ""


def main(out_dir: str) -> None:
    global OUT_DIR
    OUT_DIR = out_dir
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    cases = {
        "engine_unknown_key": lambda: engine_case(config({"gama": 0.5})),
        "engine_max_grad_norm": lambda: engine_case(config({"max_grad_norm": 1.0})),
        "engine_gamma_string": lambda: engine_case(config({"gamma": "0.5"})),
        "engine_gamma_word": lambda: engine_case(config({"gamma": "high"})),
        "engine_refresh_bad": lambda: engine_case(config({"refresh": "weekly"})),
        "engine_type_lowercase": lambda: engine_case(config(type_="anon")),
        "engine_auto_without_trainer": lambda: engine_case(config({"lr": "auto"})),
        "engine_good": lambda: engine_case(config()),
        "trainer_good": lambda: trainer_case(recipe({"gamma": 0.5})),
        "trainer_gamma_string": lambda: trainer_case(recipe({"gamma": "0.5"})),
        "trainer_unknown_key": lambda: trainer_case(recipe({"gama": 0.5})),
        "trainer_eps_auto": lambda: trainer_case(recipe({"eps": "auto"})),
        "trainer_type_lowercase": lambda: trainer_case(
            {**recipe({}), "optimizer": {**recipe({})["optimizer"], "type": "anon"}}
        ),
    }
    report = {}
    for name, run in cases.items():
        report[name] = run()
        with open(os.path.join(out_dir, "bad_config.json"), "w") as handle:
            json.dump(report, handle, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
