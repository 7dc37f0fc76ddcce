"""The C++ kernel that ``fused=True`` runs on CPU (``anon_hf/backends/csrc/anon_cpu.cpp``, loaded by ``anon_hf.backends.cpu_kernel``).

What ``tests/test_fused.py`` covers for both backends (the reference grid, groups, skipped grads, state dicts, the
non-finite policies) is not repeated here. These tests cover what only the kernel has: its vector blocks and their
tails, threads, 16-bit storage, the build's fallback (the cache and the build itself: ``tests/test_kernel_cache.py``).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anon_hf import Anon, NonFinitePreconditionerError
from anon_hf.backends import cpu_kernel as _cpu_kernel
from anon_hf.backends import fused as _fused

# The kernel computes in fp32 with fused multiply-adds, the for-loop path rounds per op.
FP32 = dict(rtol=1e-5, atol=1e-6)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def kernel(monkeypatch):
    monkeypatch.setenv("ANON_HF_CPU_KERNEL", "1")
    reason = _cpu_kernel.kernel_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the C++ kernel is unavailable here: {reason}")


def _run(shapes, steps=20, seed=0, dtype=torch.float32, threads=None, inputs_in=None, **kwargs):
    """Anon on params of ``shapes`` for ``steps`` steps; ``inputs_in`` rounds the initial params and every gradient
    to that dtype first (an fp32 run that sees a 16-bit run's inputs)."""
    generator = torch.Generator().manual_seed(seed)

    def draw(shape):
        values = torch.randn(shape, generator=generator)
        return (values if inputs_in is None else values.to(inputs_in)).to(dtype)

    params = [torch.nn.Parameter(draw(s)) for s in shapes]
    opt = Anon(params, **{"lr": 0.01, "weight_decay": 0.1, **kwargs})
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for _ in range(steps):
            for p in params:
                p.grad = draw(p.shape)
            opt.step()
    finally:
        torch.set_num_threads(previous)
    return opt, params


@pytest.mark.parametrize("gamma", [1.0, 0.5, 2.0, 0.0], ids=["gamma1", "pow", "log", "gamma0"])
def test_every_tail_length_matches_the_forloop_path(gamma):
    # One vector block is 32 elements (two AVX-512 fp32 vectors); sizes around it and a block plus any tail.
    shapes = [(1,), (15,), (16,), (17,), (31,), (32,), (33,), (63,), (65,), (3, 7, 5), (1000,), (2, 0)]
    before = _fused.stats["kernel"]
    fused_opt, fused = _run(shapes, gamma=gamma, fused=True)
    loop_opt, loop = _run(shapes, gamma=gamma, foreach=False)
    assert _fused.stats["kernel"] - before == 20
    for a, b in zip(fused, loop, strict=True):
        torch.testing.assert_close(a, b, **FP32)
        for key, value in loop_opt.state[b].items():
            torch.testing.assert_close(fused_opt.state[a][key], value, **FP32)
    assert fused_opt.refresh_history == loop_opt.refresh_history


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="this torch has no OpenMP: the kernel is serial")
def test_large_tensors_are_split_over_torchs_threads():
    assert _cpu_kernel.kernel().threads_in_parts(2) == 2
    assert _cpu_kernel.kernel().threads_in_parts(1) == 1


def test_results_do_not_depend_on_the_number_of_threads():
    # 300,000 elements: several of the kernel's 32,768-element tasks, so two threads really split the tensor.
    shapes = [(300, 1000), (77,)]
    _, one = _run(shapes, steps=9, fused=True, threads=1)
    _, two = _run(shapes, steps=9, fused=True, threads=2)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_params_match_the_forloop_path_within_their_rounding(dtype):
    # The for-loop path computes in the param dtype, rounding per op; the kernel computes in fp32 and rounds once.
    shapes = [(33,), (8, 9)]
    _, fused = _run(shapes, steps=12, dtype=dtype, fused=True)
    _, loop = _run(shapes, steps=12, dtype=dtype, foreach=False)
    for a, b in zip(fused, loop, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "state_dtypes",
    [dict(precond_dtype="bf16"), dict(moments_dtype="bf16"), dict(precond_dtype="bf16", moments_dtype="bf16")],
    ids=["bf16_precond", "bf16_moments", "bf16_both"],
)
def test_16_bit_state_with_fp32_params_matches_foreach(state_dtypes):
    shapes = [(40,), (6, 11)]
    fused_opt, fused = _run(shapes, steps=12, fused=True, **state_dtypes)
    loop_opt, loop = _run(shapes, steps=12, foreach=True, **state_dtypes)
    for a, b in zip(fused, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
        for key, value in loop_opt.state[b].items():
            assert fused_opt.state[a][key].dtype == value.dtype
            torch.testing.assert_close(fused_opt.state[a][key].float(), value.float(), rtol=2e-2, atol=1e-3)


def test_bf16_params_with_fp32_state_round_once_per_step():
    # The eager paths apply the decay and the update to bf16 params as two rounded ops (p * 0.999 is often p again
    # in bf16); the kernel rounds p once per step. So the kernel is compared with fp32 params fed the same inputs:
    # 12 roundings to bf16 (half an ulp, 2**-9 relative, each) stay within 2e-2.
    shapes = [(40,), (6, 11)]
    kwargs = dict(precond_dtype="fp32", moments_dtype="fp32")
    fused_opt, fused = _run(shapes, steps=12, dtype=torch.bfloat16, fused=True, **kwargs)
    _, exact = _run(shapes, steps=12, dtype=torch.float32, inputs_in=torch.bfloat16, foreach=False)
    for a, b in zip(fused, exact, strict=True):
        assert a.dtype == torch.bfloat16 and fused_opt.state[a]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)


