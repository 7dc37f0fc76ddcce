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
from .transformers import OPTIM_NAME, parse_optim_args

__all__ = ["check_trainer_routes", "deepspeed_config_names_anon", "reconcile_deepspeed_block"]

logger = logging.getLogger(__name__)

_AUTO = "auto"


def _optim_name(args: Any) -> str:
    optim = getattr(args, "optim", None)
    return str(getattr(optim, "value", optim))


def _default_optim_name(args: Any) -> str | None:
    field = getattr(type(args), "__dataclass_fields__", {}).get("optim")
    return None if field is None else str(getattr(field.default, "value", field.default))


def _names_another_optimizer(args: Any) -> bool:
    """``--optim`` names an optimizer other than Anon and other than transformers' default (which nobody typed)."""
    name = _optim_name(args)
    return name != OPTIM_NAME and name != _default_optim_name(args)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("0", "") and os.environ.get("LOCAL_RANK", "0") in ("0", "")


def _normalized(key: str, value: Any) -> Any:
    """``value`` as an Anon built with it stores it (lists become tuples, "bf16" a torch.dtype, ...)."""
    probe = Anon([torch.zeros(1, requires_grad=True)], **{key: value})
    return probe.verify_sync if key == "verify_sync" else probe.defaults[key]


def _requested(args: Any, elsewhere: str) -> dict[str, Any]:
    """The typed ``--optim_args`` that apply to an Anon built ``elsewhere``; raises when they would be ignored."""
    optim_args = getattr(args, "optim_args", None)
    if _optim_name(args) == OPTIM_NAME:
        return parse_optim_args(optim_args)
    if optim_args:
        raise ValueError(
            f"--optim_args {optim_args!r} would be ignored: the optimizer is the Anon from {elsewhere}, and "
            f"--optim is {_optim_name(args)!r}, not 'anon'. Add --optim anon to apply them to that Anon, or drop "
            "--optim_args."
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
    given: dict[str, Any], requested: Mapping[str, Any], *, where: str, ways_out: str, fill_auto: bool
) -> dict[str, Any]:
    """Fill ``given`` in place from ``requested`` (missing keys, and "auto" ones if ``fill_auto``); raise on a key
    both set differently. Returns the filled keys."""
    filled: dict[str, Any] = {}
    for key, value in requested.items():
        if key not in given or (fill_auto and given[key] == _AUTO):
            given[key] = filled[key] = value
        elif _normalized(key, given[key]) != _normalized(key, value):
            raise _conflict(key, value, given[key], where, ways_out.format(key=key))
    return filled


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed: the config's optimizer block against --optim / --optim_args (at TrainingArguments construction)
# --------------------------------------------------------------------------------------------------------------


def _is_anon_type(name: object) -> bool:
    return isinstance(name, str) and name.lower() == Anon.__name__.lower()


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
    return isinstance(block, dict) and _is_anon_type(block.get("type"))


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
    if not _is_anon_type(block.get("type")):
        if _optim_name(args) == OPTIM_NAME:
            raise ValueError(
                f'--optim anon, but the DeepSpeed config\'s optimizer block has "type": {block.get("type")!r}: '
                'transformers builds the config\'s optimizer and ignores --optim. Either remove the "optimizer" '
                "block from the DeepSpeed config (the Trainer then builds Anon with its decay/no-decay groups), or "
                'set "type": "Anon" in it, or drop --optim anon.'
            )
        return
    if _names_another_optimizer(args):
        raise ValueError(
            f'--optim {_optim_name(args)} and the DeepSpeed config\'s optimizer block "type": "Anon" both choose '
            "the optimizer; transformers would build the config's Anon and ignore --optim. Either use --optim anon "
            '(or leave --optim out), or remove the "optimizer" block from the DeepSpeed config.'
        )
    requested = _requested(args, 'the DeepSpeed config\'s optimizer block ("type": "Anon")')
    params = block.setdefault("params", {})
    if not isinstance(params, dict):
        return  # validate_anon_params reports it
    filled = _merge(
        params,
        requested,
        where="the DeepSpeed config's optimizer.params",
        ways_out='remove it from the config\'s optimizer.params or set it to "auto" there',
        fill_auto=True,
    )
    _log_filled(filled, "DeepSpeed optimizer.params")


