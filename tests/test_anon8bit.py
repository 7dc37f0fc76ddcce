"""``anon_hf.Anon8bit`` against the literal 8-bit reference (tests/reference8bit.py), its own paths, its state dicts
and Anon's.

Tolerance against the literal reference: the package computes in fp32, the reference in fp64, so a value lying
within ~1e-7 of the midpoint between two codes may round the other way; such a flip changes one element's state by
one code step (up to 12.5 %) and its trajectory from there on, by as much as the update allows (with gamma = 1.5 and
L2 decay one element moved 0.35 apart). The tests therefore bound quantiles of the per-element gap after 30 steps:
median <= 1e-6 and 90th percentile <= 2e-5. On the same runs the fp32 reference (``ReferenceAnon``, no quantization)
has a median gap >= 1.6e-3 (measured over the configs of FAST), so the bounds tell 8-bit state from fp32 state.
"""

from __future__ import annotations

import copy
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from optim_inputs import extra_configs, reference_configs
from reference import ReferenceAnon, run_beside_reference
from reference8bit import ReferenceAnon8bit, roundtrip_exp_avg, roundtrip_exp_avg_sq, roundtrip_precond

from anon_hf import Anon, Anon8bit, dequantize_state_dict
from anon_hf.backends import cpu_kernel as _cpu_kernel
from anon_hf.storage import quant8 as _quant8

# (40, 110): 4,400 elements, 8-bit (17 blocks and a tail of 48); (300,): full precision, under 4,096.
SHAPES = [(40, 110), (300,)]
IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
FAST = {
    "gamma1.0-no_wd-refresh_pow2",
    "gamma0.5-l2_wd-refresh_every",
    "gamma-0.5-decoupled_wd-refresh_3",
    "gamma1.5-decoupled_wd-refresh_pow2",
    "gamma0.0-l2_wd-refresh_pow2",
    "beta3_zero",
    "maximize",
    "bounds",
    "gamma3",
}
MEDIAN, P90 = 1e-6, 2e-5
# Between two runs of the package (reference path and kernel) flips are the only difference: most elements agree.
CLOSE, MOST = 1e-5, 0.99


def _kernel_or_skip():
    reason = _cpu_kernel.kernel8_unavailable_reason()
    if reason is not None:
        pytest.skip(f"the 8-bit C++ kernel is unavailable here: {reason}")


def _run(kwargs, impl, steps=30, reference_cls=ReferenceAnon8bit):
    generator = torch.Generator().manual_seed(1)
    init = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
    params = [torch.nn.Parameter(t.float()) for t in init]
    opt = Anon8bit(params, **kwargs, **IMPLS[impl])
    ref = run_beside_reference(opt, params, init, steps, reference_cls=reference_cls, **kwargs)
    return opt, params, ref


def _gaps(params, ref) -> list[torch.Tensor]:
    return [
        (p.detach().double() - torch.tensor(ref.params[k], dtype=torch.float64).view_as(p)).abs()
        for k, p in enumerate(params)
    ]


def _quantiles(gap: torch.Tensor) -> tuple[float, float]:
    median, p90 = torch.quantile(gap.flatten(), torch.tensor([0.5, 0.9], dtype=gap.dtype)).tolist()
    return median, p90


def _assert_tracks(gaps):
    for gap in gaps:
        median, p90 = _quantiles(gap)
        assert median <= MEDIAN and p90 <= P90, (median, p90)


def _reference_grid():
    """FAST configs on both paths; the rest of the grid (slow) on the reference path, which decides every refresh."""
    for config in reference_configs() + extra_configs():
        for impl in ("forloop", "fused"):
            if config.desc in FAST:
                yield pytest.param(config, impl, id=f"{config.desc}-{impl}")
            elif impl == "forloop":
                yield pytest.param(config, impl, id=f"{config.desc}-{impl}", marks=pytest.mark.slow)


