"""``fused=True`` against the literal reference, the for-loop and foreach paths, through both of its backends.

Tests that take the ``backend`` fixture run twice: ``kernel`` (CPU tensors take the C++ kernel of
``anon_hf.backends.cpu_kernel``, the default on CPU) and ``compiled`` (``ANON_HF_CPU_KERNEL=0``: the torch.compile'd graphs
of ``anon_hf.backends.fused``, what CUDA tensors run). Tests of the graphs alone take ``compiled_graphs``.

Compiling costs seconds per graph on CPU. Graphs are keyed by dtypes, rank, chunk size and the kind of step only
(dynamic shapes), so most tests reuse the same few graphs; the full reference grid is marked slow.
"""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from optim_inputs import extra_configs, reference_configs
from reference import run_beside_reference

from anon_hf import Anon, NonFinitePreconditionerError
from anon_hf.backends import cpu_kernel as _cpu_kernel
from anon_hf.backends import fused as _fused

IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
# Both rank 2, neither square nor with a size-1 dim: one graph (dynamic shapes) per kind of step serves both.
SHAPES = [(3, 4), (6, 2)]
# fp32: the compiled kernel rounds once per stored value where eager code rounds per op; tolerances as the
# eager paths' own (tests/test_optimizer.py).
TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}
ALL_CONFIGS = reference_configs() + extra_configs()
# One config per code path of the graphs: gamma == 1, |gamma| <= 1 (pow), |gamma| > 1 (log space), gamma == 0 (no
# preconditioner), L2 and decoupled decay, refresh every step or every N, beta3 = 0, maximize, bounds, beta1 = 0.
FAST = {
    "gamma1.0-no_wd-refresh_pow2",
    "gamma0.5-l2_wd-refresh_every",
    "gamma-0.5-decoupled_wd-refresh_3",
    "gamma1.5-decoupled_wd-refresh_pow2",
    "gamma0.0-l2_wd-refresh_pow2",
    "gamma0.0-decoupled_wd-refresh_every",
    "beta3_zero",
    "beta3_high_every",
    "maximize",
    "bounds",
    "gamma3",
    "betas_zero",
}


@pytest.fixture(params=["kernel", "compiled"])
def backend(request, monkeypatch):
    """Which backend ``fused=True`` runs on CPU; ``kernel`` skips, with the reason, where it cannot be built."""
    monkeypatch.setenv("ANON_HF_CPU_KERNEL", "1" if request.param == "kernel" else "0")
    if request.param == "kernel" and (reason := _cpu_kernel.kernel_unavailable_reason()) is not None:
        pytest.skip(f"the C++ kernel is unavailable here: {reason}")
    return request.param


@pytest.fixture
def compiled_graphs(monkeypatch):
    """The torch.compile'd graphs, as CUDA tensors run them."""
    monkeypatch.setenv("ANON_HF_CPU_KERNEL", "0")


def _params(shapes=SHAPES, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64).to(dtype)) for s in shapes]


def _run_against_reference(kwargs, dtype, steps=40):
    params = _params(dtype=torch.float64)
    init = [p.detach().clone() for p in params]
    params = [torch.nn.Parameter(t.to(dtype)) for t in init]
    opt = Anon(params, **kwargs, fused=True)
    ref = run_beside_reference(opt, params, init, steps, **kwargs)
    return opt, params, ref


def _check_against_reference(config, dtype, backend):
    # fp64 is not a dtype of the C++ kernel: the graphs run it on either backend.
    counter = "kernel" if backend == "kernel" and dtype in _cpu_kernel.SUPPORTED_DTYPES else "compiled"
    calls_before = _fused.stats[counter]
    opt, params, ref = _run_against_reference(config.kwargs, dtype)
    for k, p in enumerate(params):
        expected = torch.tensor(ref.params[k], dtype=torch.float64).view_as(p)
        # Each update carries a relative error of a few ulps, so the absolute error grows with the path a parameter
        # travels, up to steps * lr * v for unit gradients: gamma = -2 gives v ~ 10 and a path of ~4 in 40 steps.
        v_max = max(ref.preconditioner(k)) if "precond" in opt.state[p] else 1.0
        travelled = max(1.0, 40 * config.kwargs.get("lr", 1e-3) * v_max)
        tolerance = dict(TOLERANCES[dtype], atol=TOLERANCES[dtype]["atol"] * travelled)
        torch.testing.assert_close(p.detach().double(), expected, **tolerance)
        if "precond" in opt.state[p]:
            expected_v = torch.tensor(ref.preconditioner(k), dtype=torch.float64).view_as(p)
            torch.testing.assert_close(opt.state[p]["precond"].double(), expected_v, **TOLERANCES[dtype])
    assert opt.refresh_history == (ref.refreshes if config.kwargs.get("gamma", 1.0) != 0 else [])
    # Only the first refresh (step 1) runs eagerly: the other 39 steps went through the backend.
    assert _fused.stats[counter] - calls_before >= 39


