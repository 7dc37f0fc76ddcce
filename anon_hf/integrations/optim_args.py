"""What a user writes to ask for Anon: the optimizer's names on every route, and ``optim_args`` turned into keywords.

One table, :data:`ANON_NAMES`, says which names mean which class: ``--optim anon`` / ``"type": "Anon"`` mean
:class:`~anon_hf.Anon`, ``--optim anon_8bit`` / ``"type": "Anon8bit"`` mean :class:`~anon_hf.Anon8bit`. Every
route (``--optim``, a DeepSpeed config's optimizer block, ``Trainer(optimizers=...)``,
``optimizer_cls_and_kwargs``) and the check that the optimizer which trains is the one asked for read it.

:func:`parse_optim_args` turns ``"gamma=1.1,eps=1e-12"`` into the keyword arguments of the class, typed by its
signature and checked by its own validator. This module imports neither transformers nor the other integration
modules, so ``transformers.py``, ``routes.py`` and ``deepspeed.py`` all build on it.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import hyper
from .. import optimizer8bit as _optimizer8bit
from ..optimizer import Anon
from ..optimizer8bit import Anon8bit

__all__ = [
    "ANON_NAMES",
    "OPTIM_NAME",
    "OPTIM_NAME_8BIT",
    "AnonName",
    "anon_name_for_class",
    "anon_name_for_config_type",
    "anon_name_for_optim",
    "optim_args_spec",
    "parse_optim_args",
]


@dataclass(frozen=True)
class AnonName:
    """One optimizer of anon-hf and the names it goes by."""

    optim: str  # TrainingArguments.optim / --optim
    config_type: str  # a DeepSpeed config's "optimizer": {"type": ...}, looked up on torch.optim case-sensitively
    optimizer_cls: type  # the class built


# Most specific class first, so that anon_name_for_class finds Anon8bit before its parent Anon.
ANON_NAMES: tuple[AnonName, ...] = (
    AnonName("anon_8bit", "Anon8bit", Anon8bit),  # named like adamw_8bit: the same update, 8-bit state
    AnonName("anon", "Anon", Anon),
)
OPTIM_NAME = "anon"
OPTIM_NAME_8BIT = "anon_8bit"


def anon_name_for_optim(optim: Any) -> AnonName | None:
    """The entry whose ``--optim`` name is ``optim`` (a string or an ``OptimizerNames`` member), else None."""
    value = getattr(optim, "value", optim)
    return next((name for name in ANON_NAMES if name.optim == value), None)


def anon_name_for_config_type(config_type: Any) -> AnonName | None:
    """The entry a DeepSpeed optimizer block's ``"type"`` names, in any case (the spelling is checked elsewhere)."""
    if not isinstance(config_type, str):
        return None
    return next((name for name in ANON_NAMES if name.config_type.lower() == config_type.lower()), None)


def anon_name_for_class(optimizer_cls: Any) -> AnonName | None:
    """The entry of the most specific anon-hf class ``optimizer_cls`` is or derives from, else None."""
    if not isinstance(optimizer_cls, type):
        return None
    return next((name for name in ANON_NAMES if issubclass(optimizer_cls, name.optimizer_cls)), None)


# --------------------------------------------------------------------------------------------------------------
# optim_args: text turned into the types of Anon's signature; the class itself checks the ranges
# --------------------------------------------------------------------------------------------------------------

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null", "auto", "")
_NONE_TYPE = type(None)

# Keys that belong to TrainingArguments: point to the flag instead of accepting a second way to set them.
_FROM_TRAINING_ARGS = {
    "lr": "--learning_rate",
    "learning_rate": "--learning_rate",
    "weight_decay": "--weight_decay",
    "betas": "--adam_beta1 / --adam_beta2",
    "beta1": "--adam_beta1",
    "beta2": "--adam_beta2",
}