@pytest.mark.parametrize("config, impl", list(_reference_grid()))
def test_matches_literal_8bit_reference(config, impl):
    if impl == "fused":
        _kernel_or_skip()
    opt, params, ref = _run(config.kwargs, impl)
    _assert_tracks(_gaps(params, ref))
    assert opt.refresh_history == (ref.refreshes if config.kwargs.get("gamma", 1.0) != 0 else [])
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.int8 and state["exp_avg"].shape == params[0].shape
    assert state["exp_avg_absmax"].shape == (18,)  # 4,400 = 17 * 256 + 48
    assert opt.state[params[1]]["exp_avg"].dtype == torch.float32  # under min_8bit_size: full precision


@pytest.mark.parametrize(
    "config", [c for c in reference_configs() + extra_configs() if c.desc in FAST], ids=lambda c: c.desc
)
def test_the_compiled_8bit_graph_matches_the_literal_reference(config, monkeypatch):
    # The graph CUDA tensors take between refreshes, run here by inductor on CPU with the C++ kernel turned off.
    from anon_hf.backends.fused import stats as fused_stats

    monkeypatch.setenv("ANON_HF_CPU_KERNEL", "0")
    before, kernel_before = fused_stats["compiled_8bit"], kernel8_calls()
    opt, params, ref = _run(config.kwargs, "fused")
    _assert_tracks(_gaps(params, ref))
    assert opt.refresh_history == (ref.refreshes if config.kwargs.get("gamma", 1.0) != 0 else [])
    refreshes = 0 if config.kwargs.get("gamma", 1.0) == 0 else len(ref.refreshes)
    assert fused_stats["compiled_8bit"] - before == 30 - refreshes  # every step between refreshes, nothing else
    assert kernel8_calls() == kernel_before


def kernel8_calls() -> int:
    from anon_hf.backends.fused import stats

    return stats["kernel_8bit"]


def test_the_tolerance_tells_8bit_from_fp32_state():
    _, params, ref = _run(dict(lr=0.01), "forloop", reference_cls=ReferenceAnon)
    median, _ = _quantiles(_gaps(params, ref)[0])
    assert median > 1000 * MEDIAN


@pytest.mark.parametrize("numel", [256, 300, 4096 + 77])
def test_codecs_match_the_literal_roundtrips(numel):
    generator = torch.Generator().manual_seed(numel)
    values = torch.randn(numel, generator=generator) * torch.logspace(-6, 2, numel)[torch.randperm(numel)]
    values[::17] = 0.0
    # rtol: fp32 against fp64 arithmetic; for v, exp2 of an fp32 log up to ~40 in size (40 * 2**-24 * ln 2 = 2e-6).
    for key, roundtrip, tensor, rtol in (
        ("exp_avg", roundtrip_exp_avg, values, 1e-6),
        ("exp_avg_sq", roundtrip_exp_avg_sq, values.square(), 1e-6),
        ("precond", roundtrip_precond, values.abs(), 1e-5),
    ):
        decoded = _quant8.dequantize(key, _quant8.quantize(key, tensor)).double()
        expected = torch.tensor(roundtrip(tensor.double().tolist()), dtype=torch.float64)
        assert torch.equal(decoded == 0, expected == 0), key  # exact zeros, and only they, decode to 0
        close = torch.isclose(decoded, expected, rtol=rtol, atol=0)
        assert close.double().mean().item() >= 0.999, key  # the rest: rare midpoint flips (see the module doc)
        torch.testing.assert_close(decoded, expected, rtol=0.13, atol=0)  # a flip is one code: <= 12.5 % apart


def test_a_positive_accumulator_never_becomes_zero_and_zero_stays_exact():
    s = torch.zeros(4096)
    s[0], s[1] = 1e30, 1e-30  # 60 decades apart in one block
    decoded = _quant8.dequantize("exp_avg_sq", _quant8.quantize("exp_avg_sq", s))
    assert decoded[1] > 0 and torch.count_nonzero(decoded[2:]) == 0 and decoded[0] == 1e30


