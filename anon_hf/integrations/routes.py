"""One rule when two routes choose the optimizer: ``--optim``/``--optim_args`` and an optimizer given elsewhere.

The Trainer can get its optimizer from ``--optim``/``--optim_args``, from a DeepSpeed config's ``"optimizer"``
block, from ``Trainer(optimizers=(optimizer, scheduler))`` or from ``Trainer(optimizer_cls_and_kwargs=...)``.
transformers silently lets the last three win over ``--optim``. When one of them involves Anon, anon-hf applies:

* **Keys left out are filled.** A key of ``--optim_args`` that the DeepSpeed block leaves out or sets to
  ``"auto"``, or that ``optimizer_cls_and_kwargs`` leaves out, is filled from ``--optim_args``; the filled values
  are logged (once, by the main process).
* **A key set on both sides must agree.** Different values raise a ``ValueError`` naming both places and every
  way out. An optimizer passed with ``optimizers=`` is already built, so every key of ``--optim_args`` is
  compared with its param groups.
* **The optimizer itself must agree.** ``--optim anon`` next to another optimizer (a DeepSpeed block of another
  type, ``optimizers=``/``optimizer_cls_and_kwargs`` with another class) raises, and so does ``--optim`` naming
  another optimizer explicitly (not transformers' default) next to an Anon from elsewhere. ``--optim_args``
  without ``--optim anon`` next to an Anon from elsewhere raises rather than being ignored.

``lr``, ``betas`` and ``weight_decay`` keep transformers' own rules (the DeepSpeed block's ``"auto"`` is filled
from ``--learning_rate`` etc., and a number that differs is reported by transformers).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..optimizer import Anon
from .optim_args import AnonName, anon_name_for_class, anon_name_for_config_type, anon_name_for_optim, parse_optim_args

__all__ = ["check_trainer_routes", "deepspeed_config_names_anon", "find_anon", "reconcile_deepspeed_block"]

logger = logging.getLogger(__name__)

_AUTO = "auto"


def _optim_name(args: Any) -> str:
    optim = getattr(args, "optim", None)
    return str(getattr(optim, "value", optim))


def _named(args: Any) -> AnonName | None:
    """The anon-hf optimizer ``--optim`` names (``anon`` or ``anon_8bit``), else None."""
    return anon_name_for_optim(getattr(args, "optim", None))


def _default_optim_name(args: Any) -> str | None:
    field = getattr(type(args), "__dataclass_fields__", {}).get("optim")
    return None if field is None else str(getattr(field.default, "value", field.default))


def _names_another_optimizer(args: Any) -> bool:
    """``--optim`` names an optimizer other than Anon and other than transformers' default (which nobody typed)."""
    return _named(args) is None and _optim_name(args) != _default_optim_name(args)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("0", "") and os.environ.get("LOCAL_RANK", "0") in ("0", "")


def _normalized(key: str, value: Any, optimizer_cls: type = Anon) -> Any:
    """``value`` as an ``optimizer_cls`` built with it stores it (lists become tuples, "bf16" a torch.dtype, ...)."""
    probe = optimizer_cls([torch.zeros(1, requires_grad=True)], **{key: value})
    return probe.verify_sync if key == "verify_sync" else probe.defaults[key]


def _requested(args: Any, elsewhere: str, given: AnonName) -> dict[str, Any]:
    """The typed ``--optim_args`` that apply to the ``given`` optimizer built ``elsewhere``; raises when ``--optim``
    names the other anon-hf optimizer, or when ``--optim_args`` would be ignored."""
    optim_args = getattr(args, "optim_args", None)
    named = _named(args)
    if named is not None and named != given:
        raise ValueError(
            f"optim={named.optim!r} asks for {named.optimizer_cls.__name__}, but {elsewhere} is "
            f"{given.optimizer_cls.__name__}, which the Trainer uses instead. Either use optim={given.optim!r}, or "
            f"make {elsewhere} {named.optimizer_cls.__name__} (DeepSpeed type {named.config_type!r})."
        )
    if named is not None:
        return parse_optim_args(optim_args, named.optimizer_cls, named.optim)
    if optim_args:
        raise ValueError(
            f"--optim_args {optim_args!r} would be ignored: the optimizer is the {given.optimizer_cls.__name__} from "
            f"{elsewhere}, and --optim is {_optim_name(args)!r}, not {given.optim!r}. Add --optim {given.optim} to "
            "apply them to it, or drop --optim_args."
        )
    return {}