def test_large_gamma_with_tiny_second_moments_stays_finite():
    # gamma = 3 with sigma ~ eps = 1e-16: sigma**gamma = 1e-48 is zero in fp32, so the kernel works in log space.
    generator = torch.Generator().manual_seed(5)
    results = []
    for impl in (dict(fused=True), dict(foreach=False)):
        param = torch.nn.Parameter(torch.randn(50, generator=generator))
        opt = Anon([param], lr=1e-3, gamma=3.0, **impl)
        for _ in range(9):
            param.grad = torch.full((50,), 1e-12)
            opt.step()
        results.append(opt.state[param]["precond"].clone())
    assert torch.isfinite(results[0]).all()
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=0)


def test_fp64_and_noncontiguous_tensors_take_other_paths_in_the_same_step():
    params = [
        torch.nn.Parameter(torch.randn(6, 4)),  # the kernel
        torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64)),  # the compiled graphs
        torch.nn.Parameter(torch.randn(4, 6).t()),  # non-contiguous: foreach
    ]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = Anon(params, lr=0.01, fused=True), Anon(reference, lr=0.01, foreach=True)
    before = {key: _fused.stats[key] for key in ("kernel", "compiled", "fallback")}
    for _ in range(5):
        for p, q in zip(params, reference, strict=True):
            p.grad = torch.randn(p.shape, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for key in before:
        assert _fused.stats[key] > before[key], key
    for p, q in zip(params, reference, strict=True):
        torch.testing.assert_close(p, q, **FP32)


def test_the_environment_variable_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("ANON_HF_CPU_KERNEL", "0")
    assert _cpu_kernel.kernel_unavailable_reason() == "ANON_HF_CPU_KERNEL=0 is set"
    before = _fused.stats["kernel"], _fused.stats["compiled"]
    _run([(5, 3)], steps=3, fused=True)
    assert _fused.stats["kernel"] == before[0]
    assert _fused.stats["compiled"] > before[1]


def _forget_the_loaded_kernel(monkeypatch):
    monkeypatch.delitem(_cpu_kernel._results, _cpu_kernel.MAIN.prefix, raising=False)


def test_a_failed_build_falls_back_to_foreach_with_one_warning(monkeypatch, caplog):
    _forget_the_loaded_kernel(monkeypatch)

    def no_compiler(spec):
        raise RuntimeError("error: command 'c++' failed: No such file or directory")

    monkeypatch.setattr(_cpu_kernel, "_load_or_build", no_compiler)
    before = {key: _fused.stats[key] for key in ("kernel", "compiled", "fallback")}
    with caplog.at_level(logging.WARNING, logger="anon_hf"):
        _, fused = _run([(5, 3), (7,)], steps=6, fused=True)
    _, loop = _run([(5, 3), (7,)], steps=6, foreach=True)
    for a, b in zip(fused, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (_fused.stats["kernel"], _fused.stats["compiled"]) == (before["kernel"], before["compiled"])
    assert _fused.stats["fallback"] > before["fallback"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "could not be built" in warnings[0] and "No such file" in warnings[0] and "foreach" in warnings[0]
    with pytest.raises(RuntimeError, match="kernel is not loaded"):
        _cpu_kernel.kernel()


def test_loading_says_which_kernel_runs(monkeypatch, caplog):
    _forget_the_loaded_kernel(monkeypatch)
    with caplog.at_level(logging.INFO, logger="anon_hf.backends.cpu_kernel"):
        assert _cpu_kernel.kernel_unavailable_reason() is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "C++ kernel" in messages[0] and torch.backends.cpu.get_cpu_capability() in messages[0]


def test_the_kernel_refuses_mismatched_lists_before_writing():
    module = _cpu_kernel.kernel()
    param, grad, exp_avg = torch.randn(5), torch.randn(5), torch.zeros(5)
    original = param.clone()
    scalars = [1.0, 0.1, 0.999, 0.001, 1.0, 0.0, -1e30, 1e30] + [0.0] * 5
    # l2, bounds, refresh, has_prev, keep_unseen, estimate, limit, late_seen, check_only, keep
    flags = (False, False, 0, False, False, 0, False, False, False, [])
    with pytest.raises(RuntimeError, match="one entry per tensor"):
        module.anon_step([param], [grad], [exp_avg], [], [], [], [-0.1, -0.1], [1.0, 1.0], scalars, *flags)
    with pytest.raises(RuntimeError, match="one entry per tensor"):
        module.anon_step([param], [grad], [exp_avg], [], [], [], [-0.1], [], scalars, *flags)
    with pytest.raises(RuntimeError, match="param's size"):
        module.anon_step([param], [grad], [torch.zeros(4)], [], [], [], [-0.1], [1.0], scalars, *flags)
    assert torch.equal(param, original)
    assert module.anon_supported([param, param.t()], [grad, grad], [exp_avg, exp_avg], [], []) == [True, True]
    matrix = torch.randn(3, 4)
    assert module.anon_supported([matrix.t()], [matrix.t()], [matrix.t()], [], []) == [False]
    assert module.anon_supported([param.double()], [grad.double()], [exp_avg.double()], [], []) == [False]
    assert module.anon_supported([param], [grad.bfloat16()], [exp_avg], [], []) == [False]


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e20], ids=["nan", "inf", "square_overflows"])
@pytest.mark.parametrize("gamma", [1.0, 0.5], ids=["gamma1", "pow"])
def test_a_refresh_with_a_non_finite_accumulator_raises_before_writing(poison, gamma):
    # Step 4 refreshes with a previous preconditioner: the check's shortcut (no power computed) must still see it.
    param = torch.nn.Parameter(torch.randn(100))
    opt = Anon([param], lr=0.01, gamma=gamma, fused=True)
    for _ in range(3):
        param.grad = torch.randn(100)
        opt.step()
    param.grad = torch.randn(100)
    param.grad[70] = poison
    before = [param.detach().clone()] + [t.clone() for t in opt.state[param].values()]
    with pytest.raises(NonFinitePreconditionerError, match="step 4"):
        opt.step()
    after = [param.detach()] + list(opt.state[param].values())
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old, new)


