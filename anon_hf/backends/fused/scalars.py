"""The scalars of a fused step, by name: one layout for the compiled graphs and the C++ kernel.

Both backends take the step's hyperparameters as one 1-D array of floats. :data:`SCALAR_SLOTS` names its slots; the
graphs index it through :data:`SLOT` and the kernel exports its own names (``SCALAR_SLOTS``), which
``anon_hf.backends.cpu_kernel`` compares with this tuple, name by name, before the kernel may run.
"""

from __future__ import annotations

import math

from ...refresh import inverse_bias_correction
from ...schedule import gradients_since_refresh

__all__ = ["SCALAR_SLOTS", "SLOT", "per_tensor_scalars", "step_scalars", "step_scalars_from"]

SCALAR_SLOTS = (
    "decay",  # 1 - lr * weight_decay with decoupled decay, else 1
    "weight1",  # 1 - beta1
    "beta2",
    "weight2",  # 1 - beta2
    "sign",  # -1 with maximize, else 1
    "l2",  # weight_decay with coupled (L2) decay, else 0
    "lo",  # lower bound, -inf without one
    "hi",  # upper bound, inf without one
    "eps",
    "gamma",
    "weight_prev",  # refresh only: beta3 when a previous preconditioner is averaged in, else 0
    "weight_new",  # refresh only: 1 - beta3 when it is, else 1
    "max_ratio",  # max_precond_ratio, inf without a limit
)
SLOT = {name: index for index, name in enumerate(SCALAR_SLOTS)}


def step_scalars(
    *,
    lr: float,
    beta1: float,
    beta2: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    beta3: float,
    bounds: tuple[float | None, float | None] | None,
    maximize: bool,
    max_precond_ratio: float | None,
    averaged: bool,
) -> list[float]:
    """The values of :data:`SCALAR_SLOTS` for one step; ``averaged``: a refresh averages the previous preconditioner
    in (on an ordinary step, and at a tensor's first refresh, the refresh slots keep their neutral values)."""
    decoupled = decoupled_weight_decay or weight_decay == 0
    values = dict(
        decay=1.0 - lr * weight_decay if decoupled else 1.0,
        weight1=1.0 - beta1,
        beta2=beta2,
        weight2=1.0 - beta2,
        sign=-1.0 if maximize else 1.0,
        l2=0.0 if decoupled else weight_decay,
        lo=-math.inf if bounds is None or bounds[0] is None else bounds[0],
        hi=math.inf if bounds is None or bounds[1] is None else bounds[1],
        eps=eps,
        gamma=gamma,
        weight_prev=0.0,
        weight_new=1.0,
        max_ratio=math.inf if max_precond_ratio is None else max_precond_ratio,
    )
    if averaged:
        values["weight_prev"], values["weight_new"] = beta3, 1.0 - beta3
    return [values[name] for name in SCALAR_SLOTS]


# The keyword arguments of step_scalars besides ``averaged``, as functional.anon names its own.
_HYPERPARAMETERS = (
    "lr",
    "beta1",
    "beta2",
    "gamma",
    "eps",
    "weight_decay",
    "decoupled_weight_decay",
    "beta3",
    "bounds",
    "maximize",
    "max_precond_ratio",
)


def step_scalars_from(hyper: dict, *, averaged: bool) -> list[float]:
    """:func:`step_scalars` with the hyperparameters taken by name from ``hyper`` (``functional.anon``'s keyword
    arguments; other keys are ignored)."""
    return step_scalars(**{name: hyper[name] for name in _HYPERPARAMETERS}, averaged=averaged)


def per_tensor_scalars(steps: list[int], hyper: dict) -> tuple[list[float], list[float]]:
    """What differs per tensor, at each tensor's step (``steps[i]``, already advanced): ``-lr / (1 - beta1**t)`` and
    the accumulator's inverse bias correction ``1 / (1 - beta2**n)``, ``n`` the gradients since its last refresh.
    ``hyper``: ``functional.anon``'s keyword arguments (``lr``, ``beta1``, ``beta2`` and ``refresh`` are read)."""
    lr, beta1, beta2, refresh = hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["refresh"]
    neg_step_sizes = [-lr / (1 - beta1**step) for step in steps]
    inv_bias2s = [inverse_bias_correction(beta2, gradients_since_refresh(step, refresh)) for step in steps]
    return neg_step_sizes, inv_bias2s
