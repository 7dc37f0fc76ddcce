"""The optimizer step alone under raw FSDP2 (``fully_shard``, DTensor params): 2 gloo CPU ranks, a ~35M-param Llama.

Two modes, each launching itself with ``torchrun --nproc_per_node 2`` (``OMP_NUM_THREADS=1`` per rank)::

    python benchmarks/fsdp2_step.py --tag before              # ratios: results/fsdp2_step_before.json
    python benchmarks/fsdp2_step.py --steps 1000 --tag before # growth: results/fsdp2_growth_before.json

**Ratios.** The model (LlamaConfig: hidden 512, 6 layers, vocab 16,000, untied: 35.4M params) is built from its
config, each decoder layer and the whole model go under ``fully_shard``, and one backward pass leaves fixed gradients.
Every optimizer steps those same DTensor params: torch's ``AdamW(fused=True)`` (the anchor), ``Anon(fused=True)``,
``Anon8bit(fused=True)`` and ``Anon()`` (the class defaults). In each round every candidate's step is paired with an
AdamW step right before it; both ranks enter each timed step together (a barrier) and the slower rank's time counts.
A candidate's ratio is the median over rounds of its per-round ``candidate / adamw``. Anon's step counters are set
before each timed step so that the step is an ordinary one (step 1001) or a refresh (step 1024).

**Growth** (``--steps N``). ``Anon(fused=True)`` and ``Anon8bit(fused=True)`` take N steps each on the same params
and gradients, counting steps naturally (refreshes at 1, 2, 4, ...). Every ``--every`` steps each rank records the
median step time of the window and, after ``gc.collect()``, ``len(gc.get_objects())``; growth is the last window
against the first.

``--clock thread`` (the default) times each rank's own CPU time (``time.thread_time``; 1 thread per rank), so other
jobs on a shared machine do not count; ``--clock wall`` uses ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ORDINARY_STEP = 1001  # as in step_time.py: far from the last refresh (512), so max_precond_ratio binds nowhere
REFRESH_STEP = 1024
CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


def candidates() -> dict[str, tuple[str, dict]]:
    """name -> (optimizer family, constructor kwargs); ``adamw_fused`` is the anchor every ratio is taken against."""
    return {
        "adamw_fused": ("adamw", dict(fused=True)),
        "anon_fused": ("anon", dict(fused=True)),
        "anon8bit_fused": ("anon8bit", dict(fused=True)),
        "anon_defaults": ("anon", dict()),
    }


def build(family: str, params, kwargs: dict) -> torch.optim.Optimizer:
    from anon_hf import Anon, Anon8bit

    classes = {"adamw": torch.optim.AdamW, "anon": Anon, "anon8bit": Anon8bit}
    return classes[family](params, lr=1e-4, weight_decay=0.01, **kwargs)


def make(name: str, params) -> torch.optim.Optimizer:
    family, kwargs = candidates()[name]
    return build(family, params, kwargs)


def llama_config(**overrides):
    """~35M params by default: hidden 512, MLP 1376, 6 layers, 8 heads, vocab 16,000, untied head."""
    from transformers import LlamaConfig

    kwargs = dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=16000,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**kwargs, **overrides})


def sharded_llama(config, seed: int = 0) -> torch.nn.Module:
    """A Llama from ``config`` with each decoder layer and the whole model under raw ``fully_shard``."""
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def leave_gradients(model: torch.nn.Module, vocab: int, rank: int) -> None:
    """One forward and backward pass on this rank's random tokens: every param's ``.grad`` is a DTensor shard."""
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids, labels=ids).loss.backward()


def set_steps(optimizer, step: int) -> None:
    """Anon's per-tensor step counters to ``step`` (the next step is ``step + 1``); other optimizers untouched."""
    if not type(optimizer).__module__.startswith("anon_hf"):
        return
    for state in optimizer.state.values():
        state["step"].fill_(step)


def timed(optimizer, clock) -> float:
    """One ``step()`` of this rank, both ranks starting together; seconds by ``clock``."""
    dist.barrier()
    start = clock()
    optimizer.step()
    return clock() - start


