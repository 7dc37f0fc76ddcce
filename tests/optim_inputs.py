"""Tables of Anon configurations and of bad inputs, in the manner of torch's ``common_optimizers.py``.

Configs never set implementation flags (``foreach``); tests cross them with each implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

IMPLEMENTATIONS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True)}


@dataclass
class OptimizerInput:
    kwargs: dict[str, Any]
    desc: str


@dataclass
class ErrorOptimizerInput:
    kwargs: dict[str, Any]
    error_type: type
    error_regex: str
    desc: str = field(default="")


GAMMAS = (-0.5, 0.0, 0.5, 1.0, 1.5)
REFRESHES = ("pow2", "every", 3)
WEIGHT_DECAYS = {
    "no_wd": {},
    "decoupled_wd": dict(weight_decay=0.1),
    "l2_wd": dict(weight_decay=0.1, decoupled_weight_decay=False),
}


def reference_configs() -> list[OptimizerInput]:
    """gamma x weight-decay mode x refresh mode: the grid the reference comparison runs over."""
    configs = []
    for gamma in GAMMAS:
        for wd_desc, wd in WEIGHT_DECAYS.items():
            for refresh in REFRESHES:
                kwargs = dict(lr=0.01, gamma=gamma, refresh=refresh, **wd)
                configs.append(OptimizerInput(kwargs, f"gamma{gamma}-{wd_desc}-refresh_{refresh}"))
    return configs


def extra_configs() -> list[OptimizerInput]:
    """Corners the grid does not reach."""
    return [
        OptimizerInput(dict(lr=0.01, betas=(0.8, 0.95), eps=1e-8), "betas_eps"),
        OptimizerInput(dict(lr=0.01, beta3=0.0), "beta3_zero"),
        OptimizerInput(dict(lr=0.01, beta3=0.9, refresh="every"), "beta3_high_every"),
        OptimizerInput(dict(lr=0.01, maximize=True, weight_decay=0.1), "maximize"),
        OptimizerInput(dict(lr=0.05, bounds=(-0.5, 0.5)), "bounds"),
        OptimizerInput(dict(lr=0.05, bounds=(None, 0.2)), "bounds_upper_only"),
        OptimizerInput(dict(lr=0.01, gamma=3.0), "gamma3"),
        OptimizerInput(dict(lr=0.01, gamma=-2.0), "gamma_minus2"),
        OptimizerInput(dict(lr=0.01, betas=(0.0, 0.0)), "betas_zero"),
    ]


def error_inputs() -> list[ErrorOptimizerInput]:
    E = ErrorOptimizerInput
    return [
        E(dict(lr=-1e-3), ValueError, r"Invalid lr value: -0.001 \(allowed: .*>= 0\)", "negative_lr"),
        E(
            dict(lr=torch.tensor([1e-3, 2e-3])),
            ValueError,
            r"Tensor lr must be 1-element",
            "lr_vector",
        ),
        E(
            dict(betas=(1.0, 0.999)),
            ValueError,
            r"Invalid beta parameter at index 0: 1.0 \(allowed: \[0, 1\)\)",
            "beta1_one",
        ),
        E(
            dict(betas=(0.9, -0.1)),
            ValueError,
            r"Invalid beta parameter at index 1: -0.1 \(allowed: \[0, 1\)\)",
            "beta2_negative",
        ),
        E(dict(betas=(0.9,)), ValueError, r"Invalid betas value: \(0.9,\)", "betas_short"),
        E(dict(beta3=1.0), ValueError, r"Invalid beta3 value: 1.0 \(allowed: \[0, 1\)", "beta3_one"),
        E(dict(beta3=-0.5), ValueError, r"Invalid beta3 value: -0.5", "beta3_negative"),
        E(dict(eps=0.0), ValueError, r"Invalid epsilon value: 0.0 \(allowed: a finite float > 0", "eps_zero"),
        E(dict(eps=-1e-8), ValueError, r"Invalid epsilon value: -1e-08", "eps_negative"),
        E(dict(gamma=float("nan")), ValueError, r"Invalid gamma value: nan \(allowed: any finite real", "gamma_nan"),
        E(dict(gamma=float("inf")), ValueError, r"Invalid gamma value: inf", "gamma_inf"),
        E(dict(gamma="1.1"), ValueError, r"Invalid gamma value: '1.1' \(allowed: any finite real", "gamma_string"),
        E(
            dict(weight_decay=-0.1),
            ValueError,
            r"Invalid weight_decay value: -0.1 \(allowed: a finite float >= 0\)",
            "wd_negative",
        ),
        E(
            dict(refresh="sometimes"),
            ValueError,
            r"Invalid refresh value: 'sometimes' \(allowed: 'pow2', 'every', or an integer N >= 1",
            "refresh_name",
        ),
        E(dict(refresh=0), ValueError, r"Invalid refresh value: 0 \(allowed:", "refresh_zero"),
        E(dict(refresh=2.5), ValueError, r"Invalid refresh value: 2.5", "refresh_float"),
        E(dict(bounds=(1.0, -1.0)), ValueError, r"Invalid bounds value: lo=1.0 > hi=-1.0", "bounds_reversed"),
        E(dict(bounds=(0.0,)), ValueError, r"Invalid bounds value: \(0.0,\)", "bounds_short"),
        E(
            dict(on_nonfinite="ignore"),
            ValueError,
            r"Invalid on_nonfinite value: 'ignore' \(allowed: 'raise', 'skip'\)",
            "nonfinite_policy",
        ),
        E(dict(foreach="yes"), ValueError, r"Invalid foreach value: 'yes'", "foreach_string"),
    ]