def test_state_bytes_per_param_are_at_most_3_1():
    param = torch.nn.Parameter(torch.randn(512, 1376))
    opt = Anon8bit([param], lr=1e-3)
    param.grad = torch.randn_like(param)
    opt.step()
    state = opt.state[param]
    stored = sum(t.numel() * t.element_size() for key, t in state.items() if key != "step")
    assert stored == _quant8.state_bytes(param.numel())
    assert stored / param.numel() <= 3.1


def test_zero_grad_lr_zero_step_creates_every_key_and_changes_nothing():
    param = torch.nn.Parameter(torch.randn(80, 64))
    before = param.detach().clone()
    opt = Anon8bit([param], lr=0.0)
    param.grad = torch.zeros_like(param)
    opt.step()
    assert set(opt.state[param]) == {"step", *_quant8.QUANTIZED_KEYS, *_SIDE_KEYS}
    assert torch.equal(param.detach(), before)


_SIDE_KEYS = {side for sides in _quant8.QUANTIZED_KEYS.values() for side in sides}


def _train(opt, params, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("impl", ["forloop", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resumes_bitwise_from_a_weights_only_state_dict(impl, dtype):
    if impl == "fused":
        _kernel_or_skip()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in SHAPES]
    opt = Anon8bit(params, lr=0.01, weight_decay=0.1, **IMPLS[impl])
    _train(opt, params, 11, seed=1)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": opt.state_dict()}, buffer)
    _train(opt, params, 9, seed=2)  # through the refresh at step 16

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = Anon8bit(resumed, lr=0.01, weight_decay=0.1, **IMPLS[impl])
    opt2.load_state_dict(saved["optimizer"])
    assert opt2.state[resumed[0]]["exp_avg_absmax"].dtype == torch.float32  # not cast to a bf16 param's dtype
    _train(opt2, resumed, 9, seed=2)
    for a, b in zip(params, resumed, strict=True):
        assert torch.equal(a, b)
    for key, value in opt.state[params[0]].items():
        assert torch.equal(value, opt2.state[resumed[0]][key]), key


def test_fused_matches_the_reference_path():
    _kernel_or_skip()
    runs = []
    for impl in ("forloop", "fused"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(4096 + 77,), (70, 80)]]
        opt = Anon8bit(params, lr=0.01, **IMPLS[impl])
        _train(opt, params, 40, seed=3)
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        gap = (a - b).abs()
        assert (gap <= CLOSE).double().mean() >= MOST


@pytest.mark.parametrize("max_precond_ratio", [None, 10.0, 1.0], ids=["no_limit", "limit", "limit_binds"])
@pytest.mark.parametrize("bounds", [None, (-1.5, 1.5)], ids=["no_bounds", "bounds"])
@pytest.mark.parametrize("weight_decay", ["decoupled", "l2"])
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_every_variant_of_the_kernel_matches_the_reference_path(gamma, max_precond_ratio, bounds, weight_decay):
    # The kernel compiles the limit (gamma 1: a square root; other gammas: exp2 and log2), L2 decay and bounds in or
    # out (its AVX-512 version per combination, for whole blocks; its loops for the tail of 4,096 + 77 elements): each
    # combination against the reference path, with a gradient that grows between refreshes so that ratio 10 binds
    # somewhere and ratio 1 on about half the elements.
    _kernel_or_skip()
    scale = lambda step: 1.0 + 0.2 * (step % 16)  # noqa: E731
    # weight_decay 0.05, not 0.1: an L2 coefficient equal to 1 - beta1 hid a kernel reading the wrong slot.
    hyper = dict(gamma=gamma, weight_decay=0.05, decoupled_weight_decay=weight_decay == "decoupled", bounds=bounds)
    fused = _kernel_beside_reference_path(dict(hyper, max_precond_ratio=max_precond_ratio), scale)
    if bounds is not None:
        assert all(p.min() >= bounds[0] and p.max() <= bounds[1] for p in fused)


@pytest.mark.parametrize("gamma", [1.0, 0.5, 1.5, 3.0])
def test_the_kernel_limit_near_its_threshold_matches_the_reference_path(gamma):
    # With stationary gradients and ratio 1, v * sigma**(gamma / 2) sits near 1 on most elements, on either side:
    # where the AVX-512 version's shortcut (log2 read from the bits, with a margin) skips a vector, no lane may bind.
    # Gradients of scale 1: at 0.1, gamma 3 makes steps of ~1 (v ~ sigma**-1.5), where a code flip moves an element
    # 0.1 away (measured the same with the codec path this kernel replaced at gamma != 1).
    _kernel_or_skip()
    _kernel_beside_reference_path(dict(gamma=gamma, max_precond_ratio=1.0), lambda step: 10.0)


def _kernel_beside_reference_path(kwargs, scale, steps=40):
    """Parameters after ``steps`` steps of Anon8bit(fused=True), asserted close to the reference path's. Gradients are
    of scale 0.1 * scale(step), so that sigma**(-gamma / 2) tells gammas apart (at sigma near 1 it would not)."""
    runs, kernel_steps = [], []
    for impl in ("forloop", "fused"):
        generator = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(4096 + 77,), (70, 80)]]
        opt = Anon8bit(params, lr=0.01, **kwargs, **IMPLS[impl])
        before = kernel8_calls()
        for step in range(1, steps + 1):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator) * (0.1 * scale(step))
            opt.step()
        kernel_steps.append(kernel8_calls() - before)
        runs.append(params)
    assert kernel_steps == [0, steps - len(opt.refresh_history)]  # every step between refreshes
    for a, b in zip(*runs, strict=True):
        gap = (a - b).abs()
        assert (gap <= CLOSE).double().mean() >= MOST, gap.max()
    return runs[1]


