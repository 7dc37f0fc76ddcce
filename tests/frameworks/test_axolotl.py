"""axolotl: `axolotl train cfg.yml` with `optimizer: anon`, from the YAML of docs/frameworks.md.

What is checked, on a tiny Llama saved locally and 16 text rows (``axolotl train`` re-runs itself as
``accelerate launch -m axolotl.cli.train``):

* 2 ranks (``axolotl train cfg.yml -- --multi_gpu --num_processes 2``) under ``anon-hf run``: both ranks ran (a
  saved RNG state each), the checkpoint's optimizer state is Anon's and every param group has the docs' gamma.
  GPUs only: on CPU axolotl 0.19.0 maps each rank's model to the CUDA device of its LOCAL_RANK and fails to load it
  (``axolotl/utils/config/__init__.py``, ``normalize_config``), so the test skips there;
* a full fine-tune under ``anon-hf run``, then a resume from its step-4 checkpoint after ``anon-hf enable`` with
  the plain command: at step 8 the weights and the whole optimizer state equal the uninterrupted run's bit for
  bit. One rank: transformers 5.16.1 cannot resume a multi-rank run on CPU (see test_llamafactory.py);
* a typo in ``optim_args`` stops the run at axolotl's config validation (anon_hf/integrations/axolotl.py), before
  the data is tokenised or the model loaded.
"""

from __future__ import annotations

import json

import harness
import pytest
import torch

pytestmark = pytest.mark.frameworks
FRAMEWORK = harness.FRAMEWORKS["axolotl"]
TWO_RANKS = ["--", "--multi_gpu", "--num_processes", "2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    harness.require(FRAMEWORK)
    root = tmp_path_factory.mktemp("axolotl")
    model = harness.save_tiny_model(FRAMEWORK, root / "model")
    data = root / "data" / "tiny.jsonl"
    data.parent.mkdir()
    # Plain text rows: the alpaca template alone is longer than the tiny model's context.
    rows = [{"text": f"{row['instruction']} {row['output']}"} for row in harness.tiny_rows()]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model, data


def tiny_config(assets, run_dir, **overrides) -> dict:
    """The docs' block with the paths and sizes replaced by the tiny ones; its optimizer lines kept."""
    model, data = assets
    config = harness.snippet("axolotl_full_sft.yml")
    for key in ("num_epochs", "saves_per_epoch"):
        config.pop(key, None)
    config.update(
        base_model=str(model),
        datasets=[{"path": str(data), "ds_type": "json", "type": "completion"}],
        dataset_prepared_path=str(run_dir / "prepared"),
        output_dir=str(run_dir / "out"),
        sequence_len=64,
        dataset_num_proc=1,
        micro_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=8,
        save_steps=4,
        logging_steps=1,
        bf16=False,
        tf32=False,
        seed=42,
    )
    config.update(overrides)
    return config


def train(run_dir, config: dict, *, launcher: list[str], extra: tuple[str, ...] = ()) -> str:
    path = harness.write_config(config, run_dir / "cfg.yml")
    return harness.run(
        FRAMEWORK, [*launcher, "axolotl", "train", str(path), *extra], harness.environment(FRAMEWORK, run_dir), run_dir
    )


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="axolotl 0.19.0 runs 2 ranks on GPUs only: normalize_config sets device_map {'': LOCAL_RANK} whatever the "
    "device, and transformers then fails on CPU with 'Cannot access accelerator device when none is available'",
)
def test_two_ranks_anon_state(assets, tmp_path):
    config = tiny_config(assets, tmp_path, max_steps=2, save_steps=2)
    assert config["optimizer"] == "anon" and config["optim_args"] == {"gamma": harness.GAMMA}
    train(tmp_path, config, launcher=["anon-hf", "run"], extra=tuple(TWO_RANKS))
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert {path.name for path in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    harness.assert_anon_state(harness.load(checkpoint / "optimizer.pt"))


def test_bitwise_resume(assets, tmp_path):
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    for folder in (full_dir, resumed_dir):
        folder.mkdir()
    train(full_dir, tiny_config(assets, full_dir), launcher=["anon-hf", "run"])
    final, halfway = full_dir / "out" / "checkpoint-8", full_dir / "out" / "checkpoint-4"
    expected_optimizer = harness.load(final / "optimizer.pt")
    harness.assert_anon_state(expected_optimizer)

    resume = tiny_config(assets, resumed_dir, resume_from_checkpoint=str(halfway))
    harness.run(FRAMEWORK, ["anon-hf", "enable"], harness.environment(FRAMEWORK, resumed_dir), resumed_dir)
    try:
        train(resumed_dir, resume, launcher=[])
    finally:
        harness.run(FRAMEWORK, ["anon-hf", "disable"], harness.environment(FRAMEWORK, resumed_dir), resumed_dir)
    again = resumed_dir / "out" / "checkpoint-8"
    harness.assert_bitwise_equal(expected_optimizer, harness.load(again / "optimizer.pt"), "optimizer.pt")
    weights = harness.safetensors_dict(final / "model.safetensors")
    harness.assert_bitwise_equal(weights, harness.safetensors_dict(again / "model.safetensors"), "model.safetensors")
    start = harness.safetensors_dict(halfway / "model.safetensors")
    assert any(not start[name].equal(weights[name]) for name in weights)


def test_optim_args_typo_stops_at_config_validation(assets, tmp_path):
    config = tiny_config(assets, tmp_path, optim_args={"gama": harness.GAMMA})
    path = harness.write_config(config, tmp_path / "cfg.yml")
    env = harness.environment(FRAMEWORK, tmp_path)
    with pytest.raises(AssertionError) as failed:
        harness.run(FRAMEWORK, ["anon-hf", "run", "axolotl", "train", str(path)], env, tmp_path)
    output = str(failed.value)
    assert "Invalid optim_args for optim='anon': unknown key 'gama'" in output
    assert "validate_config" in output  # raised from axolotl's config validation ...
    assert not (tmp_path / "prepared").exists()  # ... before any data set was tokenised and saved