def _log_filled(filled: Mapping[str, Any], where: str) -> None:
    if filled and _is_main_process():
        text = ", ".join(f"{key}={value!r}" for key, value in filled.items())
        logger.warning("Anon's %s filled from --optim_args: %s", where, text)


def _conflict(key: str, requested: Any, given: Any, where: str, ways_out: str) -> ValueError:
    return ValueError(
        f"Anon's {key} is set twice with different values: --optim_args {key}={requested!r} and {where} "
        f"{key}={given!r}. Either drop {key} from --optim_args, or {ways_out}."
    )


def _merge(
    given: dict[str, Any],
    requested: Mapping[str, Any],
    *,
    where: str,
    ways_out: str,
    fill_auto: bool,
    optimizer_cls: type = Anon,
) -> dict[str, Any]:
    """Fill ``given`` in place from ``requested`` (missing keys, and "auto" ones if ``fill_auto``); raise on a key
    both set differently. Returns the filled keys."""
    filled: dict[str, Any] = {}
    for key, value in requested.items():
        if key not in given or (fill_auto and given[key] == _AUTO):
            given[key] = filled[key] = value
        elif _normalized(key, given[key], optimizer_cls) != _normalized(key, value, optimizer_cls):
            raise _conflict(key, value, given[key], where, ways_out.format(key=key))
    return filled


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed: the config's optimizer block against --optim / --optim_args (at TrainingArguments construction)
# --------------------------------------------------------------------------------------------------------------


def _deepspeed_config(args: Any, accelerator: Any = None) -> dict | None:
    """The Trainer's DeepSpeed config: from ``--deepspeed`` (``args.hf_deepspeed_config``), else from accelerate's
    DeepSpeed plugin (``accelerate launch`` with a DeepSpeed config file). None without DeepSpeed."""
    config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
    if config is None and accelerator is not None:
        plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
        config = getattr(getattr(plugin, "hf_ds_config", None), "config", None)
    return config if isinstance(config, dict) else None


def deepspeed_config_names_anon(args: Any, accelerator: Any = None) -> bool:
    """Whether the Trainer's DeepSpeed config (see :func:`_deepspeed_config`) has an optimizer block naming Anon."""
    config = _deepspeed_config(args, accelerator)
    block = config.get("optimizer") if config is not None else None
    return isinstance(block, dict) and anon_name_for_config_type(block.get("type")) is not None


