"""anon-hf: the Anon optimizer for PyTorch and the Hugging Face training stack.

``import anon_hf`` imports torch and nothing else; the integrations (transformers, accelerate, DeepSpeed)
load on first use of their names.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._schedule import refresh_steps
from ._sync import RefreshOutOfSyncError
from .functional import NonFinitePreconditionerError, anon
from .optimizer import Anon

__version__ = "0.1.0.dev0"

__all__ = [
    "Anon",
    "NonFinitePreconditionerError",
    "RefreshOutOfSyncError",
    "__version__",
    "anon",
    "refresh_steps",
]

# Names that live in optional integrations: resolved on first access so that `import anon_hf` stays light.
_LAZY_NAMES: dict[str, str] = {}


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))
