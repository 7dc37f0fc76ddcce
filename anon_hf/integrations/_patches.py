"""The one table of patches anon_hf applies to transformers, accelerate and DeepSpeed, and the one way they are guarded.

Each :class:`Patch` row names the module whose import triggers it, the ``on_*_imported`` function that applies it,
the attributes it touches and the feature that needs it. :func:`install` registers every row with the post-import
hooks; the row's function runs through :func:`_apply`, so a patch that fails (a private attribute renamed in a new
release) never breaks the user's import: it logs one error line naming the attribute, and the feature's entry
point raises :class:`PatchError` through :func:`require` when it is used. Before the first patch of a library runs,
its installed version is checked against :data:`anon_hf.integrations.import_utils.SUPPORTED_VERSIONS` (one warning outside).

Standard library only: ``import anon_hf`` loads this module, and the libraries it patches must stay unimported.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .import_hooks import when_imported
from .import_utils import SUPPORTED_VERSIONS, warn_if_unsupported

__all__ = ["PATCHES", "Patch", "PatchError", "failures", "install", "require", "wrap_once"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patch:
    module: str  # the import that triggers the patch
    integration: str  # anon_hf.integrations.<integration> holds the function
    function: str  # its on_*_imported(module)
    targets: tuple[str, ...]  # the attributes of `module` it reads or replaces
    feature: str  # what stops working without it

    def where(self) -> str:
        return ", ".join(f"{self.module}.{target}" for target in self.targets)


PATCHES: tuple[Patch, ...] = (
    Patch(
        "transformers.training_args",
        "transformers",
        "on_training_args_imported",
        ("TrainingArguments.__post_init__", "OptimizerNames"),
        "optim='anon' in TrainingArguments (the enum member and the optim_args check)",
    ),
    # A missing _OPTIMIZER_HANDLERS is not a failure: the transformers.trainer row then wraps the Trainer's lookup.
    Patch(
        "transformers.trainer_optimizer",
        "transformers",
        "on_trainer_optimizer_imported",
        ("_OPTIMIZER_HANDLERS",),
        "the Trainer's optimizer handler for optim='anon'",
    ),
    Patch(
        "transformers.trainer",
        "transformers",
        "on_trainer_imported",
        ("Trainer.__init__",),
        "AnonCallback in every Trainer that uses Anon",
    ),
    Patch(
        "deepspeed",
        "deepspeed",
        "on_deepspeed_imported",
        ("initialize",),
        "the check at deepspeed.initialize that anon_hf's DeepSpeed patches are in place",
    ),
    Patch(
        "deepspeed.runtime.zero.utils",
        "deepspeed",
        "on_zero_utils_imported",
        ("ZERO_SUPPORTED_OPTIMIZERS",),
        "ZeRO accepting Anon without zero_allow_untested_optimizer",
    ),
    Patch(
        "deepspeed.runtime.engine",
        "deepspeed",
        "on_engine_imported",
        ("DeepSpeedEngine._configure_basic_optimizer",),
        "the check of a config's Anon optimizer.params before DeepSpeed builds it",
    ),
    Patch(
        "accelerate.accelerator",
        "deepspeed",
        "on_accelerator_imported",
        ("map_pytorch_optim_to_deepspeed",),
        "refusing accelerate's silent swap of Anon for DeepSpeedCPUAdam under offload_optimizer",
    ),
    Patch(
        "transformers.integrations.deepspeed",
        "deepspeed",
        "on_hf_deepspeed_imported",
        ("HfTrainerDeepSpeedConfig.trainer_config_process",),
        'the Trainer\'s "auto" filling of an Anon optimizer block (eps kept)',
    ),
    Patch(
        "deepspeed.runtime.zero.stage_1_and_2",
        "deepspeed_universal",
        "on_zero12_imported",
        ("DeepSpeedZeroOptimizer._load_universal_checkpoint",),
        "refusing a ZeRO-1/2 universal checkpoint that lost Anon's precond",
    ),
    Patch(
        "deepspeed.runtime.zero.stage3",
        "deepspeed_universal",
        "on_zero3_imported",
        ("DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3",),
        "loading Anon's precond from a ZeRO-3 universal checkpoint",
    ),
    Patch(
        "axolotl.utils.config",
        "axolotl",
        "on_axolotl_config_imported",
        ("validate_config",),
        "the check of optimizer: anon's optim_args when axolotl validates its config, before the model loads",
    ),
)

_MISSING = object()

# Patch -> "ErrorType: message" for every row whose function raised.
_failures: dict[Patch, str] = {}


class PatchError(RuntimeError):
    """A feature is used whose patch could not be applied to the installed library."""


def _package(patch: Patch) -> str:
    return patch.module.partition(".")[0]


def _supported(package: str) -> str:
    return f"{package}{SUPPORTED_VERSIONS[package]}" if package in SUPPORTED_VERSIONS else package


def _apply(patch: Patch, module: ModuleType) -> None:
    """Run one row's function on the module just imported; on failure record it and log one line, never raise."""
    try:
        getattr(importlib.import_module(f"{__package__}.{patch.integration}"), patch.function)(module)
    except Exception as err:
        _failures[patch] = f"{type(err).__name__}: {err}"
        logger.error(
            "anon_hf could not patch %s (%s); %s will raise when used. anon_hf supports %s.",
            patch.where(),
            _failures[patch],
            patch.feature,
            _supported(_package(patch)),
        )


