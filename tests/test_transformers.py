"""`--optim anon` in transformers: the enum member, the Trainer handler, optim_args, exact resume, the callback."""

import math
import subprocess
import sys
import textwrap
from types import ModuleType, SimpleNamespace

import pytest
import torch

import anon_hf
from anon_hf import Anon
from anon_hf.integrations.import_utils import is_transformers_available

pytestmark = pytest.mark.skipif(not is_transformers_available(), reason="transformers is not installed")

if is_transformers_available():
    import tiny
    from tiny import TokenDataset
    from transformers import HfArgumentParser, Trainer, TrainerCallback
    from transformers.training_args import OptimizerNames, TrainingArguments

    from anon_hf.integrations import _patches
    from anon_hf.integrations import optim_args as optim_args_module
    from anon_hf.integrations import transformers as integration
    from anon_hf.integrations.trainer_callback import AnonCallback, find_anon, preconditioner_stats


def tiny_llama(seed=0):
    # Untied: the Trainer's decay groups then hold lm_head.weight on its own, which the group checks look for.
    return tiny.tiny_llama(seed, tie_word_embeddings=False)


ALL_OPTIM_ARGS = (
    "gamma=0.5,eps=1e-12,beta3=0.25,refresh=4,decoupled_weight_decay=false,bounds=-2:2,"
    "foreach=true,on_nonfinite=skip,verify_sync=false"
)


def training_args(output_dir, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        optim="anon",
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_steps=100,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(output_dir, model=None, callbacks=None, **overrides):
    return Trainer(
        model=model if model is not None else tiny_llama(),
        args=training_args(output_dir, **overrides),
        train_dataset=TokenDataset(),
        callbacks=callbacks,
    )


def run_python(code, **kwargs):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, **kwargs)


# --- registration ----------------------------------------------------------------------------------------------


def test_import_is_light_and_register_is_idempotent_and_thread_safe():
    result = run_python(
        """
        import sys, threading
        import anon_hf
        assert "transformers" not in sys.modules, "import anon_hf imported transformers"
        threads = [threading.Thread(target=anon_hf.register) for _ in range(4)]
        [t.start() for t in threads]; [t.join() for t in threads]
        anon_hf.register()
        from transformers.training_args import OptimizerNames
        members = [m for m in OptimizerNames if m.value == "anon"]
        print(len(members), members[0] is OptimizerNames.ANON is OptimizerNames("anon"), len(OptimizerNames))
        """,
        check=True,
    )
    count, same, total = result.stdout.split()
    assert (count, same) == ("1", "True")
    assert int(total) >= 2


def test_enum_member_is_real():
    member = OptimizerNames("anon")
    assert member is OptimizerNames.ANON and member.value == "anon" and member.name == "ANON"
    assert member in list(OptimizerNames)
    assert OptimizerNames["ANON"] is member
    assert torch.optim.Anon is Anon  # DeepSpeed's {"type": "Anon"} is looked up there


def test_training_args_optim_anon(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), optim="anon", optim_args="gamma=0.5")
    assert args.optim is OptimizerNames.ANON
    assert '"optim": "anon"' in args.to_json_string()
    assert args.to_dict()["optim"] == "anon"