# --------------------------------------------------------------------------------------------------------------
# Trainer(optimizers=...) and Trainer(optimizer_cls_and_kwargs=...) against --optim / --optim_args
# --------------------------------------------------------------------------------------------------------------


def _find_anon(optimizer: Any) -> Anon | None:
    from .trainer_callback import find_anon

    return find_anon(optimizer)


def _check_optimizer_object(args: Any, optimizer: Any) -> None:
    anon = _find_anon(optimizer)
    if anon is None:
        if _optim_name(args) == OPTIM_NAME:
            raise ValueError(
                f"optim='anon', but Trainer(optimizers=...) passes a {type(optimizer).__name__}, which the Trainer "
                "uses instead. Either drop optim='anon' (and optim_args), or pass an Anon "
                "(anon_hf.create_anon_optimizer(model, ...))."
            )
        return
    if _names_another_optimizer(args):
        raise ValueError(
            f"optim={_optim_name(args)!r}, but Trainer(optimizers=...) passes an Anon, which the Trainer uses "
            "instead. Either use optim='anon' (or leave optim out), or pass the optimizer you named."
        )
    for key, value in _requested(args, "Trainer(optimizers=...)").items():
        for index, group in enumerate(anon.param_groups):
            given = anon.verify_sync if key == "verify_sync" else group.get(key)
            if given != _normalized(key, value):
                raise _conflict(
                    key,
                    value,
                    given,
                    f"the Anon passed with Trainer(optimizers=...) (param group {index}) has",
                    f"build the optimizer with {key}={value!r}",
                )


def _check_cls_and_kwargs(trainer: Any, args: Any) -> None:
    optimizer_cls, kwargs = trainer.optimizer_cls_and_kwargs
    is_anon = isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Anon)
    if not is_anon:
        if _optim_name(args) == OPTIM_NAME:
            raise ValueError(
                f"optim='anon', but Trainer(optimizer_cls_and_kwargs=...) names {getattr(optimizer_cls, '__name__', optimizer_cls)}, "
                "which the Trainer uses instead. Either drop optim='anon' (and optim_args), or pass "
                "(anon_hf.Anon, kwargs)."
            )
        return
    if _names_another_optimizer(args):
        raise ValueError(
            f"optim={_optim_name(args)!r}, but Trainer(optimizer_cls_and_kwargs=...) names Anon, which the Trainer "
            "uses instead. Either use optim='anon' (or leave optim out), or drop optimizer_cls_and_kwargs."
        )
    merged = dict(kwargs)
    filled = _merge(
        merged,
        _requested(args, "Trainer(optimizer_cls_and_kwargs=...)"),
        where="Trainer(optimizer_cls_and_kwargs=...) kwargs",
        ways_out="remove it from the optimizer_cls_and_kwargs kwargs",
        fill_auto=False,
    )
    if filled:
        trainer.optimizer_cls_and_kwargs = (optimizer_cls, merged)
        _log_filled(filled, "optimizer_cls_and_kwargs")


def _check_against_deepspeed_block(trainer: Any, args: Any) -> None:
    config = _deepspeed_config(args, getattr(trainer, "accelerator", None))
    if config is None:
        return
    if _find_anon(trainer.optimizer) is not None and "optimizer" not in config:
        # transformers' deepspeed_init sets trainer.optimizer = None, then builds from --optim (default: AdamW).
        raise ValueError(
            "Trainer(optimizers=...) passes an Anon, but under DeepSpeed the Trainer drops an optimizer passed that "
            "way and builds its own from --optim (AdamW unless --optim anon). Either pass "
            "optimizer_cls_and_kwargs=(anon_hf.Anon, kwargs) instead, or use --optim anon --optim_args ..., or name "
            'Anon in the DeepSpeed config\'s optimizer block ({"type": "Anon", "params": {...}}).'
        )
    block = config.get("optimizer")
    cls_and_kwargs = getattr(trainer, "optimizer_cls_and_kwargs", None) or (None, None)
    passed_anon = _find_anon(trainer.optimizer) is not None or (
        isinstance(cls_and_kwargs[0], type) and issubclass(cls_and_kwargs[0], Anon)
    )
    if not isinstance(block, dict) or not (passed_anon or _is_anon_type(block.get("type"))):
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
