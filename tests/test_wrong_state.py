"""Wrong optimizer state: every malformed or foreign state dict gives a clear error before anything is loaded, and
the few tolerated differences are documented migrations with their results checked.

Covered elsewhere, not repeated here: AdamW's state dict, Adam moments grafted into Anon groups and other shapes of
``exp_avg`` (``test_optimizer.py``); older group keys filled with defaults (``test_conventions.py``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from crash.ports import free_port

from anon_hf import Anon

ROOT = Path(__file__).resolve().parent.parent
DS_WORKER = ROOT / "tests" / "crash" / "ds_wrong_state_worker.py"
HAS_TRANSFORMERS = all(importlib.util.find_spec(name) for name in ("transformers", "accelerate"))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def trained(steps: int = 3, **kwargs) -> tuple[torch.nn.Parameter, Anon]:
    param = torch.nn.Parameter(torch.randn(3, 2))
    opt = Anon([param], lr=0.01, **kwargs)
    for _ in range(steps):
        param.grad = torch.randn(3, 2)
        opt.step()
    return param, opt


def set_state(key, value):
    return lambda sd: sd["state"][0].__setitem__(key, value)


def set_group(key, value):
    return lambda sd: sd["param_groups"][0].__setitem__(key, value)


def drop_state(*keys):
    return lambda sd: [sd["state"][0].pop(key) for key in keys]


# (description, how to spoil a state dict of `trained()`, the error it must give)
BAD_STATE = [
    ("no_step", drop_state("step"), r"State of param 0 lacks 'step' or 'exp_avg'"),
    ("no_exp_avg", drop_state("exp_avg"), r"State of param 0 lacks 'step' or 'exp_avg'"),
    ("no_precond", drop_state("precond"), r"has only one of 'exp_avg_sq' and 'precond'"),
    ("amsgrad_key", set_state("max_exp_avg_sq", torch.zeros(3, 2)), r"has keys \['max_exp_avg_sq'\] that Anon does not"),
    ("step_negative", set_state("step", torch.tensor(-3.0)), r"State 'step' of param 0 is tensor\(-3\.\) \(allowed: a whole"),
    ("step_fraction", set_state("step", torch.tensor(2.5)), r"State 'step' of param 0 is tensor\(2\.5000\)"),
    ("step_vector", set_state("step", torch.tensor([1.0, 2.0])), r"State 'step' of param 0 is tensor\(\[1\., 2\.\]\)"),
    ("step_nan", set_state("step", float("nan")), r"State 'step' of param 0 is nan"),
    ("step_string", set_state("step", "3"), r"State 'step' of param 0 is '3'"),
    ("precond_int", set_state("precond", torch.ones(3, 2, dtype=torch.int64)), r"'precond' of param 0 is a tensor of dtype torch.int64 \(allowed: a floating-point"),
    ("precond_bool", set_state("precond", torch.ones(3, 2, dtype=torch.bool)), r"'precond' of param 0 is a tensor of dtype torch.bool"),
    ("precond_float", set_state("precond", 1.0), r"State 'precond' of param 0 is a float \(allowed: a floating-point tensor"),
    ("precond_none", set_state("precond", None), r"State 'precond' of param 0 is a NoneType"),
    ("exp_avg_list", set_state("exp_avg", [[0.0] * 2] * 3), r"State 'exp_avg' of param 0 is a list"),
    ("precond_transposed", set_state("precond", torch.ones(2, 3)), r"State 'precond' of param 0 has shape \(2, 3\) but the parameter has shape \(3, 2\)"),
    ("exp_avg_sq_flat", set_state("exp_avg_sq", torch.zeros(6)), r"State 'exp_avg_sq' of param 0 has shape \(6,\)"),
    ("precond_nan", set_state("precond", torch.full((3, 2), float("nan"))), r"'precond' of param 0 holds nan, inf or negative values"),
    ("precond_inf", set_state("precond", torch.full((3, 2), float("inf"))), r"'precond' of param 0 holds nan, inf or negative values"),
    ("precond_negative", set_state("precond", -torch.ones(3, 2)), r"'precond' of param 0 holds nan, inf or negative values"),
    ("state_not_dict", lambda sd: sd["state"].__setitem__(0, torch.zeros(3, 2)), r"State of param 0 is a Tensor, not a dict of tensors"),
    ("no_state_key", lambda sd: sd.pop("state"), r"Invalid state dict for Anon: expected a dict with 'state' and 'param_groups'.*got \['param_groups'\]"),
    ("no_groups_key", lambda sd: sd.pop("param_groups"), r"Invalid state dict for Anon: .*got \['state'\]"),
    ("group_gamma_string", set_group("gamma", "1.0"), r"Param group 0 of the state dict: Invalid gamma value: '1.0' \(allowed: any finite real"),
    ("group_lr_negative", set_group("lr", -1.0), r"Param group 0 of the state dict: Invalid lr value: -1.0"),
    ("group_refresh", set_group("refresh", "weekly"), r"Param group 0 of the state dict: Invalid refresh value: 'weekly' \(allowed: 'pow2', 'every'"),
    ("group_betas", set_group("betas", (0.9, 1.5)), r"Param group 0 of the state dict: Invalid beta parameter at index 1: 1.5"),
    ("group_policy", set_group("on_nonfinite", "ignore"), r"Param group 0 of the state dict: Invalid on_nonfinite value: 'ignore'"),
    ("group_no_gamma", lambda sd: sd["param_groups"][0].pop("gamma"), r"not written by Anon: param group 0 has no gamma"),
]  # fmt: skip


@pytest.mark.parametrize("spoil, message", [case[1:] for case in BAD_STATE], ids=[case[0] for case in BAD_STATE])
def test_malformed_state_dict_is_refused_before_anything_is_loaded(spoil, message):
    _, source = trained()
    state_dict = copy.deepcopy(source.state_dict())
    spoil(state_dict)
    param, target = trained(steps=1, gamma=0.5)
    before_state = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state_dict)
    # Nothing was loaded: the target's hyperparameters and state are those it had.
    after_state = target.state_dict()
    assert after_state["param_groups"] == before_state["param_groups"]
    assert all(torch.equal(after_state["state"][0][k], v) for k, v in before_state["state"][0].items())
    assert target.param_groups[0]["params"][0] is param


OTHER_OPTIMIZERS = {
    "SGD_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p),
    "Adam_amsgrad": lambda p: torch.optim.Adam(p, amsgrad=True),
    "Adagrad": lambda p: torch.optim.Adagrad(p),
    "RMSprop": lambda p: torch.optim.RMSprop(p, momentum=0.9),
    "NAdam": lambda p: torch.optim.NAdam(p),
    "Adamax": lambda p: torch.optim.Adamax(p),
}


@pytest.mark.parametrize("make", list(OTHER_OPTIMIZERS.values()), ids=list(OTHER_OPTIMIZERS))
def test_any_other_optimizers_state_is_refused(make):
    param = torch.nn.Parameter(torch.randn(3, 2))
    other = make([param])
    param.grad = torch.randn(3, 2)
    other.step()
    with pytest.raises(ValueError, match=r"not written by Anon: param group 0 has no gamma, refresh, beta3"):
        Anon([param]).load_state_dict(other.state_dict())
    # Grafting Anon's group keys on does not get the foreign per-tensor state through either.
    forged = other.state_dict()
    forged["param_groups"][0].update(gamma=1.0, refresh="pow2", beta3=0.5)
    with pytest.raises(ValueError, match=r"State of param 0 (has keys|lacks 'step' or 'exp_avg'|has only one of)"):
        Anon([param]).load_state_dict(forged)


# --- documented migrations: accepted, with the result checked -------------------------------------------------


def continue_run(param_value, state_dict, steps, seed=5):
    param = torch.nn.Parameter(param_value.clone())
    opt = Anon([param], lr=0.01)
    opt.load_state_dict(state_dict)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        param.grad = torch.randn(3, 2, generator=generator)
        opt.step()
    return param.detach(), opt


def test_plain_number_step_is_upgraded_to_a_tensor_and_resumes_identically():
    param, opt = trained(steps=3)
    # Copies first: a loaded state dict shares its tensors with the optimizer that loads it.
    state_dict = copy.deepcopy(opt.state_dict())
    reference, _ = continue_run(param.detach(), copy.deepcopy(opt.state_dict()), steps=6)
    state_dict["state"][0]["step"] = 3  # as a hand-written or older state dict may hold it
    resumed, resumed_opt = continue_run(param.detach(), state_dict, steps=6)
    assert torch.is_tensor(resumed_opt.state[resumed_opt.param_groups[0]["params"][0]]["step"])
    assert resumed_opt.refresh_history == [4, 8]
    assert torch.equal(resumed, reference)


def test_float64_state_is_cast_to_the_parameter_dtype_like_torch_optim():
    """torch.optim's rule: floating state takes its parameter's dtype on load (here fp64 state into fp32)."""
    param, opt = trained(steps=3)
    state_dict = copy.deepcopy(opt.state_dict())
    for key in ("exp_avg", "exp_avg_sq", "precond"):
        state_dict["state"][0][key] = state_dict["state"][0][key].double()
    fresh = torch.nn.Parameter(param.detach().clone())
    target = Anon([fresh], lr=0.01)
    target.load_state_dict(state_dict)
    for key in ("exp_avg", "exp_avg_sq", "precond"):
        loaded = target.state[fresh][key]
        assert loaded.dtype == torch.float32
        assert torch.equal(loaded, state_dict["state"][0][key].float())
    reference, _ = continue_run(param.detach(), copy.deepcopy(opt.state_dict()), steps=2)
    resumed, _ = continue_run(param.detach(), state_dict, steps=2)
    assert torch.equal(resumed, reference)  # fp32 -> fp64 -> fp32 is exact


def test_empty_per_param_state_loads_and_that_param_starts_fresh():
    """torch.optim writes ``{}`` for a param merely looked up in ``optimizer.state`` (e.g. by a logging callback
    for a param without a gradient); such a state dict must load, and that param starts from step 0."""
    used, unused = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))
    opt = Anon([used, unused], lr=0.01)
    used.grad = torch.randn(3, 2)
    opt.step()
    assert "precond" not in opt.state[unused]  # the lookup that leaves an empty entry behind
    state_dict = opt.state_dict()
    assert state_dict["state"][1] == {}
    target_used, target_unused = torch.nn.Parameter(used.detach().clone()), torch.nn.Parameter(unused.detach().clone())
    target = Anon([target_used, target_unused], lr=0.01)
    target.load_state_dict(state_dict)
    target_used.grad, target_unused.grad = torch.randn(3, 2), torch.randn(4)
    target.step()
    assert target.state[target_used]["step"].item() == 2
    assert target.state[target_unused]["step"].item() == 1


# --- foreign checkpoints through the training stacks ----------------------------------------------------------


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers and accelerate installed")
def test_trainer_checkpoint_written_by_adamw_is_refused_by_an_anon_run(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from anon_hf.integrations.trainer_callback import find_anon

    class Tokens(torch.utils.data.Dataset):
        ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, index):
            return {"input_ids": self.ids[index], "labels": self.ids[index]}

    def trainer(optim, max_steps):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=64)  # fmt: skip
        args = TrainingArguments(
            output_dir=str(tmp_path), optim=optim, max_steps=max_steps, per_device_train_batch_size=4,
            save_strategy="steps", save_steps=2, report_to="none", disable_tqdm=True, use_cpu=True, logging_steps=100,
        )  # fmt: skip
        return Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=Tokens())

    trainer("adamw_torch", max_steps=2).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert "exp_avg_sq" in next(iter(torch.load(checkpoint / "optimizer.pt")["state"].values()))

    anon_run = trainer("anon", max_steps=4)
    with pytest.raises(ValueError, match=r"This state dict was not written by Anon: param group 0 has no gamma"):
        anon_run.train(resume_from_checkpoint=str(checkpoint))
    anon = find_anon(anon_run.optimizer)
    assert isinstance(anon, Anon) and len(anon.state) == 0  # Anon never stepped
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers and accelerate installed")
def test_trainer_checkpoint_with_a_param_that_never_had_a_gradient_resumes(tmp_path):
    """A param without a gradient gets no state; the checkpoint must still resume. AnonCallback used to look every
    param up in ``optimizer.state`` (a defaultdict) and leave ``{}`` entries that the resume refused."""
    from transformers import Trainer, TrainingArguments

    from anon_hf.integrations.trainer_callback import find_anon

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.used, self.unused = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)

        def forward(self, x):
            return {"loss": self.used(x).pow(2).mean()}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, index):
            return {"x": torch.full((4,), float(index))}

    def trainer(max_steps):
        args = TrainingArguments(
            output_dir=str(tmp_path), optim="anon", max_steps=max_steps, save_strategy="steps", save_steps=2,
            report_to="none", disable_tqdm=True, use_cpu=True, logging_steps=1, per_device_train_batch_size=4,
        )  # fmt: skip
        return Trainer(model=Model(), args=args, train_dataset=Data())

    trainer(2).train()
    saved = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt")["state"]
    assert len(saved) == 2 and {} not in saved.values()  # used.weight and used.bias only
    resumed = trainer(4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4
    anon = find_anon(resumed.optimizer)
    assert anon.state[resumed.model.used.weight]["step"].item() == 4


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed installed")
def test_deepspeed_checkpoints_that_anon_cannot_resume_stop_with_an_error(tmp_path):
    env = dict(
        os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1"
    )
    result = subprocess.run(
        [sys.executable, str(DS_WORKER), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads((tmp_path / "ds_wrong_state.rank0.json").read_text())
    for name, outcome in report.items():
        assert "setup_error" not in outcome, (name, outcome)
        assert outcome["reader_optimizer"] == "Anon", name
        # The load stopped before Anon held any state, so no step can run on mixed state.
        assert outcome["state_unchanged"] and outcome["reader_state_keys"] == [], name
    # ZeRO-2's default (rigid) checkpoint: DeepSpeed hands AdamW's state to Anon.load_state_dict, which refuses it.
    assert report["adamw_rigid"]["writer_optimizer"] == "AdamW"
    assert report["adamw_rigid"]["error"].startswith("ValueError: This state dict was not written by Anon")
    # elastic_checkpoint: DeepSpeed's own restore needs a step in the param groups; torch-style optimizers keep it
    # per tensor, so neither AdamW's nor Anon's checkpoint loads (DeepSpeed asserts; docs/troubleshooting.md).
    for name in ("adamw_elastic", "anon_elastic"):
        assert report[name]["error"].startswith("AssertionError"), report[name]
        assert report[name]["error_site"].endswith("_restore_step_from_elastic_checkpoint"), report[name]
    # Another model: DeepSpeed stops at the module weights, before the optimizer.
    assert "size mismatch for 0.weight" in report["anon_other_model"]["error"]