def test_hf_argument_parser_command_line(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--optim", "anon", "--optim_args", "gamma=0.5,refresh=every,bounds=0:"]
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
    assert args.optim is OptimizerNames.ANON
    assert integration.parse_optim_args(args.optim_args) == {"gamma": 0.5, "refresh": "every", "bounds": (0.0, None)}


def test_training_args_bin_reloads_in_a_fresh_process(tmp_path):
    trainer = make_trainer(tmp_path, optim_args="gamma=0.5")
    trainer.save_model(str(tmp_path))  # writes training_args.bin with torch.save, as checkpoints do
    path = tmp_path / "training_args.bin"
    load = f"import torch; a = torch.load({str(path)!r}, weights_only=False); print(a.optim.value, a.optim_args)"
    with_anon = run_python("import anon_hf; " + load)
    assert with_anon.returncode == 0, with_anon.stderr
    assert with_anon.stdout.split() == ["anon", "gamma=0.5"]
    # Without the registration the pickle does not load: the check above tests something real.
    without = run_python(load)
    assert without.returncode != 0
    assert "anon is not a valid OptimizerNames" in without.stderr


# --- the optimizer the Trainer builds --------------------------------------------------------------------------


def test_trainer_builds_anon_with_training_args_groups_and_optim_args(tmp_path):
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = make_trainer(
        tmp_path,
        model=model,
        learning_rate=3e-3,
        adam_beta1=0.8,
        adam_beta2=0.95,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        optim_args=ALL_OPTIM_ARGS,
    )
    trainer.train()
    anon = find_anon(trainer.optimizer)
    assert type(anon) is Anon
    expected = dict(lr=3e-3, betas=(0.8, 0.95), gamma=0.5, eps=1e-12, beta3=0.25, refresh=4)
    expected.update(decoupled_weight_decay=False, bounds=(-2.0, 2.0), foreach=True, on_nonfinite="skip")
    for group in anon.param_groups:
        assert {key: group[key] for key in expected} == expected
    assert anon.verify_sync is False

    names = {id(p): name for name, p in model.named_parameters()}
    decay_names = set(trainer.get_decay_parameter_names(model))
    decay, no_decay = anon.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == decay_names
    assert {names[id(p)] for p in no_decay["params"]} == set(before) - decay_names
    assert any("norm" in names[id(p)] for p in no_decay["params"])

    for name, p in model.named_parameters():
        assert anon.state[p]["step"].item() == 3, name
        assert p.min() >= -2.0 and p.max() <= 2.0
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())


def test_create_anon_optimizer_matches_the_trainer_groups(tmp_path):
    model = tiny_llama()
    trainer = make_trainer(tmp_path, model=model, weight_decay=0.1)
    trainer.create_optimizer()
    ours = anon_hf.create_anon_optimizer(model, lr=1e-3, weight_decay=0.1, gamma=0.5)
    theirs = find_anon(trainer.optimizer)
    assert [[id(p) for p in g["params"]] for g in ours.param_groups] == [
        [id(p) for p in g["params"]] for g in theirs.param_groups
    ]
    assert [g["weight_decay"] for g in ours.param_groups] == [0.1, 0.0]
    assert ours.defaults["gamma"] == 0.5


def test_adam_epsilon_is_not_mapped_to_eps(tmp_path, caplog):
    args = training_args(tmp_path, adam_epsilon=1e-3)
    with caplog.at_level("WARNING", logger=integration.__name__):
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert optimizer_cls is Anon
    assert "eps" not in kwargs
    assert kwargs == {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "fused": True}
    assert "adam_epsilon=0.001 is ignored" in caplog.text


@pytest.mark.parametrize(
    ("optim_args", "expected"),
    [(None, True), ("fused=false", False), ("fused=none", None), ("foreach=true", None), ("foreach=false", True)],
)
def test_optim_anon_takes_the_fused_path_unless_told_otherwise(tmp_path, optim_args, expected):
    # The Trainer's default optimizer, adamw_torch_fused, is fused; --optim anon's default is too.
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args(tmp_path, optim_args=optim_args))
    assert kwargs.get("fused") is expected


# --- optim_args errors -----------------------------------------------------------------------------------------

