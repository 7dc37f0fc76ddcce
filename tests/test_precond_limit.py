"""``max_precond_ratio``: between refreshes a step uses ``min(v, ratio * sigma_t**(-gamma / 2))``.

The case it exists for: a weight whose gradients were tiny over the intervals that built ``v`` and are large now (an
embedding or output row of a rare token). Every path (for-loop, foreach, the C++ kernel, the compiled graphs) is
compared with the literal reference (``tests/reference.py``), which spells the limit out again with Python floats.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from paths import PATHS
from paths import use_path as _use_path
from reference import ReferenceAnon

from anon_hf import Anon
from anon_hf.integrations.transformers import parse_optim_args


def _grown_row_run(flags: dict, *, rows, dim, quiet, grow_at, gamma, max_precond_ratio, steps=70):
    """Row 0's gradients are ``quiet`` times those of the other rows until ``grow_at``, then as large. Steps Anon
    (fp32) and the reference side by side; returns (Anon's params, the reference's, row 0's largest step in lr)."""
    lr = 1e-3
    generator = torch.Generator().manual_seed(rows * 1000 + dim + grow_at)
    init = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    kwargs = dict(lr=lr, gamma=gamma, max_precond_ratio=max_precond_ratio)
    param = torch.nn.Parameter(init.float())
    opt = Anon([param], **kwargs, **flags)
    reference = ReferenceAnon([init.flatten().tolist()], **kwargs)
    largest = 0.0
    for step in range(1, steps + 1):
        grad = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
        if step < grow_at:
            grad[0] *= quiet
        param.grad = grad.float()
        before = param.detach()[0].clone()
        opt.step()
        largest = max(largest, (param.detach()[0] - before).abs().max().item() / lr)
        reference.step([grad.float().double().flatten().tolist()])
    expected = torch.tensor(reference.params[0], dtype=torch.float64).view(rows, dim)
    return param.detach().double(), expected, largest


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    rows=st.integers(2, 6),
    dim=st.integers(1, 40),
    quiet=st.sampled_from([1e-6, 1e-4]),
    grow_at=st.integers(5, 60),
    gamma=st.sampled_from([1.0, 0.5, 1.5, -0.5]),
)
def test_a_row_whose_gradient_grows_between_refreshes_follows_the_reference_on_every_path(
    rows, dim, quiet, grow_at, gamma
):
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in PATHS:
            got, expected, _ = _grown_row_run(
                _use_path(name, monkeypatch),
                rows=rows,
                dim=dim,
                quiet=quiet,
                grow_at=grow_at,
                gamma=gamma,
                max_precond_ratio=10.0,
            )
            # fp32 against float64; the fused paths compute powers through exp and log (~1e-6 relative).
            torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("name", list(PATHS))
def test_the_limit_is_what_keeps_a_grown_row_from_a_huge_step(name, monkeypatch):
    flags = _use_path(name, monkeypatch)
    run = dict(rows=4, dim=16, quiet=1e-5, grow_at=40, gamma=1.0)
    _, _, limited = _grown_row_run(flags, max_precond_ratio=10.0, **run)
    _, _, unlimited = _grown_row_run(flags, max_precond_ratio=None, **run)
    # v ~ 1e5 was built from gradients 1e-5 times the ones that come at step 40, inside the interval 33..64.
    assert unlimited > 1e3
    # At most ratio * |m_hat| / sqrt(sigma_t); with beta1 = 0.9 and n <= 32 gradients since the refresh, ~2 * sqrt(n).
    assert limited <= 12.0


def test_on_stationary_gradients_the_limit_changes_only_the_first_intervals():
    # Where every element has gradients of one scale, v rests on one or two draws only at steps 1-7; after that the
    # limit never binds, so the limited run departs from the paper's update only for elements whose early draws were
    # small, and only then.
    def run(ratio):
        generator = torch.Generator().manual_seed(0)
        param = torch.nn.Parameter(torch.zeros(4096))
        opt = Anon([param], lr=1e-3, max_precond_ratio=ratio, foreach=False)
        history = []
        for _ in range(300):
            param.grad = torch.randn(4096, generator=generator)
            opt.step()
            history.append(param.detach().clone())
        return history

    limited, published = run(10.0), run(None)
    assert torch.equal(limited[1], published[1])  # steps 1 and 2 refresh: nothing to limit
    differ_at_8 = limited[7] != published[7]
    assert 0 < int(differ_at_8.sum()) < 0.02 * 4096
    for step in range(8, 300):
        assert torch.equal(limited[step][~differ_at_8], published[step][~differ_at_8]), step + 1


