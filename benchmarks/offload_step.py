"""ZeRO-Offload's optimizer step on CPU: Anon's C++ kernels against DeepSpeed's ``DeepSpeedCPUAdam`` (what
ZeRO-Offload runs by default) and torch's ``AdamW(fused=True)``, 1 thread and all threads, in two settings:

* **flat**: one flat fp32 tensor of 50M and 200M elements (what ZeRO hands the CPU optimizer: a rank's flat
  partition), every optimizer stepping the same parameter and gradient;
* **zero2**: a real ZeRO-2 offload step through DeepSpeed (``deepspeed.initialize`` with
  ``zero_optimization.stage=2``, ``offload_optimizer.device=cpu``) of a Llama built from a config (~58M parameters,
  fp32, one rank on gloo, ``DS_ACCELERATOR=cpu``): one engine per optimizer, ``{"type": "AdamW"}`` (DeepSpeed builds
  ``DeepSpeedCPUAdam``), ``{"type": "Anon", "params": {"fused": true}}`` (as anon-hf registers it) and a client
  ``torch.optim.AdamW(fused=True)`` (with ``zero_force_ds_cpu_optimizer: false``). Each round runs a forward and
  backward per engine (untimed), then times ``engine.step()`` (the CPU optimizer's step, the copy of the updated
  partition into the model and ZeRO's bookkeeping) and, inside it, the inner optimizer's ``step()``.

Steps are timed in rounds (one step of each optimizer, in turn, the order reversed every other round), and each
candidate's ratio to DeepSpeedCPUAdam and to fused AdamW is the median of its per-round ratios, so a change in
machine load between rounds cancels out. Anon's step counters are set to 16 before each timed step so that timed
steps are ordinary steps (17), not refreshes. Each thread count and setting runs in a child process with
``OMP_NUM_THREADS`` set, because DeepSpeed's extension is built with ``-fopenmp`` against the system's OpenMP runtime,
which ``torch.set_num_threads`` does not reach.

    DS_ACCELERATOR=cpu python benchmarks/offload_step.py                    # flat 50M/200M and ZeRO-2, 1 and all threads
    DS_ACCELERATOR=cpu python benchmarks/offload_step.py --sizes 50 --threads 1 --repeats 15 --zero2-rounds 0

DeepSpeedCPUAdam is built on first use (``CPUAdamBuilder().load()``, minutes) under ``TORCH_EXTENSIONS_DIR``; without
DeepSpeed its row and the ZeRO-2 runs are left out and ratios are to fused AdamW only. Results go to
``benchmarks/results/offload_step_cpu.json``, with the CPU's instruction set and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anon_hf import Anon, Anon8bit  # noqa: E402

OPTIMIZERS = ("ds_cpu_adam", "adamw_fused", "anon_fused", "anon8bit_fused")
ZERO2_OPTIMIZERS = ("ds_cpu_adam", "adamw_fused", "anon_fused")
ANCHORS = (("ds_cpu_adam", "vs_ds"), ("adamw_fused", "vs_adamw"))
# The ZeRO-2 model: a Llama of 58.1M parameters (untied embeddings: 2 x 16.4M), and its fixed batch of token ids.
ZERO2_LLAMA = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
ZERO2_BATCH = (2, 64)


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


def ordinary(optimizer):
    """Anon's counters at 16, so that its next step is step 17 (no refresh); other optimizers are left as they are."""
    if isinstance(optimizer, Anon):
        for state in optimizer.state.values():
            state["step"].fill_(16)


def rounds(steps, repeats):
    """``{name: [seconds, ...]}``: ``repeats`` rounds of ``steps[name]()`` for every name, the order reversed every
    other round (so that no candidate always follows the same one)."""
    names = list(steps)
    times = {name: [] for name in names}
    for index in range(repeats):
        for name in names if index % 2 == 0 else names[::-1]:
            times[name].append(steps[name]())
    return times


def ratios(times, extra=None):
    """Per candidate: its median time in ms and its median per-round ratio to each anchor present."""
    rows = {}
    for name, samples in times.items():
        row = {"ms": 1e3 * statistics.median(samples)}
        for anchor, key in ANCHORS:
            if anchor in times:
                row[key] = statistics.median(t / a for t, a in zip(samples, times[anchor], strict=True))
        rows[name] = {**row, **(extra or {}).get(name, {})}
    return rows


def measure_flat(numel, names, repeats, warmup):
    """``{name: {"ms": median step time, "vs_ds": median ratio, "vs_adamw": median ratio}}`` for one size."""
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(numel, generator=generator) * 0.02)
    param.grad = torch.randn(numel, generator=generator) * 1e-3
    optimizers = {name: opt for name in names if (opt := build(name, param)) is not None}

    def timed(opt):
        def step():
            ordinary(opt)
            start = time.perf_counter()
            opt.step()
            return time.perf_counter() - start

        return step

    steps = {name: timed(opt) for name, opt in optimizers.items()}
    for step in steps.values():
        for _ in range(warmup):
            step()
    return ratios(rounds(steps, repeats))