@pytest.mark.parametrize("gamma", [1.0, 0.5], ids=["gamma1", "pow"])
def test_preconditioners_outside_the_checks_shortcut_range_match_foreach(gamma):
    # v > 1e15 (possible with a tiny eps and gamma > 1) makes the refresh check compute the new preconditioner for
    # that block instead of taking its shortcut; the step must still match the foreach path.
    results = []
    for impl in (dict(fused=True), dict(foreach=True)):
        generator = torch.Generator().manual_seed(6)
        param = torch.nn.Parameter(torch.randn(80, generator=generator))
        opt = Anon([param], lr=1e-3, gamma=gamma, **impl)
        for step in range(1, 5):
            param.grad = torch.randn(80, generator=generator)
            if step == 4:  # the refresh at step 4 meets v = 1e16 in the first block
                opt.state[param]["precond"][:8] = 1e16
            opt.step()
        results.append((param.detach().clone(), opt.state[param]["precond"].clone()))
    for fused, foreach in zip(*results, strict=True):
        assert torch.isfinite(fused).all()
        torch.testing.assert_close(fused, foreach, rtol=1e-5, atol=1e-6)


# The step rule between refreshes (anon_hf.refresh.StepRule), called through the kernel's adapter: 1,037 elements
# (32 whole blocks and a tail), v == 0 on every 7th element of the first 300 (so some blocks have such a lane and the
# rest do not), and of those, every other one with neither an accumulator nor a gradient (s stays 0).
RULE_NUMEL = 1037


