"""The C++ kernels' cache (``anon_hf.backends.cpu_kernel``): keyed by the source, loaded without ninja, built once per
node, and announced.

The fast tests replace torch's build with a stand-in that writes a file; those marked ``slow`` build the real kernels
into a private ``TORCH_EXTENSIONS_DIR`` (1-3 minutes per build on 2 cores) from two copies of anon-hf's source, and
under a Trainer run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from anon_hf.backends import cpu_kernel
from anon_hf.integrations.import_utils import is_transformers_available

ROOT = Path(__file__).resolve().parents[1]
BUILD_LINE = "anon_hf: building the C++ kernel"
BUILT_LINE = "anon_hf: built the C++ kernel"


# --- the name ----------------------------------------------------------------------------------------------------


def _kernel_from(tmp_path: Path, folder: str, text: str, **changes) -> cpu_kernel.Kernel:
    source = tmp_path / folder / "anon_cpu.cpp"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(text)
    return dataclasses.replace(cpu_kernel.MAIN, sources=(source,), **changes)


def test_the_name_follows_the_sources_bytes_and_flags_not_their_path(tmp_path):
    text = cpu_kernel.MAIN.sources[0].read_text()
    here, there = _kernel_from(tmp_path, "env_a", text), _kernel_from(tmp_path, "env_b", text)
    edited = _kernel_from(tmp_path, "env_c", text + "\n// one more line\n")
    flagged = _kernel_from(tmp_path, "env_d", text, extra_flags=("-DANON_HF_TEST_FLAG",))
    names = [cpu_kernel.extension_name(k) for k in (here, there, edited, flagged)]
    assert names[0] == names[1]
    assert len(set(names[1:])) == 3
    capability = cpu_kernel._capability().lower()
    assert all(name.startswith(f"anon_hf_cpu_{capability}_") for name in names)
    assert cpu_kernel.build_directory(here) == cpu_kernel.cache_root() / names[0]


def test_the_cache_root_is_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    assert cpu_kernel.cache_root() == tmp_path / "cache"
    assert cpu_kernel.build_directory(cpu_kernel.MAIN).parent == tmp_path / "cache"


# --- loading and building, with torch's build replaced -------------------------------------------------------------


class FakeBuild:
    """Stands in for ``torch.utils.cpp_extension.load``: writes the library file, counts calls, logs when it starts."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.calls = 0

    def __call__(self, name, sources, extra_cflags, build_directory, verbose):
        self.calls += 1
        logging.getLogger("fake.compiler").warning("COMPILER STARTED")
        time.sleep(self.seconds)
        library = cpu_kernel._library(Path(build_directory))
        library.write_text("not really a library")
        return SimpleNamespace(__name__=name)


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """The stand-in build, into a private cache, for ``.spec``: a kernel of its own source (never the real one's name,
    so nothing it registers can be taken for the real kernel)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    source = tmp_path / "csrc" / "anon_cpu.cpp"
    source.parent.mkdir()
    source.write_text("// a stand-in source for the tests of the cache\n")

    build = FakeBuild()
    monkeypatch.setattr("torch.utils.cpp_extension.load", build)
    imported = []
    monkeypatch.setattr(cpu_kernel, "_import", lambda d: imported.append(d) or SimpleNamespace(__name__=d.name))
    build.imported = imported
    build.spec = dataclasses.replace(cpu_kernel.MAIN, sources=(source,), check=None)
    return build


def test_a_first_build_is_announced_before_it_starts_and_timed_after(fake_build, caplog):
    with caplog.at_level(logging.WARNING):
        _, built = cpu_kernel._load_or_build(fake_build.spec)
    assert built and fake_build.calls == 1
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    announce, compiler, done = messages
    assert announce.startswith(BUILD_LINE) and compiler == "COMPILER STARTED" and done.startswith(BUILT_LINE)
    directory = cpu_kernel.build_directory(fake_build.spec)
    assert str(directory) in announce and "1-3 minutes" in announce and "anon_cpu.cpp" in announce
    assert "anon-hf build-kernels" in announce
    assert directory.name in done and " s." in done
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_a_built_kernel_is_imported_without_building_again(fake_build, caplog):
    cpu_kernel._load_or_build(fake_build.spec)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _, built = cpu_kernel._load_or_build(fake_build.spec)
    assert not built and fake_build.calls == 1
    assert fake_build.imported == [cpu_kernel.build_directory(fake_build.spec)]
    assert not [r for r in caplog.records if BUILD_LINE in r.getMessage()]


def test_a_build_that_never_finished_is_built_again(fake_build):
    directory = cpu_kernel.build_directory(fake_build.spec)
    directory.mkdir(parents=True)
    cpu_kernel._library(directory).write_text("half a library: the process died while linking")
    (directory / "lock").write_text("")  # torch's own lock, left by that process: load() would wait on it forever
    _, built = cpu_kernel._load_or_build(fake_build.spec)
    assert built and fake_build.calls == 1
    assert not (directory / "lock").exists()


def test_processes_that_need_the_same_build_at_once_build_it_once(fake_build):
    # Each thread opens the lock file itself, so the OS lock separates them as it separates the ranks of a node.
    fake_build.seconds = 0.5
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cpu_kernel._load_or_build(fake_build.spec)[1]))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake_build.calls == 1
    assert sorted(results) == [False, False, True]


def test_build_all_builds_every_kernel_once(fake_build, monkeypatch, tmp_path):
    kernels = []
    for kernel in cpu_kernel.KERNELS:
        source = tmp_path / "csrc" / kernel.sources[0].name
        source.write_text(f"// a stand-in source for {kernel.title}\n")
        kernels.append(dataclasses.replace(kernel, sources=(source,), check=None))
    monkeypatch.setattr(cpu_kernel, "KERNELS", tuple(kernels))
    monkeypatch.setattr(cpu_kernel, "_results", {})
    first = cpu_kernel.build_all()
    again = cpu_kernel.build_all()
    assert fake_build.calls == len(cpu_kernel.KERNELS) == 2
    assert [b.directory for b in first] == [cpu_kernel.build_directory(k) for k in cpu_kernel.KERNELS]
    assert all(b.build_seconds is not None for b in first) and all(b.build_seconds is None for b in again)


# --- real builds and loads in subprocesses --------------------------------------------------------------------------

LOAD_BOTH = (
    "from anon_hf.backends import cpu_kernel as k\n"
    "assert k.kernel_unavailable_reason() is None, k.kernel_unavailable_reason()\n"
    "assert k.kernel8_unavailable_reason() is None, k.kernel8_unavailable_reason()\n"
    "print('LOADED', k.kernel().__name__, k.kernel8().__name__)\n"
)
LOAD_MAIN = LOAD_BOTH.replace("assert k.kernel8_unavailable_reason() is None, k.kernel8_unavailable_reason()\n", "")
LOAD_MAIN = LOAD_MAIN.replace(", k.kernel8().__name__", "")


def _fake_ninja(folder: Path) -> Path:
    """A ``ninja`` that leaves a mark and fails: any build attempt with it on PATH shows."""
    folder.mkdir(parents=True, exist_ok=True)
    ninja = folder / "ninja"
    ninja.write_text(f'#!/bin/sh\necho called >> "{folder}/ninja-was-called"\nexit 1\n')
    ninja.chmod(0o755)
    return folder


def _ninja_folders(tmp_path: Path) -> dict[str, str]:
    """The real ninjas here (this environment's and the system's, often different versions), and a fake one."""
    folders = {"fake": str(_fake_ninja(tmp_path / "fake_ninja"))}
    venv_ninja = Path(sys.executable).parent / "ninja"
    if venv_ninja.exists():
        folders["venv"] = str(venv_ninja.parent)
    for candidate in ("/usr/bin", "/usr/local/bin"):
        if (Path(candidate) / "ninja").exists():
            folders["system"] = candidate
            break
    return folders


def _python(code: str, *, source_root: Path, cache: Path, path: str, timeout: int = 900) -> str:
    env = dict(os.environ, PYTHONPATH=str(source_root), TORCH_EXTENSIONS_DIR=str(cache), PATH=path)
    env.pop("ANON_HF_CPU_KERNEL", None)
    # cwd: `python -c` puts the working folder first on sys.path, which must not hold another anon_hf.
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=source_root, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_a_cached_kernel_loads_with_no_ninja_or_a_broken_one(tmp_path):
    # This session's cache: the kernels are built there once (by this call, or by earlier tests).
    reason = cpu_kernel.kernel_unavailable_reason() or cpu_kernel.kernel8_unavailable_reason()
    if reason:
        pytest.skip(f"the C++ kernels cannot run here: {reason}")
    fake = _fake_ninja(tmp_path / "bin")
    for path in ("/nonexistent", str(fake)):
        output = _python(LOAD_BOTH, source_root=ROOT, cache=cpu_kernel.cache_root(), path=path)
        assert "LOADED" in output and BUILD_LINE not in output
    assert not (fake / "ninja-was-called").exists()


def _copy_source(tmp_path: Path, name: str, extra_line: str = "") -> Path:
    """A copy of anon_hf as another environment would hold it, its main kernel's source edited by ``extra_line``."""
    root = tmp_path / name
    shutil.copytree(ROOT / "anon_hf", root / "anon_hf", ignore=shutil.ignore_patterns("__pycache__"))
    if extra_line:
        source = root / "anon_hf" / "backends" / "csrc" / "anon_cpu.cpp"
        source.write_text(source.read_text() + extra_line)
    return root


