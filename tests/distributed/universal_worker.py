"""2 ranks -> 1 rank: resume a ZeRO checkpoint written by engines_worker.py through a universal checkpoint.

Usage: ``torchrun --nproc_per_node 1 tests/distributed/universal_worker.py OUT_DIR zero2 [zero3]``

For each stage: the step-6 checkpoint of the 2-rank run (OUT_DIR/<stage>_ckpt/step6) is converted with
``anon_hf.integrations.deepspeed_universal``, loaded into a 1-rank engine holding the whole global batch, and
trained to step 20. Records the largest difference of the loaded preconditioner from the 2 ranks' partitions
(read straight from the original files), of the final parameters from the uninterrupted 2-rank run, and the
error raised when the stock converter's output (no precond) is loaded into Anon.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import SAVE_AT, Report, finish, global_batches, init_process_group, max_abs_diff, tiny_llama  # noqa: E402
from engines_worker import ds_config, ds_train, zero_full_params, zero_full_state  # noqa: E402

TAG = f"step{SAVE_AT}"


def resume(stage: int, out_dir: str, report: Report) -> None:
    import deepspeed

    from anon_hf.integrations.deepspeed_universal import convert

    name = f"zero{stage}"
    ckpt_root = os.path.join(out_dir, f"{name}_ckpt")
    written = convert(os.path.join(ckpt_root, TAG), os.path.join(ckpt_root, f"{TAG}_universal"))
    result = {"written_keys": written, **resume_universal(stage, ckpt_root, f"{TAG}_universal", out_dir, 0, 1)}
    config = ds_config(stage, world=1, checkpoint={"load_universal": True})

    # The stock converter's output has no precond: loading it into Anon must stop, not reset it to ones.
    from deepspeed.checkpoint import ds_to_universal as stock

    stock_dir = os.path.join(ckpt_root, f"{TAG}_stock_universal")
    stock.main(_stock_args(os.path.join(ckpt_root, TAG), stock_dir))
    model = tiny_llama(seed=1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    try:
        engine.load_checkpoint(ckpt_root, tag=f"{TAG}_stock_universal", load_optimizer_states=True)
        result["stock_load"] = "no error"
    except Exception as err:
        result["stock_load"] = f"{type(err).__name__}: {err}"
    report[name] = result


def resume_universal(stage: int, ckpt_root: str, tag: str, source_dir: str, rank: int, world: int) -> dict:
    """Load the universal checkpoint ``ckpt_root/tag`` on ``world`` ranks and train from step 6 to step 20.

    Compares the loaded preconditioner and the final parameters with what the run that wrote the checkpoint saved
    in ``source_dir`` (``zero<stage>_precond_step6.pt``, ``zero<stage>_final.pt``).
    """
    import deepspeed

    name = f"zero{stage}"
    config = ds_config(stage, world=world, checkpoint={"load_universal": True})
    model = tiny_llama(seed=1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    engine.load_checkpoint(ckpt_root, tag=tag, load_optimizer_states=True)
    anon = engine.optimizer.optimizer
    loaded = zero_full_state(engine, stage, "precond")
    expected = torch.load(os.path.join(source_dir, f"{name}_precond_step{SAVE_AT}.pt"), weights_only=True)
    steps_after_load = sorted({int(s["step"].item()) for s in anon.state.values()})
    ds_train(engine, global_batches()[SAVE_AT:], rank=rank, world=world)
    final = torch.load(os.path.join(source_dir, f"{name}_final.pt"), weights_only=True)
    return {
        "steps_after_load": steps_after_load,
        "precond": max_abs_diff(loaded, expected),
        "resume": max_abs_diff(zero_full_params(engine, stage), final),
        "refresh_history": anon.refresh_history,
        "refreshes_after_load": anon.refresh_history,  # a fresh engine: no step ran before the load
    }


def _stock_args(input_folder: str, output_folder: str):
    import argparse

    return argparse.Namespace(
        input_folder=input_folder,
        output_folder=output_folder,
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )


def main(out_dir: str, stages: list[str]) -> None:
    import deepspeed  # `import anon_hf` (via _common) registered the hooks

    rank, _ = init_process_group()
    deepspeed.init_distributed(dist_backend="gloo")
    report = Report(out_dir, "universal", rank)
    for name in stages:
        try:
            resume(int(name.removeprefix("zero")), out_dir, report)
        except Exception:
            report[f"{name}_error"] = traceback.format_exc()
            traceback.print_exc()
    finish()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