@pytest.mark.parametrize("config", [c for c in ALL_CONFIGS if c.desc in FAST], ids=lambda c: c.desc)
def test_fused_matches_reference_fp32(config, backend):
    _check_against_reference(config, torch.float32, backend)


FULL_GRID = [
    pytest.param(config, dtype, id=f"{config.desc}-{name}")
    for config in ALL_CONFIGS
    for dtype, name in ((torch.float32, "fp32"), (torch.float64, "fp64"))
    if not (dtype == torch.float32 and config.desc in FAST)  # those run in the fast test above
]


@pytest.mark.slow
@pytest.mark.parametrize("config, dtype", FULL_GRID)
def test_fused_matches_reference_full_grid(config, dtype, backend):
    _check_against_reference(config, dtype, backend)


def test_the_compiled_path_really_runs_and_says_so_once(caplog, compiled_graphs):
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _fused.telemetry._logged.clear()
    # fp64 moments with fp32 params: no other test uses these dtypes, so dynamo must capture new graphs here.
    params = _params(shapes=[(5, 7), (7, 5)])
    opt = Anon(params, lr=0.01, fused=True, moments_dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="anon_hf.backends.fused"):
        for _ in range(6):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    assert _fused.fused_unavailable_reason(params) is None
    # A step graph, a finite-check graph and a refresh graph.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs_before + 3
    kinds = {key[0] for key in _fused.graphs._ran if any(isinstance(k, tuple) and torch.float64 in k for k in key)}
    assert kinds == {"step", "flags", "refresh"}
    messages = [r.getMessage() for r in caplog.records if "torch.compile'd graphs" in r.getMessage()]
    assert len(messages) == 1