BAD_OPTIM_ARGS = [
    ("gama=1", r"unknown key 'gama'"),
    ("beta3=2", r"beta3='2' is not valid .*\[0, 1\)"),
    ("eps=0", r"eps='0' is not valid"),
    ("gamma=nan", r"gamma='nan' is not valid"),
    ("refresh=often", r"refresh='often' is not valid"),
    ("bounds=1:-1", r"bounds='1:-1' is not valid .*lo=1.0 > hi=-1.0"),
    ("foreach=maybe", r"foreach='maybe' is not valid"),
    ("on_nonfinite=ignore", r"on_nonfinite='ignore' is not valid .*allowed: 'raise', 'skip'"),
    ("gamma", r"'gamma' is not of the form key=value"),
    ("lr=1e-3", r"'lr' is set with --learning_rate"),
    ("betas=0.9", r"--adam_beta1 / --adam_beta2"),
]


@pytest.mark.parametrize("optim_args, message", BAD_OPTIM_ARGS, ids=[bad for bad, _ in BAD_OPTIM_ARGS])
def test_bad_optim_args_fail_at_argument_parsing_listing_valid_keys(tmp_path, optim_args, message):
    with pytest.raises(ValueError, match=message) as info:
        TrainingArguments(output_dir=str(tmp_path), optim="anon", optim_args=optim_args)
    for key in ("gamma", "eps", "beta3", "refresh", "decoupled_weight_decay", "bounds", "foreach", "on_nonfinite"):
        assert f"{key}:" in str(info.value)


BAD_OPTIM_ARGS_8BIT = [
    ("gama=1.1", r"Invalid optim_args for optim='anon_8bit': unknown key 'gama'.*min_8bit_size: integer"),
    ("min_8bit_size=0", r"min_8bit_size='0' is not valid \(Invalid min_8bit_size value: 0 \(allowed: an integer >= 1"),
    ("eps=-1", r"eps='-1' is not valid"),
]


@pytest.mark.parametrize("optim_args, message", BAD_OPTIM_ARGS_8BIT, ids=[bad for bad, _ in BAD_OPTIM_ARGS_8BIT])
def test_bad_optim_args_for_anon_8bit_fail_when_training_arguments_are_built(tmp_path, optim_args, message):
    with pytest.raises(ValueError, match=message) as info:
        TrainingArguments(output_dir=str(tmp_path), optim="anon_8bit", optim_args=optim_args)
    assert "docs/trainer.md#optim_args" in str(info.value)


@pytest.mark.parametrize("near_miss", ["Anon", "anon8bit", "anon-8bit", "ANON_8BIT"])
def test_a_near_miss_of_the_optim_name_fails_when_training_arguments_are_built(tmp_path, near_miss):
    message = rf"Invalid optim value '{near_miss}': anon-hf's optimizers are named 'anon' or 'anon_8bit'"
    with pytest.raises(ValueError, match=message):
        TrainingArguments(output_dir=str(tmp_path), optim=near_miss)


def test_fused_is_an_optim_arg():
    assert integration.parse_optim_args("fused=true,gamma=1.1") == {"fused": True, "gamma": 1.1}
    assert integration.parse_optim_args("fused=none") == {"fused": None}
    with pytest.raises(ValueError, match=r"fused='maybe' is not valid.*fused: true, false or none"):
        integration.parse_optim_args("fused=maybe")


def test_optim_args_are_parsed_once_per_run(tmp_path):
    """The check at argument parsing and the Trainer's handler share one parse (and one validation) of the text."""
    optim_args_module._parse.cache_clear()
    args = training_args(tmp_path, optim_args="gamma=0.75,refresh=8")
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert optimizer_cls is Anon and (kwargs["gamma"], kwargs["refresh"]) == (0.75, 8)
    info = optim_args_module._parse.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_fused_and_foreach_together_fail_at_argument_parsing(tmp_path):
    with pytest.raises(ValueError, match=r"fused, foreach do not go together \(`fused` and `foreach` cannot be"):
        TrainingArguments(output_dir=str(tmp_path), optim="anon", optim_args="fused=true,foreach=true")


