"""``--optim anon`` for the transformers ``Trainer``: enum member, optimizer handler, ``optim_args`` casting.

transformers has no public optimizer registry (notes §2): ``TrainingArguments.optim`` is converted with
``OptimizerNames(value)``, ``HfArgumentParser`` builds ``--optim``'s choices from the enum's members, and
``Trainer.get_optimizer_cls_and_kwargs`` dispatches through the private dict
``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``. So registration means:

* ``transformers.training_args``: add a real member ``OptimizerNames.ANON = "anon"`` (argparse choices,
  ``OptimizerNames("anon")``, ``to_json_string`` and unpickling of ``training_args.bin`` all go through the
  member tables), and check ``optim_args`` in ``TrainingArguments.__post_init__`` so a typo fails at argument
  parsing, before a model is loaded;
* ``transformers.trainer_optimizer``: put :func:`_get_anon_optimizer` into ``_OPTIMIZER_HANDLERS``;
* ``transformers.trainer``: add :class:`~anon_hf.integrations.trainer_callback.AnonCallback` to every Trainer
  whose optimizer is Anon and, only if the handler table was missing, wrap ``get_optimizer_cls_and_kwargs``.

Each ``on_*_imported`` function is a row of the table in ``_patches.py``, called with the module that was just
imported, and touches only that module; none of this module's top-level code imports transformers. A patch that
fails is logged there and raises :class:`~anon_hf.integrations._patches.PatchError` when ``optim="anon"`` is used.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import threading
import types
import typing
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

from .. import optimizer as _optimizer
from ..optimizer import Anon
from ..optimizer8bit import Anon8bit
from ._patches import PatchError, require, wrap_once
from .import_utils import SUPPORTED_VERSIONS

__all__ = [
    "OPTIM_NAME",
    "OPTIM_NAME_8BIT",
    "SUPPORTED_TRANSFORMERS",
    "get_anon_8bit_optimizer",
    "get_anon_optimizer",
    "optim_args_spec",
    "parse_optim_args",
    "register",
    "uses_anon",
]

logger = logging.getLogger(__name__)

OPTIM_NAME = "anon"
_ENUM_MEMBER = "ANON"
# `--optim anon_8bit`: Anon8bit (8-bit state), named like `adamw_8bit`; the same optim_args plus min_8bit_size.
OPTIM_NAME_8BIT = "anon_8bit"
_ENUM_MEMBER_8BIT = "ANON_8BIT"
# The range whose private optimizer plumbing this module was written against (see make test-compat).
SUPPORTED_TRANSFORMERS = SUPPORTED_VERSIONS["transformers"]

_lock = threading.RLock()
# What the import hooks managed to install; register() and Trainer construction report what is missing.
_status: dict[str, str | None] = {"enum": None, "handler": None, "trainer": None}
_registered = False


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
        "--adam_epsilon is not used by Anon (its eps sits inside the power: set eps=... here)."
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


def _validate(group: dict[str, Any]) -> None:
    # The class's own validator, on a group as the constructor builds it (dtype names mapped first). Building a
    # throwaway optimizer instead would draw an id from the cross-rank refresh check's counter on this rank only.
    group = {
        **group,
        **{name: _optimizer._state_dtype(group.get(name)) for name in ("precond_dtype", "moments_dtype")},
    }
    _optimizer._validate_hyperparameters(group)


def _check_with_the_class(kwargs: dict[str, Any], raw: dict[str, str], optimizer_cls: type, optim_name: str) -> None:
    """Validate with the class's validator, each key alone (so the error names it), then all together."""
    defaults = _signature_defaults(optimizer_cls)
    for key, value in kwargs.items():
        try:
            _validate({**defaults, key: value})
        except (ValueError, TypeError) as err:
            raise _optim_args_error(f"{key}={raw[key]!r} is not valid ({err})", optimizer_cls, optim_name) from None
    try:
        _validate({**defaults, **kwargs})
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
    checked by the validator the constructor runs (``anon_hf.optimizer._validate_hyperparameters``). The result of one text is kept, so the check at argument parsing and the Trainer's
    handler parse it once per process.

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


