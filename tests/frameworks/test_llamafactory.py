"""LLaMA-Factory: `llamafactory-cli train cfg.yaml` with `optim: anon`, from the YAML of docs/frameworks.md.

What is checked, on a tiny Llama saved locally and 16 alpaca rows:

* a full fine-tune under ``anon-hf run``: the checkpoint's optimizer state is Anon's (exp_avg, exp_avg_sq,
  precond, step for every parameter) and every param group has the docs' gamma; then a resume from its step-4
  checkpoint after ``anon-hf enable``, with the plain command: at step 8 the weights (model.safetensors) and the
  whole optimizer state (optimizer.pt: every tensor, every group setting) equal the uninterrupted run's bit for
  bit. One rank: transformers 5.6 cannot resume a multi-rank run on CPU (it loads optimizer.pt with
  ``map_location=torch.device("cpu", rank)``, which torch refuses; fixed in later transformers);
* LoRA from the docs' LoRA block on 2 ranks (``FORCE_TORCHRUN=1 NPROC_PER_NODE=2``, gloo on CPU): both ranks
  ran (a saved RNG state each) and the optimizer holds Anon's state for the adapter weights only.
"""

from __future__ import annotations

import json

import harness
import pytest

pytestmark = pytest.mark.frameworks
FRAMEWORK = harness.FRAMEWORKS["llamafactory"]
TWO_RANKS = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    harness.require(FRAMEWORK)
    root = tmp_path_factory.mktemp("llamafactory")
    model = harness.save_tiny_model(FRAMEWORK, root / "model")
    harness.write_json(harness.tiny_rows(), root / "data" / "tiny.json")
    harness.write_json({"anon_tiny": {"file_name": "tiny.json"}}, root / "data" / "dataset_info.json")
    return root, model


def tiny_config(name: str, assets, output_dir, **overrides) -> dict:
    """The docs' block ``name`` with the paths and sizes replaced by the tiny ones; its optimizer lines kept."""
    root, model = assets
    config = harness.snippet(name)
    config.pop("num_train_epochs", None)
    config.update(
        model_name_or_path=str(model),
        dataset="anon_tiny",
        dataset_dir=str(root / "data"),
        template="empty",
        cutoff_len=32,
        output_dir=str(output_dir),
        overwrite_cache=True,
        preprocessing_num_workers=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        logging_steps=1,
        max_steps=8,
        save_steps=4,
        bf16=False,
        report_to="none",
        seed=42,
    )
    config.update(overrides)
    return config


def train(assets, tmp_path, config: dict, *, launcher: list[str], **env) -> str:
    path = harness.write_config(config, tmp_path / f"{tmp_path.name}.yaml")
    return harness.run(
        FRAMEWORK,
        [*launcher, "llamafactory-cli", "train", str(path)],
        harness.environment(FRAMEWORK, tmp_path, **env),
        tmp_path,
    )


def test_bitwise_resume(assets, tmp_path):
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    for folder in (full_dir, resumed_dir):
        folder.mkdir()
    config = tiny_config("llamafactory_full_sft.yaml", assets, full_dir / "out")
    assert config["optim"] == "anon" and config["optim_args"] == f"gamma={harness.GAMMA}"
    train(assets, full_dir, config, launcher=["anon-hf", "run"])
    final = full_dir / "out" / "checkpoint-8"
    assert json.loads((final / "trainer_state.json").read_text())["global_step"] == 8
    expected_optimizer = harness.load(final / "optimizer.pt")
    harness.assert_anon_state(expected_optimizer)

    halfway = full_dir / "out" / "checkpoint-4"
    resume = tiny_config(
        "llamafactory_full_sft.yaml", assets, resumed_dir / "out", resume_from_checkpoint=str(halfway)
    )
    harness.run(FRAMEWORK, ["anon-hf", "enable"], harness.environment(FRAMEWORK, resumed_dir), resumed_dir)
    try:
        train(assets, resumed_dir, resume, launcher=[])
    finally:
        harness.run(FRAMEWORK, ["anon-hf", "disable"], harness.environment(FRAMEWORK, resumed_dir), resumed_dir)
    again = resumed_dir / "out" / "checkpoint-8"
    harness.assert_bitwise_equal(expected_optimizer, harness.load(again / "optimizer.pt"), "optimizer.pt")
    weights = harness.safetensors_dict(final / "model.safetensors")
    harness.assert_bitwise_equal(weights, harness.safetensors_dict(again / "model.safetensors"), "model.safetensors")
    # The comparison means something only if steps 5-8 moved the weights.
    start = harness.safetensors_dict(halfway / "model.safetensors")
    assert any(not start[name].equal(weights[name]) for name in weights)


def test_two_ranks_lora_anon_state(assets, tmp_path):
    config = tiny_config("llamafactory_lora_sft.yaml", assets, tmp_path / "out", max_steps=2, save_steps=2)
    assert config["finetuning_type"] == "lora" and config["optim"] == "anon"
    train(assets, tmp_path, config, launcher=["anon-hf", "run"], **TWO_RANKS)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert {path.name for path in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    optimizer = harness.load(checkpoint / "optimizer.pt")
    harness.assert_anon_state(optimizer)
    # Only the adapters train: one state per saved LoRA tensor.
    lora_weights = harness.safetensors_dict(checkpoint / "adapter_model.safetensors")
    assert len(optimizer["state"]) == len(lora_weights) > 0
