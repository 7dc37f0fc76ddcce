"""What the framework tests share: one venv per framework, its environment, the docs' YAML, and checkpoint checks.

Each framework gets a venv under ``.frameworks/<name>/`` that sees the base environment (the one running the tests,
``.venv`` for ``make``) through a ``.pth`` file, as ``tests/compat/run_compat.py`` does: torch is pinned to the
base's version in a constraints file, so the CPU torch is reused and no CUDA torch is ever downloaded, while the
framework's own pins (transformers, accelerate, trl, peft, datasets) install into the venv and shadow the base's.
anon-hf is installed there editable (``--no-deps``) from this checkout, so ``anon-hf`` is the venv's console script.

Standard library, torch and PyYAML only: the tests run in the base environment and reach a framework only through
its console commands, started as subprocesses with the venv's ``bin/`` first on ``PATH``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".frameworks"
DOCS_PAGE = ROOT / "docs" / "frameworks.md"
OPT_IN = "ANON_HF_FRAMEWORKS"
# What the harness checks in every checkpoint: Anon's per-parameter state and the docs' optim_args.
ANON_STATE_KEYS = {"exp_avg", "exp_avg_sq", "precond", "step"}
GAMMA = 1.1

TORCHAUDIO_STUB = '''"""A stub written by anon-hf's framework harness (tests/frameworks/harness.py).

The registry's torchaudio wheels are CUDA builds that fail to load beside a CPU torch. LLaMA-Factory imports
torchaudio at module level (llamafactory/data/mm_plugin.py) and needs it only for audio inputs.
"""


def __getattr__(name):
    raise AttributeError(f"torchaudio.{name}: this torchaudio is a stub (no audio inputs); install a torchaudio "
                         "built for your torch to use audio data")
'''


@dataclass(frozen=True)
class Framework:
    name: str  # the venv's folder under .frameworks/
    title: str
    requirements: tuple[str, ...]  # what pip installs into the venv, pinned to the tested releases
    command: str  # the framework's console script
    remove: tuple[str, ...] = ()  # CUDA-only wheels it drags in that do not load beside the CPU torch
    stubs: tuple[str, ...] = ()  # removed modules it imports at module level: a stub module takes their place

    @property
    def venv(self) -> Path:
        return VENVS / self.name

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def stamp(self) -> Path:
        return self.venv / ".anon-hf-ready"


FRAMEWORKS = {
    framework.name: framework
    for framework in (
        # kernels 0.19 breaks transformers 5.6 at import; 0.12.3 is the newest that works with it.
        Framework(
            "llamafactory",
            "LLaMA-Factory",
            ("llamafactory==0.9.5", "kernels==0.12.3"),
            "llamafactory-cli",
            remove=("torchvision", "torchaudio"),
            stubs=("torchaudio",),
        ),
        Framework("axolotl", "axolotl", ("axolotl==0.19.0",), "axolotl", remove=("torchvision", "torchaudio")),
        Framework("torchtune", "torchtune", ("torchtune==0.6.1", "torchao==0.13.0"), "tune"),
    )
}


def _pip(framework: Framework, *args: str) -> None:
    subprocess.run([str(framework.bin / "python"), "-m", "pip", *args], check=True)


def _write_stub(framework: Framework, module: str) -> None:
    site = Path(sysconfig.get_paths(vars={"base": str(framework.venv)})["purelib"])
    (site / module).mkdir(exist_ok=True)
    (site / module / "__init__.py").write_text(TORCHAUDIO_STUB)


def setup(framework: Framework) -> None:
    """Create (once) and fill ``framework``'s venv; a stamp holding the requirements marks it ready."""
    wanted = "\n".join(framework.requirements)
    if framework.stamp.exists() and framework.stamp.read_text() == wanted:
        return
    python = framework.bin / "python"
    if not python.exists():
        subprocess.run([sys._base_executable, "-m", "venv", str(framework.venv)], check=True)
    site = Path(sysconfig.get_paths(vars={"base": str(framework.venv)})["purelib"])
    (site / "_anon_hf_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    constraints = framework.venv / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    _pip(framework, "install", "-c", str(constraints), *framework.requirements)
    if framework.remove:
        _pip(framework, "uninstall", "-y", *framework.remove)
    for module in framework.stubs:
        _write_stub(framework, module)
    # torch lives in the base, so its console scripts do not exist here; LLaMA-Factory calls `torchrun` by name.
    torchrun = framework.bin / "torchrun"
    torchrun.write_text(f"#!{python}\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n")
    torchrun.chmod(0o755)
    _pip(framework, "install", "--no-deps", "-e", str(ROOT))
    framework.stamp.write_text(wanted)


def require(framework: Framework) -> None:
    """Skip, with the reason, unless the venv is ready and the framework tests were asked for."""
    if not framework.stamp.exists():
        pytest.skip(f"{framework.title}'s venv {framework.venv} is missing: `make test-frameworks` builds it")
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"opt-in ({framework.title} runs take minutes): `make test-frameworks`, or {OPT_IN}=1")