@pytest.mark.slow
def test_build_kernels_then_two_sources_build_once_each_whichever_ninja(tmp_path):
    # Three real builds (both kernels of source A through `anon-hf build-kernels`, the main kernel of source B).
    cache, ninjas = tmp_path / "cache", _ninja_folders(tmp_path)
    if "venv" not in ninjas and "system" not in ninjas:
        pytest.skip("no ninja on this machine: the kernels cannot be built")
    real = [ninjas.get("venv", ninjas.get("system")), ninjas.get("system", ninjas.get("venv"))]
    source_a, source_b = _copy_source(tmp_path, "env_a"), _copy_source(tmp_path, "env_b", "\n// env_b's edit\n")
    env = dict(os.environ, PYTHONPATH=str(source_a), PATH=os.pathsep.join([real[0], os.environ["PATH"]]))
    command = [sys.executable, "-m", "anon_hf", "build-kernels", "--dir", str(cache)]
    cli = subprocess.run(command, cwd=source_a, env=env, capture_output=True, text=True, timeout=1800)
    assert cli.returncode == 0, cli.stdout + cli.stderr[-3000:]
    assert f"export TORCH_EXTENSIONS_DIR={cache}" in cli.stdout and cli.stdout.count("built in") == 2
    # A run with no ninja at all, then with a ninja that fails: both load what build-kernels built.
    for path in ("/nonexistent", ninjas["fake"]):
        output = _python(LOAD_BOTH, source_root=source_a, cache=cache, path=path)
        assert "LOADED" in output and BUILD_LINE not in output
    # Source B builds its own main kernel once, beside A's, with the other ninja; then each loads with either.
    with_compiler = os.pathsep.join([real[1], os.environ["PATH"]])  # that ninja first, then the compiler
    assert _python(LOAD_MAIN, source_root=source_b, cache=cache, path=with_compiler).count(BUILD_LINE) == 1
    for root in (source_a, source_b, source_a, source_b):
        for path in (*real, ninjas["fake"]):
            assert BUILD_LINE not in _python(LOAD_MAIN, source_root=root, cache=cache, path=path)
    assert not (Path(ninjas["fake"]) / "ninja-was-called").exists()
    assert len([d for d in cache.iterdir() if d.name.startswith("anon_hf_cpu_")]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not is_transformers_available(), reason="transformers is not installed")
