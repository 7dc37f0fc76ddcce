"""Non-finite values: a refresh never stores a nan/inf preconditioner silently; between refreshes, as AdamW."""

from __future__ import annotations

import pytest
import torch
from optim_inputs import IMPLEMENTATIONS

from anon_hf import Anon, NonFinitePreconditionerError


def _run_until(opt, params, steps, bad_step, bad_value=float("nan")):
    for t in range(1, steps + 1):
        for p in params:
            p.grad = torch.randn_like(p)
        if t == bad_step:
            params[1].grad[0] = bad_value


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_raise_policy_names_group_tensor_and_step_and_keeps_old_preconditioner(impl):
    good, bad = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))
    opt = Anon([{"params": [good]}, {"params": [bad]}], lr=0.01, **IMPLEMENTATIONS[impl])
    for t in range(1, 4):
        good.grad, bad.grad = torch.randn(3), torch.randn(2, 2)
        if t == 3:
            bad.grad[0, 0] = float("nan")
        opt.step()
    precond_before = opt.state[bad]["precond"].clone()
    good.grad, bad.grad = torch.randn(3), torch.randn(2, 2)
    with pytest.raises(
        NonFinitePreconditionerError,
        match=r"refreshed at step 4 for param group 1, tensor 0 \(shape \(2, 2\)\) is not finite",
    ) as info:
        opt.step()
    assert (info.value.step, info.value.group_index, info.value.tensor_index) == (4, 1, 0)
    assert info.value.args == (4, 0, (2, 2), 1)  # (step, tensor_index, shape, group_index), as the fields
    assert torch.equal(opt.state[bad]["precond"], precond_before)
    assert "on_nonfinite='skip'" in str(info.value)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_skip_policy_keeps_previous_preconditioner_and_resets_accumulator(impl):
    param = torch.nn.Parameter(torch.randn(4))
    opt = Anon([param], lr=0.01, gamma=-0.5, on_nonfinite="skip", **IMPLEMENTATIONS[impl])
    for _ in range(2):
        param.grad = torch.randn(4)
        opt.step()
    precond_at_2 = opt.state[param]["precond"].clone()
    param.grad = torch.randn(4)
    # With gamma < 0 an inf second moment maps to a finite u (inf**-0.5 == 0): still a poisoned refresh.
    param.grad[1] = float("inf")
    opt.step()
    param.grad = torch.randn(4)
    opt.step()  # step 4: refresh, non-finite, skipped
    assert torch.equal(opt.state[param]["precond"], precond_at_2)
    assert torch.count_nonzero(opt.state[param]["exp_avg_sq"]).item() == 0
    assert opt.refresh_history == [1, 2, 4]


@pytest.mark.parametrize("gamma", [1.0, -0.5])
def test_inf_gradient_is_caught_whatever_the_sign_of_gamma(gamma):
    param = torch.nn.Parameter(torch.randn(4))
    opt = Anon([param], lr=0.01, gamma=gamma)
    param.grad = torch.randn(4)
    param.grad[3] = float("inf")
    with pytest.raises(NonFinitePreconditionerError, match="refreshed at step 1 for param group 0, tensor 0"):
        opt.step()


def test_nonfinite_gradient_between_refreshes_behaves_like_adamw():
    anon_param, adam_param = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    anon = Anon([anon_param], lr=0.01)
    adamw = torch.optim.AdamW([adam_param], lr=0.01)
    for t in range(1, 4):
        g = torch.randn(3)
        if t == 3:
            g[2] = float("nan")
        anon_param.grad, adam_param.grad = g.clone(), g.clone()
        anon.step()
        adamw.step()
    # Step 3 is not a refresh: the nan reaches the weight it belongs to, as in AdamW, and no other.
    assert torch.equal(torch.isnan(anon_param), torch.isnan(adam_param))
    assert torch.isnan(anon_param).tolist() == [False, False, True]


def test_large_gamma_with_tiny_second_moment_stays_finite():
    # sigma = eps = 1e-16 and gamma = 3 give sigma**gamma = 1e-48: zero in fp32 unless computed in log space.
    # keep_unseen=False: the published rule, under which the element without a gradient takes sigma = eps.
    param = torch.nn.Parameter(torch.zeros(3))
    opt = Anon([param], lr=0.01, gamma=3.0, keep_unseen=False)
    param.grad = torch.tensor([0.0, 1e-3, 1.0])
    opt.step()
    precond = opt.state[param]["precond"]
    assert torch.isfinite(precond).all()
    torch.testing.assert_close(precond[0], torch.tensor(1e24), rtol=1e-4, atol=0)
    assert param[0].item() == 0.0