def _union_members(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected true or false")


def _to_pair(text: str, hint: Any) -> tuple:
    # transformers splits optim_args on "," before handlers see them, so a pair is written LO:HI.
    element_hints = typing.get_args(hint)
    parts = text.split(":")
    if len(element_hints) != 2 or len(parts) != 2:
        raise ValueError("expected LO:HI, e.g. -1:1, 0: or :1 (an empty side is unbounded)")
    return tuple(_from_text(part, element) for part, element in zip(parts, element_hints, strict=True))


def _member_converter(member: Any) -> tuple[int, Callable[[str], Any]] | None:
    """(precedence, converter) for one member of a type hint; None for a type text cannot give (e.g. Tensor)."""
    origin = typing.get_origin(member)
    if member is bool:
        return 0, _to_bool
    if member is int:
        return 1, int
    if member is float:
        return 2, float
    if origin is tuple:
        return 3, lambda text: _to_pair(text, member)
    if origin is typing.Literal:
        return 4, lambda text: _to_choice(text, typing.get_args(member))
    if member is str:
        return 9, str
    return None


def _to_choice(text: str, choices: tuple) -> Any:
    by_text = {str(choice): choice for choice in choices}
    if text not in by_text:
        raise ValueError(f"expected one of {', '.join(by_text)}")
    return by_text[text]


def _from_text(text: str, hint: Any) -> Any:
    """Turn ``text`` into a value of type ``hint`` (bool, int, float, a LO:HI pair, a Literal, str, or a union).

    Members are tried from the most to the least specific (bool, int, float, pair, Literal, str), so
    ``refresh=4`` gives 4 and ``refresh=pow2`` gives "pow2". Ranges are not checked here.
    """
    members = _union_members(hint)
    if _NONE_TYPE in members and text.lower() in _NONE:
        return None
    converters = sorted(filter(None, map(_member_converter, members)), key=lambda item: item[0])
    errors: list[ValueError] = []
    for _, convert in converters:
        try:
            return convert(text)
        except ValueError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]  # one type: its own words
    raise ValueError(f"cannot be read as {_describe(hint)}: {'; '.join(dict.fromkeys(map(str, errors)))}")


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "integer", float: "float", str: "name", _NONE_TYPE: "none"}
    parts = []
    for member in _union_members(hint):
        if typing.get_origin(member) is tuple:
            sides = [arg for arg in _union_members(typing.get_args(member)[0]) if arg is not _NONE_TYPE]
            parts.append(f"LO:HI of {_describe(sides[0])} (a side may be empty)")
        elif typing.get_origin(member) is typing.Literal:
            parts.append(" or ".join(map(str, typing.get_args(member))))
        elif member in names:
            parts.append(names[member])
    if parts[:1] == ["true or false"] and "none" in parts:
        return "true, false or none"
    return ", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else "".join(parts)