def test_optim_args_set_after_construction_fail_before_training(tmp_path):
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, model=model)
    trainer.args.optim_args = "gamma=1,refresh=sometimes"
    with pytest.raises(ValueError, match="refresh='sometimes' is not valid.*Valid keys: gamma"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_other_optimizers_are_untouched(tmp_path):
    trainer = make_trainer(tmp_path, optim="adamw_torch", optim_args="anything=1")
    assert not any(isinstance(c, AnonCallback) for c in trainer.callback_handler.callbacks)
    trainer.create_optimizer()
    assert type(find_anon(trainer.optimizer)) is not Anon


# --- fallback and failure paths of the registration ------------------------------------------------------------


def fake_trainer_cls(with_lookup=True):
    """A Trainer class as in a transformers release without the handler table (or without either hook point)."""

    class Trainer:
        def __init__(self, args):
            self.args = args
            self.optimizer = None
            self.optimizer_cls_and_kwargs = None
            self.callback_handler = SimpleNamespace(callbacks=[])

    if with_lookup:

        def get_optimizer_cls_and_kwargs(args, model=None):
            raise ValueError(f"Trainer cannot instantiate unsupported optimizer: {args.optim}")

        Trainer.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)
    return Trainer


def fake_module(name, **attributes):
    module = ModuleType(name)
    module.__dict__.update(attributes)
    return module


@pytest.fixture
def fresh_status(monkeypatch):
    monkeypatch.setattr(integration, "_status", {"enum": "OptimizerNames.ANON", "handler": None, "trainer": None})
    monkeypatch.setattr(_patches, "_failures", {})


def apply_row(module_name, module):
    """Apply the patch table's row for ``module_name`` to ``module`` through its guard, as an import would."""
    (row,) = [patch for patch in _patches.PATCHES if patch.module == module_name]
    _patches._apply(row, module)
    return row


def test_fallback_wraps_get_optimizer_cls_and_kwargs_without_handler_table(tmp_path, fresh_status):
    trainer_cls = fake_trainer_cls()
    integration.on_trainer_optimizer_imported(fake_module("transformers.trainer_optimizer"))
    assert integration._status["handler"] is None
    integration.on_trainer_imported(fake_module("transformers.trainer", Trainer=trainer_cls))
    assert "wrapped" in integration._status["handler"]

    args = training_args(tmp_path, learning_rate=2e-3, weight_decay=0.01, optim_args="gamma=0.25")
    assert trainer_cls.get_optimizer_cls_and_kwargs(args) == (
        Anon,
        {"lr": 2e-3, "betas": (0.9, 0.999), "weight_decay": 0.01, "gamma": 0.25, "fused": True},
    )
    with pytest.raises(ValueError, match="unsupported optimizer: .*ADAMW_TORCH"):
        trainer_cls.get_optimizer_cls_and_kwargs(training_args(tmp_path, optim="adamw_torch"))
    trainer = trainer_cls(args)
    assert [type(c) for c in trainer.callback_handler.callbacks] == [AnonCallback]


def test_clear_error_when_neither_hook_point_exists(tmp_path, fresh_status):
    trainer_cls = fake_trainer_cls(with_lookup=False)
    apply_row("transformers.trainer_optimizer", fake_module("transformers.trainer_optimizer"))
    apply_row("transformers.trainer", fake_module("transformers.trainer", Trainer=trainer_cls))
    with pytest.raises(RuntimeError, match=r"supports transformers>=5\.0,<6"):
        trainer_cls(training_args(tmp_path))
    trainer_cls(training_args(tmp_path, optim="adamw_torch"))  # other optimizers still work


def test_a_failing_patch_does_not_break_the_import(caplog, fresh_status):
    training_args_cls = type("TrainingArguments", (), {"__post_init__": lambda self: None})
    module = fake_module("transformers.training_args", TrainingArguments=training_args_cls)  # no OptimizerNames
    with caplog.at_level("ERROR", logger=_patches.__name__):
        row = apply_row("transformers.training_args", module)
    assert "OptimizerNames" in _patches.failures()[row]
    assert "anon_hf supports transformers>=5.0,<6" in caplog.text


