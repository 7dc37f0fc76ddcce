"""torchtune: `tune run <recipe> --config cfg.yaml` with `optimizer: {_component_: anon_hf.Anon}`, from the YAML of
docs/frameworks.md, on CPU (``device: cpu``, fp32).

The tiny Llama is saved in Hugging Face format and read by torchtune's ``FullModelHFCheckpointer``
(``model_type: LLAMA3_2``, tied embeddings); its tokenizer.json is read through ``tune_tokenizer.py``. What is
checked:

* full fine-tune, one process, 2 epochs: the intermediate checkpoint's ``recipe_state.pt`` holds Anon's state and
  the docs' gamma; then a resume from that epoch-0 checkpoint (``resume_from_checkpoint: true``): the weights
  after epoch 1 equal the uninterrupted run's bit for bit (torchtune saves the optimizer only between epochs, so
  the final optimizer state cannot be compared; the weights after 4 more Anon steps depend on all of it);
* the FSDP2 distributed recipe (``tune run --nproc_per_node 2 full_finetune_distributed``, gloo on CPU): Anon
  steps DTensor shards, and the saved state is Anon's. The recipe runs from a ``tune cp`` copy with two CUDA-only
  calls made conditional (``CPU_FIXES``): as released it raises on CPU before the first step;
* LoRA, one process: Anon's state for the adapter weights only.
"""

from __future__ import annotations

import json
import shutil

import harness
import pytest

pytestmark = pytest.mark.frameworks
FRAMEWORK = harness.FRAMEWORKS["torchtune"]
HERE = harness.ROOT / "tests" / "frameworks"
# The tiny Llama of tests/tiny.py in torchtune's builder (vocab from the saved tokenizer).
TINY = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=64, intermediate_dim=128)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    harness.require(FRAMEWORK)
    root = tmp_path_factory.mktemp("torchtune")
    model = harness.save_tiny_model(FRAMEWORK, root / "model")
    data = root / "data" / "tiny.jsonl"
    data.parent.mkdir()
    data.write_text(
        "".join(json.dumps({"text": f"{r['instruction']} {r['output']}"}) + "\n" for r in harness.tiny_rows())
    )
    return model, data