def zero2_engine(name):
    """A DeepSpeed ZeRO-2 engine with the optimizer offloaded to CPU, stepping ``name``, on a fresh Llama."""
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**ZERO2_LLAMA)).float()
    model.config.use_cache = False
    config = {
        "train_micro_batch_size_per_gpu": ZERO2_BATCH[0],
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    hyper = {"lr": 1e-3, "weight_decay": 0.01}
    client = None
    if name == "ds_cpu_adam":
        config["optimizer"] = {"type": "AdamW", "params": hyper}
    elif name == "anon_fused":
        config["optimizer"] = {"type": "Anon", "params": {**hyper, "fused": True}}
    else:  # a client optimizer under offload: DeepSpeed refuses it unless told not to force its own
        client = torch.optim.AdamW(model.parameters(), **hyper, fused=True)
        config["zero_force_ds_cpu_optimizer"] = False
        config["zero_allow_untested_optimizer"] = True
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), optimizer=client, config=config
    )
    return engine


def measure_zero2(names, repeats, warmup):
    """Per optimizer: median ``engine.step()`` and inner ``optimizer.step()`` times and their per-round ratios."""
    import torch.distributed as dist

    with socket.socket() as probe:  # one rank on gloo, on a free local port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    ids = torch.randint(0, ZERO2_LLAMA["vocab_size"], ZERO2_BATCH, generator=torch.Generator().manual_seed(0))
    engines, inner_times, kinds = {}, {}, {}
    for name in names:
        engine = engines[name] = zero2_engine(name)
        inner = engine.optimizer.optimizer
        kinds[name] = {"inner": type(inner).__name__, "partition_device": str(engine.optimizer.device)}
        inner_times[name] = []

        def inner_step(*args, _step=inner.step, _times=inner_times[name], **kwargs):
            start = time.perf_counter()
            result = _step(*args, **kwargs)
            _times.append(time.perf_counter() - start)
            return result

        inner.step = inner_step

    def timed(name):
        engine = engines[name]

        def step():
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            ordinary(engine.optimizer.optimizer)
            start = time.perf_counter()
            engine.step()
            return time.perf_counter() - start

        return step

    steps = {name: timed(name) for name in names}
    for step in steps.values():
        for _ in range(warmup):
            step()
    for samples in inner_times.values():
        samples.clear()
    times = rounds(steps, repeats)
    # The inner step runs once per param group per engine.step(): sum them per round.
    inner = {}
    for name, samples in inner_times.items():
        per_step = len(samples) // repeats
        inner[name] = [sum(samples[i * per_step : (i + 1) * per_step]) for i in range(repeats)]
    engine_rows, inner_rows = ratios(times, kinds), ratios(inner)
    from anon_hf.backends.fused.telemetry import stats

    result = {"params_millions": sum(p.numel() for p in engines[names[0]].module.parameters()) / 1e6}
    result.update(engine_step=engine_rows, inner_step=inner_rows, anon_paths=dict(stats))
    dist.barrier()
    dist.destroy_process_group()
    return result


def deepspeed_available():
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: F401
    except Exception:
        return False
    return True


def child(args):
    torch.set_num_threads(args.child_threads)
    if args.child_mode == "zero2":
        names = [name for name in ZERO2_OPTIMIZERS if name in args.optimizers.split(",")]
        result = measure_zero2(names, args.zero2_rounds, args.warmup)
    else:
        result = {}
        for size in args.sizes.split(","):
            result[size] = measure_flat(int(float(size) * 1e6), args.optimizers.split(","), args.repeats, args.warmup)
    print(json.dumps(result))


def run_child(threads, mode, args):
    """The child's results for one thread count and setting, with OMP_NUM_THREADS set before any runtime starts."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    command = [sys.executable, __file__, "--child-threads", str(threads), "--child-mode", mode, "--sizes", args.sizes]
    command += ["--optimizers", args.optimizers, "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    command += ["--zero2-rounds", str(args.zero2_rounds)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {threads}-thread {mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_rows(title, results, columns=("ms",)):
    print(title)
    print(f"{'threads':>7} {'size':>5} {'optimizer':<15} {'ms':>9} {'vs DS':>7} {'vs AdamW':>9}")
    for threads, sizes in results.items():
        for size, rows in sizes.items():
            for name, row in rows.items():
                ds, adamw = row.get("vs_ds", float("nan")), row.get("vs_adamw", float("nan"))
                print(f"{threads:>7} {size:>5} {name:<15} {row['ms']:>9.1f} {ds:>7.2f} {adamw:>9.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50,200", help="flat tensor sizes in millions of elements ('' for none)")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="thread counts (default 1 and all)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds of the flat steps (default 9)")
    parser.add_argument("--zero2-rounds", type=int, default=9, help="timed rounds of the ZeRO-2 steps (0: none)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "offload_step_cpu.json"))
    parser.add_argument("--child-threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", default="flat", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_threads:
        return child(args)
    isa = torch.backends.cpu.get_cpu_capability()
    load_before = os.getloadavg()
    flat, zero2 = {}, {}
    for threads in args.threads.split(","):
        if args.sizes:
            flat[threads] = {f"{size}M": rows for size, rows in run_child(int(threads), "flat", args).items()}
        if args.zero2_rounds and deepspeed_available():
            zero2[threads] = run_child(int(threads), "zero2", args)
    load_after = os.getloadavg()
    print(
        f"ISA {isa}, {cpu_name()}, {os.cpu_count()} CPUs; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    if flat:
        print_rows("flat fp32 tensor, optimizer.step()", flat)
    for part in ("engine_step", "inner_step"):
        if zero2:
            rows = {threads: {f"{result['params_millions']:.0f}M": result[part]} for threads, result in zero2.items()}
            print_rows(f"ZeRO-2 offload, 1 rank, {part.replace('_', '.')}()", rows)
    record = {"isa": isa, "cpu": cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__}
    record.update(load_average_before=load_before, load_average_after=load_after, results=flat, zero2=zero2)
    record["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
