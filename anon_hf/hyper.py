"""Each hyperparameter of a param group once: its name, default and allowed range.

:data:`HYPERPARAMETERS` is the one table that :class:`anon_hf.Anon`'s signature defaults, its validator
(:func:`validate`), ``__setstate__`` (defaults for keys older state dicts lack), the Python-number normalisation of
state dicts (:func:`as_python_numbers`) and the keyword arguments of :func:`anon_hf.functional.anon`
(:func:`update_kwargs`) read. The ``optim_args`` text of the Trainer integration and DeepSpeed's ``optimizer.params``
follow the class signature, so a new row plus its keyword in ``Anon.__init__`` reaches them too. The fused backends'
scalars are named in ``anon_hf.backends.fused.scalars``. Long advice belongs in ``docs/troubleshooting.md``.

Nothing here imports anything but torch and the standard library.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .schedule import validate_refresh

__all__ = [
    "DEFAULTS",
    "HYPERPARAMETERS",
    "Hyperparameter",
    "NONFINITE_POLICIES",
    "STATE_DTYPES",
    "as_python_numbers",
    "state_dtype",
    "update_kwargs",
    "validate",
]

NONFINITE_POLICIES = ("raise", "skip")
# Storage dtypes `precond_dtype` / `moments_dtype` accept (None: the param's dtype). float16 cannot hold squared
# gradients (they underflow) nor preconditioners above 65504, so it is refused.
STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float64)
_STATE_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def state_dtype(value: object) -> object:
    """Map a dtype name (``"bf16"``, ``"bfloat16"``, ...) to its torch.dtype; anything else is returned as is."""
    return _STATE_DTYPE_NAMES.get(value.removeprefix("torch."), value) if isinstance(value, str) else value


def is_real_number(value: object) -> bool:
    # numbers.Real admits numpy scalars (a gamma from np.linspace); bool is an int but never a hyperparameter.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter of a param group.

    ``check(value)`` raises ``ValueError`` in torch's form (``Invalid <name> value: ...``) when ``value`` is outside
    the range; ``number``: stored as a Python float; ``functional``: passed by name to
    :func:`anon_hf.functional.anon` (``lr`` and ``betas`` are passed in their own form)."""

    name: str
    default: Any
    check: Callable[[Any], None]
    number: bool = False
    functional: bool = True


def _check_lr(lr: Any) -> None:
    value = lr
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")  # torch.optim's wording, which generic tooling matches
        value = lr.item()
    if not is_real_number(value) or not value >= 0.0:
        raise ValueError(f"Invalid lr value: {lr!r} (allowed: a float or 1-element tensor >= 0)")


def _check_betas(betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas value: {betas!r} (allowed: a pair (beta1, beta2), each in [0, 1))")
    for index, beta in enumerate(betas):
        if not is_real_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta!r} (allowed: [0, 1))")


def _check_bounds(bounds: Any) -> None:
    if bounds is None:
        return
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(f"Invalid bounds value: {bounds!r} (allowed: None or a pair (lo, hi) with lo <= hi)")
    lo, hi = bounds
    for name, bound in (("lo", lo), ("hi", hi)):
        if bound is not None and (not is_real_number(bound) or math.isnan(bound)):
            raise ValueError(f"Invalid bounds value: {name}={bound!r} (allowed: a real number or None)")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"Invalid bounds value: lo={lo} > hi={hi} (allowed: None or (lo, hi) with lo <= hi)")


def _check_gamma(gamma: Any) -> None:
    if not is_real_number(gamma) or not math.isfinite(gamma):
        raise ValueError(f"Invalid gamma value: {gamma!r} (allowed: any finite real number, e.g. -0.1, 0, 1, 1.1)")


def _check_eps(eps: Any) -> None:
    if not is_real_number(eps) or not (eps > 0.0 and math.isfinite(eps)):
        raise ValueError(f"Invalid epsilon value: {eps!r} (allowed: a finite float > 0, e.g. 1e-16)")


def _check_weight_decay(weight_decay: Any) -> None:
    if not is_real_number(weight_decay) or not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (allowed: a finite float >= 0)")