def warm_up(optimizer, steps: int) -> float:
    """The first step (state, and the fused path's kernel build or compile), a refresh and ``steps`` ordinary
    steps; returns the first step's wall seconds."""
    start = time.perf_counter()
    optimizer.step()
    first = time.perf_counter() - start
    set_steps(optimizer, REFRESH_STEP - 1)
    optimizer.step()
    for _ in range(steps):
        set_steps(optimizer, ORDINARY_STEP - 1)
        optimizer.step()
    return first


def ratio_rounds(params, names: list[str], rounds: int, warmup: int, clock) -> dict:
    """This rank's seconds per round: ``{name: {"step": [...], "refresh": [...], "anchor_step": [...], ...}}``,
    each candidate's step timed right after a step of the anchor (torch's fused AdamW); plus each first step."""
    anchor = build("adamw", params, dict(fused=True))
    warm_up(anchor, warmup)
    optimizers = {name: make(name, params) for name in names}
    times = {name: {"first_step_s": warm_up(opt, warmup)} for name, opt in optimizers.items()}
    for _ in range(rounds):
        for name, optimizer in optimizers.items():
            for kind, step in (("step", ORDINARY_STEP), ("refresh", REFRESH_STEP)):
                anchor_time = timed(anchor, clock)
                set_steps(optimizer, step - 1)
                times[name].setdefault(f"anchor_{kind}", []).append(anchor_time)
                times[name].setdefault(kind, []).append(timed(optimizer, clock))
    return times


def ratio_rows(per_rank: list[dict]) -> list[dict]:
    """Per candidate: median over rounds of (slowest rank's step) / (slowest rank's anchor step), for ordinary and
    refresh steps, and the median milliseconds of each."""
    rows = []
    for name in per_rank[0]:
        row = dict(optimizer=name, first_step_s=round(max(rank[name]["first_step_s"] for rank in per_rank), 2))
        for kind in ("step", "refresh"):
            mine = [max(values) for values in zip(*(rank[name][kind] for rank in per_rank), strict=True)]
            anchor = [max(values) for values in zip(*(rank[name][f"anchor_{kind}"] for rank in per_rank), strict=True)]
            row[f"{kind}_ms"] = round(statistics.median(mine) * 1e3, 2)
            row[f"{kind}_anchor_ms"] = round(statistics.median(anchor) * 1e3, 2)
            row[f"{kind}_ratio"] = round(statistics.median(m / a for m, a in zip(mine, anchor, strict=True)), 3)
        rows.append(row)
    return rows


def growth_windows(params, name: str, steps: int, every: int, clock) -> list[dict]:
    """``steps`` natural steps of one optimizer; per window of ``every`` steps this rank's median step time and,
    after ``gc.collect()``, the number of objects the collector tracks."""
    optimizer = make(name, params)
    windows, times = [], []
    for step in range(1, steps + 1):
        times.append(timed(optimizer, clock))
        if step % every == 0:
            gc.collect()
            windows.append(
                dict(end_step=step, median_step_ms=statistics.median(times) * 1e3, objects=len(gc.get_objects()))
            )
            times = []
    del optimizer
    gc.collect()
    return windows


def growth_row(name: str, per_rank: list[list[dict]]) -> dict:
    """First and last window of each rank, and their growth: time ratio (slowest rank) and objects (largest)."""
    first = [windows[0] for windows in per_rank]
    last = [windows[-1] for windows in per_rank]
    return dict(
        optimizer=name,
        first_window_ms=round(max(w["median_step_ms"] for w in first), 2),
        last_window_ms=round(max(w["median_step_ms"] for w in last), 2),
        time_growth=round(max(w["median_step_ms"] for w in last) / max(w["median_step_ms"] for w in first), 3),
        objects_first=[w["objects"] for w in first],
        objects_last=[w["objects"] for w in last],
        objects_growth=max(b["objects"] - a["objects"] for a, b in zip(first, last, strict=True)),
        windows=per_rank,
    )


