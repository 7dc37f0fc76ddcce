"""anon_hf's C++ kernels on CPU (``csrc/*.cpp``): built once per source, then loaded from a cache.

Two kernels, one loader:

- ``csrc/anon_cpu.cpp``: the ``fused=True`` step of :class:`~anon_hf.Anon` (one vectorized pass per tensor, ``at::vec``,
  so AVX2 / AVX-512 where ATen uses them; a large tensor is cut into ``torch.get_num_threads()`` parts);
- ``csrc/anon_cpu_8bit.cpp``: :class:`~anon_hf.Anon8bit`'s step between refreshes.

Each is built the first time it is needed (about 1-3 minutes on 2 cores; a C++ compiler and ninja are needed), by
torch's C++ extension loader, into ``<cache>/<name>`` where ``<cache>`` is ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) and ``<name>`` (e.g. ``anon_hf_cpu_avx512_3f2a9c01d4e7``) ends in a hash of everything
the binary depends on: the C++ source's bytes, the compiler flags, the torch version, the Python ABI and the CPU
instruction set. So two environments with different anon-hf sources keep two builds side by side and never evict each
other, and a build is never loaded for another source, torch or CPU.

A build that is already there is imported directly: ninja is not run, so which ninja is on PATH (or whether there is
one) does not matter once a kernel is built. Processes that need the same build at once (the ranks of one node) take
a file lock: one builds, the others wait and then load it. A build announces itself with a warning before it starts
(it takes minutes, and training sits at step 0 meanwhile) and another when it is done; ``anon-hf build-kernels`` builds
every kernel ahead of time (docs/troubleshooting.md).

Nothing is built or imported at ``import anon_hf``. When a build fails, CPU tensors take another path, with one
warning saying why; ``ANON_HF_CPU_KERNEL=0`` turns the kernels off on purpose (``fused=True`` CPU tensors then take
the ``torch.compile``'d graphs of ``anon_hf.backends.fused``, what CUDA tensors run).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

try:
    import fcntl
except ImportError:  # Windows: the kernels' flags are gcc/clang's anyway; builds there are not serialized
    fcntl = None

__all__ = [
    "KERNELS",
    "BuiltKernel",
    "Kernel",
    "build_all",
    "cache_root",
    "capability",
    "kernel",
    "kernel8",
    "kernel8_unavailable_reason",
    "kernel_unavailable_reason",
]

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
#: Storage dtypes the kernel reads and writes (it computes in fp32).
SUPPORTED_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
# ATen's CPU capability -> (macro that selects at::vec's implementation, compiler flags); as torch._inductor builds.
_ISA_FLAGS = {
    "AVX512": ("CPU_CAPABILITY_AVX512", ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"]),
    "AVX2": ("CPU_CAPABILITY_AVX2", ["-mavx2", "-mfma", "-mf16c"]),
}
# Written into a build's folder once its library is complete: a folder without it is built (again) under the lock.
_READY_FILE = "anon_hf_build.json"


@dataclass(frozen=True)
class Kernel:
    """One C++ kernel: what it is called, built from and with, and what runs instead when it cannot be built."""

    title: str  # for messages, e.g. "Anon's fused=True step"
    prefix: str  # the start of the extension's name
    sources: tuple[Path, ...]
    extra_flags: tuple[str, ...]
    fallback: str  # what happens when the kernel cannot be built
    check: Callable[[ModuleType], None] | None = None  # refuses a loaded module whose interface differs


def _check_interface(module: ModuleType) -> None:
    """Refuse a kernel whose scalar layout or refresh modes differ, by name, from the Python side's."""
    from ..refresh import REFRESH_MODES
    from .fused.scalars import SCALAR_SLOTS

    slots, modes = tuple(getattr(module, "SCALAR_SLOTS", ())), tuple(sorted(getattr(module, "REFRESH_MODES", {})))
    if slots != SCALAR_SLOTS or modes != tuple(sorted(REFRESH_MODES)):
        raise RuntimeError(
            f"the kernel's scalar slots {slots} and refresh modes {modes} differ from anon_hf's {SCALAR_SLOTS} and "
            f"{tuple(sorted(REFRESH_MODES))} (a stale build in TORCH_EXTENSIONS_DIR?)"
        )