def tiny_config(name: str, assets, output_dir, **overrides) -> dict:
    """The docs' block ``name`` with the model, tokenizer, data, device and run length replaced; optimizer kept."""
    model, data = assets
    config = harness.snippet(name)
    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    config["model"] = {
        **config["model"],
        "_component_": config["model"]["_component_"].replace("_1b", ""),
        "vocab_size": vocab_size,
        "rope_base": 10000,
        "norm_eps": 1e-6,
        **TINY,
    }
    if "lora_rank" in config["model"]:
        config["model"].update(lora_rank=4, lora_alpha=8)
    config.update(
        output_dir=str(output_dir),
        tokenizer={"_component_": "tune_tokenizer.tiny_tokenizer", "path": str(model), "max_seq_len": 32},
        dataset={
            "_component_": "torchtune.datasets.text_completion_dataset",
            "source": "json",
            "data_files": str(data),
            "column": "text",
            "split": "train",
        },
        batch_size=4,
        epochs=2,
        max_steps_per_epoch=None,
        device="cpu",
        dtype="fp32",
        log_peak_memory_stats=False,
        loss={"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
    )
    config["checkpointer"] = {**config["checkpointer"], "checkpoint_dir": str(model), "output_dir": str(output_dir)}
    if "lr_scheduler" in config:
        config["lr_scheduler"]["num_warmup_steps"] = 1
    config.update(overrides)
    return config


def tune(tmp_path, config: dict, recipe: list[str]) -> str:
    path = harness.write_config(config, tmp_path / "cfg.yaml")
    env = harness.environment(FRAMEWORK, tmp_path, PYTHONPATH=str(HERE))
    return harness.run(FRAMEWORK, ["tune", "run", *recipe, "--config", str(path)], env, tmp_path)


def recipe_optimizer_state(output_dir) -> dict:
    return harness.load(output_dir / "recipe_state" / "recipe_state.pt")["optimizer"]


def final_weights(output_dir, epoch: int) -> dict:
    (weights,) = (output_dir / f"epoch_{epoch}").glob("model-*.safetensors")
    return harness.safetensors_dict(weights)


def test_full_finetune_and_bitwise_resume(assets, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    config = tiny_config("torchtune_full_finetune.yaml", assets, full)
    assert config["optimizer"]["_component_"] == "anon_hf.Anon" and config["optimizer"]["gamma"] == harness.GAMMA
    full.mkdir()
    tune(full, config, ["full_finetune_single_device"])
    harness.assert_anon_state(recipe_optimizer_state(full))

    # What an interrupted run leaves: the epoch-0 weights and the recipe state saved with them.
    resumed.mkdir()
    shutil.copytree(full / "epoch_0", resumed / "epoch_0")
    shutil.copytree(full / "recipe_state", resumed / "recipe_state")
    again = tiny_config("torchtune_full_finetune.yaml", assets, resumed, resume_from_checkpoint=True)
    # torchtune 0.6.1 resumes a full fine-tune from the weights named relative to output_dir.
    (weights,) = (resumed / "epoch_0").glob("model-*.safetensors")
    again["checkpointer"]["checkpoint_files"] = [str(weights.relative_to(resumed))]
    tune(resumed, again, ["full_finetune_single_device"])
    expected = final_weights(full, 1)
    harness.assert_bitwise_equal(expected, final_weights(resumed, 1), "epoch_1 weights")
    start = final_weights(full, 0)
    assert any(not start[name].equal(expected[name]) for name in expected)


# torchtune 0.6.1's distributed recipe calls two CUDA-only helpers whatever the device, and both raise on CPU: the
# memory stats at set-up, and empty_cache (which torch.cpu lacks) before training.
CPU_FIXES = (
    (
        "        if self._is_rank_zero:\n            memory_stats = training.get_memory_stats(",
        '        if self._is_rank_zero and self._device.type == "cuda":\n            memory_stats = training.get_memory_stats(',
    ),
    (
        "        training.cleanup_before_training()\n",
        '        if self._device.type == "cuda":\n            training.cleanup_before_training()\n',
    ),
)


def cpu_recipe(tmp_path, name: str):
    """``tune cp`` the recipe, as torchtune suggests for changing one, with its CUDA-only calls made conditional."""
    recipe = tmp_path / f"{name}_cpu.py"
    env = harness.environment(FRAMEWORK, tmp_path)
    harness.run(FRAMEWORK, ["tune", "cp", name, str(recipe)], env, tmp_path)
    source = recipe.read_text()
    for old, new in CPU_FIXES:
        assert source.count(old) == 1, f"the recipe changed: {old!r}"
        source = source.replace(old, new)
    recipe.write_text(source)
    return recipe


def test_fsdp2_two_ranks(assets, tmp_path):
    config = tiny_config("torchtune_full_finetune.yaml", assets, tmp_path / "out")
    recipe = cpu_recipe(tmp_path, "full_finetune_distributed")
    # By its file name: `tune run` turns a path into a module name, which must not start with a dot.
    tune(tmp_path, config, ["--nproc_per_node", "2", recipe.name])
    harness.assert_anon_state(recipe_optimizer_state(tmp_path / "out"))


def test_lora_anon_state(assets, tmp_path):
    config = tiny_config("torchtune_lora_finetune.yaml", assets, tmp_path / "out")
    assert config["optimizer"]["_component_"] == "anon_hf.Anon"
    tune(tmp_path, config, ["lora_finetune_single_device"])
    optimizer = recipe_optimizer_state(tmp_path / "out")
    harness.assert_anon_state(optimizer)
    adapter = harness.load(next((tmp_path / "out" / "epoch_0").glob("adapter_model.pt")))
    assert len(optimizer["state"]) == len(adapter) > 0
