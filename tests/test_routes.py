"""No silent choice between two routes to the optimizer (anon_hf/integrations/routes.py), and the same `anon/*`
telemetry whichever route brought Anon: --optim anon, optimizers=, optimizer_cls_and_kwargs (here) and a DeepSpeed
config's optimizer block (tests/test_distributed.py, 2 gloo ranks)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from anon_hf import Anon, Anon8bit
from anon_hf.integrations.import_utils import is_deepspeed_available, is_transformers_available

pytestmark = pytest.mark.skipif(not is_transformers_available(), reason="transformers is not installed")

if is_transformers_available():
    import tiny
    from transformers import Trainer, TrainingArguments

    from anon_hf.integrations.trainer_callback import AnonCallback, find_anon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TELEMETRY_KEYS = {"anon/refresh_step"} | {
    f"anon/group{group}/{stat}"
    for group in (0, 1)
    for stat in (
        "precond_min",
        "precond_median",
        "precond_max",
        "step_size_median",
        "step_size_spread",
        "unseen_fraction",
    )
}


def args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none", save_strategy="no",
        logging_steps=100, disable_tqdm=True, use_cpu=True, seed=0, learning_rate=1e-3,
    )  # fmt: skip
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def two_groups(model, **anon_kwargs):
    return Anon(
        [
            {"params": [p for n, p in model.named_parameters() if "norm" not in n], "weight_decay": 0.01},
            {"params": [p for n, p in model.named_parameters() if "norm" in n], "weight_decay": 0.0},
        ],
        lr=1e-3,
        **anon_kwargs,
    )


def telemetry(trainer):
    trainer.train()
    logged = [h for h in trainer.state.log_history if "anon/refresh_step" in h]
    assert [h["anon/refresh_step"] for h in logged] == [1, 2]
    return {key for h in logged for key in h if key.startswith("anon/")}


# --- optimizers= -------------------------------------------------------------------------------------------------


def test_optimizers_anon_with_matching_optim_args_trains_and_logs(tmp_path):
    model = tiny.tiny_llama()
    optimizer = two_groups(model, gamma=1.1)
    trainer = Trainer(
        model=model,
        args=args(tmp_path, optim="anon", optim_args="gamma=1.1"),
        train_dataset=tiny.TokenDataset(),
        optimizers=(optimizer, None),
    )
    assert isinstance(trainer.callback_handler.callbacks[0], AnonCallback)
    assert telemetry(trainer) == TELEMETRY_KEYS
    assert find_anon(trainer.optimizer) is optimizer


def test_optimizers_anon_alone_logs(tmp_path):
    model = tiny.tiny_llama()
    trainer = Trainer(
        model=model, args=args(tmp_path), train_dataset=tiny.TokenDataset(), optimizers=(two_groups(model), None)
    )
    assert telemetry(trainer) == TELEMETRY_KEYS


OPTIMIZER_CONFLICTS = {
    "gamma_differs": (
        dict(optim="anon", optim_args="gamma=1.1"),
        "anon",
        r"gamma is set twice with different values: --optim_args gamma=1\.1 and the Anon passed with "
        r"Trainer\(optimizers=\.\.\.\) \(param group 0\) has gamma=1\.0\. Either drop gamma from --optim_args, or "
        r"build the optimizer with gamma=1\.1",
    ),
    "dtype_differs": (dict(optim="anon", optim_args="precond_dtype=bf16"), "anon", r"precond_dtype is set twice"),
    "optim_anon_with_adamw": (
        dict(optim="anon"),
        "adamw",
        r"optim='anon', but Trainer\(optimizers=\.\.\.\) passes a AdamW.*drop optim='anon'.*pass an Anon",
    ),
    "optim_adamw_with_anon": (
        dict(optim="adamw_torch"),
        "anon",
        r"optim='adamw_torch', but Trainer\(optimizers=\.\.\.\) passes an Anon",
    ),
    "optim_args_without_optim_anon": (
        dict(optim_args="gamma=1.1"),
        "anon",
        r"--optim_args 'gamma=1.1' would be ignored.*Add --optim anon",
    ),
}


@pytest.mark.parametrize("case", list(OPTIMIZER_CONFLICTS))
def test_optimizers_next_to_optim_never_silently_wins(tmp_path, case):
    overrides, kind, message = OPTIMIZER_CONFLICTS[case]
    model = tiny.tiny_llama()
    optimizer = two_groups(model) if kind == "anon" else torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=message):
        Trainer(
            model=model,
            args=args(tmp_path, **overrides),
            train_dataset=tiny.TokenDataset(),
            optimizers=(optimizer, None),
        )
    assert all(not state for state in optimizer.state.values())


# --- each name (anon, anon_8bit) on each route: one table of names, no drift ---------------------------------------

NAMES = [("anon", Anon), ("anon_8bit", Anon8bit)]


@pytest.mark.parametrize("optim, cls", NAMES, ids=[name for name, _ in NAMES])
def test_each_name_with_its_class_passed_built_trains(tmp_path, optim, cls):
    model = tiny.tiny_llama()
    optimizer = cls(model.parameters(), lr=1e-3, gamma=0.5)
    trainer = Trainer(
        model=model,
        args=args(tmp_path, optim=optim, optim_args="gamma=0.5"),
        train_dataset=tiny.TokenDataset(),
        optimizers=(optimizer, None),
    )
    trainer.train()
    assert find_anon(trainer.optimizer) is optimizer and trainer.state.global_step == 2


@pytest.mark.parametrize("optim, cls", NAMES, ids=[name for name, _ in NAMES])
def test_each_name_with_its_class_in_cls_and_kwargs_trains_with_optim_args_filled(tmp_path, optim, cls):
    trainer = Trainer(
        model=tiny.tiny_llama(),
        args=args(tmp_path, optim=optim, optim_args="gamma=0.5"),
        train_dataset=tiny.TokenDataset(),
        optimizer_cls_and_kwargs=(cls, {"lr": 1e-3}),
    )
    trainer.train()
    inner = find_anon(trainer.optimizer)
    assert type(inner) is cls and [group["gamma"] for group in inner.param_groups] == [0.5, 0.5]


@pytest.mark.parametrize("optim, cls", NAMES, ids=[name for name, _ in NAMES])
def test_each_name_alone_builds_its_class(tmp_path, optim, cls):
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args(tmp_path, optim=optim, optim_args="gamma=0.5"))
    assert optimizer_cls is cls and kwargs["gamma"] == 0.5


@pytest.mark.parametrize("optim, other", [("anon", Anon8bit), ("anon_8bit", Anon)], ids=["anon", "anon_8bit"])
def test_a_name_next_to_the_other_class_raises_naming_both(tmp_path, optim, other):
    model = tiny.tiny_llama()
    named = {"anon": "Anon", "anon_8bit": "Anon8bit"}[optim]
    message = rf"optim='{optim}' asks for {named}, but the optimizer passed with Trainer\(optimizers=\.\.\.\) is "
    with pytest.raises(ValueError, match=message + other.__name__):
        Trainer(
            model=model,
            args=args(tmp_path, optim=optim),
            train_dataset=tiny.TokenDataset(),
            optimizers=(other(model.parameters(), lr=1e-3), None),
        )
    with pytest.raises(
        ValueError, match=rf"optim='{optim}' asks for {named}, but the class of Trainer\(optimizer_cls"
    ):
        Trainer(
            model=tiny.tiny_llama(),
            args=args(tmp_path, optim=optim),
            train_dataset=tiny.TokenDataset(),
            optimizer_cls_and_kwargs=(other, {"lr": 1e-3}),
        )


# --- optimizer_cls_and_kwargs ------------------------------------------------------------------------------------


def test_cls_and_kwargs_are_filled_from_optim_args_and_log(tmp_path):
    trainer = Trainer(
        model=tiny.tiny_llama(),
        args=args(tmp_path, optim="anon", optim_args="gamma=1.1,eps=1e-10"),
        train_dataset=tiny.TokenDataset(),
        optimizer_cls_and_kwargs=(Anon, {"lr": 1e-3, "eps": 1e-10}),
    )
    assert trainer.optimizer_cls_and_kwargs == (Anon, {"lr": 1e-3, "eps": 1e-10, "gamma": 1.1})
    assert telemetry(trainer) == TELEMETRY_KEYS
    assert [group["gamma"] for group in find_anon(trainer.optimizer).param_groups] == [1.1, 1.1]


def test_cls_and_kwargs_fill_is_logged(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="anon_hf.integrations.routes"):
        Trainer(
            model=tiny.tiny_llama(),
            args=args(tmp_path, optim="anon", optim_args="gamma=1.1"),
            train_dataset=tiny.TokenDataset(),
            optimizer_cls_and_kwargs=(Anon, {"lr": 1e-3}),
        )
    assert "Anon's optimizer_cls_and_kwargs filled from --optim_args: gamma=1.1" in caplog.text


CLS_CONFLICTS = {
    "gamma_differs": (
        dict(optim="anon", optim_args="gamma=1.1"),
        (Anon, {"gamma": 1.0}),
        r"--optim_args gamma=1\.1 and Trainer\(optimizer_cls_and_kwargs=\.\.\.\) kwargs gamma=1\.0\. Either drop "
        r"gamma from --optim_args, or remove it from the optimizer_cls_and_kwargs kwargs",
    ),
    "optim_anon_with_adamw": (dict(optim="anon"), (torch.optim.AdamW, {}), r"names AdamW, which the Trainer uses"),
    "optim_sgd_with_anon": (dict(optim="sgd"), (Anon, {}), r"optim='sgd', but .* names Anon"),
}


@pytest.mark.parametrize("case", list(CLS_CONFLICTS))
def test_cls_and_kwargs_next_to_optim_never_silently_win(tmp_path, case):
    overrides, cls_and_kwargs, message = CLS_CONFLICTS[case]
    with pytest.raises(ValueError, match=message):
        Trainer(
            model=tiny.tiny_llama(),
            args=args(tmp_path, **overrides),
            train_dataset=tiny.TokenDataset(),
            optimizer_cls_and_kwargs=cls_and_kwargs,
        )


def test_equal_values_written_differently_agree(tmp_path):
    trainer = Trainer(
        model=tiny.tiny_llama(),
        args=args(tmp_path, optim="anon", optim_args="bounds=-1:1,precond_dtype=bf16"),
        train_dataset=tiny.TokenDataset(),
        optimizer_cls_and_kwargs=(Anon, {"bounds": [-1.0, 1.0], "precond_dtype": torch.bfloat16}),
    )
    assert trainer.optimizer_cls_and_kwargs[1] == {"bounds": [-1.0, 1.0], "precond_dtype": torch.bfloat16}


def test_optim_anon_logs_the_same_keys(tmp_path):
    trainer = Trainer(
        model=tiny.tiny_llama(),
        args=args(tmp_path, optim="anon", optim_args="gamma=1.1"),
        train_dataset=tiny.TokenDataset(),
    )
    assert telemetry(trainer) == TELEMETRY_KEYS


# --- DeepSpeed's optimizer block against --optim / --optim_args ----------------------------------------------------

DS_PROBE = textwrap.dedent(
    """
    import copy, json, logging, sys
    import anon_hf
    from transformers import TrainingArguments

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with open(sys.argv[1]) as handle:
        base = json.load(handle)

    def block(**params):
        config = copy.deepcopy(base)
        config["optimizer"]["params"].update(params)
        return config

    def without_block():
        config = copy.deepcopy(base)
        del config["optimizer"]
        return config

    def typed(name):
        config = copy.deepcopy(base)
        config["optimizer"]["type"] = name
        return config

    def adamw_block():
        config = copy.deepcopy(base)
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
        return config

    cases = {
        "fill": (block(), dict(optim="anon", optim_args="eps=1e-8,beta3=0.25")),
        "auto_filled": (block(gamma="auto", eps="auto"), dict(optim="anon", optim_args="gamma=1.1,eps=1e-8")),
        "same_value": (block(), dict(optim="anon", optim_args="gamma=1.0,refresh=pow2")),
        "same_value_written_differently": (block(bounds=[-1, 1]), dict(optim="anon", optim_args="bounds=-1:1")),
        "default_optim": (block(), dict()),
        "conflict": (block(), dict(optim="anon", optim_args="gamma=1.1,eps=1e-8")),
        "other_optim": (block(), dict(optim="adamw_torch")),
        "optim_args_without_optim_anon": (block(), dict(optim_args="gamma=1.1")),
        "optim_anon_with_adamw_block": (adamw_block(), dict(optim="anon")),
        "optim_anon_without_block": (without_block(), dict(optim="anon", optim_args="gamma=1.1")),
        "auto_left_unfilled": (block(gamma="auto"), dict(optim="anon")),
        "block_8bit_optim_anon_8bit": (typed("Anon8bit"), dict(optim="anon_8bit", optim_args="beta3=0.25")),
        "block_8bit_default_optim": (typed("Anon8bit"), dict()),
        "block_8bit_optim_anon": (typed("Anon8bit"), dict(optim="anon")),
        "block_anon_optim_anon_8bit": (block(), dict(optim="anon_8bit")),
        "optim_anon_8bit_with_adamw_block": (adamw_block(), dict(optim="anon_8bit")),
    }
    report = {}
    for name, (config, overrides) in cases.items():
        try:
            args = TrainingArguments("unused", deepspeed=config, use_cpu=True, report_to="none", **overrides)
            optimizer = args.hf_deepspeed_config.config.get("optimizer", {})
            report[name] = {"params": optimizer.get("params"), "type": optimizer.get("type")}
        except Exception as err:
            report[name] = {"error": f"{type(err).__name__}: {err}"}
    # Trainer(optimizers=...) under DeepSpeed: deepspeed_init drops the one passed, with or without a block.
    import tiny
    from transformers import Trainer

    model = tiny.tiny_llama()
    for name, config in (("optimizers_with_block", block()), ("optimizers_without_block", without_block())):
        try:
            args = TrainingArguments("unused", deepspeed=config, use_cpu=True, report_to="none")
            optimizer = anon_hf.Anon(model.parameters())
            Trainer(model=model, args=args, train_dataset=tiny.TokenDataset(), optimizers=(optimizer, None))
            report[name] = {"error": "no error"}
        except Exception as err:
            report[name] = {"error": f"{type(err).__name__}: {err}"}
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def ds_routes():
    result = subprocess.run(
        [sys.executable, "-c", DS_PROBE, os.path.join(ROOT, "recipes", "configs", "ds_zero2.json")],
        capture_output=True,
        text=True,
        env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"),
        cwd=os.path.dirname(os.path.abspath(__file__)),  # tiny.py
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


requires_deepspeed = pytest.mark.skipif(not is_deepspeed_available(), reason="deepspeed is not installed")


@requires_deepspeed
def test_deepspeed_block_keys_left_out_or_auto_are_filled_and_logged(ds_routes):
    report, log = ds_routes
    # ds_zero2.json: gamma 1.0 and refresh pow2 explicit, lr/betas/weight_decay "auto" (the Trainer's own filling).
    assert report["fill"]["params"] == {
        "lr": 5e-05, "betas": [0.9, 0.999], "weight_decay": 0.0, "gamma": 1.0, "refresh": "pow2", "eps": 1e-08,
        "beta3": 0.25,
    }  # fmt: skip
    assert "Anon's DeepSpeed optimizer.params filled from --optim_args: eps=1e-08, beta3=0.25" in log
    assert report["auto_filled"]["params"]["gamma"] == 1.1 and report["auto_filled"]["params"]["eps"] == 1e-08


@requires_deepspeed
def test_deepspeed_block_agreeing_or_alone_is_accepted(ds_routes):
    report, _ = ds_routes
    for case in ("same_value", "same_value_written_differently", "default_optim"):
        assert "error" not in report[case], report[case]
    assert report["default_optim"]["params"]["gamma"] == 1.0 and "eps" not in report["default_optim"]["params"]
    assert report["optim_anon_without_block"] == {"params": None, "type": None}


@requires_deepspeed
def test_deepspeed_block_anon8bit_with_optim_anon_8bit_is_one_optimizer_not_two(ds_routes):
    """The drift of two name checks: "type": "Anon8bit" next to --optim anon_8bit is filled, not refused."""
    report, _ = ds_routes
    assert report["block_8bit_optim_anon_8bit"]["type"] == "Anon8bit"
    assert report["block_8bit_optim_anon_8bit"]["params"]["beta3"] == 0.25
    assert (
        report["block_8bit_default_optim"]["type"] == "Anon8bit" and "error" not in report["block_8bit_default_optim"]
    )


DS_ERRORS = {
    "conflict": r"^ValueError: Anon's gamma is set twice with different values: --optim_args gamma=1\.1 and the "
    r"DeepSpeed config's optimizer\.params gamma=1\.0\. Either drop gamma from --optim_args, or remove it from the "
    r"config's optimizer\.params or set it to \"auto\" there\.$",
    "other_optim": r"^ValueError: --optim adamw_torch and the DeepSpeed config's optimizer block \"type\": \"Anon\" "
    r"both choose the optimizer.*use --optim anon \(or leave --optim out\), or remove the \"optimizer\" block",
    "optim_args_without_optim_anon": r"^ValueError: --optim_args 'gamma=1\.1' would be ignored.*Add --optim anon",
    "optim_anon_with_adamw_block": r"^ValueError: --optim anon, but the DeepSpeed config's optimizer block has "
    r"\"type\": 'AdamW'.*remove the \"optimizer\" block.*set \"type\": \"Anon\"",
    "optimizers_with_block": r"^ValueError: Trainer\(optimizers=\.\.\.\) and the DeepSpeed config's optimizer block "
    r"\(\"type\": 'Anon'\) both choose the optimizer; under DeepSpeed the Trainer builds the config's and drops the "
    r"one passed\. Either remove the \"optimizer\" block from the DeepSpeed config, or drop optimizers=\.$",
    "optimizers_without_block": r"^ValueError: Trainer\(optimizers=\.\.\.\) passes an Anon, but under DeepSpeed the "
    r"Trainer drops an optimizer passed that way.*optimizer_cls_and_kwargs=\(anon_hf\.Anon, kwargs\)",
    "auto_left_unfilled": r"^ValueError: optimizer\.params for Anon holds \"auto\" for \['gamma'\].*--optim_args",
    "block_8bit_optim_anon": r"^ValueError: optim='anon' asks for Anon, but the DeepSpeed config's optimizer block "
    r"\(\"type\": \"Anon8bit\"\) is Anon8bit.*Either use optim='anon_8bit'",
    "block_anon_optim_anon_8bit": r"^ValueError: optim='anon_8bit' asks for Anon8bit, but the DeepSpeed config's "
    r"optimizer block \(\"type\": \"Anon\"\) is Anon.*Either use optim='anon'",
    "optim_anon_8bit_with_adamw_block": r"^ValueError: --optim anon_8bit, but the DeepSpeed config's optimizer block "
    r"has \"type\": 'AdamW'.*set \"type\": \"Anon8bit\" in it",
}


@requires_deepspeed
@pytest.mark.parametrize("case", list(DS_ERRORS))
def test_deepspeed_block_conflicts_raise_naming_both_and_the_ways_out(ds_routes, case):
    report, _ = ds_routes
    assert "error" in report[case], report[case]
    assert re.search(DS_ERRORS[case], report[case]["error"]), report[case]["error"]


def test_stats_find_zero3_partitions_that_the_param_groups_no_longer_hold():
    """ZeRO-3 empties the inner optimizer's param groups after each step; the partitions stay on its wrapper."""
    from types import SimpleNamespace

    from anon_hf.integrations.trainer_callback import preconditioner_stats, zero3_group_tensors

    flats = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))]
    anon = Anon([{"params": [flats[0]]}, {"params": [flats[1]]}], lr=0.1)
    for flat, values in zip(flats, ([1.0, 2.0, 4.0, 8.0], [3.0, 3.0, 3.0]), strict=True):
        anon.state[flat]["precond"] = torch.tensor(values)
    for group in anon.param_groups:
        group["params"] = []  # as DeepSpeed's stage3._optimizer_step leaves them
    wrapper = SimpleNamespace(optimizer=SimpleNamespace(
        optimizer=anon, fp32_partitioned_groups_flat=flats, sub_group_to_group_id={0: 0, 1: 1}
    ))  # fmt: skip
    assert preconditioner_stats(anon) == {}
    stats = preconditioner_stats(anon, params_by_group=zero3_group_tensors(wrapper))
    assert (stats["anon/group0/precond_min"], stats["anon/group0/precond_max"]) == (1.0, 8.0)
    assert stats["anon/group1/precond_median"] == 3.0
    assert zero3_group_tensors(anon) is None


def test_a_deepspeed_config_from_accelerates_plugin_counts_too():
    """`accelerate launch` with a DeepSpeed config file (no --deepspeed): the config lives on accelerate's plugin.
    (That route cannot run on CPU: the Trainer's use_cpu makes accelerate drop DeepSpeed; the lookup is checked.)"""
    from types import SimpleNamespace

    from anon_hf.integrations.routes import deepspeed_config_names_anon

    def accelerator(block):
        hf_ds_config = SimpleNamespace(config={"optimizer": block})
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(hf_ds_config=hf_ds_config)))

    args = SimpleNamespace(hf_deepspeed_config=None)
    assert deepspeed_config_names_anon(args, accelerator({"type": "Anon"}))
    assert not deepspeed_config_names_anon(args, accelerator({"type": "AdamW"}))
    assert not deepspeed_config_names_anon(args, SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)))
    assert not deepspeed_config_names_anon(args)
