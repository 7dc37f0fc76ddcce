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

Each ``on_*_imported`` function is called by ``anon_hf``'s post-import hooks with the module that was just
imported and touches only that module; none of this module's top-level code imports transformers.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import threading
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

from ..optimizer import _STATE_DTYPE_NAMES, Anon
from ..optimizer8bit import Anon8bit

__all__ = [
    "OPTIM_NAME",
    "OPTIM_NAME_8BIT",
    "SUPPORTED_TRANSFORMERS",
    "get_anon_8bit_optimizer",
    "get_anon_optimizer",
    "parse_optim_args",
    "register",
    "uses_anon",
]

logger = logging.getLogger(__name__)

OPTIM_NAME = "anon"
_ENUM_MEMBER = "ANON"
# `--optim anon_8bit`: Anon8bit (8-bit state), named like `adamw_8bit`; same optim_args.
OPTIM_NAME_8BIT = "anon_8bit"
_ENUM_MEMBER_8BIT = "ANON_8BIT"
# The range whose private optimizer plumbing this module was written against (tested: 5.24).
SUPPORTED_TRANSFORMERS = ">=5.0,<6"

_lock = threading.RLock()
# What the import hooks managed to install; register() and Trainer construction report what is missing.
_status: dict[str, str | None] = {"enum": None, "handler": None, "trainer": None}
_errors: dict[str, str] = {}
_registered = False


# --------------------------------------------------------------------------------------------------------------
# optim_args: typed, validated, with every valid key in the error
# --------------------------------------------------------------------------------------------------------------

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null", "auto", "")


def _to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected true or false")


def _to_optional_bool(text: str) -> bool | None:
    return None if text.lower() in _NONE else _to_bool(text)


def _to_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _to_positive_float(text: str) -> float:
    value = _to_float(text)
    if value <= 0.0:
        raise ValueError("expected a number > 0")
    return value


def _to_unit_interval(text: str) -> float:
    value = _to_float(text)
    if not 0.0 <= value < 1.0:
        raise ValueError("expected a number in [0, 1)")
    return value


def _to_refresh(text: str) -> Any:
    if text in ("pow2", "every"):
        return text
    value = int(text)
    if value < 1:
        raise ValueError("expected pow2, every or an integer >= 1")
    return value


def _to_bounds(text: str) -> tuple[float | None, float | None] | None:
    # transformers splits optim_args on "," before handlers see them, so a pair is written LO:HI.
    if text.lower() in _NONE:
        return None
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError("expected LO:HI, e.g. -1:1, 0: or :1 (an empty side is unbounded)")
    lo, hi = (None if part.lower() in _NONE else _to_float(part) for part in parts)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"expected LO <= HI, got {lo} > {hi}")
    return lo, hi


def _to_nonfinite_policy(text: str) -> str:
    if text not in ("raise", "skip"):
        raise ValueError("expected raise or skip")
    return text


def _to_state_dtype(text: str) -> str | None:
    if text.lower() in _NONE:
        return None
    if text.removeprefix("torch.") not in _STATE_DTYPE_NAMES:
        raise ValueError(f"expected one of {', '.join(_STATE_DTYPE_NAMES)} or none")
    return text


# key -> (caster, the allowed values as written in errors and docs)
_OPTIM_ARGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "gamma": (_to_float, "float, any finite value (0 = SGD-like, 1 = Adam-like; default 1.0)"),
    "eps": (_to_positive_float, "float > 0, added inside the power (default 1e-16)"),
    "beta3": (_to_unit_interval, "float in [0, 1) (default 0.5)"),
    "refresh": (_to_refresh, "pow2, every, or an integer N >= 1 (default pow2)"),
    "decoupled_weight_decay": (_to_bool, "true or false (default true)"),
    "bounds": (_to_bounds, "LO:HI with an empty side unbounded, e.g. -1:1 or 0: (default none)"),
    "foreach": (_to_optional_bool, "true, false or none (default none = auto)"),
    "fused": (_to_optional_bool, "true, false or none: one pass per tensor (C++ kernel on CPU) (default none)"),
    "on_nonfinite": (_to_nonfinite_policy, "raise or skip (default raise)"),
    "precond_dtype": (_to_state_dtype, "bf16, fp32, fp64 or none, storage of precond (default none = param dtype)"),
    "moments_dtype": (_to_state_dtype, "bf16, fp32, fp64 or none, storage of exp_avg/exp_avg_sq (default none)"),
    "verify_sync": (_to_bool, "true or false (default true)"),
}
# Keys that belong to TrainingArguments: point to the flag instead of accepting a second way to set them.
_FROM_TRAINING_ARGS = {
    "lr": "--learning_rate",
    "learning_rate": "--learning_rate",
    "weight_decay": "--weight_decay",
    "betas": "--adam_beta1 / --adam_beta2",
    "beta1": "--adam_beta1",
    "beta2": "--adam_beta2",
}