def _rule_inputs(dtype, seed=6):
    generator = torch.Generator().manual_seed(seed)
    draw = lambda scale=1.0: torch.randn(RULE_NUMEL, generator=generator, dtype=torch.float64) * scale  # noqa: E731
    param, grad, exp_avg = draw(), draw(0.1), draw(0.1)
    exp_avg_sq = draw(0.1).square()
    precond = (draw(0.5).exp() * 3.0).clamp(min=0.1)
    unseen = torch.zeros(RULE_NUMEL, dtype=torch.bool)
    unseen[:300:7] = True
    never = torch.zeros(RULE_NUMEL, dtype=torch.bool)
    never[:300:14] = True
    precond[unseen] = 0.0
    exp_avg_sq[never], grad[never], exp_avg[never] = 0.0, 0.0, 0.0
    return [t.to(dtype) for t in (param, grad, exp_avg, exp_avg_sq, precond)]


def _rule_by_hand(tensors, hyper, rule, neg_step_size, inv_bias2):
    """The step of one tensor under ``rule``, written out in float64 from the StepRule docstring."""
    param, grad, exp_avg, exp_avg_sq, precond = (t.double() for t in tensors)
    beta1, beta2, gamma, eps = hyper["beta1"], hyper["beta2"], hyper["gamma"], hyper["eps"]
    exp_avg = exp_avg + (grad - exp_avg) * (1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + grad * grad * (1 - beta2)
    est = (exp_avg_sq * inv_bias2 + eps) ** (-gamma / 2)
    used = torch.minimum(precond, hyper["max_precond_ratio"] * est) if rule.limit else precond
    if rule.late_seen:
        late = torch.where(exp_avg_sq > 0, est, torch.zeros_like(est))
        used = torch.where(precond == 0, late, used)
    param = param * (1 - hyper["lr"] * hyper["weight_decay"]) + exp_avg * used * neg_step_size
    return param, exp_avg, exp_avg_sq


@pytest.mark.parametrize("late_seen", [True, False], ids=["late_seen", "no_late_seen"])
@pytest.mark.parametrize("limit", [True, False], ids=["limit", "no_limit"])
@pytest.mark.parametrize("gamma", [1.0, 0.5, 2.0, -0.5], ids=["one", "pow", "log", "negative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_kernel_step_rule_matches_a_plain_evaluation(dtype, gamma, limit, late_seen):
    from anon_hf.backends.fused.kernel import KernelCall
    from anon_hf.backends.fused.scalars import step_scalars
    from anon_hf.refresh import StepRule, refresh_mode

    if limit and gamma <= 0:
        pytest.skip("the limit applies only with gamma > 0 (refresh.limit_applies)")
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.99, gamma=gamma, eps=1e-8, weight_decay=0.1, max_precond_ratio=2.0)
    rule = StepRule(refresh_mode(gamma, hyper["eps"]) if limit or late_seen else None, limit, late_seen)
    tensors = _rule_inputs(dtype)
    expected = _rule_by_hand(tensors, hyper, rule, neg_step_size=-0.02, inv_bias2=30.0)
    scalars = step_scalars(
        **{k: hyper[k] for k in ("lr", "beta1", "beta2", "gamma", "eps", "weight_decay", "max_precond_ratio")},
        decoupled_weight_decay=True,
        beta3=0.9,
        bounds=None,
        maximize=False,
        averaged=False,
    )
    step = torch.tensor(5.0)
    lists = [[t] for t in tensors]
    KernelCall([0], lists, [step], scalars, ([-0.02], [30.0]), (False, False), None, rule).write()
    tolerance = FP32 if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for name, index, value in (("param", 0, expected[0]), ("exp_avg", 2, expected[1]), ("exp_avg_sq", 3, expected[2])):
        torch.testing.assert_close(tensors[index].double(), value.to(dtype).double(), **tolerance, msg=name)
    assert step.item() == 6.0
    if late_seen and dtype == torch.float32:  # unseen weights with a gradient step; those without one only decay
        update = (tensors[0].double() - _rule_inputs(dtype)[0].double() * (1 - 0.01 * 0.1)).abs()
        assert (update[7:300:14] > 1e-5).all() and (update[:300:14] < 1e-7).all()


def test_the_per_element_benchmark_runs_through_the_kernels_own_call():
    """benchmarks/kernel_ns_per_element.py calls the kernel through KernelCall: a change of the kernel's interface
    that it does not follow fails here, not in a later measurement."""
    command = [sys.executable, "benchmarks/kernel_ns_per_element.py", "--sizes", "4096", "--rounds", "1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"4096 elements: anon [0-9.]+ ns/elem, fused AdamW [0-9.]+ ns/elem, ratio [0-9.]+x", result.stdout
    )
