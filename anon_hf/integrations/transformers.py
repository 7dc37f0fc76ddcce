"""``--optim anon`` for the transformers ``Trainer``: enum member, optimizer handler, ``optim_args`` casting.

transformers has no public optimizer registry: ``TrainingArguments.optim`` is converted with
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

import importlib
import inspect
import logging
import threading
from types import ModuleType, SimpleNamespace
from typing import Any

from ..optimizer import Anon
from ..optimizer8bit import Anon8bit
from ._patches import PatchError, require, wrap_once
from .final_optimizer import requested_anon
from .import_utils import SUPPORTED_VERSIONS
from .optim_args import (
    ANON_NAMES,
    OPTIM_NAME,
    OPTIM_NAME_8BIT,
    anon_name_for_optim,
    optim_args_spec,
    parse_optim_args,
)
from .routes import check_trainer_routes

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

# The range whose private optimizer plumbing this module was written against (see make test-compat).
SUPPORTED_TRANSFORMERS = SUPPORTED_VERSIONS["transformers"]

_lock = threading.RLock()
# What the import hooks managed to install; register() and Trainer construction report what is missing.
_status: dict[str, str | None] = {"enum": None, "handler": None, "trainer": None}
_registered = False


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
# --optim name -> handler, one per row of optim_args.ANON_NAMES.
_HANDLERS = {OPTIM_NAME: _get_anon_optimizer, OPTIM_NAME_8BIT: _get_anon_8bit_optimizer}


def uses_anon(trainer: Any) -> bool:
    """Whether ``trainer`` was asked to train with Anon: ``optim="anon"``/``"anon_8bit"``, an Anon passed in by the
    user (``optimizers=``, ``optimizer_cls_and_kwargs``), or a DeepSpeed config whose optimizer block is Anon."""
    return requested_anon(trainer) is not None


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
            f"not imported yet). anon_hf supports transformers{SUPPORTED_TRANSFORMERS} (the releases its tests ran "
            f"against).{_WAY_OUT}"
        )


def _check_optim_name(optim: Any) -> None:
    """Raise for a near miss of an anon-hf name (``"Anon"``, ``"anon8bit"``), which transformers would report as
    one of its own optimizers' names."""
    text = getattr(optim, "value", optim)
    if not isinstance(text, str) or anon_name_for_optim(text) is not None:
        return
    if text.lower().replace("-", "_").replace(" ", "_").startswith("anon"):
        names = " or ".join(repr(name.optim) for name in reversed(ANON_NAMES))
        raise ValueError(f"Invalid optim value {text!r}: anon-hf's optimizers are named {names} (lower case).")


def on_training_args_imported(module: ModuleType) -> None:
    """``transformers.training_args``: add ``OptimizerNames.ANON`` and the early ``optim_args`` check."""

    def make_wrapper(original):
        def __post_init__(self, *args, **kwargs):
            named = anon_name_for_optim(self.optim)
            if named is not None:
                require(("transformers",), f"TrainingArguments(optim={named.optim!r})", _WAY_OUT)
            _check_optim_name(self.optim)
            original(self, *args, **kwargs)
            if named is not None:
                parse_optim_args(self.optim_args, named.optimizer_cls, named.optim)

        return __post_init__

    # The check goes in first, so that a failure to add the member is reported by it at use.
    wrap_once(module.TrainingArguments, "__post_init__", make_wrapper)
    members = [_add_enum_member(module.OptimizerNames, name.optim.upper(), name.optim) for name in ANON_NAMES]
    _status["enum"] = ", ".join(f"{module.__name__}.OptimizerNames.{member.name}" for member in members)


def on_trainer_optimizer_imported(module: ModuleType) -> None:
    """``transformers.trainer_optimizer``: add the handler to ``_OPTIMIZER_HANDLERS`` if that table exists."""
    handlers = getattr(module, "_OPTIMIZER_HANDLERS", None)
    names = getattr(module, "OptimizerNames", None)
    members = [getattr(names, name.optim.upper(), None) for name in ANON_NAMES]
    if not isinstance(handlers, dict) or None in members:
        logger.info("transformers.trainer_optimizer has no _OPTIMIZER_HANDLERS; anon_hf will wrap the Trainer.")
        return
    for member in members:
        handlers[member] = _HANDLERS[member.value]
    _status["handler"] = f"{module.__name__}._OPTIMIZER_HANDLERS"


def _wrap_get_optimizer_cls_and_kwargs(trainer_cls: type) -> bool:
    """Fallback: route ``optim="anon"`` around a missing handler table. False if the method is not there."""
    if not isinstance(inspect.getattr_static(trainer_cls, "get_optimizer_cls_and_kwargs", None), staticmethod):
        return False

    def make_wrapper(original):
        def get_optimizer_cls_and_kwargs(args, model=None):
            named = anon_name_for_optim(args.optim)
            if named is None:
                return original(args, model)
            ctx = SimpleNamespace(
                args=args,
                model=model,
                optimizer_kwargs={"lr": args.learning_rate},
                adam_kwargs={"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon},
                optim_args=args.optim_args or {},
            )
            return _HANDLERS[named.optim](ctx)

        return get_optimizer_cls_and_kwargs

    wrap_once(trainer_cls, "get_optimizer_cls_and_kwargs", make_wrapper)
    return True


def _after_trainer_init(trainer: Any) -> None:
    check_trainer_routes(trainer)  # no silent choice between optim= and optimizers= / optimizer_cls_and_kwargs
    requested = requested_anon(trainer)
    if requested is None:
        return
    if anon_name_for_optim(getattr(trainer.args, "optim", None)) is not None:
        _require_registered(f"Trainer(args=TrainingArguments({requested.how}))")
    from .trainer_callback import AnonCallback, add_anon_callback

    callback = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AnonCallback)), None)
    callback = callback if callback is not None else add_anon_callback(trainer)
    callback.expect(requested, trainer)  # on_train_begin: the optimizer that trains is the one asked for


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
    not installed. ``transformers.trainer`` (the slow import) is imported only when the handler table
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
