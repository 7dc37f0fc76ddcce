"""Bitwise fingerprint of Anon8bit's C++ kernel: a sha256 (16 hex digits) per case of the params and 8-bit state after
30 steps of ``Anon8bit(fused=True)`` (refreshes at 1, 2, 4, 8, 16 through the codecs; gamma 1, 0.5, 3, 0; limit off,
10 and 1; L2 or decoupled decay; bounds or none) and after 3 direct ``anon8_step`` calls for every StepRule (the
late-seen rule off too). Shapes with whole blocks and tails, one of 300,000 elements that threads split; every case
runs with 1 and 2 threads and is marked if they differ. A kernel change that keeps the bits keeps every hash.

    python benchmarks/kernel8_fingerprint.py before.json                              # the build's ISA
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/kernel8_fingerprint.py before_avx2.json
    ... change the kernel, then the same into after*.json and compare the "cases" of each pair.
"""

import hashlib
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anon_hf import Anon8bit  # noqa: E402
from anon_hf.backends import cpu_kernel as k  # noqa: E402
from anon_hf.backends.fused.scalars import step_scalars  # noqa: E402
from anon_hf.storage import quant8  # noqa: E402

assert k.kernel8_unavailable_reason() is None
K = k.kernel8()
SHAPES = [(4096 + 77,), (70, 80), (300, 1000), (256 * 20,)]


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def grads(step, gen, params):
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen) * (0.1 * (1.0 + 0.3 * (step % 7)))
        flat = g.view(-1)
        # a stripe of elements with no gradient until step 10 (late-seen rule), some huge, some tiny
        n = flat.numel()
        if step < 10:
            flat[n // 3 : n // 3 + 700] = 0
        flat[5::97] *= 1e3
        flat[7::89] *= 1e-4
        out.append(g)
    return out


def run_optimizer(kwargs, steps=30):
    gen = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = Anon8bit(params, fused=True, **kwargs)
    for step in range(1, steps + 1):
        for p, g in zip(params, grads(step, gen, params), strict=True):
            p.grad = g
        opt.step()
    tensors = list(params)
    for p in params:
        for key in sorted(opt.state[p]):
            tensors.append(opt.state[p][key])
    return digest(tensors)


def run_direct(gamma, limit, late_seen, l2, bounds):
    """anon8_step alone, every StepRule (late_seen off too, which Anon8bit never asks for)."""
    gen = torch.Generator().manual_seed(5)
    results = []
    for shape in SHAPES:
        n = torch.Size(shape).numel()
        param = torch.randn(n, generator=gen)
        m = torch.randn(n, generator=gen) * 0.1
        s = torch.rand(n, generator=gen) * 0.01
        s[::13] = 0
        v = torch.rand(n, generator=gen) * 50
        v[::11] = 0
        v[3::17] *= 1e-3
        state = {}
        for key, value in (("exp_avg", m), ("exp_avg_sq", s), ("precond", v)):
            state.update(quant8.quantize(key, value))
        keys = [
            "exp_avg",
            "exp_avg_absmax",
            "exp_avg_sq",
            "exp_avg_sq_max",
            "precond",
            "precond_log2_min",
            "precond_log2_max",
        ]
        mode = {1.0: "one", 0.5: "pow", 3.0: "log", -0.5: "pow"}[gamma]
        estimate = K.REFRESH_MODES[mode] if (limit or late_seen) else 0
        values = step_scalars(
            lr=0.01,
            beta1=0.9,
            beta2=0.99,
            gamma=gamma,
            eps=1e-8,
            weight_decay=0.05,
            decoupled_weight_decay=not l2,
            beta3=0.9,
            bounds=(-1.5, 1.5) if bounds else None,
            maximize=False,
            max_precond_ratio=2.0,
            averaged=False,
        )
        step = torch.tensor(5.0)
        for _ in range(3):
            grad = torch.randn(n, generator=gen) * 0.3
            grad[::29] = 0
            K.anon8_step(
                [param],
                [grad],
                *[[state[key]] for key in keys],
                [step],
                [-0.02],
                [30.0],
                values,
                l2,
                bounds,
                estimate,
                limit,
                late_seen,
            )
        results += [param] + [state[key] for key in keys]
    return digest(results)


def main():
    out = {"capability": k.capability(), "avx512": K.AVX512_STEP, "avx2": K.AVX2_STEP, "cases": {}}
    cases = {}
    for gamma, ratio, wd, bounds in itertools.product(
        [1.0, 0.5, 3.0, 0.0], [None, 10.0, 1.0], ["dec", "l2"], [False, True]
    ):
        if gamma == 0.0 and ratio is not None:
            continue
        kwargs = dict(
            lr=0.01,
            gamma=gamma,
            max_precond_ratio=ratio,
            weight_decay=0.05,
            decoupled_weight_decay=wd == "dec",
            bounds=(-1.5, 1.5) if bounds else None,
        )
        cases[f"opt-g{gamma}-r{ratio}-{wd}-b{int(bounds)}"] = lambda kw=kwargs: run_optimizer(kw)
    for gamma, limit, late, l2, bounds in itertools.product(
        [1.0, 0.5, 3.0, -0.5], [False, True], [False, True], [False, True], [False, True]
    ):
        if limit and gamma <= 0:
            continue
        cases[f"direct-g{gamma}-lim{int(limit)}-late{int(late)}-l2{int(l2)}-b{int(bounds)}"] = (
            lambda a=(gamma, limit, late, l2, bounds): run_direct(*a)
        )
    for name, fn in cases.items():
        hashes = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            hashes.append(fn())
        out["cases"][name] = hashes[0] if hashes[0] == hashes[1] else f"THREADS DIFFER {hashes}"
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
    print(
        out["capability"],
        out["avx512"],
        out["avx2"],
        len(out["cases"]),
        sum("DIFFER" in v for v in out["cases"].values()),
    )


if __name__ == "__main__":
    main()