def _train(impl, dtype=torch.float32, steps=20, skip_every=None, **kwargs):
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (1,), (3, 2, 4), (0,), (11,), (4, 4), (4, 4), (4, 4)]
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    frozen = [torch.nn.Parameter(torch.randn(3).to(dtype))]
    groups = [
        {"params": params[:4]},
        {"params": params[4:], "lr": 0.003, "weight_decay": 0.0},
        {"params": frozen},
        {"params": []},
    ]
    opt = Anon(groups, **kwargs, **IMPLS[impl])
    generator = torch.Generator().manual_seed(2)
    for t in range(1, steps + 1):
        for k, p in enumerate(params):
            skipped = skip_every is not None and (t + k) % skip_every == 0
            p.grad = None if skipped else torch.randn(p.shape, generator=generator).to(dtype)
        opt.step()
    assert frozen[0] not in opt.state
    return opt, params


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=0.01, weight_decay=0.1), dict(lr=0.01, gamma=0.0), dict(lr=0.01, gamma=-0.5, refresh=3, bounds=(-1, 1))],
    ids=["default", "gamma0", "pow_bounds"],
)
@pytest.mark.parametrize("skip_every", [None, 3], ids=["all_grads", "grads_none_sometimes"])
def test_fused_matches_forloop_and_foreach_over_groups_and_skipped_grads(kwargs, skip_every, backend):
    results = {impl: _train(impl, skip_every=skip_every, **kwargs) for impl in IMPLS}
    for impl in ("foreach", "fused"):
        for a, b in zip(results["forloop"][1], results[impl][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert results[impl][0].refresh_history == results["forloop"][0].refresh_history
        for p, q in zip(results["forloop"][1], results[impl][1], strict=True):
            assert results[impl][0].state[q]["step"].item() == results["forloop"][0].state[p]["step"].item()


def test_bf16_params_match_forloop_within_bf16_rounding(backend):
    # The compiled graph computes in fp32 and rounds once; the eager paths compute in bf16, rounding per op.
    eager = _train("forloop", dtype=torch.bfloat16, lr=0.01)[1]
    fused = _train("fused", dtype=torch.bfloat16, lr=0.01)[1]
    for a, b in zip(eager, fused, strict=True):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_mixed_param_dtypes_in_one_group(backend):
    def run(impl):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(6, 3)), torch.nn.Parameter(torch.randn(6, 3, dtype=torch.float64))]
        opt = Anon(params, lr=0.01, **IMPLS[impl])
        for _ in range(10):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        return params

    for a, b in zip(run("forloop"), run("fused"), strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # compiles graphs for chunks of 16 and 4 tensors; chunks of 2 are covered by the fast tests
def test_many_same_shaped_tensors_are_chunked_and_match_foreach(compiled_graphs):
    assert _fused.plan.chunk_sizes(37, 16) == [16, 16, 4, 1]
    assert _fused.plan.chunk_sizes(3, 1 << 22) == [1, 1, 1]
    assert _fused.plan.chunk_sizes(5, 1 << 20) == [4, 1]

    def run(impl):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(37)]
        opt = Anon(params, lr=0.01, **IMPLS[impl])
        for _ in range(9):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        return params

    for a, b in zip(run("foreach"), run("fused"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_laid_out_unlike_the_param_takes_the_eager_path_and_still_matches(backend):
    def run(impl):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(5, 4).t())  # non-contiguous; its gradients arrive contiguous
        opt = Anon([param], lr=0.01, **IMPLS[impl])
        for _ in range(6):
            param.grad = torch.randn(4, 5)
            opt.step()
        return param

    torch.testing.assert_close(run("foreach"), run("fused"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("save_at", [5, 8])
def test_state_dict_round_trip_is_identical_to_uninterrupted_run(save_at, backend):
    batches = [(torch.randn(16, 6), torch.randn(16, 2)) for _ in range(20)]
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    resumed = copy.deepcopy(model)

    def train(net, opt, part):
        for x, y in part:
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()

    kwargs = dict(lr=0.01, weight_decay=0.01, fused=True)
    train(model, Anon(model.parameters(), **kwargs), batches)
    first = Anon(resumed.parameters(), **kwargs)
    train(resumed, first, batches[:save_at])
    saved = first.state_dict()
    # The fused path keeps the eager paths' state format: per-tensor tensors shaped and typed like the params.
    eager = Anon(copy.deepcopy(resumed).parameters(), lr=0.01)
    for p in eager.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    eager.step()
    for index, tensor_state in saved["state"].items():
        assert set(tensor_state) == set(eager.state_dict()["state"][index])
        for key, value in tensor_state.items():
            reference = eager.state_dict()["state"][index][key]
            assert (value.shape, value.dtype, value.device) == (reference.shape, reference.dtype, reference.device)
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": saved}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh = copy.deepcopy(resumed)
    fresh.load_state_dict(checkpoint["model"])
    second = Anon(fresh.parameters(), **kwargs)
    second.load_state_dict(checkpoint["optimizer"])
    train(fresh, second, batches[save_at:])
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def _poisoned(impl, policy):
    generator = torch.Generator().manual_seed(3)
    good = torch.nn.Parameter(torch.randn(3, 2, generator=generator))
    bad = torch.nn.Parameter(torch.randn(2, 2, generator=generator))
    opt = Anon([good, bad], lr=0.01, on_nonfinite=policy, **IMPLS[impl])
    for t in range(1, 4):
        good.grad, bad.grad = torch.randn(3, 2, generator=generator), torch.randn(2, 2, generator=generator)
        if t == 3:
            bad.grad[0, 0] = float("nan")
        opt.step()
    good.grad, bad.grad = torch.randn(3, 2, generator=generator), torch.randn(2, 2, generator=generator)
    return opt, good, bad


def test_raise_policy_raises_before_anything_is_written(backend):
    opt, good, bad = _poisoned("fused", "raise")
    tensors = [t for p in (good, bad) for t in [p, *opt.state[p].values()]]
    before = [t.detach().clone() for t in tensors]
    with pytest.raises(NonFinitePreconditionerError, match=r"refreshed at step 4 for param group 0, tensor 1"):
        opt.step()
    # Params, moments (the bad tensor's hold the nan), accumulators, preconditioners and step counters alike.
    for t, old in zip(tensors, before, strict=True):
        torch.testing.assert_close(t.detach(), old, rtol=0, atol=0, equal_nan=True)


def test_skip_policy_matches_foreach(backend):
    results = {}
    for impl in ("foreach", "fused"):
        opt, good, bad = _poisoned(impl, "skip")
        opt.step()
        results[impl] = (
            good.detach().clone(),
            opt.state[bad]["precond"].clone(),
            opt.state[bad]["exp_avg_sq"].clone(),
        )
    for a, b in zip(*results.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.count_nonzero(results["fused"][2]).item() == 0


def test_a_failing_compiler_falls_back_to_foreach_with_one_warning(monkeypatch, caplog, compiled_graphs):
    monkeypatch.setattr(_fused.graphs, "_disabled_reason", None)
    monkeypatch.setattr(_fused.graphs, "_graphs", type(_fused.graphs._graphs)())
    monkeypatch.setattr(_fused.graphs, "_ran", set())

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    with caplog.at_level(logging.WARNING, logger="anon_hf.backends.fused"):
        opt, params = _train("fused", lr=0.01, steps=8)
    _, expected = _train("foreach", lr=0.01, steps=8)
    for a, b in zip(params, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "no C++ compiler here" in _fused.graphs._disabled_reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "takes the foreach path" in warnings[0].getMessage()


def test_dtensor_params_step_their_local_shards_through_the_kernel(tmp_path, caplog):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if _cpu_kernel.kernel_unavailable_reason() is not None:
        pytest.skip(f"the C++ kernel cannot run here: {_cpu_kernel.kernel_unavailable_reason()}")
    from torch.distributed.tensor import DeviceMesh, Replicate, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        local = torch.randn(4, 3)
        param = torch.nn.Parameter(distribute_tensor(local.clone(), mesh, [Replicate()]))
        plain = torch.nn.Parameter(local.clone())
        opt = Anon([param], lr=0.01, fused=True)
        reference = Anon([plain], lr=0.01, foreach=True)
        _fused.telemetry._logged.clear()
        kernel_steps, fallbacks = _fused.stats["kernel"], _fused.stats["fallback"]
        with caplog.at_level(logging.INFO, logger="anon_hf.backends.fused"):
            for _ in range(4):
                grad = torch.randn(4, 3)
                param.grad = distribute_tensor(grad, mesh, [Replicate()])
                plain.grad = grad.clone()
                opt.step()
                reference.step()
        torch.testing.assert_close(param.full_tensor(), plain.detach(), rtol=1e-6, atol=1e-7)
        assert _fused.stats["kernel"] - kernel_steps == 4
        assert _fused.stats["fallback"] == fallbacks
        assert not any("foreach path" in r.getMessage() for r in caplog.records)
    finally:
        dist.destroy_process_group()


def test_non_contiguous_params_take_the_foreach_path_and_say_so(caplog):
    param = torch.nn.Parameter(torch.randn(3, 5).t())  # a strided view, as a DTensor shard on dim 1 would be
    plain = torch.nn.Parameter(param.detach().clone().contiguous())
    opt = Anon([param], lr=0.01, fused=True)
    reference = Anon([plain], lr=0.01, foreach=True)
    _fused.telemetry._logged.clear()
    with caplog.at_level(logging.INFO, logger="anon_hf.backends.fused"):
        for _ in range(3):
            grad = torch.randn(5, 3)
            param.grad, plain.grad = grad.clone(), grad.clone()
            opt.step()
            reference.step()
    torch.testing.assert_close(param.detach(), plain.detach(), rtol=1e-6, atol=1e-7)
    messages = [r.getMessage() for r in caplog.records if "non-contiguous" in r.getMessage()]
    assert len(messages) == 1 and "foreach path" in messages[0]


def test_fused_and_foreach_together_are_refused():
    param = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(RuntimeError, match=r"`fused` and `foreach` cannot be `True` together"):
        Anon([param], fused=True, foreach=True)
    with pytest.raises(ValueError, match=r"Invalid fused value: 'yes' \(allowed: None, True or False\)"):
        Anon([param], fused="yes")
    opt = Anon([param])
    with pytest.raises(RuntimeError, match=r"`fused` and `foreach` cannot be `True` together"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "fused": True, "foreach": True})
    assert len(opt.param_groups) == 1


def test_fused_none_never_compiles():
    before = dict(_fused.stats)
    params = _params()
    opt = Anon(params, lr=0.01)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt.param_groups[0]["fused"] is None
    assert dict(_fused.stats) == before


def test_flat_partition_like_deepspeed_zero_matches_foreach(backend):
    # ZeRO-1/2 hand the inner optimizer one flat 1-D fp32 partition per group, crossing tensor boundaries.
    def run(impl):
        generator = torch.Generator().manual_seed(4)
        flat = torch.nn.Parameter(torch.randn(10_007, generator=generator))
        opt = Anon([flat], lr=0.01, weight_decay=0.1, **IMPLS[impl])
        for _ in range(12):
            flat.grad = torch.randn(10_007, generator=generator)
            opt.step()
        return flat, opt.state[flat]

    (a, state_a), (b, state_b) = run("foreach"), run("fused")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq", "precond"):
        assert state_b[key].shape == (10_007,)
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make", [lambda: torch.randn(3, device="meta"), lambda: torch.arange(3)], ids=["meta", "int"])
def test_fused_refuses_unsupported_devices_and_dtypes_in_torchs_words_before_any_state(make):
    param = make()
    good = torch.nn.Parameter(torch.randn(3))
    param.grad = torch.ones_like(param)
    good.grad = torch.ones(3)
    opt = Anon([{"params": [good]}, {"params": [param]}], fused=True)
    with pytest.raises(
        RuntimeError,
        match=r"`fused=True` requires all the params to be floating point Tensors of "
        r"supported devices: \['cpu', 'cuda', 'xpu'\] but torch\.\w+ and \w+",
    ):
        opt.step()
    assert len(opt.state) == 0
