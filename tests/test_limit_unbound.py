"""On CPU pieces, the limit of ``max_precond_ratio`` (gamma == 1) first tests where it cannot bind and then uses ``v``
itself there instead of ``min(v, rsqrt(x))`` (``anon_hf.refresh._limit_cannot_bind``). That must give exactly the bits
of the formula: near the threshold, on either side of it, and with nan, inf, negative and zero entries.

The expected values are written here from the formula, as the step computes it: ``x = s * (c / r**2) + eps / r**2``,
``min(rsqrt(x), v)``.
"""

from __future__ import annotations

import pytest
import torch

from anon_hf import Anon
from anon_hf import refresh as refresh_module
from anon_hf.refresh import step_preconditioners, step_rule

EPS, RATIO = 1e-16, 10.0
NUMEL = 4096 + 13  # a vectorized body and a scalar tail


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int64 if tensor.dtype == torch.float64 else torch.int32)


def _x(s: torch.Tensor, c: float, ratio: float = RATIO) -> torch.Tensor:
    factor = ratio**-2
    return s * (c * factor) + EPS * factor


def _expected(s: torch.Tensor, v: torch.Tensor, c: float, ratio: float = RATIO) -> torch.Tensor:
    if EPS * ratio**-2 < 1e-30:  # the bound's form where eps / ratio**2 would be tiny: the ratio after the root
        return torch.minimum(torch.rsqrt(s * c + EPS) * ratio, v)
    return torch.minimum(torch.rsqrt(_x(s, c, ratio)), v)