# --- exact resume ----------------------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_is_bitwise_exact_and_continues_the_refresh_schedule(tmp_path):
    common = dict(max_steps=20, weight_decay=0.1, optim_args="gamma=0.5", save_strategy="steps", save_steps=6)
    full = make_trainer(tmp_path / "full", **common)
    full.train()
    assert find_anon(full.optimizer).refresh_history == [1, 2, 4, 8, 16]

    stopped = make_trainer(tmp_path / "resumed", callbacks=[StopAt(6)], **common)
    stopped.train()
    assert stopped.state.global_step == 6
    checkpoint = tmp_path / "resumed" / "checkpoint-6"
    assert (checkpoint / "optimizer.pt").is_file()

    resumed = make_trainer(tmp_path / "resumed", model=tiny_llama(seed=1), **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 20
    anon = find_anon(resumed.optimizer)
    assert anon.refresh_history == [8, 16]  # not [1, 2, 4, 8, 16]: the schedule continues from step 6
    assert all(anon.state[p]["step"].item() == 20 for p in resumed.model.parameters())
    # log_history comes back from the checkpoint, so the logged refreshes read as one run.
    refreshes = [(h["step"], h["anon/refresh_step"]) for h in resumed.state.log_history if "anon/refresh_step" in h]
    assert refreshes == [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)]

    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    assert full_state.keys() == resumed_state.keys()
    mismatched = [name for name in full_state if not torch.equal(full_state[name], resumed_state[name])]
    assert mismatched == []


# --- the callback ----------------------------------------------------------------------------------------------