@pytest.mark.skipif(
    _cpu_kernel._capability() != "AVX512",
    reason="this CPU's kernel build has no AVX-512 version: the tests above already run its loops on every block",
)
def test_the_avx2_build_of_the_kernel_matches_the_reference_path_too(tmp_path):
    # Above, whole blocks run the AVX-512 version; here the kernel is built for AVX2 (torch reports AVX2 under
    # ATEN_CPU_CAPABILITY), so whole blocks run its AVX2 version and tails its plain loops, vectorized without masks.
    # Inductor gets a cache of its own: its FX graph cache does not key on the instruction set and would hand an
    # AVX2 process code written for 16 lanes.
    _kernel_or_skip()
    assert _cpu_kernel.kernel8().AVX512_STEP
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    which = (
        "from anon_hf.backends import cpu_kernel as k; assert k.kernel8_unavailable_reason() is None; "
        "print(k.kernel8().AVX512_STEP, k.kernel8().AVX2_STEP)"
    )
    built = subprocess.run([sys.executable, "-c", which], env=env, capture_output=True, text=True, timeout=900)
    assert built.stdout.strip() == "False True", built.stdout + built.stderr[-2000:]  # whole blocks: the AVX2 version
    selected = (
        "every_variant_of_the_kernel or near_its_threshold or fused_matches_the_reference_path or cpu_codecs_match"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(tests / "test_anon8bit.py"),
            "-k",
            selected,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"^31 passed", result.stdout, re.MULTILINE), result.stdout[-2000:]


