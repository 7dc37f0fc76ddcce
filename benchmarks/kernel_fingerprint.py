"""A fingerprint of what ``Anon(fused=True)``'s C++ kernel writes on CPU: sha256 of the params' and the state's bytes
after 30 steps (refreshes at 1, 2, 4, 8, 16), over a grid of shapes, dtypes and hyperparameters, at 1 and 2 threads.

A change to ``anon_hf/backends/csrc/anon_cpu.cpp`` that is meant to leave results bitwise as they were (a speed-up)
must leave the fingerprint as it was, for each instruction set the kernel is built for:

    python benchmarks/kernel_fingerprint.py --out /tmp/before.json                           # before the change
    python benchmarks/kernel_fingerprint.py --compare /tmp/before.json                       # after it
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/kernel_fingerprint.py --out /tmp/before_avx2.json

Gradients have whole runs of zeros (some elements see their first gradient late, some never), so the late-seen rule,
the limit and the refresh's keep_unseen path all run; sizes cover a vector block, its tails and tensors split over
threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anon_hf import Anon  # noqa: E402
from anon_hf.backends import cpu_kernel  # noqa: E402
from anon_hf.backends.fused.telemetry import stats  # noqa: E402

SHAPES = [(1,), (17,), (33,), (3, 7, 5), (1000,), (70_001,), (200_003,)]
CONFIGS = {
    "defaults": {},
    "no_limit": {"max_precond_ratio": None},
    "published": {"keep_unseen": False},
    "pow": {"gamma": 1.1},
    "pow_no_limit": {"gamma": 0.6, "max_precond_ratio": None},
    "log": {"gamma": 3.0},
    "negative": {"gamma": -0.1},
    "gamma0": {"gamma": 0.0},
    "eps": {"eps": 1e-8, "max_precond_ratio": 2.0},
    "l2": {"decoupled_weight_decay": False, "weight_decay": 0.1},
    "bounds": {"bounds": (-0.5, 0.5), "maximize": True},
    "every_step": {"refresh": "every", "beta3": 0.9},
}
DTYPES = {
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {}),
    "fp16": (torch.float16, {}),
    "fp32_bf16_state": (torch.float32, {"precond_dtype": torch.bfloat16, "moments_dtype": torch.bfloat16}),
}


def gradient(shape, step, generator, dtype):
    g = torch.randn(shape, generator=generator) * 1e-2
    flat = g.view(-1)
    flat[: flat.numel() // 5] = 0  # never seen
    if step < 6:
        flat[flat.numel() // 5 : flat.numel() // 2] = 0  # seen from step 6 on: between refreshes 4 and 8
    return g.to(dtype)


def run(config, dtype, state_kwargs, threads, steps):
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=generator) * 0.1).to(dtype)) for s in SHAPES]
    opt = Anon(params, fused=True, **{"lr": 1e-2, "weight_decay": 0.01, **state_kwargs, **config})
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step in range(steps):
            for p in params:
                p.grad = gradient(p.shape, step, generator, dtype)
            opt.step()
    finally:
        torch.set_num_threads(previous)
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
        for key in sorted(opt.state[p]):
            value = opt.state[p][key]
            if isinstance(value, torch.Tensor):
                digest.update(key.encode())
                digest.update(value.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(steps, threads):
    result = {}
    for config_name, config in CONFIGS.items():
        for dtype_name, (dtype, state_kwargs) in DTYPES.items():
            if dtype == torch.float16 and config_name not in ("defaults", "pow"):
                continue
            for count in threads:
                result[f"{config_name}/{dtype_name}/{count}t"] = run(config, dtype, state_kwargs, count, steps)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", help="write the fingerprint here (JSON)")
    parser.add_argument("--compare", help="a fingerprint JSON to compare with; exit 1 on any difference")
    args = parser.parse_args(argv)
    reason = cpu_kernel.kernel_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"the C++ kernel is unavailable: {reason}")
    result = fingerprint(args.steps, [int(t) for t in args.threads.split(",")])
    record = {
        "isa": cpu_kernel.capability(),
        "kernel": cpu_kernel.kernel().__name__,
        "steps": args.steps,
        "hashes": result,
    }
    record["paths"] = dict(stats)  # how many tensor lists took the kernel, and anything that fell back
    print(f"ISA {record['isa']}, kernel {record['kernel']}, {len(result)} runs, paths {record['paths']}")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        if old["isa"] != record["isa"]:
            raise SystemExit(f"{args.compare} is for {old['isa']}, this run is {record['isa']}")
        differ = [key for key in old["hashes"] if old["hashes"][key] != result.get(key)]
        print(f"{len(old['hashes']) - len(differ)} of {len(old['hashes'])} runs identical")
        for key in differ:
            print(f"  differs: {key}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