def test_callback_is_added_first_and_logs_each_refresh_into_log_history(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=5, lr_scheduler_type="constant", optim_args="gamma=0.5")
    assert isinstance(trainer.callback_handler.callbacks[0], AnonCallback)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "anon/refresh_step" in h]
    assert [(h["step"], h["anon/refresh_step"]) for h in logged] == [(1, 1), (2, 2), (4, 4)]
    assert all("loss" in h and "grad_norm" in h for h in logged)  # joined the Trainer's own log line

    # Step 5 does not refresh, so the state now holds the preconditioner logged at step 4.
    anon = find_anon(trainer.optimizer)
    last = logged[-1]
    for index, group in enumerate(anon.param_groups):
        everything = torch.cat([anon.state[p]["precond"].flatten() for p in group["params"]]).double()
        v = everything[everything > 0]  # v == 0: embedding rows of tokens no refresh has seen (keep_unseen)
        lo, hi = v.min().item(), v.max().item()
        prefix = f"anon/group{index}/"
        assert last[prefix + "unseen_fraction"] == pytest.approx((everything == 0).double().mean().item())
        assert last[prefix + "precond_min"] == pytest.approx(lo, rel=1e-6)
        assert last[prefix + "precond_max"] == pytest.approx(hi, rel=1e-6)
        bound = math.exp(math.log(hi / lo) / (2 * 1024)) - 1 + 1e-9
        # With an even count any value between the two middle elements is a median; the histogram may land on
        # either side of a gap between them.
        ordered = v.sort().values
        low_mid, high_mid = ordered[(len(v) - 1) // 2].item(), ordered[len(v) // 2].item()
        assert low_mid * (1 - bound) <= last[prefix + "precond_median"] <= high_mid * (1 + bound)
        assert last[prefix + "step_size_spread"] == pytest.approx(hi / lo, rel=1e-6)
        assert last[prefix + "step_size_median"] == pytest.approx(1e-3 * last[prefix + "precond_median"])


def test_callback_can_be_removed(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    assert anon_hf.AnonCallback is AnonCallback  # the lazy public name
    trainer.remove_callback(anon_hf.AnonCallback)
    assert not any(isinstance(c, AnonCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    assert type(find_anon(trainer.optimizer)) is Anon
    assert not any(key.startswith("anon/") for h in trainer.state.log_history for key in h)


def test_preconditioner_stats_on_known_values():
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (500, 501, 7))
    optimizer = Anon([{"params": [a, b], "lr": 0.1}, {"params": [c], "gamma": 0.0}])
    values = torch.logspace(0, 3, 1001)  # 1 .. 1000, median 10**1.5
    optimizer.state[a]["precond"] = values[:500].flip(0).clone()
    optimizer.state[b]["precond"] = values[500:].clone()
    optimizer.state[b]["precond"][:3] = 0.0  # not seen yet: counted apart, left out of min / median / max
    values = torch.cat([values[:500], values[503:]])
    stats = preconditioner_stats(optimizer, bins=4096)
    assert set(stats) == {f"anon/group0/{k}" for k in ("precond_min", "precond_median", "precond_max")} | {
        "anon/group0/step_size_median",
        "anon/group0/step_size_spread",
        "anon/group0/unseen_fraction",
    }  # group 1 has gamma == 0: v == 1, nothing to report
    assert stats["anon/group0/unseen_fraction"] == pytest.approx(3 / 1001)
    median = values.double().median().item()
    assert stats["anon/group0/precond_min"] == pytest.approx(1.0)
    assert stats["anon/group0/precond_max"] == pytest.approx(1000.0, rel=1e-6)
    assert stats["anon/group0/precond_median"] == pytest.approx(median, rel=2 * (math.exp(math.log(1000) / 8192) - 1))
    assert stats["anon/group0/step_size_spread"] == pytest.approx(1000.0, rel=1e-6)
    assert stats["anon/group0/step_size_median"] == pytest.approx(0.1 * stats["anon/group0/precond_median"])


def test_find_anon_unwraps_nested_wrappers():
    anon = Anon([torch.nn.Parameter(torch.zeros(2))])
    assert find_anon(SimpleNamespace(optimizer=SimpleNamespace(optimizer=anon))) is anon
    assert find_anon(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)) is None


def test_optim_args_state_dtypes_reach_the_optimizer(tmp_path):
    assert integration.parse_optim_args("precond_dtype=bf16,moments_dtype=none") == {
        "precond_dtype": "bf16",
        "moments_dtype": None,
    }
    with pytest.raises(ValueError, match=r"precond_dtype='fp16' is not valid \(Invalid precond_dtype value: .*'bf16'"):
        integration.parse_optim_args("precond_dtype=fp16")
    trainer = make_trainer(tmp_path, optim_args="precond_dtype=bf16")
    trainer.train()
    anon = find_anon(trainer.optimizer)
    assert anon.param_groups[0]["precond_dtype"] == torch.bfloat16
    assert all(anon.state[p]["precond"].dtype == torch.bfloat16 for p in anon.state)


def test_optim_anon_8bit_builds_anon8bit_with_the_same_optim_args_and_logs_its_preconditioner(tmp_path):
    from anon_hf import Anon8bit

    args = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "anon_8bit", "--optim_args", "gamma=0.5,refresh=2"]
    )[0]
    assert args.optim == OptimizerNames("anon_8bit")
    trainer = make_trainer(tmp_path, max_steps=4, optim="anon_8bit", optim_args="gamma=0.5,refresh=2")
    assert isinstance(trainer.callback_handler.callbacks[0], AnonCallback)
    trainer.train()
    anon = find_anon(trainer.optimizer)
    assert type(anon) is Anon8bit and all(g["gamma"] == 0.5 and g["refresh"] == 2 for g in anon.param_groups)
    embed = trainer.model.get_input_embeddings().weight
    assert anon.state[embed]["exp_avg"].dtype == torch.int8 and anon.state[embed]["step"].item() == 4
    logged = [h for h in trainer.state.log_history if "anon/refresh_step" in h]
    assert [h["anon/refresh_step"] for h in logged] == [1, 2, 4]
    assert all(0 < h["anon/group0/precond_min"] <= h["anon/group0/precond_max"] < math.inf for h in logged)