MAIN = Kernel(
    title="Anon's fused=True step",
    prefix="anon_hf_cpu",
    sources=(_CSRC / "anon_cpu.cpp",),
    extra_flags=(),
    # Not the compiled graphs: inductor needs the same compiler on CPU, and would fail again, slowly.
    fallback="CPU tensors take the foreach path instead",
    check=_check_interface,
)
EIGHT_BIT = Kernel(
    title="Anon8bit's step",
    prefix="anon_hf_cpu8",
    sources=(_CSRC / "anon_cpu_8bit.cpp",),
    # Plain loops for the compiler's vectorizer: `omp simd` only, no OpenMP runtime.
    extra_flags=("-fopenmp-simd", "-fno-math-errno"),
    fallback="Anon8bit's CPU tensors take the reference path instead",
    check=_check_interface,
)
#: Every kernel, as ``anon-hf build-kernels`` builds them.
KERNELS = (MAIN, EIGHT_BIT)

_lock = threading.Lock()
# Per kernel prefix: (module, None) once loaded, (None, reason) once it failed.
_results: dict[str, tuple[ModuleType | None, str | None]] = {}


def capability() -> str:
    """The instruction set the kernels are built for: ATen's CPU capability (``AVX512``, ``AVX2``, ``DEFAULT``; the
    ``ATEN_CPU_CAPABILITY`` environment variable lowers it)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "DEFAULT"


_capability = capability


def cache_root() -> Path:
    """Where the builds go: ``TORCH_EXTENSIONS_DIR``, else torch's default root (``~/.cache/torch_extensions``)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _flags(spec: Kernel) -> list[str]:
    macro, arch_flags = _ISA_FLAGS.get(_capability(), (None, []))
    flags = ["-O3", *arch_flags, *spec.extra_flags] + ([f"-D{macro}"] if macro else [])
    # Not -fopenmp (the main kernel's loop compiled slower with it): the kernels call the OpenMP runtime that torch
    # links to directly, through GOMP_parallel, to spread large tensors over torch's threads.
    if torch.backends.openmp.is_available():
        flags.append("-DANON_HF_OPENMP_ABI")
    return flags


def extension_name(spec: Kernel) -> str:
    """``<prefix>_<isa>_<hash>``: the hash covers the sources' bytes and the headers they share (``csrc/*.h``), the
    flags (the ISA's among them), torch and the Python ABI, not where the sources lie."""
    digest = hashlib.sha256()
    for source in (*spec.sources, *sorted(_CSRC.glob("*.h"))):
        digest.update(source.read_bytes())
    key = [*_flags(spec), torch.__version__, str(torch.version.git_version), sys.implementation.cache_tag]
    key.append(str(sysconfig.get_config_var("EXT_SUFFIX")))
    digest.update("\0".join(key).encode())
    return f"{spec.prefix}_{_capability().lower()}_{digest.hexdigest()[:12]}"


def build_directory(spec: Kernel) -> Path:
    """The folder that holds (or will hold) ``spec``'s build for this source, torch and CPU."""
    return cache_root() / extension_name(spec)


def _library(directory: Path) -> Path:
    from torch.utils.cpp_extension import LIB_EXT

    return directory / f"{directory.name}{LIB_EXT}"


def _is_built(directory: Path) -> bool:
    return (directory / _READY_FILE).is_file() and _library(directory).is_file()


def _import(directory: Path) -> ModuleType:
    """Import the built library of ``directory`` as a module, as torch's loader does after a build (no ninja)."""
    name = directory.name
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _library(directory))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s build lock (an OS file lock: released even if this process dies while building)."""
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(directory / "anon_hf.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("anon_hf: another process is building the C++ kernel in %s; waiting for it.", directory)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(spec: Kernel, directory: Path) -> ModuleType:
    """Build ``spec`` into ``directory`` with torch's loader (ninja), announced before and after; caller holds the lock."""
    from torch.utils.cpp_extension import load

    # torch's own lock file, left behind by a process that died mid-build, would make load() wait forever; under our
    # lock no other anon_hf process builds here.
    (directory / "lock").unlink(missing_ok=True)
    sources = ", ".join(source.name for source in spec.sources)
    logger.warning(
        "anon_hf: building the C++ kernel for %s (%s, %s) because this source, torch and CPU have no build in the "
        "cache yet. This takes about 1-3 minutes on 2 cores (training waits at its first step meanwhile) and happens "
        "once: later runs load it from %s. `anon-hf build-kernels` builds every kernel ahead of time.",
        spec.title,
        sources,
        _capability(),
        directory,
    )
    started = time.perf_counter()
    module = load(
        name=directory.name,
        sources=[str(s) for s in spec.sources],
        extra_cflags=_flags(spec),
        build_directory=str(directory),
        verbose=False,
    )
    sys.modules[directory.name] = module  # as _import() registers a cached build: never initialized twice
    record = {"sources": sources, "capability": _capability(), "flags": _flags(spec), "torch": torch.__version__}
    (directory / f"{_READY_FILE}.tmp").write_text(json.dumps(record) + "\n")
    os.replace(directory / f"{_READY_FILE}.tmp", directory / _READY_FILE)
    logger.warning("anon_hf: built the C++ kernel %s in %.0f s.", directory.name, time.perf_counter() - started)
    return module


