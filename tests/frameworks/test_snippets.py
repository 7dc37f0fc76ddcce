"""docs/frameworks.md's YAML blocks are the configs the framework tests run: they parse, and hold the keys the
harness relies on (the optimizer lines it keeps, the paths and sizes it replaces). Quick: part of ``make test``."""

from __future__ import annotations

import harness
import pytest

# File name of each block -> the keys the tests keep as written.
ANON_TEXT = {"optim": "anon", "optim_args": f"gamma={harness.GAMMA}"}
OPTIMIZER_LINES = {
    "llamafactory_full_sft.yaml": ANON_TEXT,
    "llamafactory_lora_sft.yaml": ANON_TEXT,
    "axolotl_full_sft.yml": {"optimizer": "anon", "optim_args": {"gamma": harness.GAMMA}},
    "torchtune_full_finetune.yaml": {
        "optimizer": {"_component_": "anon_hf.Anon", "lr": 2.0e-5, "gamma": harness.GAMMA}
    },
    "torchtune_lora_finetune.yaml": {
        "optimizer": {"_component_": "anon_hf.Anon", "lr": 3.0e-4, "gamma": harness.GAMMA, "weight_decay": 0.01}
    },
}
# ... and the keys they replace with the tiny model, data and run length (they must be there to be replaced).
TUNE_REPLACED = {"model", "tokenizer", "dataset", "checkpointer", "output_dir", "device", "dtype", "epochs"}
REPLACED = {
    "llamafactory_full_sft.yaml": {"model_name_or_path", "dataset", "template", "output_dir", "num_train_epochs"},
    "llamafactory_lora_sft.yaml": {"model_name_or_path", "dataset", "template", "output_dir", "finetuning_type"},
    "axolotl_full_sft.yml": {"base_model", "datasets", "output_dir", "num_epochs", "saves_per_epoch"},
    "torchtune_full_finetune.yaml": TUNE_REPLACED,
    "torchtune_lora_finetune.yaml": TUNE_REPLACED | {"lr_scheduler"},
}


def test_every_block_is_tested_and_every_tested_block_exists():
    assert set(harness.snippets()) == set(OPTIMIZER_LINES)


@pytest.mark.parametrize("name", sorted(OPTIMIZER_LINES))
def test_block_parses_with_the_optimizer_lines(name):
    config = harness.snippet(name)
    assert isinstance(config, dict), name
    for key, value in OPTIMIZER_LINES[name].items():
        assert config.get(key) == value, f"{name}: {key} is {config.get(key)!r}, expected {value!r}"
    assert REPLACED[name] <= set(config), f"{name} lacks {sorted(REPLACED[name] - set(config))}"


def test_snippet_reader_finds_named_yaml_blocks_only(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```yaml\n# a.yaml\noptim: anon\n```\n\n```yaml\nno: name\n```\n\n```bash\n# b.yaml\nx\n```\n")
    assert harness.snippets(page) == {"a.yaml": "optim: anon\n"}
