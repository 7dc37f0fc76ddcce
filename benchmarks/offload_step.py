"""ZeRO-Offload's optimizer step on CPU: Anon's C++ kernels against DeepSpeed's ``DeepSpeedCPUAdam`` (what
ZeRO-Offload runs by default) and torch's ``AdamW(fused=True)``, on one flat fp32 tensor (what ZeRO hands the CPU
optimizer: a rank's flat partition), 1 thread and all threads.

Every optimizer steps the same parameter and gradient. Steps are timed in rounds (one step of each optimizer, in
turn), and each candidate's ratio to DeepSpeedCPUAdam and to fused AdamW is the median of its per-round ratios, so a
change in machine load between rounds cancels out. Anon's step counters are reset before each timed step so that
timed steps are ordinary steps (17), not refreshes. Each thread count runs in a child process with
``OMP_NUM_THREADS`` set, because DeepSpeed's extension is built with ``-fopenmp`` against the system's OpenMP runtime,
which ``torch.set_num_threads`` does not reach.

    DS_ACCELERATOR=cpu python benchmarks/offload_step.py                    # 50M and 200M, 1 and all threads
    DS_ACCELERATOR=cpu python benchmarks/offload_step.py --sizes 50 --threads 1 --repeats 15

DeepSpeedCPUAdam is built on first use (``CPUAdamBuilder().load()``, minutes) under ``TORCH_EXTENSIONS_DIR``; without
DeepSpeed its row is left out and ratios are to fused AdamW only. Results go to
``benchmarks/results/offload_step_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anon_hf import Anon, Anon8bit  # noqa: E402

OPTIMIZERS = ("ds_cpu_adam", "adamw_fused", "anon_fused", "anon8bit_fused")


def build(name, param):
    """The optimizer ``name`` over ``[param]``, or None when it cannot run here (DeepSpeed missing)."""
    if name == "ds_cpu_adam":
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
        except Exception:  # no deepspeed, or its extension cannot build here
            return None
        return DeepSpeedCPUAdam([param], lr=1e-3, weight_decay=0.01, adamw_mode=True)
    if name == "adamw_fused":
        return torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01, fused=True)
    cls = Anon if name == "anon_fused" else Anon8bit
    return cls([param], lr=1e-3, weight_decay=0.01, fused=True)


def ordinary_step(optimizer):
    """Anon's counters at 16, so that the step is step 17 (no refresh); other optimizers step as they are."""
    if isinstance(optimizer, Anon):
        for state in optimizer.state.values():
            state["step"].fill_(16)
    optimizer.step()


def measure(numel, names, repeats, warmup):
    """``{name: {"ms": median step time, "vs_ds": median ratio, "vs_adamw": median ratio}}`` for one size."""
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(numel, generator=generator) * 0.02)
    param.grad = torch.randn(numel, generator=generator) * 1e-3
    optimizers = {name: opt for name in names if (opt := build(name, param)) is not None}
    for opt in optimizers.values():
        for _ in range(warmup):
            ordinary_step(opt)
    times = {name: [] for name in optimizers}
    for _ in range(repeats):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            ordinary_step(opt)
            times[name].append(time.perf_counter() - start)
    rows = {}
    for name, samples in times.items():
        row = {"ms": 1e3 * statistics.median(samples)}
        for anchor, key in (("ds_cpu_adam", "vs_ds"), ("adamw_fused", "vs_adamw")):
            if anchor in times:
                row[key] = statistics.median(t / a for t, a in zip(samples, times[anchor], strict=True))
        rows[name] = row
    return rows


def child(args):
    torch.set_num_threads(args.child_threads)
    result = {}
    for size in args.sizes.split(","):
        result[size] = measure(int(float(size) * 1e6), args.optimizers.split(","), args.repeats, args.warmup)
    print(json.dumps(result))


def run_threads(threads, args):
    """The child's results for one thread count, with OMP_NUM_THREADS set before any runtime starts."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    command = [sys.executable, __file__, "--child-threads", str(threads), "--sizes", args.sizes]
    command += ["--optimizers", args.optimizers, "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {threads}-thread run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50,200", help="flat tensor sizes in millions of elements")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="thread counts (default 1 and all)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "offload_step_cpu.json"))
    parser.add_argument("--child-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_threads:
        return child(args)
    results = {threads: run_threads(int(threads), args) for threads in args.threads.split(",")}
    print(f"ISA {torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}")
    print(f"{'threads':>7} {'size':>5} {'optimizer':<15} {'ms':>9} {'vs DS':>7} {'vs AdamW':>9}")
    for threads, sizes in results.items():
        for size, rows in sizes.items():
            for name, row in rows.items():
                ds, adamw = row.get("vs_ds", float("nan")), row.get("vs_adamw", float("nan"))
                print(f"{threads:>7} {size + 'M':>5} {name:<15} {row['ms']:>9.1f} {ds:>7.2f} {adamw:>9.2f}")
    record = {"isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "results": results}
    record["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
