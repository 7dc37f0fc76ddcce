"""Do two-rank runs end cleanly? N runs in a row of a small ``Anon`` training script, each with a timeout.

Each run trains on 2 gloo CPU processes, started the way ``docs/distributed.md`` gives for two CPU processes::

    accelerate launch --multi_gpu --num_processes 2 SCRIPT ...
    torchrun --nproc_per_node 2 SCRIPT ...

and counts the runs that finished (exit status 0), failed (another status, e.g. a rank killed by SIGABRT with
"terminate called without an active exception"; the last lines of the output are kept) and hung (killed after
``--timeout`` seconds; ``--gdb`` first records the ranks' native stacks). No retry: each run counts once.

Two scripts (this file with ``--train``; it imports ``anon_hf``):

- ``--script loop`` (default, ~10 s a run): a DDP model stepped by ``Anon``, with the loss gathered from every rank
  after each step (``dist.all_gather``, as the Trainer gathers its metrics) and the process group left to the
  interpreter's exit, as Trainer scripts leave it;
- ``--script trainer``: ``Trainer`` on a tiny Llama with ``--optim anon ... --use_cpu true`` (~30-60 s a run here).

    OMP_NUM_THREADS=1 python benchmarks/exit_runs.py --launcher accelerate --runs 50
    OMP_NUM_THREADS=1 python benchmarks/exit_runs.py --launcher torchrun --runs 50 --script trainer
    OMP_NUM_THREADS=1 python benchmarks/exit_runs.py --launcher both --runs 5 --optim_args verify_sync=false

Writes ``benchmarks/results/exit_runs_<launcher>_<script>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = {
    "accelerate": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"],
    "torchrun": ["torchrun", "--nproc_per_node", "2"],
}  # fmt: skip


def train_trainer(argv: list[str]) -> None:
    """``--script trainer``: HfArgumentParser(TrainingArguments) + Trainer on a tiny Llama and synthetic tokens."""
    import torch

    sys.path.insert(0, str(ROOT))
    from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    import anon_hf  # noqa: F401  (registers --optim anon)

    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
    torch.manual_seed(args.seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)  # fmt: skip
    tokens = torch.randint(0, 256, (64, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in tokens]
    Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=dataset).train()


def train_loop(argv: list[str]) -> None:
    """``--script loop``: ``--optim anon|adamw --optim_args k=v,... --max_steps N`` on a small DDP model."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    import anon_hf

    options = dict(zip(argv[::2], argv[1::2], strict=True))
    kwargs = dict(item.split("=") for item in options.get("--optim_args", "").split(",") if item)
    kwargs = {key: value.lower() == "true" if value.lower() in ("true", "false") else float(value)
              for key, value in kwargs.items()}  # fmt: skip
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer_class = torch.optim.AdamW if options.get("--optim") == "adamw" else anon_hf.Anon
    optimizer = optimizer_class(model.parameters(), lr=1e-3, **kwargs)
    for _ in range(int(options.get("--max_steps", 8))):
        loss = model(torch.randn(16, 32)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        gathered = [torch.empty_like(loss) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, loss.detach())
        torch.cat([g[None] for g in gathered]).mean().item()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the launchers start their ranks in sessions of their own, so a process group
    kill misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _stacks(pids: list[int]) -> str:
    """The native stacks of each thread of ``pids`` (function names only), from gdb; empty without gdb."""
    if shutil.which("gdb") is None:
        return ""
    report = []
    for pid in pids:
        trace = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 30"],
                               capture_output=True, text=True, timeout=120).stdout  # fmt: skip
        frames = [line.split(" in ", 1)[-1].split(" (")[0] for line in trace.splitlines() if line.startswith("#")]
        threads = [line.split('"')[1] for line in trace.splitlines() if line.startswith("Thread ") and '"' in line]
        report.append(f"pid {pid} threads {threads}:\n  " + "\n  ".join(frames))
    return "\n".join(report)


def one_run(command: list[str], env: dict[str, str], timeout: float, gdb: bool) -> tuple[str, float, str]:
    """``("ok" | "failed" | "hung", seconds, output tail)``; a hung run's processes are killed (after ``gdb``
    recorded their stacks in the tail, when asked)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            status = "ok" if proc.wait(timeout=timeout) == 0 else "failed"
        except subprocess.TimeoutExpired:
            stacks = _stacks(_descendants(proc.pid)) if gdb else ""
            for pid in [proc.pid, *_descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            status = "hung"
        log.seek(0)
        tail = "\n".join(log.read().splitlines()[-15:])
        tail += f"\n{stacks}" if status == "hung" and stacks else ""
    return status, time.perf_counter() - started, tail


def main() -> None:
    if sys.argv[1:2] == ["--train"]:
        {"loop": train_loop, "trainer": train_trainer}[sys.argv[2]](sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launcher", choices=[*LAUNCHERS, "both"], default="both")
    parser.add_argument("--runs", type=int, default=50, help="runs per launcher (default: 50)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds before a run counts as hung")
    parser.add_argument("--script", choices=["loop", "trainer"], default="loop")
    parser.add_argument("--optim", default="anon", help="anon, or the control: adamw (loop) / adamw_torch (trainer)")
    parser.add_argument("--optim_args", default="")
    parser.add_argument("--max_steps", type=int, default=8)
    parser.add_argument("--gdb", action="store_true", help="record a hung run's native stacks (gdb) before killing it")
    parser.add_argument(
        "--out", default=None, help="JSON path (default: benchmarks/results/exit_runs_<launcher>.json)"
    )
    options = parser.parse_args()
    launchers = list(LAUNCHERS) if options.launcher == "both" else [options.launcher]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    results = {}
    for launcher in launchers:
        counts, runs = {"ok": 0, "failed": 0, "hung": 0}, []
        with tempfile.TemporaryDirectory() as output_dir:
            script = [
                __file__,
                "--train",
                options.script,
                "--optim",
                options.optim,
                "--max_steps",
                str(options.max_steps),
            ]
            if options.script == "trainer":
                script += ["--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
                           "--disable_tqdm", "true", "--logging_steps", "100", "--use_cpu", "true",
                           "--output_dir", output_dir]  # fmt: skip
            if options.optim_args:
                script += ["--optim_args", options.optim_args]
            for index in range(options.runs):
                status, seconds, tail = one_run(LAUNCHERS[launcher] + script, env, options.timeout, options.gdb)
                counts[status] += 1
                runs.append(
                    {"status": status, "seconds": round(seconds, 1), **({"tail": tail} if status != "ok" else {})}
                )
                print(f"{launcher} run {index + 1}/{options.runs}: {status} in {seconds:.1f} s {counts}", flush=True)
                if status != "ok":
                    print(tail, flush=True)
        results[launcher] = {"counts": counts, "runs": runs}
    record = {"script": options.script, "runs_per_launcher": options.runs, "timeout_s": options.timeout, "optim": options.optim,
              "optim_args": options.optim_args, "max_steps": options.max_steps, "results": results}  # fmt: skip
    out = Path(options.out or ROOT / "benchmarks" / "results" / f"exit_runs_{options.launcher}_{options.script}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({name: value["counts"] for name, value in results.items()}))


if __name__ == "__main__":
    main()