def gather(value):
    """Every rank's ``value``, in rank order (a list on every rank)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def machine() -> dict:
    """What a reader needs to compare two runs: the instruction set torch's and anon_hf's kernels were built for."""
    info = dict(torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(), cpus=os.cpu_count())
    info["ATEN_CPU_CAPABILITY"] = os.environ.get("ATEN_CPU_CAPABILITY")
    info["load_average_at_start"] = os.getloadavg()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "")
    info["cpu"] = model
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    info["commit"] = commit.stdout.strip()
    return info


def worker(args) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    clock = CLOCKS[args.clock]
    config = llama_config(**({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512}
                             if args.tiny else {}))  # fmt: skip
    model = sharded_llama(config)
    leave_gradients(model, config.vocab_size, rank)
    params = list(model.parameters())
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=args.command,
        machine=machine(),
        world_size=dist.get_world_size(),
        parameters=sum(p.numel() for p in params),
        clock=args.clock,
    )
    if args.steps:
        names = ["anon_fused", "anon8bit_fused"]
        result.update(steps=args.steps, every=args.every, rows=[])
        for name in names:
            result["rows"].append(
                growth_row(name, gather(growth_windows(params, name, args.steps, args.every, clock)))
            )
    else:
        names = [name for name in candidates() if name in args.optimizers.split(",")]
        result.update(rounds=args.rounds, rows=ratio_rows(gather(ratio_rounds(params, names, args.rounds, 2, clock))))
    if rank == 0:
        write(result, args)
    dist.barrier()
    dist.destroy_process_group()


def write(result: dict, args) -> None:
    kind = "growth" if args.steps else "step"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"fsdp2_{kind}_{args.tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {out}")


def table(result: dict) -> str:
    """The result as a markdown table (the form docs/performance.md quotes)."""
    head = (
        f"{result['parameters'] / 1e6:.1f}M params, {result['world_size']} gloo ranks, "
        f"{result['machine']['cpu_capability']}, clock {result['clock']}, commit {result['machine']['commit']}\n\n"
    )
    if "steps" in result:
        lines = ["| optimizer | first window ms | last window ms | time growth | objects first | objects last |",
                 "|---|---:|---:|---:|---|---|"]  # fmt: skip
        for row in result["rows"]:
            lines.append(
                f"| {row['optimizer']} | {row['first_window_ms']} | {row['last_window_ms']} | {row['time_growth']}x "
                f"| {row['objects_first']} | {row['objects_last']} |"
            )
        return head + "\n".join(lines)
    lines = ["| optimizer | step ms | ratio | refresh ms | refresh ratio | first step s |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in result["rows"]:
        lines.append(
            f"| {row['optimizer']} | {row['step_ms']} | {row['step_ratio']}x | {row['refresh_ms']} "
            f"| {row['refresh_ratio']}x | {row['first_step_s']} |"
        )
    return head + "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="growth mode: steps per optimizer (e.g. 1000)")
    parser.add_argument("--every", type=int, default=100, help="growth mode: steps per window (default 100)")
    parser.add_argument("--rounds", type=int, default=9, help="ratio mode: paired rounds (default 9)")
    parser.add_argument("--optimizers", default=",".join(candidates()), help="ratio mode: comma-separated names")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="thread")
    parser.add_argument("--tag", default="run", help="file name suffix: results/fsdp2_{step,growth}_<tag>.json")
    parser.add_argument("--out", default=None, help="JSON path (overrides --tag)")
    parser.add_argument("--tiny", action="store_true", help="a ~0.2M-param Llama instead (a quick trial)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--command", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps and args.steps < 2 * args.every:
        parser.error(f"--steps must be at least two windows (2 x --every = {2 * args.every}), got {args.steps}")
    if args.worker:
        worker(args)
        return
    command = " ".join(["python benchmarks/fsdp2_step.py", *(argv if argv is not None else sys.argv[1:])])
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(_free_port()), os.path.abspath(__file__), "--worker", "--command", command]  # fmt: skip
    sys.exit(subprocess.call(launch + (argv if argv is not None else sys.argv[1:]), env=env))


if __name__ == "__main__":
    main()