# --------------------------------------------------------------------------------------------------------------
# The handler, in the shape of transformers' `_get_schedule_free_optimizer`
# --------------------------------------------------------------------------------------------------------------


def _default_adam_epsilon(args: Any) -> float | None:
    field = getattr(type(args), "__dataclass_fields__", {}).get("adam_epsilon")
    return None if field is None else field.default


def get_anon_optimizer(ctx: Any) -> tuple[type, dict[str, Any]]:
    """Get the Anon optimizer (``--optim anon``) from an ``OptimizerContext``.

    ``lr`` comes from ``--learning_rate``, ``betas`` from ``--adam_beta1``/``--adam_beta2`` and
    ``weight_decay`` from ``--weight_decay``; the Trainer's decay/no-decay param groups are kept (the bias and
    norm group carries ``weight_decay=0``). Anon's own hyperparameters come from ``--optim_args``, see
    :func:`parse_optim_args`. ``--adam_epsilon`` is deliberately not mapped to ``eps``: Anon adds eps inside the
    power (default 1e-16), Adam adds it to the square root (default 1e-8). ``fused`` defaults to ``True`` here
    (``fused=false`` or ``foreach=true`` in ``--optim_args`` turn it off), as the Trainer's default AdamW is fused.
    """
    return Anon, _anon_kwargs(ctx, Anon, OPTIM_NAME)


def get_anon_8bit_optimizer(ctx: Any) -> tuple[type, dict[str, Any]]:
    """Get :class:`~anon_hf.Anon8bit` (``--optim anon_8bit``): the arguments of ``--optim anon``, 8-bit state."""
    return Anon8bit, _anon_kwargs(ctx, Anon8bit, OPTIM_NAME_8BIT)


def _anon_kwargs(ctx: Any, optimizer_cls: type, optim_name: str) -> dict[str, Any]:
    """The keyword arguments of ``optimizer_cls`` from an ``OptimizerContext`` (see :func:`get_anon_optimizer`)."""
    require(("transformers",), f"optim={optim_name!r} in the Trainer", _WAY_OUT)
    anon_kwargs = parse_optim_args(ctx.optim_args, optimizer_cls, optim_name)
    default_eps = _default_adam_epsilon(ctx.args)
    if default_eps is not None and ctx.args.adam_epsilon != default_eps:
        logger.warning(
            "adam_epsilon=%g is ignored by optim='anon': Anon's eps sits inside the power and is not Adam's eps. "
            "Set it with --optim_args eps=... (default 1e-16).",
            ctx.args.adam_epsilon,
        )
    ctx.optimizer_kwargs.update({"betas": ctx.adam_kwargs["betas"], "weight_decay": ctx.args.weight_decay})
    ctx.optimizer_kwargs.update(anon_kwargs)
    if "fused" not in anon_kwargs and not anon_kwargs.get("foreach"):
        # As the Trainer's default AdamW is fused: the C++ kernel on CPU, compiled graphs on CUDA, foreach where
        # neither runs (one log line says why). `--optim_args fused=false` opts out; the class keeps torch's None.
        ctx.optimizer_kwargs["fused"] = True
    return ctx.optimizer_kwargs


# transformers' naming, for a handler table that follows its conventions.
_get_anon_optimizer = get_anon_optimizer
_get_anon_8bit_optimizer = get_anon_8bit_optimizer


def uses_anon(trainer: Any) -> bool:
    """Whether ``trainer`` will train with Anon: ``optim="anon"``, an Anon passed in by the user (``optimizers=``,
    ``optimizer_cls_and_kwargs``), or a DeepSpeed config whose optimizer block is Anon."""
    from .routes import deepspeed_config_names_anon
    from .trainer_callback import find_anon

    if _is_anon_name(getattr(getattr(trainer, "args", None), "optim", None)):
        return True
    if find_anon(getattr(trainer, "optimizer", None)) is not None:
        return True
    if deepspeed_config_names_anon(getattr(trainer, "args", None), getattr(trainer, "accelerator", None)):
        return True
    cls_and_kwargs = getattr(trainer, "optimizer_cls_and_kwargs", None)
    return bool(cls_and_kwargs) and isinstance(cls_and_kwargs[0], type) and issubclass(cls_and_kwargs[0], Anon)


