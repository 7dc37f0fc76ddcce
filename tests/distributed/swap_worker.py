"""Never a silent swap under DeepSpeed ZeRO-2: the Trainer on 2 gloo ranks, ``--deepspeed`` without an optimizer
block (so the Trainer's ``create_optimizer`` builds the optimizer DeepSpeed wraps).

Usage: ``torchrun --nproc_per_node 2 tests/distributed/swap_worker.py OUT_DIR``

Cases:
* ``subclass_sgd``: ``optim="anon"`` and a Trainer subclass whose ``create_optimizer`` builds SGD; ``train()``
  must stop before step 1 with :class:`OptimizerReplacedError` naming SGD and the override;
* ``control_optim_anon``: the plain Trainer with ``optim="anon"``: trains 2 steps with Anon inside ZeRO;
* ``block_anon8bit_optim_anon_8bit``: the config's block ``"type": "Anon8bit"`` next to ``optim="anon_8bit"``
  (the names must agree, not be refused): trains 2 steps with Anon8bit inside ZeRO.
"""

from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Report, init_process_group, run_cases, tiny_llama  # noqa: E402
from trainer_worker import TokenDataset, recipe, reset_accelerate_state, training_args  # noqa: E402

from anon_hf.integrations.routes import find_anon  # noqa: E402


class CountingSGD(torch.optim.SGD):
    steps = 0

    def step(self, closure=None):
        type(self).steps += 1
        return super().step(closure)


def without_block() -> dict:
    config = recipe("ds_zero2.json")
    del config["optimizer"]
    return config


def block_anon8bit() -> dict:
    config = copy.deepcopy(recipe("ds_zero2.json"))
    config["optimizer"]["type"] = "Anon8bit"
    return config


def run(run_dir: str, config: dict, trainer_cls=None, **overrides) -> dict:
    from transformers import Trainer

    class SwappingTrainer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = CountingSGD(self.model.parameters(), lr=0.1)
            return super().create_optimizer(model)

    trainer_cls = {None: Trainer, "swap": SwappingTrainer}[trainer_cls]
    args = training_args(run_dir, config, max_steps=2, **overrides)
    trainer = trainer_cls(model=tiny_llama(), args=args, train_dataset=TokenDataset())
    result = {"error": "no error"}
    try:
        trainer.train()
        result["inner_type"] = type(find_anon(trainer.optimizer)).__name__
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
        result["sgd_steps"] = CountingSGD.steps
    result["global_step"] = trainer.state.global_step
    del trainer
    reset_accelerate_state()
    return result


def main(out_dir: str) -> None:
    rank, _ = init_process_group()
    report = Report(out_dir, "swap", rank)
    run_dir = os.path.join(out_dir, "swap_runs")
    cases = {
        "subclass_sgd": lambda: run(run_dir, without_block(), "swap", optim="anon"),
        "control_optim_anon": lambda: run(run_dir, without_block(), optim="anon"),
        "block_anon8bit_optim_anon_8bit": lambda: run(run_dir, block_anon8bit(), optim="anon_8bit"),
    }
    run_cases({name: lambda name=name, case=case: report.__setitem__(name, case()) for name, case in cases.items()},
              [], report)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
