"""Hyperparameters declared once (anon_hf/hyper.py), and Anon8bit forwarding every Anon keyword."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

from anon_hf import Anon, Anon8bit
from anon_hf.hyper import DEFAULTS, HYPERPARAMETERS
from anon_hf.optimizer8bit import FULL_PRECISION_ONLY


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}


def test_anon8bit_takes_every_anon_keyword_through_forwarding():
    anon, eightbit = _parameters(Anon), _parameters(Anon8bit)
    assert set(eightbit) == set(anon) - set(FULL_PRECISION_ONLY) | {"min_8bit_size"}
    for name, parameter in anon.items():
        if name not in FULL_PRECISION_ONLY:
            assert eightbit[name] == parameter, name  # same kind, default and annotation
    hints = typing.get_type_hints(Anon8bit.__init__)
    assert set(hints) >= set(eightbit)


def test_anon8bit_keeps_its_positional_layout():
    param = torch.nn.Parameter(torch.zeros(8))
    # The 11th argument of Anon8bit is max_precond_ratio (Anon's keep_unseen does not exist there).
    opt = Anon8bit([param], 1e-3, (0.9, 0.999), 1.0, 1e-16, 0.0, True, "pow2", 0.5, None, 5.0)
    assert opt.defaults["max_precond_ratio"] == 5.0
    assert opt.defaults["keep_unseen"] is True


def test_a_keyword_anon_gains_reaches_anon8bit_with_no_edit(monkeypatch):
    # A toy keyword added to Anon.__init__ only: Anon8bit's forwarding passes it on by name.
    seen = {}
    original = Anon.__init__

    def with_toy(self, params, *args, toy: float = 0.0, **kwargs):
        seen["toy"] = toy
        original(self, params, *args, **kwargs)

    monkeypatch.setattr(Anon, "__init__", with_toy)
    monkeypatch.setattr(
        "anon_hf.optimizer8bit._SIGNATURE",
        inspect.signature(Anon8bit.__init__).replace(
            parameters=[
                *list(inspect.signature(Anon8bit.__init__).parameters.values())[1:],
                inspect.Parameter("toy", inspect.Parameter.KEYWORD_ONLY, default=0.0),
            ]
        ),
    )
    Anon8bit([torch.nn.Parameter(torch.zeros(8))], toy=0.25)
    assert seen == {"toy": 0.25}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep_unseen=False), r"Invalid keep_unseen value: False \(allowed: True;"),
        (dict(precond_dtype="bf16"), r"Invalid precond_dtype value: 'bf16' \(allowed: None;"),
        (dict(moments_dtype=torch.float32), r"Invalid moments_dtype value: torch.float32 \(allowed: None;"),
    ],
)
def test_anon8bit_refuses_the_full_precision_options_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Anon8bit([torch.nn.Parameter(torch.zeros(8))], **kwargs)


def test_anon_signature_defaults_are_the_table_and_the_table_is_the_documented_one():
    parameters = _parameters(Anon)
    assert {row.name: parameters[row.name].default for row in HYPERPARAMETERS} == DEFAULTS
    # The published defaults (README, docs/hyperparameters.md), written out here independently of the table.
    assert DEFAULTS == {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "gamma": 1.0,
        "eps": 1e-16,
        "weight_decay": 0.0,
        "decoupled_weight_decay": True,
        "refresh": "pow2",
        "beta3": 0.5,
        "bounds": None,
        "keep_unseen": True,
        "max_precond_ratio": 10.0,
        "maximize": False,
        "foreach": None,
        "fused": None,
        "precond_dtype": None,
        "moments_dtype": None,
        "on_nonfinite": "raise",
    }


def test_an_old_state_dict_without_newer_keys_loads_with_the_table_defaults():
    param = torch.nn.Parameter(torch.zeros(4))
    opt = Anon([param])
    state = opt.state_dict()
    for key in ("keep_unseen", "max_precond_ratio", "on_nonfinite", "bounds", "maximize"):
        del state["param_groups"][0][key]
    fresh = Anon([torch.nn.Parameter(torch.zeros(4))], max_precond_ratio=3.0)
    fresh.load_state_dict(state)
    group = fresh.param_groups[0]
    assert (group["keep_unseen"], group["max_precond_ratio"], group["on_nonfinite"]) == (True, 10.0, "raise")
