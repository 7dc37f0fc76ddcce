"""Never a silent swap: the optimizer that trains is the one asked for, checked before step 1.

A Trainer is asked for Anon in one of four ways (``--optim anon``/``anon_8bit``, a DeepSpeed config's optimizer
block, ``Trainer(optimizers=...)``, ``Trainer(optimizer_cls_and_kwargs=...)``; ``routes.py`` reconciles them when
the Trainer is built). Something else can still end up training: a Trainer subclass that builds its own optimizer
in ``create_optimizer`` (LLaMA-Factory's ``use_muon`` and ``use_adam_mini`` do), a DeepSpeed optimizer block of
another type, accelerate's swap of a client optimizer for ``DeepSpeedCPUAdam`` under ``offload_optimizer``.

:func:`requested_anon` records, when the Trainer is built, which class was asked for and how.
:class:`~anon_hf.integrations.trainer_callback.AnonCallback` calls :func:`check_optimizer_that_trains` in
``on_train_begin``, which the Trainer runs after ``create_optimizer``, ``deepspeed_init`` and
``accelerator.prepare`` on every route (plain, DeepSpeed, FSDP2) and before the first step; the optimizer it
receives is wrapped (``AcceleratedOptimizer``, DeepSpeed's ZeRO optimizer) and is unwrapped through
``.optimizer``. Transformers-free: it reads the trainer's attributes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .optim_args import AnonName, anon_name_for_class, anon_name_for_config_type, anon_name_for_optim
from .routes import _MAX_WRAPPERS, _deepspeed_config, find_anon, wrapped

__all__ = ["OptimizerReplacedError", "RequestedAnon", "check_optimizer_that_trains", "requested_anon"]

DOCS = "docs/troubleshooting.md#the-optimizer-that-trains-is-not-anon"

# Framework options that replace the Trainer's optimizer whatever `optim` says: (trainer attribute, flag, the name
# users know it by). LLaMA-Factory keeps its options on `trainer.finetuning_args`.
_FRAMEWORK_OPTIONS = (
    ("finetuning_args", "use_muon", "LLaMA-Factory's use_muon: true"),
    ("finetuning_args", "use_adam_mini", "LLaMA-Factory's use_adam_mini: true"),
    ("finetuning_args", "use_galore", "LLaMA-Factory's use_galore: true"),
    ("finetuning_args", "use_apollo", "LLaMA-Factory's use_apollo: true"),
)


class OptimizerReplacedError(RuntimeError):
    """Anon was asked for, but another optimizer would train; raised before the first step."""


@dataclass(frozen=True)
class RequestedAnon:
    """The anon-hf optimizer a Trainer was asked for (``name``) and how (``how``, e.g. ``"optim='anon'"``)."""

    name: AnonName
    how: str


def requested_anon(trainer: Any) -> RequestedAnon | None:
    """What ``trainer`` (just built) was asked to train with, when that is Anon or Anon8bit; else None."""
    args = getattr(trainer, "args", None)
    named = anon_name_for_optim(getattr(args, "optim", None))
    if named is not None:
        return RequestedAnon(named, f"optim={named.optim!r}")
    config = _deepspeed_config(args, getattr(trainer, "accelerator", None))
    block = config.get("optimizer") if config is not None else None
    named = anon_name_for_config_type(block.get("type")) if isinstance(block, dict) else None
    if named is not None:
        return RequestedAnon(named, f'the DeepSpeed config\'s optimizer block ("type": "{named.config_type}")')
    anon = find_anon(getattr(trainer, "optimizer", None))
    if anon is not None:
        return RequestedAnon(anon_name_for_class(type(anon)), "Trainer(optimizers=...)")
    cls_and_kwargs = getattr(trainer, "optimizer_cls_and_kwargs", None) or (None, None)
    named = anon_name_for_class(cls_and_kwargs[0])
    return None if named is None else RequestedAnon(named, "Trainer(optimizer_cls_and_kwargs=...)")


def _innermost(optimizer: Any) -> Any:
    for _ in range(_MAX_WRAPPERS):
        inner = wrapped(optimizer)
        if inner is None:
            return optimizer
        optimizer = inner
    return optimizer


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _create_optimizer_owner(trainer: Any) -> type | None:
    """The Trainer subclass that overrides ``create_optimizer`` (outside transformers), else None."""
    for klass in type(trainer).__mro__:
        if "create_optimizer" in vars(klass):
            return None if klass.__module__.startswith("transformers.") else klass
    return None


def _why(trainer: Any, args: Any, inner: Any) -> str:
    """Why ``inner`` trains instead of Anon, as far as the trainer shows it, with the way out."""
    config = _deepspeed_config(args, getattr(trainer, "accelerator", None))
    offload = ((config or {}).get("zero_optimization") or {}).get("offload_optimizer") or {}
    if type(inner).__name__.startswith("DeepSpeedCPU") and offload.get("device") in ("cpu", "nvme"):
        return (
            "accelerate replaced the optimizer by DeepSpeedCPUAdam because the DeepSpeed config offloads the "
            'optimizer and leaves "zero_force_ds_cpu_optimizer" at true. Set "zero_force_ds_cpu_optimizer": false, '
            "or name Anon in the config's optimizer block."
        )
    block = (config or {}).get("optimizer")
    if isinstance(block, dict) and anon_name_for_config_type(block.get("type")) is None:
        return (
            f'The DeepSpeed config\'s optimizer block ("type": {block.get("type")!r}) builds it. Remove that block, '
            'or set "type": "Anon" in it.'
        )
    options = [
        text for holder, flag, text in _FRAMEWORK_OPTIONS if getattr(getattr(trainer, holder, None), flag, False)
    ]
    if options:
        return f"{', '.join(options)} replaces the optimizer whatever optim says. Turn it off to train with Anon."
    owner = _create_optimizer_owner(trainer)
    if owner is not None:
        return (
            f"{_qualified(owner)}.create_optimizer builds its own optimizer, as framework options that "
            "bring their own optimizer do. Turn that option off, or remove the override."
        )
    return (
        "Something set trainer.optimizer between Trainer(...) and train() (a callback, or code that replaced it). "
        "Build Anon there instead."
    )


def check_optimizer_that_trains(requested: RequestedAnon, optimizer: Any, trainer: Any = None, args: Any = None):
    """Raise :class:`OptimizerReplacedError` unless ``optimizer`` (as wrapped for training) holds the class asked for.

    Args:
        requested: what the Trainer was asked for (:func:`requested_anon`).
        optimizer: the optimizer the Trainer will step, possibly wrapped by accelerate or DeepSpeed.
        trainer: the Trainer, to say why another optimizer took Anon's place (optional).
        args: its ``TrainingArguments`` (default: ``trainer.args``).
    """
    anon = find_anon(optimizer)
    if anon is not None and anon_name_for_class(type(anon)) == requested.name:
        return
    inner = anon if anon is not None else _innermost(optimizer)
    args = args if args is not None else getattr(trainer, "args", None)
    found = "no optimizer" if inner is None else f"{type(inner).__name__} ({_qualified(type(inner))})"
    raise OptimizerReplacedError(
        f"{requested.how} asks for {requested.name.optimizer_cls.__name__}, but the optimizer that would train is "
        f"{found}; training stopped before step 1. {_why(trainer, args, inner)} To train with "
        f"{type(inner).__name__} knowingly, drop {requested.how}. See {DOCS}."
    )
