"""The entry points an LLM fine-tuner types, run as console commands in subprocesses on CPU, offline:
`anon-hf run trl sft|dpo` (TRL re-runs its script through `accelerate launch`), `anon-hf run torchrun ...` and
`anon-hf run accelerate launch ...` for a script that never imports anon_hf; and, in process, TRL's SFTTrainer /
DPOTrainer and a PEFT LoRA model under the Trainer with `optim="anon"`, with exact resume."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import launch
import pytest
import torch

from anon_hf.integrations.import_utils import is_accelerate_available, is_transformers_available

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TRAIN = ROOT / "tests" / "scripts" / "train_tiny_llama.py"
HAS_TRL = importlib.util.find_spec("trl") is not None
HAS_PEFT = importlib.util.find_spec("peft") is not None

pytestmark = pytest.mark.skipif(not is_transformers_available(), reason="transformers is not installed")
requires_trl = pytest.mark.skipif(not HAS_TRL or not (BIN / "trl").is_file(), reason="trl (the test extra) missing")
requires_peft = pytest.mark.skipif(not HAS_PEFT, reason="peft (the test extra) is not installed")

# Arguments every TrainingArguments-based CLI takes: 2 steps, a checkpoint at step 2, no hub, fp32 on CPU.
COMMON = [
    "--optim", "anon", "--optim_args", "gamma=1.1", "--max_steps", "2", "--per_device_train_batch_size", "2",
    "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none", "--use_cpu", "true",
    "--logging_steps", "1", "--disable_tqdm", "true",
]  # fmt: skip


def env(**extra):
    environment = {k: v for k, v in os.environ.items() if k != "ANON_HF_AUTO_REGISTER"}
    environment.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    environment.update(extra)
    return environment


def run(command, **kwargs):
    return launch.run(command, env=env(), timeout=600, **kwargs)


def assert_checkpoint_holds_anon(checkpoint: Path, gamma: float = 1.1, groups: int = 2):
    """optimizer.pt as the Trainer saved it: Anon's four state keys per tensor, the requested gamma per group."""
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert [group["gamma"] for group in saved["param_groups"]] == [gamma] * groups
    assert saved["state"], "no optimizer state in the checkpoint"
    for state in saved["state"].values():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq", "precond"}
        assert state["step"].item() == 2


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a hub folder, plus SFT and DPO data folders, all local."""
    import tiny

    root = tmp_path_factory.mktemp("local")
    return {
        "model": tiny.save_tiny_causal_lm(root / "model"),
        "sft": tiny.save_text_dataset(root / "sft", "sft"),
        "dpo": tiny.save_text_dataset(root / "dpo", "dpo"),
    }


# --- console commands ------------------------------------------------------------------------------------------


@requires_trl
@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_anon_hf_run_trl_cli(tmp_path, local_model, command):
    # `trl sft` parses here, then runs trl/scripts/sft.py in a fresh interpreter through `accelerate launch`.
    out = tmp_path / "out"
    result = run(
        [str(BIN / "anon-hf"), "run", "trl", command, "--model_name_or_path", local_model["model"]]
        + ["--dataset_name", local_model[command], "--output_dir", str(out), *COMMON]
        + ["--max_length", "32", "--bf16", "false", "--dtype", "float32"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert_checkpoint_holds_anon(out / "checkpoint-2")
    history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert [h["anon/refresh_step"] for h in history if "anon/refresh_step" in h] == [1, 2]


def assert_two_ranks_trained(out: Path):
    ranks = [json.loads((out / f"result_rank{rank}.json").read_text()) for rank in range(2)]
    for rank in ranks:
        assert rank["optimizer"] == "Anon" and rank["world_size"] == 2
        assert [group["gamma"] for group in rank["groups"]] == [1.1, 1.1]
    assert_checkpoint_holds_anon(out / "checkpoint-2")


@pytest.mark.distributed
def test_anon_hf_run_torchrun(tmp_path):
    out = tmp_path / "out"
    command = [str(BIN / "anon-hf"), "run", "torchrun", "--nproc_per_node", "2", "--master_port", "29521"]
    result = run([*command, str(TRAIN), "--output_dir", str(out), *COMMON, "--per_device_train_batch_size", "4"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert_two_ranks_trained(out)


@pytest.mark.distributed
@pytest.mark.skipif(not is_accelerate_available(), reason="accelerate is not installed")
def test_anon_hf_run_accelerate_launch(tmp_path):
    # --multi_gpu: on CPU, `--cpu --num_processes 2` would start one process (accelerate's behaviour).
    out = tmp_path / "out"
    command = [str(BIN / "anon-hf"), "run", "accelerate", "launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--main_process_port", "29522"]
    result = run([*command, str(TRAIN), "--output_dir", str(out), *COMMON, "--per_device_train_batch_size", "4"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert_two_ranks_trained(out)


@pytest.mark.distributed
@pytest.mark.skipif(not (BIN / "deepspeed").is_file(), reason="the deepspeed launcher is not installed")
def test_anon_hf_run_deepspeed_launcher(tmp_path):
    # `deepspeed` is a plain script, not an entry point: found in this interpreter's scripts folder.
    out = tmp_path / "out"
    command = [str(BIN / "anon-hf"), "run", "deepspeed", "--num_gpus", "2", "--master_port", "29523", str(TRAIN)]
    result = launch.run(
        [*command, "--output_dir", str(out), *COMMON, "--per_device_train_batch_size", "4"],
        env=env(DS_ACCELERATOR="cpu"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert_two_ranks_trained(out)


# --- in process: TRL trainers and PEFT, with resume --------------------------------------------------------------


def train_and_resume(make_trainer, tmp_path):
    """Train 4 steps saving at 2; resume a fresh trainer from checkpoint-2; return both final weight dicts."""
    full = make_trainer(tmp_path / "full")
    initial = {name: tensor.clone() for name, tensor in full.model.state_dict().items()}
    full.train()
    assert any(not torch.equal(initial[name], tensor) for name, tensor in full.model.state_dict().items())
    assert_checkpoint_holds_anon(tmp_path / "full" / "checkpoint-2", groups=len(full.optimizer.param_groups))
    resumed = make_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    return full.model.state_dict(), resumed.model.state_dict()


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    assert [name for name in first if not torch.equal(first[name], second[name])] == []


TRAINING = dict(
    optim="anon", optim_args="gamma=1.1", max_steps=4, per_device_train_batch_size=2, save_strategy="steps",
    save_steps=2, report_to="none", use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0, learning_rate=1e-3,
)  # fmt: skip


@requires_trl
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trl_trainers_with_optim_anon_resume_exactly(tmp_path, local_model, kind):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from anon_hf.integrations.trainer_callback import AnonCallback

    data = load_dataset(local_model[kind], split="train")
    tokenizer = AutoTokenizer.from_pretrained(local_model["model"])
    config_cls, trainer_cls = (SFTConfig, SFTTrainer) if kind == "sft" else (DPOConfig, DPOTrainer)

    def make_trainer(output_dir):
        args = config_cls(output_dir=str(output_dir), max_length=32, bf16=False, **TRAINING)
        model = AutoModelForCausalLM.from_pretrained(local_model["model"], dtype=torch.float32)
        trainer = trainer_cls(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        assert isinstance(trainer.callback_handler.callbacks[0], AnonCallback)
        return trainer

    first, second = train_and_resume(make_trainer, tmp_path)
    assert_same_weights(first, second)


@requires_peft
def test_peft_lora_with_optim_anon_resumes_exactly(tmp_path):
    import tiny
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from anon_hf.integrations.trainer_callback import find_anon

    def make_trainer(output_dir):
        model = get_peft_model(tiny.tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        args = TrainingArguments(output_dir=str(output_dir), **TRAINING)
        return Trainer(model=model, args=args, train_dataset=tiny.TokenDataset())

    first, second = train_and_resume(make_trainer, tmp_path)
    assert_same_weights(first, second)
    lora = {name for name in first if "lora_" in name}
    assert lora and all(name.endswith(".weight") for name in lora)
    trainer = make_trainer(tmp_path / "check")
    trainer.create_optimizer()
    trained = [p for group in find_anon(trainer.optimizer).param_groups for p in group["params"]]
    assert len(trained) == len(lora)  # only the adapters are optimized