def _valid_keys_text() -> str:
    return "; ".join(f"{key}: {allowed}" for key, (_, allowed) in _OPTIM_ARGS.items())


def _optim_args_error(message: str) -> ValueError:
    return ValueError(
        f"Invalid optim_args for optim='anon': {message}. Valid keys: {_valid_keys_text()}. "
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


def parse_optim_args(optim_args: dict[str, str] | str | None) -> dict[str, Any]:
    """Cast and validate ``optim_args`` for Anon; return the keyword arguments for :class:`~anon_hf.Anon`.

    Args:
        optim_args: the ``"key=value,key=value"`` string of ``TrainingArguments.optim_args``, or the dict of
            strings transformers parses it into. ``None`` or empty gives ``{}``.

    Raises:
        ValueError: an unknown key or a bad value, naming it and listing every valid key with its range; raised
            before any optimizer exists.
    """
    if not optim_args:
        return {}
    raw = _split_optim_args(optim_args) if isinstance(optim_args, str) else dict(optim_args)
    kwargs: dict[str, Any] = {}
    for key, text in raw.items():
        if key in _FROM_TRAINING_ARGS:
            raise _optim_args_error(f"{key!r} is set with {_FROM_TRAINING_ARGS[key]}, not in optim_args")
        if key not in _OPTIM_ARGS:
            raise _optim_args_error(f"unknown key {key!r}")
        caster, allowed = _OPTIM_ARGS[key]
        try:
            kwargs[key] = caster(str(text))
        except ValueError as err:
            raise _optim_args_error(f"{key}={text!r} is not valid ({err}; allowed: {allowed})") from None
    return kwargs


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
    power (default 1e-16), Adam adds it to the square root (default 1e-8).
    """
    anon_kwargs = parse_optim_args(ctx.optim_args)
    default_eps = _default_adam_epsilon(ctx.args)
    if default_eps is not None and ctx.args.adam_epsilon != default_eps:
        logger.warning(
            "adam_epsilon=%g is ignored by optim='anon': Anon's eps sits inside the power and is not Adam's eps. "
            "Set it with --optim_args eps=... (default 1e-16).",
            ctx.args.adam_epsilon,
        )
    ctx.optimizer_kwargs.update({"betas": ctx.adam_kwargs["betas"], "weight_decay": ctx.args.weight_decay})
    ctx.optimizer_kwargs.update(anon_kwargs)
    return Anon, ctx.optimizer_kwargs


def get_anon_8bit_optimizer(ctx: Any) -> tuple[type, dict[str, Any]]:
    """Get :class:`~anon_hf.Anon8bit` (``--optim anon_8bit``): the arguments of ``--optim anon``, 8-bit state."""
    _, kwargs = get_anon_optimizer(ctx)
    return Anon8bit, kwargs


# transformers' naming, for a handler table that follows its conventions.
_get_anon_optimizer = get_anon_optimizer
_get_anon_8bit_optimizer = get_anon_8bit_optimizer


def uses_anon(trainer: Any) -> bool:
    """Whether ``trainer`` will train with Anon: ``optim="anon"``, or an Anon passed in by the user."""
    if _is_anon_name(getattr(getattr(trainer, "args", None), "optim", None)):
        return True
    if isinstance(getattr(trainer, "optimizer", None), Anon):
        return True
    cls_and_kwargs = getattr(trainer, "optimizer_cls_and_kwargs", None)
    return bool(cls_and_kwargs) and isinstance(cls_and_kwargs[0], type) and issubclass(cls_and_kwargs[0], Anon)


def _is_anon_name(optim: Any) -> bool:
    return getattr(optim, "value", optim) in (OPTIM_NAME, OPTIM_NAME_8BIT)


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


def _guarded(part: str) -> Callable[[Callable[[ModuleType], None]], Callable[[ModuleType], None]]:
    """Never let a patch break the user's ``import transformers``: record the failure and log it instead."""

    def decorate(patch: Callable[[ModuleType], None]) -> Callable[[ModuleType], None]:
        @functools.wraps(patch)
        def wrapper(module: ModuleType) -> None:
            # No lock here: the import system already runs this once per module, under that module's import
            # lock, and taking `_lock` too could deadlock against a `register()` that holds it while importing.
            try:
                patch(module)
            except Exception as err:
                _errors[part] = f"{type(err).__name__}: {err}"
                logger.error(
                    "anon_hf could not register optim='anon' with %s (%s); transformers%s is supported.",
                    module.__name__,
                    _errors[part],
                    SUPPORTED_TRANSFORMERS,
                )

        return wrapper

    return decorate


@_guarded("enum")
def on_training_args_imported(module: ModuleType) -> None:
    """``transformers.training_args``: add ``OptimizerNames.ANON`` and the early ``optim_args`` check."""
    member = _add_enum_member(module.OptimizerNames, _ENUM_MEMBER, OPTIM_NAME)
    _add_enum_member(module.OptimizerNames, _ENUM_MEMBER_8BIT, OPTIM_NAME_8BIT)
    training_args_cls = module.TrainingArguments
    original = training_args_cls.__post_init__
    if not getattr(original, "_anon_hf_wrapped", False):

        @functools.wraps(original)
        def __post_init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if _is_anon_name(self.optim):
                parse_optim_args(self.optim_args)

        __post_init__._anon_hf_wrapped = True
        training_args_cls.__post_init__ = __post_init__
    _status["enum"] = f"{module.__name__}.OptimizerNames.{member.name}"


@_guarded("handler")
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
    descriptor = trainer_cls.__dict__.get("get_optimizer_cls_and_kwargs")
    if not isinstance(descriptor, staticmethod):
        return False
    original = descriptor.__func__
    if getattr(original, "_anon_hf_wrapped", False):
        return True

    @functools.wraps(original)
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
        eight_bit = getattr(args.optim, "value", args.optim) == OPTIM_NAME_8BIT
        return (_get_anon_8bit_optimizer if eight_bit else _get_anon_optimizer)(ctx)

    get_optimizer_cls_and_kwargs._anon_hf_wrapped = True
    trainer_cls.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)
    return True


