"""anon-hf: the Anon optimizer for PyTorch and the Hugging Face training stack.

``import anon_hf`` imports torch and nothing else; the integrations (transformers, accelerate, DeepSpeed)
load on first use of their names.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from .distributed.sync import RefreshOutOfSyncError
from .functional import NonFinitePreconditionerError, anon
from .integrations import _patches
from .integrations._patches import PatchError
from .integrations.import_hooks import when_imported  # noqa: F401  (public: anon_hf.when_imported)
from .optimizer import Anon
from .optimizer8bit import Anon8bit, dequantize_state_dict
from .param_groups import create_anon_optimizer
from .schedule import refresh_steps

__version__ = "0.1.0.dev0"

__all__ = [
    "Anon",
    "Anon8bit",
    "NonFinitePreconditionerError",
    "PatchError",
    "RefreshOutOfSyncError",
    "__version__",
    "anon",
    "create_anon_optimizer",
    "dequantize_state_dict",
    "refresh_steps",
    "register",
]

# Names that live in optional integrations: resolved on first access so that `import anon_hf` stays light.
_LAZY_NAMES: dict[str, str] = {
    "AnonCallback": ".integrations.trainer_callback",
}

# DeepSpeed builds `"optimizer": {"type": "Anon"}` from getattr(torch.optim, "Anon") (and "Anon8bit" likewise); an
# attribute costs nothing.
torch.optim.Anon = Anon
torch.optim.Anon8bit = Anon8bit


# Each integration patches a library the moment the user's code imports the module concerned, so `import anon_hf`
# stays light and is all a script needs (`register()` forces the transformers part now). The rows, and how a
# failed patch is reported, are in integrations/_patches.py.
_patches.install()


def register() -> None:
    """Register Anon with the installed libraries now, instead of when they are imported.

    Makes ``"anon"`` a real ``transformers.training_args.OptimizerNames`` member and plugs Anon into the
    Trainer's optimizer construction (importing transformers if it is installed; nothing to do if it is not).
    Idempotent, thread-safe, and free after the first call. ``import anon_hf`` alone already registers lazily,
    at the user's own import of transformers; call this to fail early when the installed transformers cannot
    take ``optim="anon"``.

    Raises:
        RuntimeError: the installed transformers is outside the supported range and the registration failed.
    """
    from .integrations.transformers import register as _register_transformers

    _register_transformers()


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))