def test_an_anon_checkpoint_loads_into_anon8bit_quantized():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    anon = Anon(params, lr=0.01)
    _train(anon, params, 5, seed=1)
    opt = Anon8bit([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.01)
    opt.load_state_dict(copy.deepcopy(anon.state_dict()))
    large, small = (opt.state[p] for p in opt.param_groups[0]["params"])
    assert large["exp_avg"].dtype == torch.int8 and small["exp_avg"].dtype == torch.float32
    for key in _quant8.QUANTIZED_KEYS:
        expected = anon.state[params[0]][key]
        torch.testing.assert_close(_quant8.dequantize(key, large), expected, rtol=0.07, atol=1e-5 * expected.max())


def test_an_anon8bit_checkpoint_needs_conversion_to_load_into_anon():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    opt = Anon8bit(params, lr=0.01)
    _train(opt, params, 5, seed=1)
    state_dict = opt.state_dict()
    anon = Anon([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.01)
    with pytest.raises(ValueError, match=r"8-bit state written by anon_hf.Anon8bit.*dequantize_state_dict"):
        anon.load_state_dict(state_dict)
    anon.load_state_dict(dequantize_state_dict(state_dict))
    loaded = anon.state[anon.param_groups[0]["params"][0]]
    assert loaded["exp_avg"].dtype == torch.float32
    assert torch.equal(loaded["precond"], _quant8.dequantize("precond", opt.state[params[0]]))
    _train(anon, anon.param_groups[0]["params"], 3, seed=2)


def test_errors_name_the_parameter_and_the_range():
    param = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"Invalid min_8bit_size value: 0 \(allowed: an integer >= 1"):
        Anon8bit([param], min_8bit_size=0)
    with pytest.raises(ValueError, match=r"Invalid precond_dtype value: .*Anon8bit stores its state in 8 bits"):
        Anon8bit([{"params": [param], "precond_dtype": torch.bfloat16}])
    with pytest.raises(ValueError, match=r"Invalid gamma value"):
        Anon8bit([param], gamma=float("nan"))


def test_a_state_dict_of_another_sharding_is_refused():
    param = torch.nn.Parameter(torch.randn(5000))
    opt = Anon8bit([param], lr=0.01)
    param.grad = torch.randn_like(param)
    opt.step()
    other = Anon8bit([torch.nn.Parameter(torch.randn(5000))], lr=0.01)
    state_dict = opt.state_dict()
    state_dict["state"][0]["exp_avg_absmax"] = state_dict["state"][0]["exp_avg_absmax"][:-1]
    with pytest.raises(ValueError, match=r"'exp_avg_absmax' of param 0 must be a float tensor of 20 values"):
        other.load_state_dict(state_dict)


def test_registered_for_deepspeed_and_exported():
    import anon_hf

    assert torch.optim.Anon8bit is Anon8bit and "Anon8bit" in anon_hf.__all__


def test_deepspeed_accepts_the_config_type_anon8bit_under_zero():
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    from anon_hf.integrations.deepspeed import _check_type_spelling, validate_anon_params

    assert Anon8bit in ZERO_SUPPORTED_OPTIMIZERS
    assert _check_type_spelling("Anon8bit") is Anon8bit
    with pytest.raises(ValueError, match=r"Invalid optimizer type 'anon8bit' .*write \"Anon8bit\""):
        _check_type_spelling("anon8bit")
    validate_anon_params({"lr": 1e-3, "min_8bit_size": 1024}, optimizer_cls=Anon8bit)
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['precond_dtype'\]"):
        validate_anon_params({"precond_dtype": "bf16"}, optimizer_cls=Anon8bit)


@pytest.mark.parametrize("numel", [300, 4096 + 77])
def test_cpu_codecs_match_the_torch_codecs(numel):
    # The refresh steps of fused=True decode and encode with the C++ codecs; the reference path with _quant8's.
    _kernel_or_skip()
    codec = _cpu_kernel.kernel8()
    generator = torch.Generator().manual_seed(numel)
    values = torch.randn(numel, generator=generator) * torch.logspace(-6, 2, numel)[torch.randperm(numel)]
    values[::17] = 0.0
    for kind, (key, tensor) in enumerate(
        (("exp_avg", values), ("exp_avg_sq", values.square()), ("precond", values.abs()))
    ):
        expected = _quant8.quantize(key, tensor)
        encoded = {name: torch.empty_like(value) for name, value in expected.items()}
        sides = [encoded[name] for name in _quant8.QUANTIZED_KEYS[key]]
        codec.encode(kind, tensor, encoded[key], sides[0], sides[-1])
        if key == "precond":  # std::log2 and torch.log2 may differ in the last bit: a rare code flips
            assert (encoded[key] == expected[key]).double().mean() >= 0.999
        else:
            assert all(torch.equal(encoded[name], expected[name]) for name in expected), key
        decoded = torch.empty(numel)
        first, last = _quant8.QUANTIZED_KEYS[key][0], _quant8.QUANTIZED_KEYS[key][-1]
        codec.decode(kind, expected[key], expected[first], expected[last], decoded)
        torch.testing.assert_close(decoded, _quant8.dequantize(key, expected), rtol=2e-6, atol=0)


# The step rule between refreshes (anon_hf.refresh.StepRule) in the 8-bit kernel, called directly: 4,096 + 77
# elements (16 whole blocks and a tail), v == 0 (code 0) on every 7th element of the first 600 and of the tail, and of
# those every other one with neither an accumulator nor a gradient.
def _rule_state8(seed=7):
    generator = torch.Generator().manual_seed(seed)
    numel = 4096 + 77
    draw = lambda scale=1.0: torch.randn(numel, generator=generator) * scale  # noqa: E731
    param, grad, exp_avg, exp_avg_sq = draw(), draw(0.1), draw(0.1), draw(0.1).square()
    precond = (draw(0.5).exp() * 3.0).clamp(min=0.1)
    unseen = torch.zeros(numel, dtype=torch.bool)
    unseen[:600:7] = unseen[4096::7] = True
    never = torch.zeros(numel, dtype=torch.bool)
    never[:600:14] = never[4096::14] = True
    precond[unseen] = 0.0
    exp_avg_sq[never], grad[never], exp_avg[never] = 0.0, 0.0, 0.0
    state = {}
    for key, value in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("precond", precond)):
        state.update(_quant8.quantize(key, value))
    return param, grad, state, unseen & ~never, never