def reconcile_deepspeed_block(block: Any, args: Any) -> None:
    """Apply this module's rule to a DeepSpeed config's ``"optimizer"`` block and the Trainer's ``args``.

    Fills ``block["params"]`` in place. Called from the Trainer's DeepSpeed config processing, so a conflict stops
    the run when ``TrainingArguments`` is built, before a model is loaded.

    Raises:
        ValueError: ``--optim anon`` with a block of another type; ``--optim`` naming another optimizer with an Anon
            block; ``--optim_args`` without ``--optim anon``; a key set differently on both sides.
    """
    if not isinstance(block, dict):
        return
    given = anon_name_for_config_type(block.get("type"))
    named = _named(args)
    if given is None:
        if named is not None:
            raise ValueError(
                f'--optim {named.optim}, but the DeepSpeed config\'s optimizer block has "type": '
                f"{block.get('type')!r}: transformers builds the config's optimizer and ignores --optim. Either "
                'remove the "optimizer" block from the DeepSpeed config (the Trainer then builds '
                f'{named.optimizer_cls.__name__} with its decay/no-decay groups), or set "type": '
                f'"{named.config_type}" in it, or drop --optim {named.optim}.'
            )
        return
    if _names_another_optimizer(args):
        raise ValueError(
            f'--optim {_optim_name(args)} and the DeepSpeed config\'s optimizer block "type": "{given.config_type}" '
            f"both choose the optimizer; transformers would build the config's {given.optimizer_cls.__name__} and "
            f'ignore --optim. Either use --optim {given.optim} (or leave --optim out), or remove the "optimizer" '
            "block from the DeepSpeed config."
        )
    requested = _requested(args, f'the DeepSpeed config\'s optimizer block ("type": "{given.config_type}")', given)
    params = block.setdefault("params", {})
    if not isinstance(params, dict):
        return  # validate_anon_params reports it
    filled = _merge(
        params,
        requested,
        where="the DeepSpeed config's optimizer.params",
        ways_out='remove it from the config\'s optimizer.params or set it to "auto" there',
        fill_auto=True,
        optimizer_cls=given.optimizer_cls,
    )
    _log_filled(filled, "DeepSpeed optimizer.params")


# --------------------------------------------------------------------------------------------------------------
# Trainer(optimizers=...) and Trainer(optimizer_cls_and_kwargs=...) against --optim / --optim_args
# --------------------------------------------------------------------------------------------------------------


_MAX_WRAPPERS = 8


def wrapped(optimizer: Any) -> Any:
    """The optimizer ``optimizer`` wraps, else None.

    accelerate's ``AcceleratedOptimizer`` and DeepSpeed's ZeRO optimizers keep it in ``.optimizer``; BAdam's
    ``BlockOptimizer`` (LLaMA-Factory's ``use_badam``) in ``.base_optimizer``.
    """
    inner = getattr(optimizer, "optimizer", None)
    return inner if inner is not None else getattr(optimizer, "base_optimizer", None)


def find_anon(optimizer: Any) -> Anon | None:
    """The :class:`~anon_hf.Anon` inside ``optimizer``, following :func:`wrapped` through wrappers.

    Returns None when there is no Anon within a few levels.
    """
    for _ in range(_MAX_WRAPPERS):
        if optimizer is None or isinstance(optimizer, Anon):
            return optimizer
        optimizer = wrapped(optimizer)
    return None


def _check_optimizer_object(args: Any, optimizer: Any) -> None:
    anon = find_anon(optimizer)
    if anon is None:
        if _named(args) is not None:
            raise ValueError(
                f"optim={_named(args).optim!r}, but Trainer(optimizers=...) passes a {type(optimizer).__name__}, "
                f"which the Trainer uses instead. Either drop optim={_named(args).optim!r} (and optim_args), or pass "
                "an Anon (anon_hf.create_anon_optimizer(model, ...))."
            )
        return
    given = anon_name_for_class(type(anon))
    if _names_another_optimizer(args):
        raise ValueError(
            f"optim={_optim_name(args)!r}, but Trainer(optimizers=...) passes an {type(anon).__name__}, which the "
            f"Trainer uses instead. Either use optim={given.optim!r} (or leave optim out), or pass the optimizer you "
            "named."
        )
    for key, value in _requested(args, "the optimizer passed with Trainer(optimizers=...)", given).items():
        for index, group in enumerate(anon.param_groups):
            given_value = anon.verify_sync if key == "verify_sync" else group.get(key)
            if given_value != _normalized(key, value, given.optimizer_cls):
                raise _conflict(
                    key,
                    value,
                    given_value,
                    f"the {type(anon).__name__} passed with Trainer(optimizers=...) (param group {index}) has",
                    f"build the optimizer with {key}={value!r}",
                )


