"""Bad configuration from every entry point fails before any training step, naming the key and the allowed values.

Entry points: the Python constructor and factory, ``Trainer(optimizer_cls_and_kwargs=...)``, ``TrainingArguments``'
``optim_args``, the ``anon-hf run`` command line (a real subprocess, through ``HfArgumentParser``), a DeepSpeed
config block given to ``deepspeed.initialize`` and to the Trainer (``tests/crash/bad_config_worker.py``, one
process). Covered elsewhere, not repeated: the constructor's table of bad values (``tests/optim_inputs.py``), most
``optim_args`` values (``test_transformers.py``), ``"eps": "auto"`` and an unknown key under torchrun
(``test_distributed.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from crash.ports import free_port

from anon_hf import Anon, create_anon_optimizer

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "tests" / "scripts" / "train_tiny_llama.py"
DS_WORKER = ROOT / "tests" / "crash" / "bad_config_worker.py"
HAS_TRANSFORMERS = all(importlib.util.find_spec(name) for name in ("transformers", "accelerate"))
HAS_DEEPSPEED = HAS_TRANSFORMERS and importlib.util.find_spec("deepspeed") is not None
requires_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers and accelerate installed")

OPTIM_ARGS_KEYS = ("gamma", "eps", "beta3", "refresh", "decoupled_weight_decay", "bounds", "foreach", "on_nonfinite")
DS_PARAM_KEYS = ("lr", "betas", "gamma", "eps", "weight_decay", "decoupled_weight_decay", "refresh", "beta3")


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


# --- Python -----------------------------------------------------------------------------------------------------


def test_unknown_keyword_names_the_key():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'gama'"):
        Anon(tiny_model().parameters(), gama=0.5)


@pytest.mark.parametrize("gamma", ["0.5", "high", None, [0.5]], ids=["numeric_string", "word", "none", "list"])
def test_gamma_not_a_number_is_refused_by_the_factory_before_any_state(gamma):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"Invalid gamma value: .* \(allowed: any finite real number"):
        create_anon_optimizer(model, lr=1e-3, gamma=gamma)


@requires_transformers
def test_trainer_with_optimizer_cls_and_kwargs_fails_before_the_first_step(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return {"x": torch.randn(4)}

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return {"loss": self.net(x).pow(2).mean()}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(
        model=Wrapped(), args=args, train_dataset=Data(), optimizer_cls_and_kwargs=(Anon, {"gamma": "1"})
    )
    with pytest.raises(ValueError, match=r"Invalid gamma value: '1' \(allowed: any finite real number"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# --- optim_args -------------------------------------------------------------------------------------------------


@requires_transformers
@pytest.mark.parametrize(
    "optim_args, message",
    [
        ("gamma=high", r"gamma='high' is not valid \(could not convert string to float: 'high'; allowed: float"),
        ("gamma=0.5,gamma3=1", r"unknown key 'gamma3'"),
        (
            "refresh=0",
            r"refresh='0' is not valid \(Invalid refresh value: 0 \(allowed: 'pow2', 'every', or an integer N >= 1",
        ),
        ("decoupled_weight_decay=maybe", r"decoupled_weight_decay='maybe' is not valid \(expected true or false"),
        ("bounds=1", r"bounds='1' is not valid \(expected LO:HI"),
        ("verify_sync=2", r"verify_sync='2' is not valid"),
        ("weight_decay=0.1", r"'weight_decay' is set with --weight_decay, not in optim_args"),
    ],
    ids=["gamma_word", "unknown_after_valid", "refresh_zero", "wd_mode", "bounds_one_side", "verify_sync", "wd"],
)
def test_optim_args_errors_name_the_key_and_list_every_valid_key(tmp_path, optim_args, message):
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match=message) as info:
        TrainingArguments(output_dir=str(tmp_path), optim="anon", optim_args=optim_args)
    text = str(info.value)
    assert text.startswith("Invalid optim_args for optim='anon': ")
    assert all(f"{key}:" in text for key in OPTIM_ARGS_KEYS), text


@requires_transformers
@pytest.mark.parametrize(
    "optim_args, message",
    [
        ("gama=1", "unknown key 'gama'"),
        ("gamma=one", "gamma='one' is not valid (could not convert string to float: 'one'"),
    ],
    ids=["unknown_key", "gamma_string"],
)
def test_anon_hf_run_command_line_stops_at_argument_parsing(tmp_path, optim_args, message):
    """``anon-hf run train.py --optim anon --optim_args ...``: the script's HfArgumentParser fails, before a model."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "anon_hf", "run", str(TRAIN_SCRIPT), "--output_dir", str(out), "--optim", "anon"]
    command += ["--optim_args", optim_args, "--max_steps", "3", "--report_to", "none", "--use_cpu", "true"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: Invalid optim_args for optim='anon': "), result.stderr[-3000:]
    assert message in last
    assert all(f"{key}:" in last for key in OPTIM_ARGS_KEYS), last
    # The traceback goes through the argument parser, and nothing was trained or written.
    assert "parse_args_into_dataclasses" in result.stderr
    assert "LlamaForCausalLM" not in result.stderr.split("Traceback")[-1]
    assert not (out / "result_rank0.json").exists()
    assert not out.exists() or not any(out.iterdir())


# --- DeepSpeed ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepspeed_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_config")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(DS_WORKER), str(out)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads((out / "bad_config.json").read_text())


requires_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed, transformers and accelerate")

DS_CASES = {
    # deepspeed.initialize(config=...): refused when the engine builds the optimizer, before an engine exists.
    "engine_unknown_key": r"^ValueError: Unknown key\(s\) \['gama'\] in the DeepSpeed config's optimizer.params for Anon \(valid keys: lr, betas, gamma",
    "engine_max_grad_norm": r"^ValueError: Unknown key\(s\) \['max_grad_norm'\] .*Gradient clipping is the top-level DeepSpeed setting \"gradient_clipping\"",
    "engine_gamma_string": r"^ValueError: Invalid gamma value: '0.5' \(allowed: any finite real number",
    "engine_gamma_word": r"^ValueError: Invalid gamma value: 'high' \(allowed: any finite real number",
    "engine_refresh_bad": r"^ValueError: Invalid refresh value: 'weekly' \(allowed: 'pow2', 'every'",
    "engine_auto_without_trainer": r"^ValueError: optimizer.params for Anon still holds \"auto\" for \['lr'\]: only the Trainer",
    # DeepSpeed's own sanity check sees a misspelt type before anon_hf's check does (reported to issue 4); either
    # message names the type.
    "engine_type_lowercase": r"^(AssertionError: anon is not a supported DeepSpeed Optimizer|ValueError: Invalid optimizer type 'anon' in the DeepSpeed config: write \"Anon\")",
    # The Trainer with deepspeed=config: keys are checked when TrainingArguments is built, values when train()
    # has DeepSpeed build Anon; either way before the first step.
    "trainer_unknown_key": r"^ValueError: Unknown key\(s\) \['gama'\] in the DeepSpeed config's optimizer.params for Anon",
    "trainer_eps_auto": r"^ValueError: \"eps\": \"auto\" in optimizer.params for Anon would be filled with the Trainer's adam_epsilon",
    "trainer_type_lowercase": r"^ValueError: Invalid optimizer type 'anon' in the DeepSpeed config: write \"Anon\"",
    "trainer_gamma_string": r"^ValueError: Invalid gamma value: '0.5' \(allowed: any finite real number",
}  # fmt: skip


@requires_deepspeed
@pytest.mark.parametrize("case", list(DS_CASES))
def test_deepspeed_block_errors_before_any_step(deepspeed_report, case):
    import re

    outcome = deepspeed_report[case]
    assert re.search(DS_CASES[case], outcome["error"]), outcome["error"]
    if "Unknown key" in outcome["error"]:
        assert all(key in outcome["error"] for key in DS_PARAM_KEYS)
    assert outcome["weights_unchanged"]
    if case.startswith("trainer_"):
        assert outcome["global_step"] in (None, 0)


@requires_deepspeed
def test_deepspeed_controls_train(deepspeed_report):
    """The same configs with valid values build and, under the Trainer, train: the failures above are the values'."""
    assert deepspeed_report["engine_good"]["error"] == "no error"
    trainer = deepspeed_report["trainer_good"]
    assert trainer["error"] == "no error" and trainer["global_step"] == 3 and not trainer["weights_unchanged"]
