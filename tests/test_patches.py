"""The patch table: every patch of transformers, accelerate and DeepSpeed, with its attribute missing, leaves the
import working, logs one line naming what failed, and makes the feature's use raise a clear error. Also: the
supported version ranges (checked once per library at import, equal to pyproject's), and optim_args keys that
follow the optimizer's signature with no edit in the integration."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from anon_hf import Anon
from anon_hf.integrations import _patches, import_utils
from anon_hf.integrations.import_utils import SUPPORTED_VERSIONS, package_version

ROOT = Path(__file__).resolve().parents[1]

CASES = [(patch, target) for patch in _patches.PATCHES for target in patch.targets]


def installed(module_name: str) -> bool:
    return all(package_version(name) for name in {module_name.partition(".")[0], "transformers", "deepspeed"})


def resolve(module, target: str):
    """(owner, attribute) for a dotted target such as ``DeepSpeedEngine._configure_basic_optimizer``."""
    *path, attribute = target.split(".")
    owner = module
    for name in path:
        owner = getattr(owner, name)
    return owner, attribute


def use(patch: _patches.Patch, training_args) -> None:
    """The entry point of the feature each row serves."""
    if patch.integration == "transformers":
        from transformers import Trainer

        Trainer.get_optimizer_cls_and_kwargs(training_args)
    else:
        import deepspeed

        model = torch.nn.Linear(2, 2)
        deepspeed.initialize(model=model, optimizer=Anon(model.parameters()), config={"train_batch_size": 1})


@pytest.fixture
def fresh_failures(monkeypatch):
    monkeypatch.setattr(_patches, "_failures", {})


@pytest.mark.parametrize("patch, target", CASES, ids=[f"{p.module}.{t}" for p, t in CASES])
def test_patch_with_its_attribute_missing_logs_once_and_fails_at_use(
    patch, target, monkeypatch, caplog, tmp_path, fresh_failures
):
    if not installed(patch.module):
        pytest.skip(f"needs {patch.module.partition('.')[0]}, transformers and deepspeed installed")
    if importlib.util.find_spec(patch.module) is None:  # transformers 5.0 has no trainer_optimizer: the fallback runs
        pytest.skip(f"this release has no {patch.module}")
    module = importlib.import_module(patch.module)
    from transformers import TrainingArguments

    training_args = TrainingArguments(output_dir=str(tmp_path), optim="anon", report_to="none", use_cpu=True)
    owner, attribute = resolve(module, target)
    monkeypatch.delattr(owner, attribute)
    with caplog.at_level(logging.INFO, logger="anon_hf"):
        _patches._apply(patch, module)  # what the import hook runs: it must not raise

    if target == "_OPTIMIZER_HANDLERS":  # a designed fallback, not a failure (see the fallback tests)
        assert _patches.failures() == {}
        assert [r.levelname for r in caplog.records] == ["INFO"] and attribute in caplog.records[0].getMessage()
        return
    (record,) = caplog.records
    assert record.levelname == "ERROR" and record.name == _patches.__name__
    message = record.getMessage()
    assert f"{patch.module}." in message and f"no attribute '{attribute}'" in message, message
    assert f"anon_hf supports {patch.module.partition('.')[0]}" in message
    assert list(_patches.failures()) == [patch]

    if patch.module == "deepspeed":  # the gate itself is gone: DeepSpeed's own API is what is missing
        with pytest.raises(AttributeError, match="initialize"):
            use(patch, training_args)
        return
    with pytest.raises(_patches.PatchError, match=rf"no attribute '{attribute}'.*docs/troubleshooting.md") as info:
        use(patch, training_args)
    assert patch.feature in str(info.value)
    assert "pip install" not in str(info.value)  # the user's framework may pin another release


FINDER = """
    import importlib.abc, importlib.machinery, sys

    class DropAttribute(importlib.abc.MetaPathFinder):
        # Simulates a release of {module} without {target}: executes it, then deletes the attribute.
        def find_spec(self, name, path, target=None):
            if name != {module!r}:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            exec_module = spec.loader.exec_module

            def exec_and_drop(module):
                exec_module(module)
                owner = module
                *parents, attribute = {target!r}.split(".")
                for parent in parents:
                    owner = getattr(owner, parent)
                delattr(owner, attribute)

            spec.loader.exec_module = exec_and_drop
            return spec

    sys.meta_path.insert(0, DropAttribute())
