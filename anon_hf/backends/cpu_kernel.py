"""Anon's fused CPU kernel (``csrc/anon_cpu.cpp``): built on first use with torch's C++ extension loader.

The kernel makes one vectorized pass per tensor (``at::vec``, so AVX2 / AVX-512 where ATen uses them). With
``torch.get_num_threads() > 1`` a large tensor is cut into that many parts, run on torch's OpenMP threads. It is
built the first time a ``fused=True`` step meets CPU tensors (~20 s on 2 cores, needs a C++ compiler and ninja),
cached under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) per torch version and CPU capability,
and loaded from there afterwards.

Nothing is built or imported at ``import anon_hf``. When the build fails, CPU tensors take the foreach path, with one
warning saying why; ``ANON_HF_CPU_KERNEL=0`` turns the kernel off on purpose, and CPU tensors then take the
``torch.compile``'d graphs of ``anon_hf.backends.fused`` (what CUDA tensors run).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["kernel", "kernel8", "kernel8_unavailable_reason", "kernel_unavailable_reason"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "anon_cpu.cpp"
# Anon8bit's step between refreshes: plain loops for the compiler's vectorizer (-fopenmp-simd: `omp simd` only, no
# OpenMP runtime).
_SOURCE_8BIT = _SOURCE.with_name("anon_cpu_8bit.cpp")
_FLAGS_8BIT = ("-fopenmp-simd", "-fno-math-errno")
#: Storage dtypes the kernel reads and writes (it computes in fp32).
SUPPORTED_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
# ATen's CPU capability -> (macro that selects at::vec's implementation, compiler flags); as torch._inductor builds.
_ISA_FLAGS = {
    "AVX512": ("CPU_CAPABILITY_AVX512", ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"]),
    "AVX2": ("CPU_CAPABILITY_AVX2", ["-mavx2", "-mfma", "-mf16c"]),
}

_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None
_module8: ModuleType | None = None
_failure8: str | None = None


def _capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "DEFAULT"


def _cache_dir() -> str:
    """Where torch's extension loader keeps builds: ``TORCH_EXTENSIONS_DIR``, else its default root."""
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def _build(source: Path = _SOURCE, prefix: str = "anon_hf_cpu", extra_flags: tuple[str, ...] = ()) -> ModuleType:
    from torch.utils.cpp_extension import load

    capability = _capability()
    macro, arch_flags = _ISA_FLAGS.get(capability, (None, []))
    flags = ["-O3", *arch_flags, *extra_flags] + ([f"-D{macro}"] if macro else [])
    # Not -fopenmp (the kernel's loop compiled ~8% slower with it): the kernel calls the OpenMP runtime that torch
    # links to directly, through GOMP_parallel, to spread large tensors over torch's threads.
    if torch.backends.openmp.is_available():
        flags.append("-DANON_HF_OPENMP_ABI")
    # One build per torch version and instruction set: a cache shared between machines or torch upgrades never
    # loads a binary built for something else.
    tag = hashlib.sha1(f"{torch.__version__}|{capability}|{' '.join(flags)}".encode()).hexdigest()[:10]
    name = re.sub(r"\W", "_", f"{prefix}_{capability.lower()}_{tag}")
    started = time.perf_counter()
    module = load(name=name, sources=[str(source)], extra_cflags=flags, verbose=False)
    logger.info(
        "Anon fused=True: CPU tensors run anon_hf's C++ kernel (%s, %s), ready in %.1f s (built on first use, "
        "cached in %s).",
        capability,
        name,
        time.perf_counter() - started,
        _cache_dir(),
    )
    return module


def _check_interface(module: ModuleType) -> ModuleType:
    """``module``, refused unless its scalar layout and refresh modes match the Python side's by name (both kernels
    export them)."""
    from ..refresh import REFRESH_MODES
    from .fused.scalars import SCALAR_SLOTS

    slots, modes = tuple(getattr(module, "SCALAR_SLOTS", ())), tuple(sorted(getattr(module, "REFRESH_MODES", {})))
    if slots != SCALAR_SLOTS or modes != tuple(sorted(REFRESH_MODES)):
        raise RuntimeError(
            f"the kernel's scalar slots {slots} and refresh modes {modes} differ from anon_hf's {SCALAR_SLOTS} and "
            f"{tuple(sorted(REFRESH_MODES))} (a stale build in TORCH_EXTENSIONS_DIR?)"
        )
    return module


def kernel_unavailable_reason() -> str | None:
    """Why the C++ kernel cannot run in this process (``None`` if it can); builds or loads it on first call."""
    global _module, _failure
    if os.environ.get("ANON_HF_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        return "ANON_HF_CPU_KERNEL=0 is set"
    if _module is not None or _failure is not None:
        return _failure
    with _lock:
        if _module is None and _failure is None:
            # Not the compiled graphs: inductor needs the same compiler on CPU, and would fail again, slowly.
            _module, _failure = _load(_build_checked, "CPU tensors take the foreach path instead")
    return _failure


def _build_checked() -> ModuleType:
    """The main kernel, refused unless its interface matches (see :func:`_check_interface`)."""
    module = _build()
    _check_interface(module)
    return module


def build_failure() -> str | None:
    """Why building the kernel failed in this process (``None`` if it did not fail or was not tried)."""
    return _failure


def _load(build, fallback: str) -> tuple[ModuleType | None, str | None]:
    """``(module, None)`` from ``build()``, or ``(None, reason)`` logged once with what happens instead."""
    try:
        return build(), None
    except Exception as err:  # no compiler, no ninja, a failed build: the caller's fallback takes over
        detail = (str(err).strip() or type(err).__name__).splitlines()[-1][:300]
        failure = f"the C++ kernel could not be built ({type(err).__name__}: {detail})"
        logger.warning("Anon fused=True: %s; %s.", failure, fallback)
        return None, failure


def kernel8_unavailable_reason() -> str | None:
    """Why Anon8bit's C++ kernel (``csrc/anon_cpu_8bit.cpp``) cannot run here (``None`` if it can); builds it once."""
    global _module8, _failure8
    if os.environ.get("ANON_HF_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        return "ANON_HF_CPU_KERNEL=0 is set"
    if _module8 is not None or _failure8 is not None:
        return _failure8
    with _lock:
        if _module8 is None and _failure8 is None:
            build = lambda: _check_interface(_build(_SOURCE_8BIT, "anon_hf_cpu8", _FLAGS_8BIT))  # noqa: E731
            _module8, _failure8 = _load(build, "Anon8bit's CPU tensors take the reference path instead")
    return _failure8


def kernel8() -> ModuleType:
    """Anon8bit's loaded extension; call :func:`kernel8_unavailable_reason` first."""
    if _module8 is None:
        raise RuntimeError("anon_hf's 8-bit C++ kernel is not loaded; check kernel8_unavailable_reason() first")
    return _module8


def kernel() -> ModuleType:
    """The loaded extension; call :func:`kernel_unavailable_reason` first."""
    if _module is None:
        raise RuntimeError("anon_hf's C++ kernel is not loaded; check kernel_unavailable_reason() first")
    return _module
