"""Never a silent swap (anon_hf/integrations/final_optimizer.py): when Anon is asked for and another optimizer would
train, ``trainer.train()`` stops before step 1 with an error naming what replaced it and why.

The frameworks do it in ``create_optimizer`` (LLaMA-Factory's ``use_muon`` builds Muon there whatever ``optim``
says); these tests do it the same way. The DeepSpeed route runs on 2 gloo ranks (``-m distributed``)."""

import json
import os
import sys
import types

import pytest
import torch

from anon_hf import Anon, Anon8bit
from anon_hf.integrations.import_utils import is_deepspeed_available, is_transformers_available

pytestmark = pytest.mark.skipif(not is_transformers_available(), reason="transformers is not installed")

if is_transformers_available():
    import tiny
    from transformers import Trainer, TrainingArguments

    from anon_hf.integrations.final_optimizer import OptimizerReplacedError
    from anon_hf.integrations.routes import find_anon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none", save_strategy="no",
        logging_steps=100, disable_tqdm=True, use_cpu=True, seed=0, learning_rate=1e-3,
    )  # fmt: skip
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class CountingSGD(torch.optim.SGD):
    """SGD that counts its steps, standing in for Muon or Adam-mini."""

    steps = 0

    def step(self, closure=None):
        type(self).steps += 1
        return super().step(closure)


class SwappingTrainer(Trainer):
    """Builds its own optimizer in create_optimizer, the way LLaMA-Factory's trainers do for use_muon."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = CountingSGD(self.model.parameters(), lr=0.1)
        return super().create_optimizer(model)


class PassThroughTrainer(Trainer):
    """Overrides create_optimizer but keeps the Trainer's optimizer (LLaMA-Factory without use_muon)."""

    def create_optimizer(self, model=None):
        return super().create_optimizer(model)


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_stopped_before_step_1(trainer, before):
    assert trainer.state.global_step == 0
    assert CountingSGD.steps == 0
    for name, value in trainer.model.named_parameters():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


@pytest.mark.parametrize("optim, asked", [("anon", "Anon"), ("anon_8bit", "Anon8bit")])
def test_create_optimizer_override_stops_before_step_1_naming_it(tmp_path, optim, asked):
    CountingSGD.steps = 0
    model = tiny.tiny_llama()
    trainer = SwappingTrainer(model=model, args=args(tmp_path, optim=optim), train_dataset=tiny.TokenDataset())
    before = weights(model)
    with pytest.raises(OptimizerReplacedError) as info:
        trainer.train()
    message = str(info.value)
    assert f"optim={optim!r} asks for {asked}" in message
    assert "CountingSGD" in message and "stopped before step 1" in message
    assert "test_swap.SwappingTrainer.create_optimizer" in message
    assert "docs/troubleshooting.md#the-optimizer-that-trains-is-not-anon" in message
    assert_stopped_before_step_1(trainer, before)


def test_a_framework_option_that_replaces_the_optimizer_is_named(tmp_path):
    """LLaMA-Factory keeps use_muon on trainer.finetuning_args; the error names the option, not only the class."""
    CountingSGD.steps = 0
    model = tiny.tiny_llama()
    trainer = SwappingTrainer(model=model, args=args(tmp_path, optim="anon"), train_dataset=tiny.TokenDataset())
    trainer.finetuning_args = types.SimpleNamespace(use_muon=True, use_adam_mini=False)
    before = weights(model)
    with pytest.raises(OptimizerReplacedError, match=r"LLaMA-Factory's use_muon: true replaces the optimizer"):
        trainer.train()
    assert_stopped_before_step_1(trainer, before)


def test_the_other_anon_class_is_a_swap_too(tmp_path):
    """optim='anon_8bit' asks for 8-bit state; an Anon with fp32 state training instead is reported."""

    class AnonInstead(Trainer):
        def create_optimizer(self, model=None):
            self.optimizer = Anon(self.model.parameters(), lr=1e-3)
            return self.optimizer

    model = tiny.tiny_llama()
    trainer = AnonInstead(model=model, args=args(tmp_path, optim="anon_8bit"), train_dataset=tiny.TokenDataset())
    with pytest.raises(
        OptimizerReplacedError, match=r"asks for Anon8bit, but the optimizer that would train is Anon \("
    ):
        trainer.train()
    assert trainer.state.global_step == 0


def test_an_optimizer_replaced_after_the_trainer_was_built_is_reported(tmp_path):
    model = tiny.tiny_llama()
    anon = Anon(model.parameters(), lr=1e-3)
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=tiny.TokenDataset(), optimizers=(anon, None))
    trainer.optimizer = CountingSGD(model.parameters(), lr=0.1)
    with pytest.raises(
        OptimizerReplacedError, match=r"Trainer\(optimizers=...\) asks for Anon.*set trainer.optimizer"
    ):
        trainer.train()