def _callback(patch: Patch) -> Callable[[ModuleType], None]:
    return lambda module: _apply(patch, module)


def install(patches: Iterable[Patch] = PATCHES) -> None:
    """Register every row (and the version check of each library it patches) with the post-import hooks."""
    patches = tuple(patches)
    # Only the libraries patched here are checked: a version warning about anything else could not be acted on.
    for package in dict.fromkeys(_package(patch) for patch in patches):
        features = "; ".join(patch.feature for patch in patches if _package(patch) == package)
        when_imported(package, functools.partial(warn_if_unsupported, what_may_break=features))
    for patch in patches:
        when_imported(patch.module, _callback(patch))


def failures(integrations: Iterable[str] | None = None) -> dict[Patch, str]:
    """The rows that failed, with their errors; only those of ``integrations`` (module names) if given."""
    wanted = None if integrations is None else set(integrations)
    return {patch: error for patch, error in _failures.items() if wanted is None or patch.integration in wanted}


def require(integrations: Iterable[str], use: str, way_out: str = "") -> None:
    """Raise :class:`PatchError` for ``use`` if a patch of ``integrations`` failed, naming each and the fix."""
    failed = failures(integrations)
    if not failed:
        return
    details = "; ".join(f"{patch.where()} ({error}) for {patch.feature}" for patch, error in failed.items())
    packages = dict.fromkeys(_supported(_package(patch)) for patch in failed)
    raise PatchError(
        f"{use} needs anon_hf's patches of the installed libraries, and these failed when the modules were "
        f"imported: {details}. anon_hf supports {', '.join(packages)} (the releases its tests ran against); with "
        f"this release, {use} cannot work. See docs/troubleshooting.md#patches-supported-versions-and-optim_args-types."
        f"{way_out}"
    )


def wrap_once(owner: Any, attribute: str, make_wrapper: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.attribute`` by ``make_wrapper(original)`` (with the original's metadata), once.

    A second call finds anon_hf's wrapper and does nothing; a staticmethod stays a staticmethod.

    Raises:
        AttributeError: ``owner`` has no ``attribute`` (the row's guard logs it).
    """
    if isinstance(owner, type):  # what `object` provides (e.g. __init__) does not count as the library's
        holders = [vars(klass) for klass in owner.__mro__ if klass is not object]
        descriptor = next((holder[attribute] for holder in holders if attribute in holder), _MISSING)
    else:
        descriptor = inspect.getattr_static(owner, attribute, _MISSING)
    if descriptor is _MISSING:
        name = getattr(owner, "__qualname__", getattr(owner, "__name__", type(owner).__name__))
        raise AttributeError(f"{name} has no attribute {attribute!r}")
    static = isinstance(descriptor, staticmethod)
    original = descriptor.__func__ if static else getattr(owner, attribute)
    if getattr(original, "_anon_hf_wrapped", False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper._anon_hf_wrapped = True
    setattr(owner, attribute, staticmethod(wrapper) if static else wrapper)
