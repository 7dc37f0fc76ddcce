"""The torch.optim conventions users rely on: closures, zero_grad, skipped params, schedulers, compile."""

from __future__ import annotations

import pytest
import torch
from optim_inputs import IMPLEMENTATIONS

from anon_hf import Anon


def test_closure_is_called_once_with_grad_enabled_and_its_loss_returned():
    model = torch.nn.Linear(3, 1)
    opt = Anon(model.parameters(), lr=0.01)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = model(torch.ones(2, 3)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.requires_grad


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_params_without_grad_are_skipped_and_keep_their_own_step(impl):
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    b_alone = torch.nn.Parameter(b.detach().clone())
    opt = Anon([a, b], lr=0.01, **IMPLEMENTATIONS[impl])
    opt_alone = Anon([b_alone], lr=0.01, **IMPLEMENTATIONS[impl])
    b_before = b.detach().clone()
    for t in range(1, 13):
        a.grad = torch.randn(4)
        b.grad = torch.randn(4) if t % 3 == 0 else None
        opt.step()
        if b.grad is not None:
            b_alone.grad = b.grad.clone()
            opt_alone.step()
        if t < 3:
            assert b not in opt.state and torch.equal(b, b_before)
    assert opt.state[a]["step"].item() == 12
    assert opt.state[b]["step"].item() == 4
    # b's bias corrections and refreshes follow its own 4 steps, exactly as if it had been alone.
    torch.testing.assert_close(b, b_alone, rtol=0, atol=0)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_set_to_none_decides_whether_a_step_counts(set_to_none):
    param = torch.nn.Parameter(torch.randn(3))
    opt = Anon([param], lr=0.01)
    param.grad = torch.randn(3)
    opt.step()
    opt.zero_grad(set_to_none=set_to_none)
    opt.step()
    assert opt.state[param]["step"].item() == (1 if set_to_none else 2)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + t)),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
    ],
    ids=["lambda", "cosine", "onecycle"],
)
def test_schedulers_drive_tensor_and_float_lr_alike(make_scheduler):
    init = torch.randn(5)
    runs = []
    for lr in (0.05, torch.tensor(0.05)):
        param = torch.nn.Parameter(init.clone())
        opt = Anon([param], lr=lr)
        scheduler = make_scheduler(opt)
        lrs = []
        for t in range(10):
            param.grad = torch.full((5,), float(t + 1)) * init
            opt.step()
            scheduler.step()
            lrs.append(float(opt.param_groups[0]["lr"]))
        runs.append((param.detach(), lrs, opt.param_groups[0]["betas"]))
    (p_float, lrs_float, betas_float), (p_tensor, lrs_tensor, betas_tensor) = runs
    assert len(set(lrs_float)) > 1, "the scheduler must have changed lr"
    assert lrs_float == pytest.approx(lrs_tensor)
    assert betas_float == pytest.approx(betas_tensor)
    torch.testing.assert_close(p_float, p_tensor, rtol=1e-6, atol=1e-7)


def test_onecycle_cycles_beta1_through_the_betas_key():
    opt = Anon([torch.nn.Parameter(torch.randn(2))], lr=0.01, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, total_steps=10, base_momentum=0.8, max_momentum=0.95
    )
    assert opt.param_groups[0]["betas"][0] == pytest.approx(0.95)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["betas"][0] < 0.95


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one():
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin)
    opts = [Anon(eager.parameters(), lr=0.01), Anon(twin.parameters(), lr=0.01)]
    for _ in range(5):
        x = torch.randn(32, 8)
        for model, opt in zip((eager, compiled), opts, strict=False):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(eager.parameters(), twin.parameters(), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_older_state_dict_without_newer_group_keys_loads_with_defaults():
    """Migration rule: group keys added in later releases are filled with their defaults on load."""
    param = torch.nn.Parameter(torch.randn(3))
    opt = Anon([param], lr=0.01)
    param.grad = torch.randn(3)
    opt.step()
    old = opt.state_dict()
    for key in ("on_nonfinite", "bounds", "maximize", "foreach", "differentiable"):
        del old["param_groups"][0][key]
    fresh = Anon([param], lr=0.01, on_nonfinite="skip")
    fresh.load_state_dict(old)
    group = fresh.param_groups[0]
    assert (group["on_nonfinite"], group["bounds"], group["maximize"], group["foreach"]) == (
        "raise",
        None,
        False,
        None,
    )
    param.grad = torch.randn(3)
    fresh.step()
    assert fresh.state[param]["step"].item() == 2