def _is_anon_name(optim: Any) -> bool:
    return getattr(optim, "value", optim) in (OPTIM_NAME, OPTIM_NAME_8BIT)


def _optimizer_for(optim: Any) -> tuple[type, str]:
    """The class and ``--optim`` name an Anon ``optim`` value stands for."""
    eight_bit = getattr(optim, "value", optim) == OPTIM_NAME_8BIT
    return (Anon8bit, OPTIM_NAME_8BIT) if eight_bit else (Anon, OPTIM_NAME)


# --------------------------------------------------------------------------------------------------------------
# Patching the modules as they are imported
# --------------------------------------------------------------------------------------------------------------


def _add_enum_member(enum_cls: Any, name: str, value: str) -> Any:
    """Add a real member ``name = value`` to an existing ``str`` Enum; return the member (idempotent).

    A real member (not just an entry in ``_value2member_map_``) is what iteration, ``HfArgumentParser``'s
    ``choices`` and ``Enum.__reduce_ex__`` see. Steps follow ``enum._proto_member.__set_name__`` (3.11+).
    """
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    if name in enum_cls._member_map_:
        raise RuntimeError(f"{enum_cls.__name__}.{name} already exists with another value")
    new_member = getattr(enum_cls, "_new_member_", None)
    if new_member is None:  # Python 3.10
        member = enum_cls._member_type_.__new__(enum_cls, value)
    elif getattr(enum_cls, "_use_args_", True):
        member = new_member(enum_cls, value)
    else:
        member = new_member(enum_cls)
    if not hasattr(member, "_value_"):
        member._value_ = value if enum_cls._member_type_ is object else enum_cls._member_type_(value)
    member._name_ = name
    member.__objclass__ = enum_cls
    member.__init__(value)
    member._sort_order_ = len(enum_cls._member_names_)
    # EnumType.__setattr__ refuses names already in _member_map_, so the class attribute goes in first.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    return member


_WAY_OUT = (
    " Or build Anon yourself and pass it: Trainer(optimizers=(anon_hf.create_anon_optimizer(model, lr=...), None))."
)


def _require_registered(use: str) -> None:
    """Raise :class:`PatchError` for ``use`` unless every transformers patch applied and a handler is installed."""
    require(("transformers",), use, _WAY_OUT)
    if _status["enum"] is None or _status["handler"] is None:
        raise PatchError(
            f"{use} needs optim='anon' registered with transformers, and this transformers has neither "
            "transformers.trainer_optimizer._OPTIMIZER_HANDLERS nor Trainer.get_optimizer_cls_and_kwargs (or was "
            f"not imported yet). anon_hf supports transformers{SUPPORTED_TRANSFORMERS}: pip install "
            f"'transformers{SUPPORTED_TRANSFORMERS}'.{_WAY_OUT}"
        )


def on_training_args_imported(module: ModuleType) -> None:
    """``transformers.training_args``: add ``OptimizerNames.ANON`` and the early ``optim_args`` check."""

    def make_wrapper(original):
        def __post_init__(self, *args, **kwargs):
            if _is_anon_name(self.optim):
                require(("transformers",), "TrainingArguments(optim='anon')", _WAY_OUT)
            original(self, *args, **kwargs)
            if _is_anon_name(self.optim):
                parse_optim_args(self.optim_args, *_optimizer_for(self.optim))

        return __post_init__

    # The check goes in first, so that a failure to add the member is reported by it at use.
    wrap_once(module.TrainingArguments, "__post_init__", make_wrapper)
    member = _add_enum_member(module.OptimizerNames, _ENUM_MEMBER, OPTIM_NAME)
    _add_enum_member(module.OptimizerNames, _ENUM_MEMBER_8BIT, OPTIM_NAME_8BIT)
    _status["enum"] = f"{module.__name__}.OptimizerNames.{member.name}"