def _check_cls_and_kwargs(trainer: Any, args: Any) -> None:
    optimizer_cls, kwargs = trainer.optimizer_cls_and_kwargs
    given = anon_name_for_class(optimizer_cls)
    if given is None:
        if _named(args) is not None:
            raise ValueError(
                f"optim={_named(args).optim!r}, but Trainer(optimizer_cls_and_kwargs=...) names "
                f"{getattr(optimizer_cls, '__name__', optimizer_cls)}, which the Trainer uses instead. Either drop "
                f"optim={_named(args).optim!r} (and optim_args), or pass (anon_hf.Anon, kwargs)."
            )
        return
    if _names_another_optimizer(args):
        raise ValueError(
            f"optim={_optim_name(args)!r}, but Trainer(optimizer_cls_and_kwargs=...) names {optimizer_cls.__name__}, "
            f"which the Trainer uses instead. Either use optim={given.optim!r} (or leave optim out), or drop "
            "optimizer_cls_and_kwargs."
        )
    merged = dict(kwargs)
    filled = _merge(
        merged,
        _requested(args, "the class of Trainer(optimizer_cls_and_kwargs=...)", given),
        where="Trainer(optimizer_cls_and_kwargs=...) kwargs",
        ways_out="remove it from the optimizer_cls_and_kwargs kwargs",
        fill_auto=False,
        optimizer_cls=optimizer_cls,
    )
    if filled:
        trainer.optimizer_cls_and_kwargs = (optimizer_cls, merged)
        _log_filled(filled, "optimizer_cls_and_kwargs")


def _passes_anon(trainer: Any) -> bool:
    cls_and_kwargs = getattr(trainer, "optimizer_cls_and_kwargs", None) or (None, None)
    return find_anon(trainer.optimizer) is not None or anon_name_for_class(cls_and_kwargs[0]) is not None


def _check_against_deepspeed_block(trainer: Any, args: Any) -> None:
    config = _deepspeed_config(args, getattr(trainer, "accelerator", None))
    if config is None:
        return
    if find_anon(trainer.optimizer) is not None and "optimizer" not in config:
        # transformers' deepspeed_init sets trainer.optimizer = None, then builds from --optim (default: AdamW).
        raise ValueError(
            "Trainer(optimizers=...) passes an Anon, but under DeepSpeed the Trainer drops an optimizer passed that "
            "way and builds its own from --optim (AdamW unless --optim anon). Either pass "
            "optimizer_cls_and_kwargs=(anon_hf.Anon, kwargs) instead, or use --optim anon --optim_args ..., or name "
            'Anon in the DeepSpeed config\'s optimizer block ({"type": "Anon", "params": {...}}).'
        )
    block = config.get("optimizer")
    if not isinstance(block, dict) or not (_passes_anon(trainer) or anon_name_for_config_type(block.get("type"))):
        return
    passed = "optimizers" if trainer.optimizer is not None else "optimizer_cls_and_kwargs"
    raise ValueError(
        f'Trainer({passed}=...) and the DeepSpeed config\'s optimizer block ("type": {block.get("type")!r}) both '
        f"choose the optimizer; under DeepSpeed the Trainer builds the config's and drops the one passed. Either "
        f'remove the "optimizer" block from the DeepSpeed config, or drop {passed}=.'
    )


def check_trainer_routes(trainer: Any) -> None:
    """Apply this module's rule to a freshly built Trainer's ``optimizers=`` / ``optimizer_cls_and_kwargs``.

    Fills missing keys of ``optimizer_cls_and_kwargs`` from ``optim_args``. Raises ``ValueError`` as described in
    this module's docstring, before any optimizer is built or any step is taken.
    """
    args = getattr(trainer, "args", None)
    if args is None:
        return
    if getattr(trainer, "optimizer", None) is not None or getattr(trainer, "optimizer_cls_and_kwargs", None):
        _check_against_deepspeed_block(trainer, args)
    if getattr(trainer, "optimizer", None) is not None:
        _check_optimizer_object(args, trainer.optimizer)
    if getattr(trainer, "optimizer_cls_and_kwargs", None):
        _check_cls_and_kwargs(trainer, args)
