"""Property tests: random shapes, dtypes, hyperparameters and step counts against the literal reference."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optim_inputs import IMPLEMENTATIONS
from reference import ReferenceAnon

from anon_hf import Anon, refresh_steps
from anon_hf.backends import cpu_kernel as _cpu_kernel

settings.register_profile(
    "anon", max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("anon")

refresh_modes = st.one_of(st.sampled_from(["pow2", "every"]), st.integers(min_value=1, max_value=6))
hyperparameters = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-4, 0.1),
        # beta2 is 0 or >= 0.5: with keep_unseen an accumulator that is exactly 0 keeps the preconditioner, and
        # beta2 = 1e-30 can take s_prev * beta2 to 0 in fp32 while the fp64 reference keeps a subnormal s > 0.
        "betas": st.tuples(st.floats(0.0, 0.99), st.one_of(st.just(0.0), st.floats(0.5, 0.999))),
        "gamma": st.floats(-2.0, 3.0),
        "eps": st.sampled_from([1e-16, 1e-12, 1e-8]),
        "weight_decay": st.sampled_from([0.0, 0.01, 0.2]),
        "decoupled_weight_decay": st.booleans(),
        "refresh": refresh_modes,
        "beta3": st.floats(0.0, 0.95),
    }
)
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
# fp32 and bf16 parameters are compared with a reference run in fp64 on the same (rounded) gradients.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _gradients(shape, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(steps):
        g = torch.randn(shape, generator=generator, dtype=torch.float64)
        g = g * 10 ** torch.empty(shape, dtype=torch.float64).uniform_(-2, 1, generator=generator)
        grads.append(torch.where(torch.rand(shape, generator=generator) < 0.05, 0.0, g))
    return grads


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@given(
    kwargs=hyperparameters,
    shape=shapes,
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    steps=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_every_path_matches_reference(impl, kwargs, shape, dtype, steps, seed):
    _check_against_reference(IMPLEMENTATIONS[impl], kwargs, shape, dtype, steps, seed)


@given(
    kwargs=hyperparameters,
    # Up to 216 elements: several of the kernel's 32-element blocks and a tail. (Larger tensors hold, sooner or later,
    # an element whose L2-decayed gradient cancels to ~0 before a huge step, where fp32 and the fp64 reference part.)
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    steps=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_fused_cpu_kernel_matches_reference(kwargs, shape, dtype, steps, seed):
    # fused=True on CPU fp32/bf16 params is anon_hf's C++ kernel (fp64 takes the compiled graphs, see test_fused.py).
    if (reason := _cpu_kernel.kernel_unavailable_reason()) is not None:
        pytest.skip(f"the C++ kernel is unavailable here: {reason}")
    _check_against_reference(dict(fused=True), kwargs, shape, dtype, steps, seed)


def _check_against_reference(impl_kwargs, kwargs, shape, dtype, steps, seed):
    init = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    param = torch.nn.Parameter(init.clone())
    opt = Anon([param], **kwargs, **impl_kwargs)
    ref = ReferenceAnon([init.double().flatten().tolist()], **kwargs)
    trajectory_scale = 1.0
    for grad in _gradients(shape, steps, seed):
        grad = grad.to(dtype)
        param.grad = grad.clone()
        opt.step()
        ref.step([grad.double().flatten().tolist()])
        trajectory_scale = max(trajectory_scale, max(abs(x) for x in ref.params[0]))
        if dtype == torch.bfloat16:
            # bf16 rounds the weights at every step; follow the stored weights so rounding does not compound.
            ref.params[0] = param.detach().double().flatten().tolist()
    expected = torch.tensor(ref.params[0], dtype=torch.float64).view(shape)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(param.detach().double(), expected, rtol=tol, atol=tol * trajectory_scale)
    if kwargs["gamma"] != 0:
        assert opt.refresh_history == refresh_steps(steps, kwargs["refresh"])


@given(
    kwargs=hyperparameters,
    steps=st.integers(2, 30),
    save_at_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_state_dict_taken_at_any_step_resumes_identically(kwargs, steps, save_at_fraction, seed):
    save_at = int(save_at_fraction * (steps - 1))
    grads = _gradients((3, 2), steps, seed)
    init = torch.randn(3, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    straight = torch.nn.Parameter(init.clone())
    opt = Anon([straight], **kwargs)
    for g in grads:
        straight.grad = g.clone()
        opt.step()

    first_param = torch.nn.Parameter(init.clone())
    first = Anon([first_param], **kwargs)
    for g in grads[:save_at]:
        first_param.grad = g.clone()
        first.step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed_param = torch.nn.Parameter(first_param.detach().clone())
    resumed = Anon([resumed_param], **{**kwargs, "lr": 123.0})  # the saved groups' lr must win
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for g in grads[save_at:]:
        resumed_param.grad = g.clone()
        resumed.step()
    assert torch.equal(resumed_param, straight)
    assert resumed.state[resumed_param]["step"].item() == steps


@given(steps=st.integers(1, 300), refresh=refresh_modes)
def test_refresh_schedule_is_exactly_the_documented_one(steps, refresh):
    schedule = refresh_steps(steps, refresh)
    if refresh == "pow2":
        expected = [2**k for k in range(10) if 2**k <= steps]
    elif refresh == "every":
        expected = list(range(1, steps + 1))
    else:
        expected = sorted({1} | set(range(refresh, steps + 1, refresh)))
    assert schedule == expected


@given(beta1=st.floats(0.0, 0.99), lr=st.floats(1e-3, 1.0), steps=st.integers(1, 25), seed=st.integers(0, 2**16))
def test_gamma_zero_equals_sgd_with_dampened_momentum(beta1, lr, steps, seed):
    grads = _gradients((4,), steps, seed)
    p_anon, p_sgd = (
        torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)),
        torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)),
    )
    anon = Anon([p_anon], lr=lr, betas=(beta1, 0.999), gamma=0.0)
    sgd = torch.optim.SGD([p_sgd], lr=lr, momentum=beta1, dampening=beta1)
    sgd.state[p_sgd]["momentum_buffer"] = torch.zeros_like(p_sgd)
    for t, g in enumerate(grads, start=1):
        p_anon.grad, p_sgd.grad = g.clone(), g.clone()
        sgd.param_groups[0]["lr"] = lr / (1 - beta1**t)
        anon.step()
        sgd.step()
    scale = max(1.0, p_sgd.abs().max().item())
    torch.testing.assert_close(p_anon, p_sgd, rtol=1e-10, atol=1e-12 * scale)


def test_deepcopy_keeps_state_independent():
    param = torch.nn.Parameter(torch.randn(3))
    opt = Anon([param])
    param.grad = torch.randn(3)
    opt.step()
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    clone_state = next(iter(clone.state.values()))
    clone_state["exp_avg"].add_(1.0)
    assert not torch.equal(clone_state["exp_avg"], opt.state[param]["exp_avg"])