def _unsupported_message() -> str:
    details = "; ".join(f"{part}: {error}" for part, error in _errors.items()) or "the private API was not found"
    return (
        f"anon_hf could not register optim='anon' with this transformers ({details}). anon_hf supports "
        f"transformers{SUPPORTED_TRANSFORMERS}; install a version in that range (pip install "
        f"'transformers{SUPPORTED_TRANSFORMERS}'), or build Anon yourself and pass it with "
        "Trainer(optimizers=(anon_hf.create_anon_optimizer(model, lr=...), None))."
    )


def _after_trainer_init(trainer: Any) -> None:
    if not uses_anon(trainer):
        return
    if _is_anon_name(getattr(trainer.args, "optim", None)) and not (_status["enum"] and _status["handler"]):
        raise RuntimeError(_unsupported_message())
    from .trainer_callback import AnonCallback, add_anon_callback

    if not any(isinstance(callback, AnonCallback) for callback in trainer.callback_handler.callbacks):
        add_anon_callback(trainer)


@_guarded("trainer")
def on_trainer_imported(module: ModuleType) -> None:
    """``transformers.trainer``: auto-add the callback; wrap the optimizer lookup if the handler table is gone."""
    trainer_cls = module.Trainer
    if _status["handler"] is None:
        if _wrap_get_optimizer_cls_and_kwargs(trainer_cls):
            _status["handler"] = f"{module.__name__}.Trainer.get_optimizer_cls_and_kwargs (wrapped)"
        else:
            _errors.setdefault("handler", "neither _OPTIMIZER_HANDLERS nor Trainer.get_optimizer_cls_and_kwargs")
    original = trainer_cls.__init__
    if not getattr(original, "_anon_hf_wrapped", False):

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            _after_trainer_init(self)

        __init__._anon_hf_wrapped = True
        trainer_cls.__init__ = __init__
    _status["trainer"] = f"{module.__name__}.Trainer"


# Module -> patch; anon_hf/__init__.py registers these with its post-import hooks.
IMPORT_HOOKS: dict[str, Callable[[ModuleType], None]] = {
    "transformers.training_args": on_training_args_imported,
    "transformers.trainer_optimizer": on_trainer_optimizer_imported,
    "transformers.trainer": on_trainer_imported,
}


def register() -> None:
    """Import transformers' training modules now, so the hooks above run, and raise if one could not patch.

    Idempotent and thread-safe; after the first success it returns at once. Does nothing when transformers is
    not installed. ``transformers.trainer`` (the slow import, ~10 s) is imported only when the handler table
    was missing and the fallback must be installed; otherwise its patch waits for the user's own import.

    Raises:
        RuntimeError: this transformers cannot take ``optim="anon"``; the message names the supported range.
    """
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        from ..import_utils import is_transformers_available

        if not is_transformers_available():
            return
        importlib.import_module("transformers.training_args")
        try:
            importlib.import_module("transformers.trainer_optimizer")
        except ImportError:
            pass  # a layout without this module: the Trainer fallback below takes over
        if _status["handler"] is None:
            importlib.import_module("transformers.trainer")
        if _status["enum"] is None or _status["handler"] is None:
            raise RuntimeError(_unsupported_message())
        _registered = True