def test_a_trainer_run_at_default_verbosity_shows_the_build_line_before_the_build(tmp_path):
    # A compiler wrapper appends to the same file as the run's output (O_APPEND), so the file's order is the order
    # in time of the announcement and the compiler's first start.
    log, bin_dir = tmp_path / "run.log", tmp_path / "bin"
    bin_dir.mkdir()
    compiler = bin_dir / "g++"
    compiler.write_text(f'#!/bin/sh\necho "COMPILER STARTED" >> "{log}"\nexec {shutil.which("g++")} "$@"\n')
    compiler.chmod(0o755)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"), CXX=str(compiler), OMP_NUM_THREADS="1")
    env.pop("ANON_HF_CPU_KERNEL", None)
    command = [sys.executable, "-m", "anon_hf", "run", str(ROOT / "tests" / "scripts" / "train_tiny_llama.py"),
               "--optim", "anon", "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none",
               "--save_strategy", "no", "--use_cpu", "true", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with open(log, "a") as out:
        result = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert text.count(BUILD_LINE) == 1, text[-3000:]
    announce, compiled, done = (text.index(s) for s in (BUILD_LINE, "COMPILER STARTED", BUILT_LINE))
    assert announce < compiled < done
    assert str(tmp_path / "cache") in text[announce:compiled]