@pytest.mark.parametrize("optim, cls", [("anon", Anon), ("anon_8bit", Anon8bit)])
def test_control_an_override_that_keeps_anon_trains(tmp_path, optim, cls):
    trainer = PassThroughTrainer(
        model=tiny.tiny_llama(), args=args(tmp_path, optim=optim), train_dataset=tiny.TokenDataset()
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert type(find_anon(trainer.optimizer)) is cls


def test_without_anon_a_custom_optimizer_is_left_alone(tmp_path):
    """No Anon asked for: the check stays out of the way (no AnonCallback is added)."""
    CountingSGD.steps = 0
    trainer = SwappingTrainer(model=tiny.tiny_llama(), args=args(tmp_path), train_dataset=tiny.TokenDataset())
    trainer.train()
    assert CountingSGD.steps == 2


# --- what the check finds inside wrappers, and the reasons it gives (no training) ---------------------------------


def requested(name="anon"):
    from anon_hf.integrations.final_optimizer import RequestedAnon
    from anon_hf.integrations.optim_args import anon_name_for_optim

    return RequestedAnon(anon_name_for_optim(name), f"optim={name!r}")


def check(optimizer, trainer=None, args=None):
    from anon_hf.integrations.final_optimizer import check_optimizer_that_trains

    check_optimizer_that_trains(requested(), optimizer, trainer, args)


def test_anon_inside_accelerate_deepspeed_and_badam_style_wrappers_passes():
    anon = Anon([torch.zeros(2, requires_grad=True)], lr=1e-3)
    zero = types.SimpleNamespace(optimizer=anon)  # DeepSpeed's ZeRO optimizer keeps the inner one in .optimizer
    check(types.SimpleNamespace(optimizer=zero))  # accelerate's wrapper around it
    check(types.SimpleNamespace(base_optimizer=anon, optimizer=None))  # BAdam's BlockOptimizer


def deepspeed_args(config):
    return types.SimpleNamespace(hf_deepspeed_config=types.SimpleNamespace(config=config))


def test_accelerates_offload_swap_is_named_with_its_setting():
    DeepSpeedCPUAdam = type("DeepSpeedCPUAdam", (), {})
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(OptimizerReplacedError, match=r"is DeepSpeedCPUAdam .*zero_force_ds_cpu_optimizer\" at true"):
        check(types.SimpleNamespace(optimizer=DeepSpeedCPUAdam()), args=deepspeed_args(config))


def test_a_deepspeed_block_of_another_type_is_named():
    config = {"optimizer": {"type": "AdamW", "params": {}}}
    inner = torch.optim.AdamW([torch.zeros(2, requires_grad=True)])
    with pytest.raises(OptimizerReplacedError, match=r"optimizer block \(\"type\": 'AdamW'\) builds it"):
        check(types.SimpleNamespace(optimizer=inner), args=deepspeed_args(config))


# --- DeepSpeed: ZeRO-2 on 2 gloo ranks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepspeed_swaps(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_distributed import read_reports, torchrun

    out_dir = tmp_path_factory.mktemp("swap")
    code, output, _ = torchrun("swap_worker.py", out_dir, nproc=2)
    reports = read_reports(out_dir, "swap", 2)
    assert all(reports), f"exit code {code}; output tail:\n{output[-6000:]}"
    return reports


@pytest.mark.distributed
@pytest.mark.skipif(not is_deepspeed_available(), reason="deepspeed is not installed")
def test_deepspeed_create_optimizer_override_stops_before_step_1(deepspeed_swaps):
    for report in deepspeed_swaps:
        case = report["subclass_sgd"]
        assert case["error"].startswith("OptimizerReplacedError: optim='anon' asks for Anon"), case
        assert "CountingSGD" in case["error"] and "SwappingTrainer.create_optimizer" in case["error"]
        assert (case["global_step"], case["sgd_steps"]) == (0, 0)


@pytest.mark.distributed
@pytest.mark.skipif(not is_deepspeed_available(), reason="deepspeed is not installed")
@pytest.mark.parametrize("case", ["control_optim_anon", "block_anon8bit_optim_anon_8bit"])
def test_deepspeed_control_trains_with_the_class_asked_for(deepspeed_swaps, case):
    expected = {"control_optim_anon": "Anon", "block_anon8bit_optim_anon_8bit": "Anon8bit"}[case]
    for report in deepspeed_swaps:
        assert report[case] == {"error": "no error", "inner_type": expected, "global_step": 2}, json.dumps(report)