def _default_text(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ":".join("" if part is None else str(part) for part in value)
    return str(value)


@functools.cache
def optim_args_spec(optimizer_cls: type = Anon) -> dict[str, tuple[Any, str]]:
    """The keys ``optim_args`` accepts for ``optimizer_cls``: key -> (type hint, allowed text for errors and docs).

    Read from the signature of ``optimizer_cls.__init__``: every keyword argument except ``params`` and the ones
    TrainingArguments sets (lr, betas, weight_decay), typed by its annotation (or by its default's type), so a
    hyperparameter added to the class is accepted here with no edit.
    """
    try:
        hints = typing.get_type_hints(optimizer_cls.__init__)
    except Exception:  # an annotation that cannot be evaluated: fall back to the defaults' types
        hints = {}
    spec = {}
    for name, parameter in inspect.signature(optimizer_cls.__init__).parameters.items():
        if name in ("self", "params") or name in _FROM_TRAINING_ARGS or parameter.default is inspect.Parameter.empty:
            continue
        hint = hints.get(name, type(parameter.default))
        if _describe(hint):
            spec[name] = (hint, f"{_describe(hint)} (default {_default_text(parameter.default)})")
    return spec


def _valid_keys_text(optimizer_cls: type) -> str:
    return "; ".join(f"{key}: {allowed}" for key, (_, allowed) in optim_args_spec(optimizer_cls).items())


def _optim_args_error(message: str, optimizer_cls: type = Anon, optim_name: str = "anon") -> ValueError:
    return ValueError(
        f"Invalid optim_args for optim={optim_name!r}: {message}. Valid keys: {_valid_keys_text(optimizer_cls)}. "
        "lr, weight_decay and betas come from --learning_rate, --weight_decay, --adam_beta1/--adam_beta2; "
        "--adam_epsilon is not used by Anon (its eps sits inside the power: set eps=... here). "
        "See docs/trainer.md#optim_args."
    )


def _split_optim_args(text: str) -> dict[str, str]:
    """Split ``"a=1,b=2"`` as transformers' ``_parse_optim_args`` does, with a clear error for a bad item."""
    pairs: dict[str, str] = {}
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        if item.count("=") != 1:
            raise _optim_args_error(f"{item!r} is not of the form key=value")
        key, value = item.split("=")
        pairs[key] = value
    return pairs


def _signature_defaults(optimizer_cls: type) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    for klass in (Anon, optimizer_cls):  # a subclass may take its parent's keywords through **kwargs
        for name, parameter in inspect.signature(klass.__init__).parameters.items():
            if parameter.default is not inspect.Parameter.empty:
                defaults[name] = parameter.default
    return defaults


def _validate(group: dict[str, Any], optimizer_cls: type) -> None:
    # The class's own validator, on a group as the constructor builds it (dtype names mapped first). Building a
    # throwaway optimizer instead would draw an id from the cross-rank refresh check's counter on this rank only.
    group = {
        **group,
        **{name: hyper.state_dtype(group.get(name)) for name in ("precond_dtype", "moments_dtype")},
    }
    hyper.validate(group)
    if issubclass(optimizer_cls, Anon8bit):
        _optimizer8bit._validate_min_8bit_size(group.get("min_8bit_size", 1))


def _check_with_the_class(kwargs: dict[str, Any], raw: dict[str, str], optimizer_cls: type, optim_name: str) -> None:
    """Validate with the class's validator, each key alone (so the error names it), then all together."""
    defaults = _signature_defaults(optimizer_cls)
    for key, value in kwargs.items():
        try:
            _validate({**defaults, key: value}, optimizer_cls)
        except (ValueError, TypeError) as err:
            raise _optim_args_error(f"{key}={raw[key]!r} is not valid ({err})", optimizer_cls, optim_name) from None
    try:
        _validate({**defaults, **kwargs}, optimizer_cls)
    except (ValueError, TypeError, RuntimeError) as err:  # keys that contradict each other, e.g. fused and foreach
        raise _optim_args_error(f"{', '.join(kwargs)} do not go together ({err})", optimizer_cls, optim_name) from None


@functools.lru_cache(maxsize=64)
def _parse(items: tuple[tuple[str, str], ...], optimizer_cls: type, optim_name: str) -> dict[str, Any]:
    raw = dict(items)
    spec = optim_args_spec(optimizer_cls)
    kwargs: dict[str, Any] = {}
    for key, text in raw.items():
        if key in _FROM_TRAINING_ARGS:
            message = f"{key!r} is set with {_FROM_TRAINING_ARGS[key]}, not in optim_args"
            raise _optim_args_error(message, optimizer_cls, optim_name)
        if key not in spec:
            raise _optim_args_error(f"unknown key {key!r}", optimizer_cls, optim_name)
        hint, allowed = spec[key]
        try:
            kwargs[key] = _from_text(text, hint)
        except ValueError as err:
            message = f"{key}={text!r} is not valid ({err}; allowed: {allowed})"
            raise _optim_args_error(message, optimizer_cls, optim_name) from None
    _check_with_the_class(kwargs, raw, optimizer_cls, optim_name)
    return kwargs


def parse_optim_args(
    optim_args: dict[str, str] | str | None, optimizer_cls: type = Anon, optim_name: str = OPTIM_NAME
) -> dict[str, Any]:
    """Turn ``optim_args`` into keyword arguments for ``optimizer_cls``, checked by Anon's own validator.

    Keys and types come from ``optimizer_cls.__init__``'s signature (:func:`optim_args_spec`); the ranges are
    checked by the validator the constructor runs (``anon_hf.hyper.validate``). The result of one text is kept,
    so the check at argument parsing and the Trainer's handler parse it once per process.

    Args:
        optim_args: the ``"key=value,key=value"`` string of ``TrainingArguments.optim_args``, or the dict of
            strings transformers parses it into. ``None`` or empty gives ``{}``.
        optimizer_cls: the class the keyword arguments are for (default: :class:`~anon_hf.Anon`).
        optim_name: the ``--optim`` name, for the error message (default: ``"anon"``).

    Raises:
        ValueError: an unknown key or a bad value, naming it, its text and the allowed values, and listing every
            valid key with its type and default; raised before any optimizer exists.
    """
    if not optim_args:
        return {}
    raw = _split_optim_args(optim_args) if isinstance(optim_args, str) else dict(optim_args)
    items = tuple((str(key), str(value)) for key, value in raw.items())
    return dict(_parse(items, optimizer_cls, optim_name))