def _state(dtype=torch.float32, seed=0, c=1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """An accumulator and a preconditioner where v**2 * x lies between 1e-4 and 1e-2: the limit binds nowhere."""
    generator = torch.Generator().manual_seed(seed)
    s = 10 ** (torch.rand(NUMEL, generator=generator, dtype=torch.float64) * 8 - 9)
    ratio_sq = 10 ** (torch.rand(NUMEL, generator=generator, dtype=torch.float64) * 2 - 4)  # v**2 * x
    v = (ratio_sq / ((s * c + EPS) / RATIO**2)).sqrt()
    return s.to(dtype), v.to(dtype)


def _used(s_list, v_list, c=1.5, ratio=RATIO, gamma=1.0, keep_unseen=True, skip_unbound=True) -> list[torch.Tensor]:
    return step_preconditioners(
        s_list,
        v_list,
        [c] * len(s_list),
        [False] * len(s_list),
        rule=step_rule(gamma, EPS, ratio, keep_unseen),
        gamma=gamma,
        eps=EPS,
        max_ratio=ratio,
        skip_unbound=skip_unbound,
    )


def _check(s, v, c=1.5, ratio=RATIO, keep_unseen=True) -> bool:
    """Asserts the bits of the formula (and of the path without the test); returns whether ``v`` itself was used."""
    used = _used([s], [v], c=c, ratio=ratio, keep_unseen=keep_unseen)[0]
    assert torch.equal(_bits(used), _bits(_expected(s, v, c, ratio)))
    assert torch.equal(_bits(used), _bits(_used([s], [v], c=c, ratio=ratio, skip_unbound=False)[0]))
    return used is v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_where_the_limit_binds_nowhere_v_itself_is_used_and_is_the_formula(dtype):
    s, v = _state(dtype)
    assert _check(s, v)
    assert torch.equal(_expected(s, v, 1.5), v)


@pytest.mark.parametrize("position", [17, NUMEL - 3], ids=["body", "tail"])
def test_an_element_at_the_threshold_or_one_ulp_past_it_is_computed(position):
    s, v = _state()
    # Exactly at the edge: v == rsqrt(x), where min(v, rsqrt(x)) is v either way; the test must not skip it.
    v[position] = torch.rsqrt(_x(s, 1.5))[position]
    assert not _check(s, v)
    # One ulp past it: the limit binds on this element only.
    v[position] = torch.nextafter(v[position], torch.tensor(float("inf")))
    assert not _check(s, v)
    assert _expected(s, v, 1.5)[position] < v[position]


def test_the_margin_sits_just_below_the_threshold():
    s, v = _state()
    x = _x(s, 1.5).double()
    # v**2 * x = 1 - 2e-5: inside the margin's safe side, skipped; 1 - 5e-6: within the margin, computed.
    v[5] = float(((1 - 2e-5) / x[5]).sqrt())
    assert _check(s, v)
    v[5] = float(((1 - 5e-6) / x[5]).sqrt())
    assert not _check(s, v)
    assert torch.equal(_expected(s, v, 1.5), v)  # computed, and still v: the limit does not bind there


@pytest.mark.parametrize(
    "s_value, v_value, c, skipped",
    [
        (float("nan"), None, 1.5, False),
        (float("inf"), None, 1.5, False),
        (-float("inf"), None, 1.5, False),
        (-1e-3, None, 1.5, False),  # x < 0: rsqrt is nan
        (-1e-30, None, 1.5, False),  # a negative accumulator, although x still rounds positive
        (3e38, None, 1000.0, False),  # s * c / ratio**2 overflows x to inf: rsqrt(x) == 0
        (3e38, -0.0, 1000.0, False),  # rsqrt(x) == +0 against v == -0
        (3e38, 0.0, 1000.0, False),
        (3e38, -0.0, 1.5, True),  # x large but finite: min(rsqrt(x), -0) is -0
        (None, float("nan"), 1.5, False),
        (None, float("inf"), 1.5, False),
        (None, 0.0, 1.5, True),
        (None, -0.0, 1.5, True),
        (None, 1e-30, 1.5, True),  # v * v is subnormal
        (0.0, None, 1.5, True),
        (-0.0, None, 1.5, True),
    ],
)
@pytest.mark.parametrize("position", [17, NUMEL - 3], ids=["body", "tail"])
def test_nan_inf_negative_and_zero_entries_give_the_formula_bits(s_value, v_value, c, skipped, position):
    s, v = _state(c=c)
    assert _check(s, v, c=c)  # no entry binds before the one changed
    if s_value is not None:
        s[position] = s_value
    if v_value is not None:
        v[position] = v_value
    # keep_unseen=False: a 0 in v takes the limit, not the late-seen rule.
    assert _check(s, v, c=c, keep_unseen=False) == skipped


@pytest.mark.parametrize("ratio", [1.0, float("inf")], ids=["ratio1", "ratio-inf"])
def test_the_edge_ratios_give_the_formula_bits(ratio):
    s, v = _state()
    _check(s, v, ratio=ratio)
    if ratio == 1.0:
        v[9] = torch.rsqrt(_x(s, 1.5, ratio))[9] * 2  # binds
        assert not _check(s, v, ratio=ratio)
    else:
        v[9] = float("inf")
        _check(s, v, ratio=ratio)
        s[10] = 3e38  # s * c overflows: rsqrt(inf) * inf is nan
        _check(s, v, c=1000.0, ratio=ratio)


def test_each_tensor_of_a_batch_is_decided_on_its_own():
    (s0, v0), (s1, v1) = _state(seed=0), _state(seed=1)
    v1[100] = torch.rsqrt(_x(s1, 1.5))[100] * 4  # binds
    empty = torch.zeros(0)
    used = _used([s0, s1, empty], [v0, v1, empty])
    assert used[0] is v0 and used[1] is not v1 and used[2].numel() == 0
    assert torch.equal(_bits(used[1]), _bits(_expected(s1, v1, 1.5)))


def test_other_powers_and_whole_tensors_keep_the_full_computation(monkeypatch):
    calls = []
    monkeypatch.setattr(refresh_module, "_limit_cannot_bind", lambda *a, **k: calls.append(1) or [True])
    s, v = _state()
    assert _used([s], [v], gamma=0.5)[0] is not v
    assert _used([s], [v], skip_unbound=False)[0] is not v
    assert not calls


def test_a_run_where_the_limit_binds_now_and_then_matches_the_full_computation_bit_for_bit(monkeypatch):
    # A row whose gradient grows 100-fold after step 20 binds until the refresh at 32 takes it in; the other rows
    # never bind. The same run with the test turned off must give the same bits, and both verdicts must occur.
    verdicts = []
    test = refresh_module._limit_cannot_bind

    def counted(*args, **kwargs):
        result = test(*args, **kwargs)
        verdicts.extend(result)
        return result

    def run(skip: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(
            refresh_module, "_limit_cannot_bind", counted if skip else lambda s, *a, **k: [False] * len(s)
        )
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 48, generator=generator)) for _ in range(2)]
        optimizer = Anon(params, lr=1e-2)
        for step in range(1, 41):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator) * 1e-2
                if step > 20:
                    p.grad[3] *= 100
            optimizer.step()
        return [p.detach().clone() for p in params] + [
            t.clone() for st in optimizer.state.values() for t in st.values()
        ]

    skipped, computed = run(True), run(False)
    assert True in verdicts and False in verdicts
    for a, b in zip(skipped, computed, strict=True):
        assert torch.equal(_bits(a) if a.is_floating_point() else a, _bits(b) if b.is_floating_point() else b)