@pytest.mark.parametrize("late_seen", [True, False], ids=["late_seen", "no_late_seen"])
@pytest.mark.parametrize("limit", [True, False], ids=["limit", "no_limit"])
@pytest.mark.parametrize("gamma", [1.0, 0.5, 3.0, -0.5], ids=["one", "pow", "log", "negative"])
def test_the_8bit_kernel_step_rule_matches_a_plain_evaluation(gamma, limit, late_seen):
    from anon_hf.backends.fused.scalars import step_scalars
    from anon_hf.refresh import refresh_mode

    _kernel_or_skip()
    if limit and gamma <= 0:
        pytest.skip("the limit applies only with gamma > 0 (refresh.limit_applies)")
    lr, beta1, beta2, eps, ratio, neg_step_size, inv_bias2 = 0.01, 0.9, 0.99, 1e-8, 2.0, -0.02, 30.0
    param, grad, state, late, never = _rule_state8()
    # By hand, in float64, from the decoded state and the StepRule docstring.
    m, s, v = (_quant8.dequantize(key, state).double() for key in ("exp_avg", "exp_avg_sq", "precond"))
    g = grad.double()
    m = m + (g - m) * (1 - beta1)
    s = s * beta2 + g * g * (1 - beta2)
    est = (s * inv_bias2 + eps) ** (-gamma / 2)
    used = torch.minimum(v, ratio * est) if limit else v
    if late_seen:
        used = torch.where(v == 0, torch.where(s > 0, est, torch.zeros_like(est)), used)
    expected = param.double() + m * used * neg_step_size

    kernel = _cpu_kernel.kernel8()
    values = step_scalars(lr=lr, beta1=beta1, beta2=beta2, gamma=gamma, eps=eps, weight_decay=0.0,
                          decoupled_weight_decay=True, beta3=0.9, bounds=None, maximize=False,
                          max_precond_ratio=ratio, averaged=False)  # fmt: skip
    mode = refresh_mode(gamma, eps) if limit or late_seen else None
    estimate = 0 if mode is None else kernel.REFRESH_MODES[mode]
    keys = ["exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_max", "precond", "precond_log2_min"]
    step = torch.tensor(5.0)
    kernel.anon8_step(
        [param], [grad], *[[state[key]] for key in keys + ["precond_log2_max"]], [step], [neg_step_size],
        [inv_bias2], values, False, False, estimate, limit, late_seen,
    )  # fmt: skip
    torch.testing.assert_close(param.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_quant8.dequantize("exp_avg_sq", state).double(), s, rtol=7e-2, atol=0.0)
    if late_seen:  # unseen weights with a gradient step; those without one stand still
        assert ((param.double() - _rule_state8()[0].double()).abs()[late] > 1e-5).all()
        assert torch.equal(param[never], _rule_state8()[0][never])