"""


def run_script(module: str, target: str, body: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(FINDER.format(module=module, target=target)) + textwrap.dedent(body)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(not installed("deepspeed"), reason="needs deepspeed and transformers installed")
def test_real_import_of_a_deepspeed_without_the_attribute_succeeds_and_initialize_explains():
    result = run_script(
        "deepspeed.runtime.zero.utils",
        "ZERO_SUPPORTED_OPTIMIZERS",
        """
        import logging, torch
        logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(name)s %(message)s")
        import anon_hf
        import deepspeed  # the user's import: must succeed
        model = torch.nn.Linear(2, 2)
        try:
            deepspeed.initialize(model=model, optimizer=anon_hf.Anon(model.parameters()), config={"train_batch_size": 1})
        except anon_hf.integrations._patches.PatchError as err:
            print("USE", err)
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("LOG ERROR")]
    assert len(errors) == 1 and "ZERO_SUPPORTED_OPTIMIZERS" in errors[0], result.stderr[-3000:]
    assert "USE deepspeed.initialize with Anon needs" in result.stdout and "ZERO_SUPPORTED_OPTIMIZERS" in result.stdout


@pytest.mark.skipif(not installed("transformers"), reason="needs transformers and deepspeed installed")
def test_real_import_of_a_transformers_without_the_enum_succeeds_and_optim_anon_explains(tmp_path):
    result = run_script(
        "transformers.training_args",
        "OptimizerNames",
        f"""
        import logging
        logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(name)s %(message)s")
        import anon_hf
        from transformers import TrainingArguments  # the user's import: must succeed
        try:
            TrainingArguments(output_dir={str(tmp_path)!r}, optim="anon", report_to="none")
        except anon_hf.integrations._patches.PatchError as err:
            print("USE", err)
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("LOG ERROR")]
    assert len(errors) == 1 and "OptimizerNames" in errors[0], result.stderr[-3000:]
    assert "USE TrainingArguments(optim='anon') needs" in result.stdout
    assert "create_anon_optimizer" in result.stdout  # the way out that needs no patch


def test_wrap_once_wraps_once_keeps_staticmethods_and_names_a_missing_attribute():
    class Owner:
        @staticmethod
        def lookup(x):
            return x

        def method(self):
            return "original"

    calls = []

    def make_wrapper(original):
        def wrapper(*args):
            calls.append(args)
            return original(*args)

        return wrapper

    for _ in range(2):
        _patches.wrap_once(Owner, "lookup", make_wrapper)
        _patches.wrap_once(Owner, "method", make_wrapper)
    assert isinstance(Owner.__dict__["lookup"], staticmethod) and Owner.lookup(3) == 3
    assert Owner().method() == "original" and Owner.method.__name__ == "method"
    assert len(calls) == 2  # one wrapper each, not two
    with pytest.raises(AttributeError, match="Owner has no attribute 'missing'"):
        _patches.wrap_once(Owner, "missing", make_wrapper)


# --- supported versions ------------------------------------------------------------------------------------------


def test_supported_versions_are_the_ranges_pyproject_declares():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    declared = {}
    for requirement in map(Requirement, (text for texts in extras.values() for text in texts)):
        if requirement.name in SUPPORTED_VERSIONS:
            declared.setdefault(requirement.name, requirement.specifier)
    assert declared == {name: SpecifierSet(spec) for name, spec in SUPPORTED_VERSIONS.items()}


def test_version_outside_the_range_warns_once_per_library(monkeypatch, caplog):
    monkeypatch.setattr(import_utils, "_warned", set())
    monkeypatch.setattr(import_utils, "package_version", {"transformers": "4.57.6", "deepspeed": "0.19.8"}.get)
    with caplog.at_level(logging.WARNING, logger=import_utils.__name__):
        for name in ("transformers", "transformers.training_args", "transformers.trainer", "deepspeed"):
            import_utils.warn_if_unsupported(type(sys)(name), "optim='anon' in TrainingArguments")
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith("anon_hf patches transformers, and transformers 4.57.6 is outside >=5.0,<6")
    assert "the feature that needs it (optim='anon' in TrainingArguments) raises a PatchError" in message
    assert "pip install" not in message  # advice that may contradict the user's framework pins


def test_only_the_libraries_anon_hf_patches_have_a_version_check():
    """A warning about a library anon-hf does not patch (TRL, PEFT) could not be acted on: there is none."""
    patched = {patch.module.partition(".")[0] for patch in _patches.PATCHES}
    assert {"transformers", "accelerate", "deepspeed"} <= set(SUPPORTED_VERSIONS) <= patched
    assert "trl" not in patched and "peft" not in patched


@pytest.mark.parametrize("trl_version", ["0.24.0", "1.9.0"])  # LLaMA-Factory 0.9.5 pins trl<=0.24, axolotl 0.19 1.9.0
def test_no_warning_for_the_trl_that_frameworks_pin(monkeypatch, caplog, trl_version):
    monkeypatch.setattr(import_utils, "_warned", set())
    monkeypatch.setattr(import_utils, "package_version", {"trl": trl_version}.get)
    with caplog.at_level(logging.WARNING, logger=import_utils.__name__):
        import_utils.warn_if_unsupported(type(sys)("trl.trainer.sft_trainer"))
    assert caplog.records == []


@pytest.mark.skipif(not package_version("accelerate"), reason="needs accelerate installed")
def test_real_import_outside_the_range_warns_once():
    code = """
import logging
logging.basicConfig(format="LOG %(levelname)s %(message)s")
import anon_hf.integrations.import_utils as import_utils
import_utils.SUPPORTED_VERSIONS["accelerate"] = ">=99"  # the installed release is then outside
import accelerate, accelerate.accelerator  # two patched modules of the same library
"""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("LOG WARNING")]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert "anon_hf patches accelerate, and accelerate" in warnings[0] and "outside >=99" in warnings[0]
    assert "DeepSpeedCPUAdam" in warnings[0]  # the feature that may break is named


def test_unreadable_version_is_reported_not_raised(monkeypatch, caplog):
    monkeypatch.setattr(import_utils, "_warned", set())
    monkeypatch.setattr(import_utils, "package_version", lambda name: "not a version")
    with caplog.at_level(logging.WARNING, logger=import_utils.__name__):
        import_utils.warn_if_unsupported(type(sys)("deepspeed"))
    assert "could not check the version of deepspeed" in caplog.text


# --- optim_args follow the signature --------------------------------------------------------------------------------


@pytest.mark.skipif(not package_version("transformers"), reason="needs transformers (the optim_args parser's home)")
def test_a_new_hyperparameter_needs_no_edit_in_the_integration(monkeypatch):
    """The core's side of a new keyword (signature, validator) is all optim_args needs."""
    from anon_hf import hyper
    from anon_hf.integrations.optim_args import optim_args_spec, parse_optim_args

    class Toy(Anon):
        def __init__(self, params, lr: float = 1e-3, *, toy: float = 0.5, mode: str = "a", **kwargs):
            super().__init__(params, lr=lr, **kwargs)

    validate = hyper.validate

    def validate_with_toy(group):
        if not 0.0 <= group["toy"] <= 1.0:
            raise ValueError(f"Invalid toy value: {group['toy']!r} (allowed: [0, 1])")
        validate(group)

    monkeypatch.setattr(hyper, "validate", validate_with_toy)  # the one validator (anon_hf/hyper.py)
    assert optim_args_spec(Toy)["toy"][1] == "float (default 0.5)"
    assert parse_optim_args("toy=0.25,mode=b", Toy, "toy") == {"toy": 0.25, "mode": "b"}
    with pytest.raises(
        ValueError, match=r"optim='toy': toy='2' is not valid \(Invalid toy value: 2.0 \(allowed: \[0, 1\]"
    ):
        parse_optim_args("toy=2", Toy, "toy")
    with pytest.raises(
        ValueError, match=r"toy='x' is not valid \(could not convert string to float: 'x'; allowed: float"
    ):
        parse_optim_args("toy=x", Toy, "toy")


@pytest.mark.slow
@pytest.mark.parametrize("trl_version", ["0.24.0", "1.9.0"])  # LLaMA-Factory 0.9.5's cap and axolotl 0.19's pin
def test_no_version_warning_with_the_trl_a_framework_installs(tmp_path, trl_version):
    """A venv on top of this one (a .pth file) with only TRL replaced, from the registry: importing anon_hf, TRL's
    SFT trainer and TrainingArguments(optim="anon") logs no warning at all."""
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", f"trl=={trl_version}"], capture_output=True, text=True
    )
    if pip.returncode != 0:
        pytest.skip(f"trl {trl_version} could not be installed from the package index: {pip.stderr[-300:]}")
    code = """
import logging
logging.basicConfig(format="LOG %(levelname)s %(name)s %(message)s")
import anon_hf, trl
from trl import SFTTrainer
from transformers import TrainingArguments
TrainingArguments("out", optim="anon", report_to="none", use_cpu=True)
print("trl", trl.__version__)
"""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"trl {trl_version}" in result.stdout
    assert [line for line in result.stderr.splitlines() if line.startswith("LOG WARNING")] == []
