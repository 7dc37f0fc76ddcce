"""The four ways an Anon step runs, for tests that compare them: ``forloop`` and ``foreach`` (eager), ``kernel``
(``fused=True`` on CPU: the C++ kernel) and ``graphs`` (``fused=True`` with ``ANON_HF_CPU_KERNEL=0``: the
torch.compile'd graphs CUDA tensors run)."""

from __future__ import annotations

import pytest

from anon_hf.backends import cpu_kernel as _cpu_kernel

PATHS = {
    "forloop": dict(foreach=False),
    "foreach": dict(foreach=True),
    "kernel": dict(fused=True),
    "graphs": dict(fused=True),
}


def use_path(path: str, monkeypatch) -> dict:
    """Select the fused backend through the environment and return the constructor flags for ``path``."""
    monkeypatch.setenv("ANON_HF_CPU_KERNEL", "0" if path == "graphs" else "1")
    if path == "kernel" and (reason := _cpu_kernel.kernel_unavailable_reason()) is not None:
        pytest.skip(f"the C++ kernel is unavailable here: {reason}")
    return PATHS[path]
