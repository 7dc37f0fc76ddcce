"""anon_hf.Anon against the literal reference, torch's SGD, itself (for-loop vs foreach) and its state dicts."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
import torch
from optim_inputs import IMPLEMENTATIONS, error_inputs, extra_configs, reference_configs
from reference import run_beside_reference

from anon_hf import Anon

SHAPES = [(3, 4), (5,)]
# fp64 Anon computes what the reference computes up to the order of float operations and its log-space refresh.
TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def _initial_values(shapes=SHAPES, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def _run_against_reference(kwargs, impl, dtype, steps=40):
    init = _initial_values()
    params = [torch.nn.Parameter(t.to(dtype)) for t in init]
    opt = Anon(params, **kwargs, **IMPLEMENTATIONS[impl])
    ref = run_beside_reference(opt, params, init, steps, **kwargs)
    return opt, params, ref


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("config", reference_configs() + extra_configs(), ids=lambda c: c.desc)
def test_matches_reference(config, dtype, impl):
    opt, params, ref = _run_against_reference(config.kwargs, impl, dtype)
    for k, p in enumerate(params):
        expected = torch.tensor(ref.params[k], dtype=torch.float64).view_as(p)
        torch.testing.assert_close(p.detach().double(), expected, **TOLERANCES[dtype])
        if "precond" in opt.state[p]:
            expected_v = torch.tensor(ref.preconditioner(k), dtype=torch.float64).view_as(p)
            torch.testing.assert_close(opt.state[p]["precond"].double(), expected_v, **TOLERANCES[dtype])
    # gamma = 0 keeps no preconditioner, so there is nothing to refresh.
    assert opt.refresh_history == (ref.refreshes if config.kwargs.get("gamma", 1.0) != 0 else [])


@pytest.mark.parametrize(
    "refresh, expected", [("pow2", [1, 2, 4, 8, 16, 32]), (5, [1, 5, 10, 15, 20, 25, 30, 35, 40])]
)
def test_refreshes_exactly_on_schedule_and_reuses_preconditioner_between(refresh, expected):
    param = torch.nn.Parameter(torch.randn(6))
    opt = Anon([param], lr=0.01, refresh=refresh)
    changed_at = []
    previous = None
    for t in range(1, 41):
        param.grad = torch.randn(6)
        opt.step()
        precond = opt.state[param]["precond"].clone()
        if previous is None or not torch.equal(precond, previous):
            changed_at.append(t)
        previous = precond
        # The accumulator is empty right after each refresh and only then.
        assert torch.count_nonzero(opt.state[param]["exp_avg_sq"]).item() == (0 if t in expected else 6)
    assert changed_at == expected
    assert opt.refresh_history == expected


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_gamma_zero_is_sgd_with_dampened_momentum_and_bias_correction(weight_decay, impl):
    beta1, lr = 0.9, 0.1
    init = torch.randn(4, 3, dtype=torch.float64)
    p_anon = torch.nn.Parameter(init.clone())
    p_sgd = torch.nn.Parameter(init.clone())
    anon = Anon(
        [p_anon],
        lr=lr,
        betas=(beta1, 0.999),
        gamma=0.0,
        weight_decay=weight_decay,
        decoupled_weight_decay=False,
        **IMPLEMENTATIONS[impl],
    )
    sgd = torch.optim.SGD([p_sgd], lr=lr, momentum=beta1, dampening=beta1, weight_decay=weight_decay)
    # torch's SGD seeds its buffer with the first gradient; Anon's m starts at 0, so start SGD's there too.
    sgd.state[p_sgd]["momentum_buffer"] = torch.zeros_like(p_sgd)
    for t in range(1, 31):
        noise = torch.randn(4, 3, dtype=torch.float64)
        p_anon.grad = p_anon.detach() * 0.5 + noise
        p_sgd.grad = p_sgd.detach() * 0.5 + noise
        sgd.param_groups[0]["lr"] = lr / (1 - beta1**t)
        anon.step()
        sgd.step()
        torch.testing.assert_close(p_anon, p_sgd, rtol=1e-12, atol=1e-14)
    assert set(anon.state[p_anon]) == {"step", "exp_avg"}, "gamma = 0 must not allocate exp_avg_sq or precond"


def _make_mixed_params(dtype, device="cpu"):
    shapes = [(7, 5), (5,), (1,), (3, 2, 4), (0,), (11,)]
    return [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("config", reference_configs()[::4] + extra_configs(), ids=lambda c: c.desc)
def test_foreach_matches_forloop(config, dtype, device):
    params_by_impl = {}
    for impl, flags in IMPLEMENTATIONS.items():
        torch.manual_seed(0)
        params = _make_mixed_params(dtype, device)
        # A group whose params never get gradients and an empty group are both legal and must be skipped.
        frozen = [torch.nn.Parameter(torch.randn(3, device=device).to(dtype))]
        groups = [{"params": params[:3]}, {"params": params[3:], "lr": 0.003}, {"params": frozen}, {"params": []}]
        opt = Anon(groups, **config.kwargs, **flags)
        for _ in range(20):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        assert frozen[0] not in opt.state
        params_by_impl[impl] = params
    # bf16 rounds every intermediate; the foreach kernels may order a fused multiply-add differently.
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-7)
    for a, b in zip(*params_by_impl.values(), strict=False):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_complex_params_match_their_real_view(impl):
    init = torch.randn(4, 3, dtype=torch.complex64)
    p_complex = torch.nn.Parameter(init.clone())
    p_real = torch.nn.Parameter(torch.view_as_real(init).clone())
    opt_c = Anon([p_complex], lr=0.01, weight_decay=0.1, **IMPLEMENTATIONS[impl])
    opt_r = Anon([p_real], lr=0.01, weight_decay=0.1, **IMPLEMENTATIONS[impl])
    for _ in range(10):
        g = torch.randn(4, 3, dtype=torch.complex64)
        p_complex.grad, p_real.grad = g, torch.view_as_real(g).clone()
        opt_c.step()
        opt_r.step()
    torch.testing.assert_close(torch.view_as_real(p_complex.detach()), p_real.detach(), rtol=0, atol=0)


def test_per_group_hyperparameters_match_separate_optimizers():
    group_kwargs = [dict(lr=0.02, gamma=0.5, refresh="every"), dict(lr=0.005, gamma=1.5, refresh=3, weight_decay=0.1)]
    init = [torch.randn(5, 4), torch.randn(6)]
    joint = [torch.nn.Parameter(t.clone()) for t in init]
    apart = [torch.nn.Parameter(t.clone()) for t in init]
    opt_joint = Anon([{"params": [p], **kw} for p, kw in zip(joint, group_kwargs, strict=False)], lr=1.0)
    opts_apart = [Anon([p], **kw) for p, kw in zip(apart, group_kwargs, strict=False)]
    for _ in range(25):
        for a, b in zip(joint, apart, strict=False):
            g = torch.randn_like(a)
            a.grad, b.grad = g, g.clone()
        opt_joint.step()
        for opt in opts_apart:
            opt.step()
    for a, b in zip(joint, apart, strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_tensor_lr_with_scheduler_matches_float_lr(impl):
    init = torch.randn(8)
    p_float, p_tensor = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_float = Anon([p_float], lr=0.05, **IMPLEMENTATIONS[impl])
    opt_tensor = Anon([p_tensor], lr=torch.tensor(0.05), **IMPLEMENTATIONS[impl])
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (opt_float, opt_tensor)]
    for _ in range(12):
        g = torch.randn(8)
        p_float.grad, p_tensor.grad = g, g.clone()
        for opt, schedule in zip((opt_float, opt_tensor), schedules, strict=False):
            opt.step()
            schedule.step()
    assert isinstance(opt_tensor.param_groups[0]["lr"], torch.Tensor)
    assert opt_tensor.param_groups[0]["lr"].item() == pytest.approx(0.05 * 0.5**4)
    torch.testing.assert_close(p_float, p_tensor, rtol=1e-7, atol=0)


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("save_at", [5, 8])
@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_state_dict_resume_is_identical_to_uninterrupted_run(save_at, gamma):
    batches = [(torch.randn(16, 6), torch.randn(16, 2)) for _ in range(40)]
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    resumed = copy.deepcopy(model)
    opt = Anon(model.parameters(), lr=0.01, gamma=gamma, weight_decay=0.01)
    _train(model, opt, batches)

    first = Anon(resumed.parameters(), lr=0.01, gamma=gamma, weight_decay=0.01)
    _train(resumed, first, batches[:save_at])
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh_model = type(resumed)(*[copy.deepcopy(m) for m in resumed])
    fresh_model.load_state_dict(checkpoint["model"])
    second = Anon(fresh_model.parameters(), lr=0.01, gamma=gamma, weight_decay=0.01)
    second.load_state_dict(checkpoint["optimizer"])
    _train(fresh_model, second, batches[save_at:])

    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=False):
        assert torch.equal(a, b)
    assert second.state[next(fresh_model.parameters())]["step"].item() == 40


@pytest.mark.parametrize("config", error_inputs(), ids=lambda c: c.desc)
def test_bad_hyperparameters_raise_before_anything_is_built(config):
    param = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(config.error_type, match=config.error_regex):
        Anon([param], **config.kwargs)


@pytest.mark.parametrize("config", error_inputs(), ids=lambda c: c.desc)
def test_bad_group_hyperparameters_raise_and_leave_the_optimizer_unchanged(config):
    opt = Anon([torch.nn.Parameter(torch.randn(3))], lr=0.01)
    with pytest.raises(config.error_type, match=config.error_regex):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], **config.kwargs})
    assert len(opt.param_groups) == 1


def test_sparse_gradients_are_refused():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = Anon(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="Anon does not support sparse gradients, consider SparseAdam instead"):
        opt.step()
    assert len(opt.state) == 0


def test_adamw_state_dict_is_refused():
    param = torch.nn.Parameter(torch.randn(4))
    adamw = torch.optim.AdamW([param])
    param.grad = torch.randn(4)
    adamw.step()
    opt = Anon([param])
    with pytest.raises(ValueError, match=r"not written by Anon: param group 0 has no gamma, refresh, beta3"):
        opt.load_state_dict(adamw.state_dict())
    assert len(opt.state) == 0


def test_adam_moments_grafted_into_anon_groups_are_refused():
    param = torch.nn.Parameter(torch.randn(4))
    adamw = torch.optim.AdamW([param])
    param.grad = torch.randn(4)
    adamw.step()
    opt = Anon([param])
    forged = opt.state_dict()
    forged["state"] = adamw.state_dict()["state"]
    with pytest.raises(ValueError, match=r"only one of 'exp_avg_sq' and 'precond'"):
        opt.load_state_dict(forged)


def test_state_dict_of_other_shapes_is_refused():
    small, large = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(5))
    source = Anon([small])
    small.grad = torch.randn(4)
    source.step()
    target = Anon([large])
    with pytest.raises(
        ValueError, match=r"State 'exp_avg' of param 0 has shape \(4,\) but the parameter has shape \(5,\)"
    ):
        target.load_state_dict(source.state_dict())


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_zero_grad_lr_zero_step_creates_every_state_key_and_changes_nothing(impl):
    # torch.distributed.checkpoint initialises an empty optimizer exactly this way before loading into it.
    param = torch.nn.Parameter(torch.randn(5, 3))
    before = param.detach().clone()
    opt = Anon([param], lr=0.0, weight_decay=0.1, **IMPLEMENTATIONS[impl])
    param.grad = torch.zeros_like(param)
    opt.step()
    assert set(opt.state[param]) == {"step", "exp_avg", "exp_avg_sq", "precond"}
    assert torch.equal(param, before)
    assert torch.isfinite(opt.state[param]["precond"]).all()


def test_import_stays_light():
    code = "import sys, anon_hf; print(sorted(m for m in ('transformers', 'accelerate', 'deepspeed', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_numpy_scalars_are_accepted_and_stored_as_python_floats():
    np = pytest.importorskip("numpy", reason="numpy is not installed")
    param = torch.nn.Parameter(torch.randn(3))
    opt = Anon([param], lr=np.float64(0.01), gamma=np.float32(1.5), betas=(np.float32(0.9), 0.99))
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "eps": np.float64(1e-12)})
    param.grad = torch.randn(3)
    opt.step()
    groups = opt.state_dict()["param_groups"]
    assert type(groups[0]["gamma"]) is float and type(groups[0]["betas"][0]) is float
    assert type(groups[1]["eps"]) is float
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # numpy scalars would be refused by the weights-only unpickler
