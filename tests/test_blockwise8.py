"""8-bit storage as a strategy of the one dispatcher (``anon_hf.storage.blockwise8``, ``anon(..., storage=...)``).

``Anon8bit`` has no step dispatch of its own: its 8-bit tensors go through ``anon_hf.anon`` with
``storage=Blockwise8(sides)``. Here: the strategy's codec against the literal round trips of ``tests/reference8bit.py``,
the functional API with 8-bit state against ``Anon8bit`` bit for bit, and a refresh's error naming the tensor by its
place in the param group.
"""

from __future__ import annotations

import pytest
import torch
from reference8bit import roundtrip_exp_avg, roundtrip_exp_avg_sq, roundtrip_precond

import anon_hf
from anon_hf import Anon8bit, NonFinitePreconditionerError
from anon_hf.storage import quant8
from anon_hf.storage.blockwise8 import Blockwise8

NUMEL = 4096 + 77  # 16 whole blocks and a short one
ROUNDTRIPS = {"exp_avg": roundtrip_exp_avg, "exp_avg_sq": roundtrip_exp_avg_sq, "precond": roundtrip_precond}


def _values(key: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(NUMEL, generator=generator) * torch.logspace(-5, 1, NUMEL)
    values[::13] = 0.0
    return values if key == "exp_avg" else values.square() if key == "exp_avg_sq" else values.abs()


@pytest.mark.parametrize("key", list(quant8.QUANTIZED_KEYS))
def test_encode_writes_in_place_what_the_literal_roundtrip_gives(key):
    codes = {key: torch.zeros(NUMEL, dtype=torch.int8 if key == "exp_avg" else torch.uint8)}
    sides = {name: torch.zeros(-(-NUMEL // 256)) for name in quant8.QUANTIZED_KEYS[key]}
    storage = Blockwise8([sides])
    storage_before = [codes[key].data_ptr()] + [side.data_ptr() for side in sides.values()]
    value = _values(key)
    storage.encode_(0, key, codes[key], value)
    assert [codes[key].data_ptr()] + [side.data_ptr() for side in sides.values()] == storage_before
    decoded = storage.decoded(0, codes)[key]
    expected = torch.tensor(ROUNDTRIPS[key](value.double().tolist()), dtype=torch.float64)
    # fp32 side values and arithmetic against the reference's Python floats: a few ulps of fp32.
    torch.testing.assert_close(decoded.double(), expected, rtol=1e-5, atol=0)
    assert torch.equal(decoded == 0, value == 0)  # "no gradient" and "not seen yet" survive exactly


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 80))  # 6,144 and 7,680 weights: 8-bit


def _grads(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=generator) * 0.1 for shape in ((96, 64), (96,), (80, 96), (80,))]


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_the_functional_api_with_8bit_storage_steps_as_anon8bit(fused):
    # Anon8bit's 8-bit tensors step through anon(storage=...): the same call made by hand gives the same bits,
    # refreshes (steps 1, 2, 4, 8) and the steps between included.
    model, twin = _model(), _model()
    optimizer = Anon8bit(model.parameters(), lr=1e-2, fused=fused)
    weights = [p for p in twin.parameters() if p.dim() == 2]
    for step in range(1, 11):
        for p, g in zip(model.parameters(), _grads(step), strict=True):
            p.grad = g.clone()
        optimizer.step()
        for p, g in zip(weights, _grads(step)[::2], strict=True):
            p.grad = g.clone()
        if step == 1:
            states = [{"step": torch.tensor(0.0), **_fresh_8bit_state(p)} for p in weights]
        codes = [[state[key] for state in states] for key in quant8.QUANTIZED_KEYS]
        sides = Blockwise8(
            [{k: v for k, v in state.items() if k != "step" and k not in quant8.QUANTIZED_KEYS} for state in states]
        )
        with torch.no_grad():
            anon_hf.anon(
                weights,
                [p.grad for p in weights],
                *codes,
                [state["step"] for state in states],
                fused=fused,
                storage=sides,
                lr=1e-2,
                beta1=0.9,
                beta2=0.999,
            )
    for p, q, twin_state in zip([p for p in model.parameters() if p.dim() == 2], weights, states, strict=True):
        assert torch.equal(p, q)
        assert all(torch.equal(optimizer.state[p][key], twin_state[key]) for key in twin_state)


def _fresh_8bit_state(param: torch.Tensor) -> dict[str, torch.Tensor]:
    """Anon8bit's state before its first step, written from its documented initial values: m = s = 0, v = 0."""
    state = {}
    for key in quant8.QUANTIZED_KEYS:
        state.update(quant8.quantize(key, torch.zeros_like(param)))
    return state


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_a_nonfinite_refresh_names_the_8bit_tensor_by_its_place_in_the_group(fused):
    model = _model()
    optimizer = Anon8bit(model.parameters(), lr=1e-2, fused=fused)
    for p, g in zip(model.parameters(), _grads(1), strict=True):
        p.grad = g
    optimizer.step()
    second_weight = model[1].weight  # position 2 of the group: weight, bias, weight, bias
    second_weight.grad = torch.full_like(second_weight, float("nan"))
    # The codes and side values are not encoded from the failed step (the eager paths may have advanced the step
    # counter: docs/troubleshooting.md says to resume from the last checkpoint).
    codes_before = {key: value.clone() for key, value in optimizer.state[second_weight].items() if key != "step"}
    with pytest.raises(NonFinitePreconditionerError) as caught:
        optimizer.step()  # step 2 refreshes
    assert (caught.value.group_index, caught.value.tensor_index, caught.value.shape) == (0, 2, (80, 96))
    assert caught.value.args == (2, 2, (80, 96), 0)
    state = optimizer.state[second_weight]
    assert all(torch.equal(state[key], value) for key, value in codes_before.items())