def environment(framework: Framework, home: Path, **extra: str) -> dict[str, str]:
    """The variables a run gets: the venv's bin first, offline, one thread per rank, no PYTHONPATH (the venv's
    editable anon-hf is the one imported), the C++ kernel's build cache shared by every framework."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        PATH=f"{framework.bin}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(framework.venv),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(home / "hf-home"),
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        DO_NOT_TRACK="1",  # axolotl's telemetry would retry an unreachable host
        AXOLOTL_DO_NOT_TRACK="1",
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=str(VENVS / "torch_extensions"),
    )
    env.update(extra)
    return env


def run(framework: Framework, args: list[str], env: dict[str, str], cwd: Path, timeout: int = 900):
    """Run a command of the venv (``args[0]`` is looked up in its bin/); fail the test with the output's tail."""
    executable = framework.bin / args[0]
    command = [str(executable) if executable.exists() else args[0], *args[1:]]
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    (cwd / f"{Path(args[0]).name}.log").write_text(output)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{output[-6000:]}"
    # anon-hf at its defaults warns only about libraries it patches, never against the framework's own pins.
    assert "anon_hf supports" not in output, output[-6000:]
    return output


def save_tiny_model(framework: Framework, directory: Path) -> Path:
    """A tiny Llama + byte-level BPE tokenizer (tests/tiny.py), saved by the venv's own transformers."""
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); from tiny import save_tiny_causal_lm; "
    code += f"save_tiny_causal_lm({str(directory)!r})"
    env = environment(framework, directory.parent)
    subprocess.run([str(framework.bin / "python"), "-c", code], env=env, check=True, capture_output=True)
    return directory


def tiny_rows() -> list[dict[str, str]]:
    """16 instruction/response rows from tests/tiny.py's sentences (alpaca format)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import SENTENCES

    rows = []
    for sentence in SENTENCES * 4:
        words = sentence.split()
        rows.append({"instruction": " ".join(words[:3]), "input": "", "output": " ".join(words[3:])})
    return rows


SNIPPET = re.compile(r"```yaml\n# ([\w.-]+\.ya?ml)\n(.*?)```", re.DOTALL)


def snippets(page: Path = DOCS_PAGE) -> dict[str, str]:
    """File name -> text of each fenced ``yaml`` block of the docs page whose first line names its file."""
    return {match.group(1): match.group(2) for match in SNIPPET.finditer(page.read_text())}


def snippet(name: str) -> dict:
    """The docs' block ``name`` parsed with PyYAML."""
    import yaml

    return yaml.safe_load(snippets()[name])


def write_config(config: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_anon_state(optimizer_state: dict, gamma: float = GAMMA) -> None:
    """Every parameter's state holds Anon's tensors and every group the docs' gamma."""
    states = optimizer_state["state"]
    assert states, "the optimizer state is empty"
    for index, state in states.items():
        assert ANON_STATE_KEYS <= set(state), f"param {index}: state keys {sorted(state)}"
    for group in optimizer_state["param_groups"]:
        assert group["gamma"] == gamma, group


def assert_bitwise_equal(expected, actual, where: str = "") -> None:
    """Nested dicts/lists/tuples of tensors and plain values: equal, tensors bit for bit (same dtype and shape)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert expected.dtype == actual.dtype and expected.shape == actual.shape, where
        assert torch.equal(expected, actual), f"{where}: max |diff| {(expected - actual).abs().max().item()}"
    elif isinstance(expected, dict):
        assert set(expected) == set(actual), f"{where}: keys {sorted(expected)} != {sorted(actual)}"
        for key in expected:
            assert_bitwise_equal(expected[key], actual[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for index, (left, right) in enumerate(zip(expected, actual, strict=True)):
            assert_bitwise_equal(left, right, f"{where}[{index}]")
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


def safetensors_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_json(data, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path