@pytest.mark.skipif(
    _cpu_kernel._capability() != "AVX512",
    reason="this CPU's kernel builds have no AVX-512 version: the step rule tests above already run what it builds",
)
def test_the_avx2_builds_step_rule_matches_a_plain_evaluation_too(tmp_path):
    # Both kernels built for AVX2 (torch reports AVX2 under ATEN_CPU_CAPABILITY): the fp32 kernel's at::vec on 8
    # lanes, the 8-bit kernel's AVX2 whole blocks and plain-loop tails.
    _kernel_or_skip()
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "step_rule_matches and not avx2"]
    command += [str(tests / "test_anon8bit.py"), str(tests / "test_cpu_kernel.py")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"^42 passed", result.stdout, re.MULTILINE), result.stdout[-2000:]
    check = (
        "from anon_hf.backends import cpu_kernel as k; k.kernel8_unavailable_reason(); print(k.kernel8().AVX2_STEP)"
    )
    assert (
        subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True).stdout.strip() == "True"
    )


def test_the_8bit_kernel_gives_the_same_bits_on_1_and_2_threads():
    # 300,000 elements: 1,172 blocks, several of the kernel's 128-block parts, so two threads really split the tensor.
    _kernel_or_skip()
    results = []
    previous = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            generator = torch.Generator().manual_seed(8)
            params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(300, 1000), (5000,)]]
            opt = Anon8bit(params, lr=0.01, fused=True)
            for _ in range(9):
                for param in params:
                    param.grad = torch.randn(param.shape, generator=generator)
                opt.step()
        finally:
            torch.set_num_threads(previous)
        results.append((params, [opt.state[p] for p in params]))
    (params1, states1), (params2, states2) = results
    for a, b, state_a, state_b in zip(params1, params2, states1, states2, strict=True):
        assert torch.equal(a, b)
        for key, value in state_a.items():
            assert torch.equal(value, state_b[key]), key


def test_the_8bit_kernel_refuses_a_mismatched_tensor_before_writing():
    _kernel_or_skip()
    from anon_hf.backends.fused.scalars import SCALAR_SLOTS

    kernel = _cpu_kernel.kernel8()
    param, state = torch.randn(300), _quant8.quantize("exp_avg", torch.randn(300))
    original, step = param.clone(), torch.tensor(1.0)
    lists = [[param], [torch.randn(300)], [state["exp_avg"]], [state["exp_avg_absmax"]], [], [], [], [], []]
    scalars = [1.0] * len(SCALAR_SLOTS)
    with pytest.raises(RuntimeError, match="tensor 0 is not supported"):
        kernel.anon8_step(*lists[:2], [state["exp_avg"][:299]], *lists[3:], [step], [-0.1], [1.0], scalars,
                          False, False, 0, False, False)  # fmt: skip
    with pytest.raises(RuntimeError, match="need an estimate mode"):
        kernel.anon8_step(*lists, [step], [-0.1], [1.0], scalars, False, False, 0, True, False)
    assert torch.equal(param, original) and step.item() == 1.0
    kernel.anon8_step(*lists, [step], [-0.1], [1.0], scalars, False, False, 0, False, False)
    assert step.item() == 2.0 and not torch.equal(param, original)
