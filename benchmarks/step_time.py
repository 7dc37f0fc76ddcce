"""Optimizer step time: Anon (for-loop, foreach, fused) against torch's AdamW (for-loop, foreach, fused) and SGD with
momentum, in one process and one run, on (a) the parameter shapes of a ~52M-parameter Llama-style model and (b) many
small tensors.

Every optimizer steps the same parameters and gradients. Steps are timed in pairs, one step of fused AdamW then one
step of the candidate, and a candidate's ratio is the median of its per-pair ratios: a change in machine load
between candidates cancels out. Anon's step counters are reset before each timed step so that timed steps are
ordinary steps (17) or refresh steps (32, and 1 for the first refresh, which has no previous preconditioner). The
amortized refresh overhead counts the 10 refreshes (1, 2, 4, ..., 512) of the first 1,000 steps:
``(extra(1) + 9 * extra(32)) / (1000 * step)``, with ``extra = refresh step - ordinary step``.

    python benchmarks/step_time.py                      # CPU, 1 thread, writes benchmarks/results/step_time_cpu.json
    python benchmarks/step_time.py --device cuda        # the same on a GPU
    python benchmarks/step_time.py --sets a --repeats 20
    python benchmarks/step_time.py --sets a --optimizers adamw_fused,anon_fused,anon8bit_forloop,anon8bit_fused \
        --clock thread --out benchmarks/results/step_time_cpu_8bit.json

``anon8bit_*`` rows step ``Anon8bit`` (8-bit state): its fused row runs the 8-bit C++ kernel between refreshes and
the reference path (decode, ``anon()``, encode) at refreshes, so its refresh columns time that path.

The fused Anon path builds its C++ kernel (CPU, ~20 s once per machine, then loaded from the cache in well under a
second) or compiles its graphs (``anon_fused_compiled`` and CUDA; tens of seconds, seconds with inductor's cache warm)
on first use; the time of its first steps is reported as ``compile_s`` and excluded from step times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
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


def llama_shapes(vocab=32000, hidden=512, intermediate=1376, layers=6):
    """(a): untied embeddings and head, per layer q/k/v/o, gate/up/down and two norms, a final norm: 51.7M params."""
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
        shapes += [(hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


def llama_shapes_20m():
    """(c): a ~20M-parameter Llama shape (hidden 384, 6 layers, vocab 16000): more tensors per parameter than (a),
    so per-call overhead weighs more."""
    return llama_shapes(vocab=16000, hidden=384, intermediate=1024, layers=6)


def small_shapes(layers=150):
    """(b): 1,200 small tensors (norms, biases, small projections), 0.77M params."""
    return [shape for _ in range(layers) for shape in [(256,)] * 4 + [(1024,)] * 2 + [(64, 16)] * 2]


def candidates():
    """(name, family, constructor kwargs, whether the refresh is timed too[, environment while it steps]).

    On CPU, ``fused=True`` runs anon_hf's C++ kernel; ``anon_fused_compiled`` turns it off (``ANON_HF_CPU_KERNEL=0``)
    to time the torch.compile'd graphs, the fused path CUDA tensors take. ``*_no_limit`` turns ``max_precond_ratio``
    off, to show what the limit costs where it binds nowhere; ``*_ratio1`` sets it to 1, where it binds on about half
    of the elements of every block (its worst case).
    """
    bf16 = dict(precond_dtype="bf16", moments_dtype="bf16")
    return [
        ("adamw_forloop", "adamw", dict(foreach=False), False),
        ("adamw_foreach", "adamw", dict(foreach=True), False),
        ("adamw_fused", "adamw", dict(fused=True), False),
        ("sgd_momentum", "sgd", dict(), False),
        ("anon_forloop", "anon", dict(foreach=False), True),
        ("anon_forloop_no_limit", "anon", dict(foreach=False, max_precond_ratio=None), False),
        ("anon_foreach", "anon", dict(foreach=True), True),
        ("anon_foreach_no_limit", "anon", dict(foreach=True, max_precond_ratio=None), False),
        ("anon_fused", "anon", dict(fused=True), True),
        ("anon_fused_no_limit", "anon", dict(fused=True, max_precond_ratio=None), True),
        ("anon_fused_ratio1", "anon", dict(fused=True, max_precond_ratio=1.0), False),
        ("anon_fused_gamma0.5", "anon", dict(fused=True, gamma=0.5), True),
        ("anon_fused_gamma0.5_no_limit", "anon", dict(fused=True, gamma=0.5, max_precond_ratio=None), True),
        ("anon_fused_gamma1.1", "anon", dict(fused=True, gamma=1.1), True),
        ("anon_fused_compiled", "anon", dict(fused=True), True, {"ANON_HF_CPU_KERNEL": "0"}),
        ("anon_foreach_gamma0", "anon", dict(foreach=True, gamma=0.0), False),
        ("anon_fused_gamma0", "anon", dict(fused=True, gamma=0.0), False),
        ("anon_foreach_bf16_precond", "anon", dict(foreach=True, precond_dtype="bf16"), False),
        ("anon_foreach_bf16_state", "anon", dict(foreach=True, **bf16), False),
        ("anon_fused_bf16_state", "anon", dict(fused=True, **bf16), False),
        ("anon8bit_forloop", "anon8bit", dict(foreach=False), True),
        ("anon8bit_fused", "anon8bit", dict(fused=True), True),
        ("anon8bit_fused_no_limit", "anon8bit", dict(fused=True, max_precond_ratio=None), True),
        ("anon8bit_fused_ratio1", "anon8bit", dict(fused=True, max_precond_ratio=1.0), False),
        ("anon8bit_fused_gamma0.5", "anon8bit", dict(fused=True, gamma=0.5), True),
        ("anon8bit_fused_gamma0.5_ratio1", "anon8bit", dict(fused=True, gamma=0.5, max_precond_ratio=1.0), False),
        ("anon8bit_fused_compiled", "anon8bit", dict(fused=True), False, {"ANON_HF_CPU_KERNEL": "0"}),
    ]


def build(family, params, kwargs):
    if family == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kwargs)
    if family == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, **kwargs)
    return (Anon8bit if family == "anon8bit" else Anon)(params, lr=1e-4, weight_decay=0.01, **kwargs)


class _WithEnvironment:
    """Steps ``optimizer`` with ``environment`` set (anon_hf reads ``ANON_HF_CPU_KERNEL`` at every fused step)."""

    def __init__(self, optimizer, environment):
        self.optimizer, self.environment = optimizer, environment
        self.state = optimizer.state

    def step(self):
        saved = {key: os.environ.get(key) for key in self.environment}
        os.environ.update(self.environment)
        try:
            self.optimizer.step()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key)
                else:
                    os.environ[key] = value


ORDINARY_STEP = 1001


def set_steps(optimizer, step):
    for state in optimizer.state.values():
        state["step"].fill_(step)


def state_bytes(optimizer, numel):
    """Bytes of optimizer state per parameter element, step counters included."""
    total = sum(
        v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    )
    return total / numel


CLOCK = (
    time.perf_counter
)  # --clock thread: this thread's CPU time (steps on CPU, 1 thread), immune to a loaded machine


def timed(fn, sync):
    sync()
    start = CLOCK()
    fn()
    sync()
    return CLOCK() - start


def paired(reference, candidate, before, repeats, sync):
    """Median times of both and the median of per-pair ratios candidate / reference."""
    ref_times, times = [], []
    for _ in range(repeats):
        ref_times.append(timed(reference.step, sync))
        before()
        times.append(timed(candidate.step, sync))
    ratios = [t / r for t, r in zip(times, ref_times, strict=True)]
    return statistics.median(times), statistics.median(ref_times), statistics.median(ratios)


def run_set(name, shapes, device, repeats, warmup, log, only=None):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=generator) * 0.02).to(device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=generator) * 1e-2).to(device)
    numel = sum(p.numel() for p in params)
    log(f"\n({name}) {len(params)} tensors, {numel / 1e6:.2f}M parameters")
    reference = build("adamw", params, dict(fused=True))
    for _ in range(warmup):
        reference.step()
    rows = []
    for label, family, kwargs, time_refresh, *environment in candidates():
        if only and label not in only:
            continue
        optimizer = build(family, params, kwargs)
        if environment:
            optimizer = _WithEnvironment(optimizer, environment[0])
        row = dict(optimizer=label)
        started = time.perf_counter()
        optimizer.step()  # creates the state (Anon: step 1, the first refresh)
        if family.startswith("anon"):
            set_steps(optimizer, 16)
            optimizer.step()  # fused: compiles the step graphs
            if time_refresh:
                set_steps(optimizer, 31)
                optimizer.step()  # fused: compiles the refresh graphs
        anon = family.startswith("anon")
        row["compile_s"] = round(time.perf_counter() - started, 2) if kwargs.get("fused") and anon else 0.0
        # Every timed ordinary step is step 1001, 489 gradients after the refresh at 512: as in training, the
        # accumulator then holds far fewer than 1 / (1 - beta2) gradients' worth, so max_precond_ratio's limit binds
        # nowhere (at step 17, timed over and over, it would: the accumulator grows past its bias correction).
        ordinary = (lambda opt=optimizer: set_steps(opt, ORDINARY_STEP - 1)) if anon else (lambda: None)
        for _ in range(warmup):
            ordinary()
            optimizer.step()
        step, ref, ratio = paired(reference, optimizer, ordinary, repeats, sync)
        row.update(step_ms=step * 1e3, adamw_fused_ms=ref * 1e3, ratio_to_adamw_fused=ratio)
        if time_refresh:
            refresh, _, refresh_ratio = paired(
                reference, optimizer, lambda opt=optimizer: set_steps(opt, 31), repeats, sync
            )
            first, _, _ = paired(
                reference, optimizer, lambda opt=optimizer: set_steps(opt, 0), max(2, repeats // 4), sync
            )
            # The ratios are taken pairwise against AdamW; convert them with this row's own medians.
            extra = max(refresh - step, 0.0)
            extra_first = max(first - step, 0.0)
            row.update(
                refresh_step_ms=refresh * 1e3,
                refresh_ratio_to_adamw_fused=refresh_ratio,
                first_refresh_step_ms=first * 1e3,
                refresh_extra_in_steps=extra / step,
                amortized_refresh_overhead_1000_steps=(extra_first + 9 * extra) / (1000 * step),
            )
        row["state_bytes_per_param"] = state_bytes(optimizer, numel)
        rows.append(row)
        log(format_row(row))
        del optimizer
    return dict(set=name, tensors=len(params), parameters=numel, rows=rows)


def format_row(row):
    text = f"  {row['optimizer']:28s} {row['step_ms']:9.2f} ms  {row['ratio_to_adamw_fused']:6.2f}x"
    text += f"  state {row['state_bytes_per_param']:5.2f} B/param"
    if "refresh_step_ms" in row:
        text += f"  refresh {row['refresh_step_ms']:8.1f} ms (+{row['refresh_extra_in_steps']:.2f} steps)"
        text += f"  amortized/1000 {100 * row['amortized_refresh_overhead_1000_steps']:.2f}%"
    if row["compile_s"]:
        text += f"  first steps {row['compile_s']:.1f} s"
    return text


def machine(device):
    info = dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads())
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name()
    else:
        model = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), ""
        )
        info["device"] = model or platform.processor()
        # What torch's kernels and anon_hf's C++ kernels were built for (ATEN_CPU_CAPABILITY can lower it).
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["cpus"] = os.cpu_count()
        info["load_average_at_start"] = os.getloadavg()
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        pass
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    parser.add_argument("--repeats", type=int, default=9, help="timed step pairs per optimizer (default 9)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--sets", default="a,c,b", help="a: Llama-style 52M shapes, c: Llama-style 20M shapes, b: 1,200 small tensors"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="wall: time.perf_counter; thread: time.thread_time, the CPU time of this thread (CPU and --threads 1 "
        "only; on a machine shared with other jobs it does not count the time spent waiting for a core)",
    )
    parser.add_argument("--optimizers", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/step_time_<device>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    global CLOCK
    if args.clock == "thread":
        if device.type != "cpu" or args.threads != 1:
            parser.error("--clock thread needs --device cpu and --threads 1")
        CLOCK = time.thread_time
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    sets = {
        "a": ("a_llama_52m", llama_shapes()),
        "c": ("c_llama_20m", llama_shapes_20m()),
        "b": ("b_small_tensors", small_shapes()),
    }
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        machine=machine(device),
        sets=[
            run_set(
                *sets[key],
                device,
                args.repeats,
                args.warmup,
                print,
                only=set(filter(None, args.optimizers.split(","))),
            )
            for key in args.sets.split(",")
        ],
    )
    result["wall_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out or Path(__file__).parent / "results" / f"step_time_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(result, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    )
    print(f"\nwall {result['wall_s']} s; wrote {out}")


if __name__ == "__main__":
    main()