def _load_or_build(spec: Kernel) -> tuple[ModuleType, bool]:
    """``(module, built)``: the cached build of ``spec`` imported, or built first (once per node: under a file lock)."""
    directory = build_directory(spec)
    if not _is_built(directory):
        with _exclusive(directory):
            if not _is_built(directory):
                module = _build(spec, directory)
                return _checked(spec, module), True
    return _checked(spec, _import(directory)), False


def _checked(spec: Kernel, module: ModuleType) -> ModuleType:
    if spec.check is not None:
        spec.check(module)
    return module


def _disabled() -> bool:
    return os.environ.get("ANON_HF_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off")


def _load(spec: Kernel) -> tuple[ModuleType | None, str | None]:
    """``(module, None)``, or ``(None, reason)`` logged once with what happens instead."""
    started = time.perf_counter()
    try:
        module, _ = _load_or_build(spec)
    except Exception as err:  # no compiler, no ninja, a failed build: the caller's fallback takes over
        detail = (str(err).strip() or type(err).__name__).splitlines()[-1][:300]
        failure = f"the C++ kernel could not be built ({type(err).__name__}: {detail})"
        logger.warning("Anon fused=True: %s; %s.", failure, spec.fallback)
        return None, failure
    logger.info(
        "Anon: %s runs anon_hf's C++ kernel on CPU tensors (%s, %s), ready in %.1f s (cached in %s).",
        spec.title,
        _capability(),
        module.__name__,
        time.perf_counter() - started,
        cache_root(),
    )
    return module, None


def _unavailable_reason(spec: Kernel) -> str | None:
    if _disabled():
        return "ANON_HF_CPU_KERNEL=0 is set"
    if spec.prefix not in _results:
        with _lock:
            if spec.prefix not in _results:
                _results[spec.prefix] = _load(spec)
    return _results[spec.prefix][1]


def _loaded(spec: Kernel) -> ModuleType | None:
    return _results.get(spec.prefix, (None, None))[0]


def kernel_unavailable_reason() -> str | None:
    """Why the main C++ kernel cannot run in this process (``None`` if it can); loads or builds it on first call."""
    return _unavailable_reason(MAIN)


def kernel8_unavailable_reason() -> str | None:
    """Why Anon8bit's C++ kernel cannot run in this process (``None`` if it can); loads or builds it on first call."""
    return _unavailable_reason(EIGHT_BIT)


def kernel() -> ModuleType:
    """The loaded main extension; call :func:`kernel_unavailable_reason` first."""
    if (module := _loaded(MAIN)) is None:
        raise RuntimeError("anon_hf's C++ kernel is not loaded; check kernel_unavailable_reason() first")
    return module


def kernel8() -> ModuleType:
    """Anon8bit's loaded extension; call :func:`kernel8_unavailable_reason` first."""
    if (module := _loaded(EIGHT_BIT)) is None:
        raise RuntimeError("anon_hf's 8-bit C++ kernel is not loaded; check kernel8_unavailable_reason() first")
    return module


def build_failure() -> str | None:
    """Why building the main kernel failed in this process (``None`` if it did not fail or was not tried)."""
    return _results.get(MAIN.prefix, (None, None))[1]


@dataclass(frozen=True)
class BuiltKernel:
    """What :func:`build_all` did for one kernel: its folder, and the seconds a build took (``None``: was cached)."""

    kernel: Kernel
    directory: Path
    build_seconds: float | None


def build_all() -> list[BuiltKernel]:
    """Build (or find) every kernel for this source, torch, Python and CPU in :func:`cache_root`; raises on failure."""
    done = []
    for spec in KERNELS:
        started = time.perf_counter()
        module, built = _load_or_build(spec)
        with _lock:
            _results[spec.prefix] = (module, None)
        seconds = time.perf_counter() - started if built else None
        done.append(BuiltKernel(spec, build_directory(spec), seconds))
    return done