def on_trainer_optimizer_imported(module: ModuleType) -> None:
    """``transformers.trainer_optimizer``: add the handler to ``_OPTIMIZER_HANDLERS`` if that table exists."""
    handlers = getattr(module, "_OPTIMIZER_HANDLERS", None)
    names = getattr(module, "OptimizerNames", None)
    member = getattr(names, _ENUM_MEMBER, None)
    if not isinstance(handlers, dict) or member is None:
        logger.info("transformers.trainer_optimizer has no _OPTIMIZER_HANDLERS; anon_hf will wrap the Trainer.")
        return
    handlers[member] = _get_anon_optimizer
    handlers[getattr(names, _ENUM_MEMBER_8BIT)] = _get_anon_8bit_optimizer
    _status["handler"] = f"{module.__name__}._OPTIMIZER_HANDLERS"


def _wrap_get_optimizer_cls_and_kwargs(trainer_cls: type) -> bool:
    """Fallback: route ``optim="anon"`` around a missing handler table. False if the method is not there."""
    if not isinstance(inspect.getattr_static(trainer_cls, "get_optimizer_cls_and_kwargs", None), staticmethod):
        return False

    def make_wrapper(original):
        def get_optimizer_cls_and_kwargs(args, model=None):
            if not _is_anon_name(args.optim):
                return original(args, model)
            ctx = SimpleNamespace(
                args=args,
                model=model,
                optimizer_kwargs={"lr": args.learning_rate},
                adam_kwargs={"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon},
                optim_args=args.optim_args or {},
            )
            eight_bit = _optimizer_for(args.optim)[0] is Anon8bit
            return (_get_anon_8bit_optimizer if eight_bit else _get_anon_optimizer)(ctx)

        return get_optimizer_cls_and_kwargs

    wrap_once(trainer_cls, "get_optimizer_cls_and_kwargs", make_wrapper)
    return True


def _after_trainer_init(trainer: Any) -> None:
    from .routes import check_trainer_routes

    check_trainer_routes(trainer)  # no silent choice between optim= and optimizers= / optimizer_cls_and_kwargs
    if not uses_anon(trainer):
        return
    if _is_anon_name(getattr(trainer.args, "optim", None)):
        _require_registered("Trainer(args=TrainingArguments(optim='anon'))")
    from .trainer_callback import AnonCallback, add_anon_callback

    if not any(isinstance(callback, AnonCallback) for callback in trainer.callback_handler.callbacks):
        add_anon_callback(trainer)


def on_trainer_imported(module: ModuleType) -> None:
    """``transformers.trainer``: auto-add the callback; wrap the optimizer lookup if the handler table is gone."""
    trainer_cls = module.Trainer

    def make_wrapper(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            _after_trainer_init(self)

        return __init__

    wrap_once(trainer_cls, "__init__", make_wrapper)
    _status["trainer"] = f"{module.__name__}.Trainer"
    if _status["handler"] is None and _wrap_get_optimizer_cls_and_kwargs(trainer_cls):
        _status["handler"] = f"{module.__name__}.Trainer.get_optimizer_cls_and_kwargs (wrapped)"


def register() -> None:
    """Import transformers' training modules now, so the hooks above run, and raise if one could not patch.

    Idempotent and thread-safe; after the first success it returns at once. Does nothing when transformers is
    not installed. ``transformers.trainer`` (the slow import, ~10 s) is imported only when the handler table
    was missing and the fallback must be installed; otherwise its patch waits for the user's own import.

    Raises:
        PatchError: (a ``RuntimeError``) this transformers cannot take ``optim="anon"``; the message names what
            failed and the supported range.
    """
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        from .import_utils import is_transformers_available

        if not is_transformers_available():
            return
        importlib.import_module("transformers.training_args")
        try:
            importlib.import_module("transformers.trainer_optimizer")
        except ImportError:
            pass  # a layout without this module: the Trainer fallback below takes over
        if _status["handler"] is None:
            importlib.import_module("transformers.trainer")
        _require_registered("anon_hf.register()")
        _registered = True