@pytest.mark.parametrize("bad", [0.5, 0.0, -1.0, math.nan, "10", True])
def test_a_bad_max_precond_ratio_is_refused_before_anything_changes(bad):
    param = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"max_precond_ratio.*allowed: None to turn the limit off, or a float >= 1"):
        Anon([param], max_precond_ratio=bad)
    opt = Anon([param])
    with pytest.raises(ValueError, match="max_precond_ratio"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "max_precond_ratio": bad})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("good", [None, 1.0, 10, math.inf])
def test_max_precond_ratio_accepts_none_one_and_inf(good):
    opt = Anon([torch.nn.Parameter(torch.ones(3))], max_precond_ratio=good)
    assert opt.param_groups[0]["max_precond_ratio"] == good


def test_optim_args_set_the_ratio_or_turn_it_off():
    assert parse_optim_args("max_precond_ratio=30")["max_precond_ratio"] == 30.0
    assert parse_optim_args("max_precond_ratio=none")["max_precond_ratio"] is None
    with pytest.raises(ValueError, match="max_precond_ratio"):
        Anon([torch.nn.Parameter(torch.ones(1))], **parse_optim_args("max_precond_ratio=0.1"))


def test_a_state_dict_from_before_the_limit_loads_with_the_default():
    param = torch.nn.Parameter(torch.ones(3))
    opt = Anon([param])
    param.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    del saved["param_groups"][0]["max_precond_ratio"]
    fresh = Anon([param], max_precond_ratio=None)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["max_precond_ratio"] == 10.0


@pytest.mark.parametrize("gamma", [1.0, 0.5, 1.5, 3.0], ids=["one", "pow", "log", "log3"])
@pytest.mark.parametrize("name", ["kernel", "graphs"])
def test_the_fused_shortcuts_miss_no_binding_element_near_the_threshold(name, gamma, monkeypatch):
    # The kernel skips blocks where a cheap test says no lane can bind. One element in 64 lies just above the
    # threshold (v**2 * sigma**gamma up to 1.4x ratio**2), one just below, the rest far below: a block then holds at
    # most one binding lane, which the test must not miss.
    flags = _use_path(name, monkeypatch)
    generator = torch.Generator().manual_seed(int(gamma * 10))
    numel, ratio, beta2 = 4096, 10.0, 0.999
    precond = 10 ** (torch.rand(numel, generator=generator, dtype=torch.float64) * 8 - 3)
    # Choose sigma so that v**2 * sigma**gamma / ratio**2 = 2**u: u in (0, 0.5), (-0.5, 0) or [-20, -3].
    position = torch.arange(numel) % 64
    uniform = torch.rand(numel, generator=generator, dtype=torch.float64)
    log2_excess = torch.where(
        position == 0, uniform * 0.5, torch.where(position == 32, -uniform * 0.5, -3 - 17 * uniform)
    )
    sigma = ((ratio**2 * 2**log2_excess) / precond**2) ** (1 / gamma)
    # Step 6 with a zero gradient: the accumulator is beta2 * s, two gradients after the refresh at step 4, so
    # sigma = beta2 * s / (1 - beta2**2) (+ eps = 1e-16, negligible here); the momentum is 0.9 * 1.
    exp_avg_sq = sigma * (1 - beta2**2) / beta2
    results = {}
    for path, path_flags in (("forloop", dict(foreach=False)), (name, flags)):
        param = torch.nn.Parameter(torch.zeros(numel))
        opt = Anon([param], lr=1.0, gamma=gamma, max_precond_ratio=ratio, **path_flags)
        param.grad = torch.zeros(numel)
        opt.step()  # creates the state
        state = opt.state[param]
        state["step"].fill_(5.0)
        state["precond"].copy_(precond)
        state["exp_avg_sq"].copy_(exp_avg_sq)
        state["exp_avg"].fill_(1.0)
        param.data.zero_()
        opt.step()
        results[path] = -param.detach().double() / (0.9 / (1 - 0.9**6))  # the preconditioner the step used
    stored = precond.float().double()
    assert int((results["forloop"] < stored * (1 - 1e-4)).sum()) > 0.5 * numel / 64  # the planted lanes bind
    torch.testing.assert_close(results[name], results["forloop"], rtol=3e-6, atol=0)