def _check_beta3(beta3: Any) -> None:
    if not is_real_number(beta3) or not 0.0 <= beta3 < 1.0:
        raise ValueError(f"Invalid beta3 value: {beta3!r} (allowed: [0, 1); 0.5 is the paper's mean)")


def _check_max_precond_ratio(ratio: Any) -> None:
    if ratio is not None and (not is_real_number(ratio) or not ratio >= 1.0):
        raise ValueError(
            f"Invalid max_precond_ratio value: {ratio!r} (allowed: None to turn the limit off, or a float >= 1, "
            "inf included; 10 is the default)"
        )


def _check_on_nonfinite(policy: Any) -> None:
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"Invalid on_nonfinite value: {policy!r} (allowed: 'raise', 'skip')")


def _dtype_row(name: str) -> Hyperparameter:
    def check(value: Any) -> None:
        if value not in STATE_DTYPES:
            raise ValueError(
                f"Invalid {name} value: {value!r} (allowed: None for the param dtype, torch.float32, torch.bfloat16 or "
                "torch.float64, or their names 'float32', 'bf16', 'bfloat16', 'float64')"
            )

    return Hyperparameter(name, None, check, functional=False)


def _flag(name: str, default: bool | None, tri_state: bool = False) -> Hyperparameter:
    """A flag: ``bool`` (checked by type, so 1 is refused), or tri-state ``None`` (auto) / True / False, which goes to
    the backends' dispatch rather than to their arithmetic."""

    def check(value: Any) -> None:
        if tri_state and value not in (None, True, False):
            raise ValueError(f"Invalid {name} value: {value!r} (allowed: None, True or False)")
        if not tri_state and not isinstance(value, bool):
            raise ValueError(f"Invalid {name} value: {value!r} (allowed: True or False)")

    return Hyperparameter(name, default, check, functional=not tri_state)


HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    Hyperparameter("lr", 1e-3, _check_lr, number=True, functional=False),
    Hyperparameter("betas", (0.9, 0.999), _check_betas, functional=False),
    Hyperparameter("gamma", 1.0, _check_gamma, number=True),
    Hyperparameter("eps", 1e-16, _check_eps, number=True),
    Hyperparameter("weight_decay", 0.0, _check_weight_decay, number=True),
    _flag("decoupled_weight_decay", True),
    Hyperparameter("refresh", "pow2", validate_refresh),
    Hyperparameter("beta3", 0.5, _check_beta3, number=True),
    Hyperparameter("bounds", None, _check_bounds),
    _flag("keep_unseen", True),
    Hyperparameter("max_precond_ratio", 10.0, _check_max_precond_ratio, number=True),
    _flag("maximize", False),
    _flag("foreach", None, tri_state=True),
    _flag("fused", None, tri_state=True),
    _dtype_row("precond_dtype"),
    _dtype_row("moments_dtype"),
    Hyperparameter("on_nonfinite", "raise", _check_on_nonfinite),
)
#: Each hyperparameter's default, by name.
DEFAULTS: dict[str, Any] = {row.name: row.default for row in HYPERPARAMETERS}


def validate(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first hyperparameter of ``group`` outside its allowed range, and
    ``RuntimeError`` for ``fused`` and ``foreach`` both True. Keys ``group`` lacks are not checked."""
    for row in HYPERPARAMETERS:
        if row.name in group:
            row.check(group[row.name])
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def as_python_numbers(group: dict[str, Any]) -> None:
    """Store numpy scalars as Python floats, so state dicts load with ``torch.load(weights_only=True)``."""
    for row in HYPERPARAMETERS:
        value = group.get(row.name)
        if row.number and is_real_number(value) and type(value) is not float:
            group[row.name] = float(value)
    if isinstance(group.get("betas"), (tuple, list)):
        group["betas"] = tuple(float(b) if is_real_number(b) else b for b in group["betas"])


def update_kwargs(group: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters of ``group`` as :func:`anon_hf.functional.anon` takes them (``lr`` as a float)."""
    beta1, beta2 = group["betas"]
    lr = group["lr"].item() if isinstance(group["lr"], Tensor) else group["lr"]
    return dict(lr=lr, beta1=beta1, beta2=beta2) | {
        row.name: group[row.name] for row in HYPERPARAMETERS if row.functional
    }
