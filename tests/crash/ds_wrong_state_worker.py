"""DeepSpeed checkpoints that must not load into Anon: written by AdamW, or by a model of another shape.

Usage: ``python tests/crash/ds_wrong_state_worker.py OUT_DIR`` (one process: it sets up a world of size 1 on gloo
itself; ``MASTER_PORT`` must be set), or under torchrun.

For each case a ZeRO engine trains two steps and saves a checkpoint, then a second engine built with Anon loads it.
Writes ``OUT_DIR/ds_wrong_state.rank{r}.json``: per case the error raised by ``load_checkpoint`` (type and
message, or "no error"), and whether the Anon engine's weights, optimizer state and step count were left as they
were before the load.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

import anon_hf  # noqa: F401  (registers the DeepSpeed hooks: ZeRO accepts Anon, config blocks are checked)


def model(width: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 4))


def config(optimizer: dict | None, elastic: bool = False) -> dict:
    result = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2, "elastic_checkpoint": elastic},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    if optimizer is not None:
        result["optimizer"] = optimizer
    return result


ANON_BLOCK = {"type": "Anon", "params": {"lr": 1e-2, "gamma": 1.0}}


def train(engine, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 8, generator=generator), torch.randn(4, 4, generator=generator)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()


def snapshot(engine) -> dict:
    anon = engine.optimizer.optimizer
    return {
        "state": [{k: v.clone() for k, v in anon.state[p].items()} for g in anon.param_groups for p in g["params"]],
        "global_steps": engine.global_steps,
    }


def same_state(before: dict, after: dict) -> bool:
    return len(before["state"]) == len(after["state"]) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(before["state"], after["state"], strict=True)
    )


def case(out_dir: str, name: str, writer_config: dict, writer_optimizer, reader_width: int = 16) -> dict:
    import deepspeed

    ckpt = os.path.join(out_dir, f"{name}_ckpt")
    writer_model = model()
    optimizer = writer_optimizer(writer_model.parameters()) if writer_optimizer else None
    writer, *_ = deepspeed.initialize(
        model=writer_model, model_parameters=writer_model.parameters(), optimizer=optimizer, config=writer_config
    )
    train(writer, 2)
    writer.save_checkpoint(ckpt, tag="step2")
    writer_inner = type(writer.optimizer.optimizer).__name__
    del writer

    reader_model = model(reader_width)
    reader_config = config(ANON_BLOCK, elastic=writer_config["zero_optimization"]["elastic_checkpoint"])
    reader, *_ = deepspeed.initialize(
        model=reader_model, model_parameters=reader_model.parameters(), config=reader_config
    )
    before = snapshot(reader)
    try:
        reader.load_checkpoint(ckpt, tag="step2")
        error, error_site = "no error", None
    except Exception as err:  # the test reads the type and the message
        error = f"{type(err).__name__}: {err}"
        where = traceback.extract_tb(err.__traceback__)[-1]
        error_site = f"{os.path.basename(where.filename)}:{where.lineno} {where.name}"
    after = snapshot(reader)
    return {
        "writer_optimizer": writer_inner,
        "reader_optimizer": type(reader.optimizer.optimizer).__name__,
        "error": error,
        "error_site": error_site,
        # The module's weights load before the optimizer's state: they may change. No step may have run.
        "state_unchanged": same_state(before, after),
        "global_steps": after["global_steps"],
        "reader_state_keys": sorted({k for s in after["state"] for k in s}),
    }


def main(out_dir: str) -> None:
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    adamw = lambda params: torch.optim.AdamW(params, lr=1e-2)  # noqa: E731
    cases = {
        # A client torch AdamW under ZeRO-2; the default (rigid) checkpoint calls Anon.load_state_dict.
        "adamw_rigid": lambda: case(out_dir, "adamw_rigid", config(None), adamw),
        # elastic_checkpoint: DeepSpeed's _restore_base_optimizer_state copies the saved keys into Anon's state
        # itself, without Anon.load_state_dict.
        "adamw_elastic": lambda: case(out_dir, "adamw_elastic", config(None, elastic=True), adamw),
        # Anon to Anon with elastic_checkpoint: DeepSpeed's elastic restore needs a "step" in the param groups,
        # which torch-style optimizers (AdamW, Anon) keep per tensor instead: it cannot load at all.
        "anon_elastic": lambda: case(out_dir, "anon_elastic", config(ANON_BLOCK, elastic=True), None),
        # An Anon checkpoint of a model with other shapes.
        "anon_other_model": lambda: case(out_dir, "anon_other_model", config(ANON_BLOCK), None, reader_width=32),
    }
    report = {}
    for name, run in cases.items():
        try:
            report[name] = run()
        except Exception as err:
            report[name] = {"setup_error": f"{type(err).__name__}: {err}"}
    with open(os.path.join(out_dir, f"ds_wrong_state.rank{dist.get_rank()}.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
