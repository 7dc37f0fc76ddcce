"""The refresh rule every path obeys (``anon_hf.refresh``): one mode decision, late-seen weights, 16-bit storage.

Paths: ``forloop`` and ``foreach`` (eager), ``kernel`` (``fused=True`` on CPU: the C++ kernel) and ``graphs``
(``fused=True`` with ``ANON_HF_CPU_KERNEL=0``: the torch.compile'd graphs CUDA tensors run).
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

import anon_hf
import anon_hf.backends.fused
import anon_hf.refresh
from anon_hf import Anon, NonFinitePreconditionerError


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    return request.param, _use_path(request.param, monkeypatch)


# --- one mode decision ------------------------------------------------------------------------------------------

# (gamma, eps) -> the mode each path must take, written out from the rule in docs/algorithm.md: directly where
# |gamma| <= 1 and eps >= 1e-30 (no power at all for gamma == 1), in log space otherwise.
MODE_GRID = {
    (1.0, 1e-16): "one",
    (1.0, 1e-35): "log",
    (0.5, 1e-16): "pow",
    (-0.5, 1e-8): "pow",
    (-1.0, 1e-30): "pow",
    (1.5, 1e-16): "log",
    (3.0, 1e-8): "log",
    (-2.0, 1e-16): "log",
    (0.5, 1e-35): "log",
}


@pytest.mark.parametrize("scale", [1e-6, 1e2], ids=["small_sigma", "large_sigma"])
@pytest.mark.parametrize(("gamma", "eps"), list(MODE_GRID), ids=[f"gamma{g}-eps{e}" for g, e in MODE_GRID])
def test_every_path_takes_the_same_mode_and_agrees_with_the_reference(gamma, eps, scale, monkeypatch):
    taken = []
    decide = anon_hf.refresh.refresh_mode

    def spy(*args):
        taken.append(decide(*args))
        return taken[-1]

    # The eager refresh (anon_hf.refresh.stored_refresh) and the fused execution are the two callers; the kernel and
    # the graphs receive their answer.
    monkeypatch.setattr(anon_hf.refresh, "refresh_mode", spy)
    monkeypatch.setattr(anon_hf.backends.fused, "refresh_mode", spy)
    generator = torch.Generator().manual_seed(3)
    init = torch.randn(40, generator=generator, dtype=torch.float64)
    grads = [torch.randn(40, generator=generator, dtype=torch.float64) * scale for _ in range(8)]
    kwargs = dict(lr=1e-3, gamma=gamma, eps=eps)
    reference = ReferenceAnon([init.tolist()], **kwargs)
    for grad in grads:
        reference.step([grad.tolist()])
    expected_precond = torch.tensor(reference.preconditioner(0), dtype=torch.float64)
    for name in PATHS:
        taken.clear()
        param = torch.nn.Parameter(init.float().clone())
        opt = Anon([param], **kwargs, **_use_path(name, monkeypatch))
        for grad in grads:
            param.grad = grad.float()
            opt.step()
        assert set(taken) == {MODE_GRID[(gamma, eps)]}, name
        # fp32 against the fp64 reference: the kernel's exp carries ~1e-6 + |gamma log sigma| * 6e-8 relative.
        rtol = 1e-5 + abs(gamma * math.log(max(scale**2, eps))) * 1e-7
        torch.testing.assert_close(opt.state[param]["precond"].double(), expected_precond, rtol=rtol, atol=0)
        torch.testing.assert_close(
            param.detach().double(), torch.tensor(reference.params[0], dtype=torch.float64), rtol=1e-4, atol=1e-6
        )


def test_the_direct_range_is_decided_in_one_place():
    import subprocess
    from pathlib import Path

    package = Path(anon_hf.__file__).parent
    hits = subprocess.run(
        ["grep", "-rln", "--include=*.py", "--include=*.cpp", "1e-30", str(package)], capture_output=True, text=True
    ).stdout.split()
    assert [Path(hit).relative_to(package).as_posix() for hit in hits] == ["refresh.py"]


# --- check before write, for every mix of backends -----------------------------------------------------------------

# Where each kind of tensor goes under fused=True on CPU: fp32 to the kernel, fp64 to the graphs, complex to eager.
MEMBERS = {"kernel": torch.float32, "graphs": torch.float64, "eager": torch.complex64}
MIXES = [("kernel", "eager"), ("graphs", "eager"), ("kernel", "graphs"), ("kernel", "graphs", "eager")]


@pytest.mark.parametrize("mix", MIXES, ids=["+".join(m) for m in MIXES])
def test_a_raise_writes_nothing_whatever_the_mix_of_backends(mix, monkeypatch):
    _use_path("kernel", monkeypatch)
    for bad_member in mix:
        generator = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(3, 4, generator=generator).to(MEMBERS[m])) for m in mix]
        opt = Anon(params, lr=0.01, fused=True)
        for step in range(1, 5):
            for p in params:
                p.grad = torch.randn(3, 4, generator=generator).to(p.dtype)
            if step == 4:  # a refresh with a previous preconditioner
                params[mix.index(bad_member)].grad[1, 2] = float("nan")
                before = [t.detach().clone() for p in params for t in (p, *opt.state[p].values())]
                with pytest.raises(NonFinitePreconditionerError, match=f"step 4 .* tensor {mix.index(bad_member)}"):
                    opt.step()
            else:
                opt.step()
        after = [t.detach() for p in params for t in (p, *opt.state[p].values())]
        for old, new in zip(before, after, strict=True):
            torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True)


def test_the_kernel_and_the_graphs_really_share_the_mixed_step(monkeypatch):
    _use_path("kernel", monkeypatch)
    params = [torch.nn.Parameter(torch.randn(3, 4).to(dtype)) for dtype in MEMBERS.values()]
    opt = Anon(params, lr=0.01, fused=True)
    before = dict(anon_hf.backends.fused.stats)
    for p in params:
        p.grad = torch.randn(3, 4).to(p.dtype)
    opt.step()
    for counter in ("kernel", "compiled", "fallback"):
        assert anon_hf.backends.fused.stats[counter] > before.get(counter, 0), counter


# --- late-seen weights --------------------------------------------------------------------------------------------


def _late_row_first_step(flags: dict, rows: int, dim: int, first_seen: int, scale: float, **rule):
    """Train an embedding-like matrix whose row 0 gets no gradient before ``first_seen``; return the first step that
    row takes (its largest element), in units of lr, or 0.0 if it never moves. ``rule``: keep_unseen and
    max_precond_ratio, when not the defaults."""
    lr = 1e-3
    generator = torch.Generator().manual_seed(first_seen)
    param = torch.nn.Parameter(torch.randn(rows, dim, generator=generator))
    opt = Anon([param], lr=lr, **rule, **flags)
    for step in range(1, 2 * first_seen + 2):  # past the first refresh after first_seen
        grad = torch.randn(rows, dim, generator=generator) * scale
        if step < first_seen:
            grad[0] = 0.0
        param.grad = grad
        row_before = param.detach()[0].clone()
        opt.step()
        moved = (param.detach()[0] - row_before).abs().max().item() / lr
        if moved > 0:
            return moved
    return 0.0


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    first_seen=st.integers(5, 60),
    scale=st.sampled_from([1e-4, 1e-3, 1e-2, 1e-1, 1.0]),
    rows=st.integers(2, 9),
    dim=st.integers(1, 70),
)
def test_a_weight_first_seen_late_takes_a_first_step_within_10_lr(first_seen, scale, rows, dim):
    # Every path, at the defaults (gamma = 1, eps = 1e-16). Adam's bound on one step is (1 - b1) / sqrt(1 - b2) ~ 3.2.
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in PATHS:
            first_step = _late_row_first_step(_use_path(name, monkeypatch), rows, dim, first_seen, scale)
            assert 0.0 < first_step <= 10.0, (name, first_step)


def test_the_published_rule_is_kept_behind_keep_unseen_false_and_no_limit(monkeypatch):
    # The same setting under the published rule: v = eps**-0.5 = 1e8 meets the first gradient (issue 13's table).
    flags = _use_path("foreach", monkeypatch)
    first_step = _late_row_first_step(flags, 4, 8, 37, 1e-2, keep_unseen=False, max_precond_ratio=None)
    assert first_step > 1e4
    # Either safeguard alone bounds it: the limit sees that the first gradient does not justify v = 1e8.
    assert _late_row_first_step(flags, 4, 8, 37, 1e-2, keep_unseen=False) <= 10.0
    assert _late_row_first_step(flags, 4, 8, 37, 1e-2, max_precond_ratio=None) <= 10.0


@pytest.mark.parametrize("refresh", ["pow2", "every", 3])
@pytest.mark.parametrize(
    "keep_unseen, max_precond_ratio",
    [(True, 10.0), (False, 10.0), (False, None)],
    ids=["default", "limit", "published"],
)
def test_sparse_gradients_match_the_literal_reference_under_each_rule(path, keep_unseen, max_precond_ratio, refresh):
    # Rows absent for stretches that cover whole refresh intervals, as rare tokens' embedding rows are.
    _, flags = path
    generator = torch.Generator().manual_seed(11)
    init = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    kwargs = dict(lr=1e-3, eps=1e-8, refresh=refresh, keep_unseen=keep_unseen, max_precond_ratio=max_precond_ratio)
    param = torch.nn.Parameter(init.clone())
    opt = Anon([param], **kwargs, **flags)
    reference = ReferenceAnon([init.flatten().tolist()], **kwargs)
    for step in range(1, 41):
        grad = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 0.01
        present = torch.tensor([step > 20, step % 7 == 0, step < 10, True, 3 <= step <= 5, step > 33])
        grad[~present] = 0.0
        param.grad = grad
        opt.step()
        reference.step([grad.flatten().tolist()])
    expected = torch.tensor(reference.params[0], dtype=torch.float64).view(6, 5)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-7, atol=1e-9)
    expected_precond = torch.tensor(reference.preconditioner(0), dtype=torch.float64).view(6, 5)
    torch.testing.assert_close(opt.state[param]["precond"], expected_precond, rtol=1e-7, atol=0)


def test_new_state_marks_the_preconditioner_unseen_and_a_zero_grad_step_changes_nothing():
    param = torch.nn.Parameter(torch.randn(4, 3))
    opt = Anon([param], lr=0.0)
    param.grad = torch.zeros(4, 3)
    before = param.detach().clone()
    opt.step()
    assert set(opt.state[param]) == {"step", "exp_avg", "exp_avg_sq", "precond"}
    assert torch.count_nonzero(opt.state[param]["precond"]).item() == 0
    assert torch.equal(param.detach(), before)


# --- 16-bit params ----------------------------------------------------------------------------------------------


def test_the_issue_13_float16_reproduction_stores_finite_values(path):
    _, flags = path
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float16))
    opt = Anon([p], **flags)
    p.grad = torch.tensor([1e-3, 0.5], dtype=torch.float16)
    opt.step()
    precond = opt.state[p]["precond"]
    assert precond.dtype == torch.float32 and opt.state[p]["exp_avg_sq"].dtype == torch.float32
    # sigma = g**2 (bias-corrected), so v = 1 / |g| with g as float16 holds it.
    expected = 1.0 / torch.tensor([1e-3, 0.5], dtype=torch.float16).float()
    torch.testing.assert_close(precond, expected, rtol=1e-5, atol=0)
    assert torch.isfinite(p).all()


def _train_16_bit(flags, dtype, steps=40):
    generator = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in [(64, 8), (37,)]]
    opt = Anon(params, **flags)
    for _ in range(steps):
        for p in params:
            # Small gradients: (1 - beta2) * g**2 is below float16's smallest subnormal for most elements.
            g = torch.randn(p.shape, generator=generator) * 10 ** torch.empty(p.shape).uniform_(
                -5, -2, generator=generator
            )
            p.grad = g.to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_params_at_defaults_stay_finite_and_every_path_agrees(dtype, monkeypatch):
    results = {}
    for name in PATHS:
        params, opt = _train_16_bit(_use_path(name, monkeypatch), dtype)
        for p in params:
            assert torch.isfinite(p).all(), name
            assert torch.isfinite(opt.state[p]["precond"]).all(), name
        results[name] = [p.detach().float() for p in params]
    # torch's own tolerances for the dtype (assert_close's defaults), against the for-loop.
    for name, tensors in results.items():
        for got, expected in zip(tensors, results["forloop"], strict=True):
            torch.testing.assert_close(got.to(dtype), expected.to(dtype), msg=name)
