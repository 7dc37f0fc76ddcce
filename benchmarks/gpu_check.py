"""A GPU check ready to run: what anon_hf's CUDA paths compute and cost, on one CUDA GPU, printed as one table.

    make gpu-check                                  # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --json benchmarks/results/gpu_check_cuda.json
    python benchmarks/gpu_check.py --device cpu --tiny   # this script's own test on CPU (tests/test_gpu_check.py)

Rows, in the order they run (``docs/performance.md``, "GPU check", says what each means):

* ``first compile``: ``Anon(fused=True)`` and ``Anon8bit(fused=True)`` on the 20M set with inductor's and Triton's
  caches empty (a fresh temporary folder unless ``--warm-cache``): wall time of the first step of each kind (refresh,
  ordinary) minus the same kind of step once warm.
* ``parity``: the compiled graphs (``Anon(fused=True)``) and the 8-bit graph (``Anon8bit(fused=True)``) against
  the foreach path, fp32 and bf16 params, the same gradients for 20 steps (refreshes at 1, 2, 4, 8, 16); a row also
  fails if the compiled path did not run (a fallback to foreach would compare foreach with itself).
* ``trainer``: ``anon-hf run tests/scripts/train_tiny_llama.py --optim anon --bf16 --max_steps 20`` in a subprocess
  (HfArgumentParser + Trainer, a tiny Llama built from a config): it finishes, Anon steps, every logged loss is finite.
* ``step time``: one optimizer step against ``torch.optim.AdamW(fused=True)`` on Llama-like shape mixes of 20M, 200M
  and 1B params (fp32): per round one AdamW step then one candidate step, each timed with CUDA events; the ratio is
  the median of the per-round ratios; warm-up steps are not timed. Candidates: ``Anon(fused=True)``,
  ``Anon8bit(fused=True)``, ``Anon(foreach=True)`` (the CUDA default), and where installed bitsandbytes'
  ``AdamW8bit`` and torchao's ``AdamW8bit``.
* ``peak memory``: ``torch.cuda.max_memory_allocated`` over 3 steps (two refreshes, one ordinary step) above the
  params and gradients of the 200M set, each optimizer alone, against AdamW's.

It is meant to end within 8 minutes on one H100-class GPU: rows not started after ``--budget-s`` (450 s) are
skipped, and say so. A row that raises is printed as a ``FAILED`` row with the error, and the rest still run. Exit status: 0 when no row
failed, 1 when one did; without a CUDA device (and no ``--device cpu``) it prints one ``gpu-check: SKIPPED`` line
saying why and exits 0, so ``make gpu-check`` passes on a CPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from step_time import llama_shapes  # noqa: E402  (one definition of the Llama-like shape mix)

from anon_hf import Anon, Anon8bit  # noqa: E402
from anon_hf.backends.fused import stats as fused_stats  # noqa: E402

PARITY_STEPS = 20
PARITY_LR = 1e-2
#: (rtol, atol, least fraction of elements within them). fp32: both paths compute in fp32, so only rounding
#: differs. bf16: the graphs compute in fp32 and round once, foreach rounds each op to bf16 (tests/test_fused.py), so
#: an element near a rounding boundary can take another bf16 value at one step and keep the difference (on CPU 1 of
#: 209k elements ended 0.1 apart after 20 steps). 8-bit: a value within rounding of the midpoint between two codes
#: may round the other way in one path, moving that element by one code step from then on (tests/test_anon8bit.py).
TOLERANCES = {
    ("Anon", torch.float32): (1e-5, 1e-5, 1.0),
    ("Anon", torch.bfloat16): (2e-2, 2e-2, 0.999),
    ("Anon8bit", torch.float32): (1e-5, 1e-5, 0.99),
    ("Anon8bit", torch.bfloat16): (2e-2, 2e-2, 0.99),
}
PASS, FAIL, FAILED, SKIPPED, MEASURED = "pass", "FAIL", "FAILED", "skipped", "measured"


@dataclasses.dataclass
class Row:
    """One line of the table. ``verdict``: pass / FAIL (out of tolerance) / FAILED (raised) / skipped / measured."""

    check: str
    setting: str
    result: str = ""
    reference: str = ""
    ratio: str = ""
    verdict: str = MEASURED
    numbers: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Context:
    device: torch.device
    sets: dict[str, list[tuple[int, ...]]]  # name -> shapes; the first is the compile set, "200M" the memory set
    rounds: int
    budget_s: float
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.budget_s


def shape_sets(tiny: bool) -> dict[str, list[tuple[int, ...]]]:
    """Llama-like shape mixes (untied embeddings and head, q/k/v/o, gate/up/down, norms), by parameter count."""
    if tiny:
        return {"tiny": llama_shapes(vocab=512, hidden=64, intermediate=128, layers=2)}
    return {
        "20M": llama_shapes(vocab=16000, hidden=384, intermediate=1024, layers=6),  # 22.9M
        "200M": llama_shapes(vocab=32000, hidden=1024, intermediate=2816, layers=12),  # 220M
        "1B": llama_shapes(vocab=32000, hidden=2048, intermediate=5632, layers=16),  # 953M
    }


def describe(name: str, shapes) -> str:
    return f"{name} ({sum(math.prod(s) for s in shapes) / 1e6:.1f}M params, {len(shapes)} tensors)"


def failed_row(check: str, setting: str, error: BaseException) -> Row:
    last = traceback.format_exception_only(type(error), error)[-1].strip()
    return Row(check, setting, result=last[:200], verdict=FAILED, numbers={"traceback": traceback.format_exc()})


class Unavailable(Exception):
    """An optional package is not installed: its rows are skipped, with this reason."""


def guarded(check: str, setting: str, make_rows: Callable[[], list[Row]]) -> list[Row]:
    """``make_rows()``; a skipped row if an optional package is missing, one FAILED row saying what it raised
    otherwise (the table goes on)."""
    try:
        return make_rows()
    except Unavailable as missing:
        return [Row(check, setting, result=str(missing), verdict=SKIPPED)]
    except Exception as error:  # noqa: BLE001  (every failure becomes a row)
        return [failed_row(check, setting, error)]


# ------------------------------------------------------------------------------------------------ timing helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_seconds(step: Callable[[], object], device: torch.device) -> float:
    """Wall time of ``step()`` including the device work it queued (compiling counts)."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def step_seconds(step: Callable[[], object], device: torch.device) -> float:
    """Device time of ``step()``: CUDA events around it on CUDA, the wall clock on CPU."""
    if device.type != "cuda":
        return wall_seconds(step, device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def set_steps(optimizer, step: int) -> None:
    """Anon's per-tensor step counters to ``step`` (its next step is ``step + 1``); other optimizers untouched."""
    if isinstance(optimizer, Anon):
        for state in optimizer.state.values():
            state["step"].fill_(step)


ORDINARY_STEP = 1001  # as in step_time.py: far from the last refresh (512), so max_precond_ratio binds nowhere


def make_params(shapes, device: torch.device, dtype=torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    """Params ~ N(0, 0.02^2) with gradients ~ N(0, 0.01^2) already set, drawn on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator, device=device).mul_(0.02).to(dtype))
        param.grad = torch.randn(shape, generator=generator, device=device).mul_(0.01).to(dtype)
        params.append(param)
    return params


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; for a wrapper subclass (torchao's 8-bit state) those of the tensors inside it."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) is not torch.Tensor and type(tensor) is not torch.nn.Parameter:
        names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def state_bytes(optimizer) -> int:
    return sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))


# ------------------------------------------------------------------------------------------------ optimizers


def step_candidates() -> dict[str, Callable]:
    """Row label -> a factory ``f(params) -> optimizer`` (raising :class:`Unavailable` for a missing package)."""
    return {
        "Anon(fused=True)": lambda params: Anon(params, lr=1e-4, weight_decay=0.01, fused=True),
        "Anon8bit(fused=True)": lambda params: Anon8bit(params, lr=1e-4, weight_decay=0.01, fused=True),
        "Anon(foreach=True)": lambda params: Anon(params, lr=1e-4, weight_decay=0.01, foreach=True),
        "bitsandbytes AdamW8bit": bnb_adamw8bit,
        "torchao AdamW8bit": torchao_adamw8bit,
    }


def adamw_fused(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)


def bnb_adamw8bit(params) -> torch.optim.Optimizer:
    try:
        import bitsandbytes
    except Exception as error:  # noqa: BLE001  (a broken install is as unavailable as a missing one)
        raise Unavailable(f"bitsandbytes not importable: {type(error).__name__}: {error}") from None
    return bitsandbytes.optim.AdamW8bit(params, lr=1e-4, weight_decay=0.01)


def torchao_adamw8bit(params) -> torch.optim.Optimizer:
    try:
        from torchao.optim import AdamW8bit
    except Exception:  # noqa: BLE001  (older torchao releases kept it under prototype)
        try:
            from torchao.prototype.low_bit_optim import AdamW8bit
        except Exception as error:  # noqa: BLE001
            raise Unavailable(f"torchao not importable: {type(error).__name__}: {error}") from None
    return AdamW8bit(params, lr=1e-4, weight_decay=0.01)


# ------------------------------------------------------------------------------------------------ first compile


def first_compile_rows(ctx: Context) -> list[Row]:
    name, shapes = next(iter(ctx.sets.items()))
    rows = []
    for cls in (Anon, Anon8bit):
        setting = f"{cls.__name__}(fused=True), fp32, {describe(name, shapes)}"
        rows += guarded("first compile", setting, lambda cls=cls, s=setting: [first_compile(cls, shapes, s, ctx)])
    return rows


def first_compile(cls, shapes, setting: str, ctx: Context) -> Row:
    """Steps 1, 2 and an ordinary step (the first refresh, a later refresh, a step between refreshes) cold, then
    the same three warm; the difference is what compiling cost."""
    optimizer = cls(make_params(shapes, ctx.device), lr=1e-4, weight_decay=0.01, fused=True)
    compiles = fused_stats["compiles"]

    def three_kinds() -> float:
        set_steps(optimizer, 0)
        seconds = wall_seconds(optimizer.step, ctx.device) + wall_seconds(optimizer.step, ctx.device)
        set_steps(optimizer, ORDINARY_STEP - 1)
        return seconds + wall_seconds(optimizer.step, ctx.device)

    cold = three_kinds()
    warm = three_kinds()
    graphs = fused_stats["compiles"] - compiles
    numbers = dict(cold_s=cold, warm_s=warm, compile_s=cold - warm, graphs_compiled=graphs)
    result = f"{cold - warm:.1f} s ({graphs} graphs; 3 steps cold {cold:.1f} s, warm {warm * 1e3:.1f} ms)"
    return Row("first compile", setting, result=result, numbers=numbers)


# ------------------------------------------------------------------------------------------------ parity

PARITY_SHAPES = [(512, 384), (384,), (96, 130)]  # 8-bit state, full-precision state (< 4,096), a partial last block


def parity_rows(ctx: Context) -> list[Row]:
    rows = []
    for cls in (Anon, Anon8bit):
        for dtype in (torch.float32, torch.bfloat16):
            setting = f"{cls.__name__}(fused=True) vs foreach=True, {str(dtype)[6:]} params, {PARITY_STEPS} steps"
            rows += guarded("parity", setting, lambda c=cls, d=dtype, s=setting: [parity(c, d, s, ctx.device)])
    return rows


def train(cls, dtype, device: torch.device, **impl) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """``PARITY_STEPS`` steps on fixed random gradients: (initial params, final params) as fp32 CPU tensors and the
    refresh history. The same draws for every call."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(device, dtype)) for s in PARITY_SHAPES]
    initial = [p.detach().float().cpu().clone() for p in params]
    optimizer = cls(params, lr=PARITY_LR, weight_decay=0.01, **impl)
    for _ in range(PARITY_STEPS):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(device, dtype)
        optimizer.step()
    return initial, [p.detach().float().cpu().clone() for p in params], list(optimizer.refresh_history)


def parity(cls, dtype, setting: str, device: torch.device) -> Row:
    before = dict(fused_stats)
    initial, fused, fused_refreshes = train(cls, dtype, device, fused=True)
    ran = {key: fused_stats[key] - before.get(key, 0) for key in ("compiled", "compiled_8bit", "fallback", "kernel")}
    _, foreach, foreach_refreshes = train(cls, dtype, device, foreach=True)
    rtol, atol, least = TOLERANCES[(cls.__name__, dtype)]
    row = parity_row(setting, fused, foreach, initial, rtol, atol, least)
    graph = "compiled_8bit" if cls is Anon8bit else "compiled"
    problems = []
    if ran[graph] == 0 or ran["fallback"] or ran["kernel"]:
        problems.append(f"the compiled path did not run alone ({ran})")
    if fused_refreshes != foreach_refreshes:
        problems.append(f"refreshes differ: {fused_refreshes} vs {foreach_refreshes}")
    if problems:
        row.verdict, row.result = FAIL, "; ".join([*problems, row.result])
    row.numbers["paths_run"] = ran
    return row


def parity_row(setting: str, fused, foreach, initial, rtol: float, atol: float, least: float) -> Row:
    """PASS when at least a fraction ``least`` of all elements satisfy ``|fused - foreach| <= atol + rtol *
    |foreach|`` and every value is finite. All arguments are lists of fp32 CPU tensors, one per param."""
    fused_all = torch.cat([t.flatten() for t in fused])
    foreach_all = torch.cat([t.flatten() for t in foreach])
    moved = (foreach_all - torch.cat([t.flatten() for t in initial])).abs().max().item()
    gap = (fused_all - foreach_all).abs()
    within = (gap <= atol + rtol * foreach_all.abs()).double().mean().item()
    finite = bool(torch.isfinite(fused_all).all() and torch.isfinite(foreach_all).all())
    ok = finite and within >= least and moved > 0
    numbers = dict(max_abs_diff=gap.max().item(), fraction_within=within, max_travel=moved, finite=finite)
    result = f"max abs diff {numbers['max_abs_diff']:.2e}, {100 * within:.3f}% within (params moved {moved:.2e})"
    if not finite:
        result = "non-finite values; " + result
    tolerance = f"rtol {rtol:g}, atol {atol:g}, >= {100 * least:g}% of elements"
    return Row("parity", setting, result=result, ratio=tolerance, verdict=PASS if ok else FAIL, numbers=numbers)


# ------------------------------------------------------------------------------------------------ Trainer

TRAINER_STEPS = 20


def trainer_command(output_dir: str, device: torch.device) -> list[str]:
    """The console path: ``anon-hf run`` (as ``python -m anon_hf run``) of a plain HfArgumentParser + Trainer script
    (``--use_cpu`` on CPU, where the Trainer refuses ``--bf16`` without it)."""
    script = ROOT / "tests" / "scripts" / "train_tiny_llama.py"
    return [sys.executable, "-m", "anon_hf", "run", str(script), "--optim", "anon", "--bf16",
            "--max_steps", str(TRAINER_STEPS), "--per_device_train_batch_size", "8", "--logging_steps", "5",
            "--save_strategy", "no", "--report_to", "none", "--output_dir", output_dir,
            *(["--use_cpu"] if device.type == "cpu" else [])]  # fmt: skip


def trainer_rows(ctx: Context) -> list[Row]:
    setting = f"anon-hf run tests/scripts/train_tiny_llama.py --optim anon --bf16, {TRAINER_STEPS} steps"
    return guarded("trainer", setting, lambda: [run_trainer(setting, ctx.device)])


def run_trainer(setting: str, device: torch.device) -> Row:
    with tempfile.TemporaryDirectory(prefix="anon-gpu-check-trainer-") as output_dir:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        start = time.perf_counter()
        proc = subprocess.run(
            trainer_command(output_dir, device), capture_output=True, text=True, timeout=300, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": path},
        )  # fmt: skip
        seconds = time.perf_counter() - start
        report = Path(output_dir) / "result_rank0.json"
        result = json.loads(report.read_text()) if report.exists() else None
    return trainer_row(setting, proc.returncode, proc.stdout + proc.stderr, result, seconds)


def trainer_row(setting: str, returncode: int, output: str, result: dict | None, seconds: float) -> Row:
    """PASS when the run exited 0, Anon was the optimizer stepping, and every logged loss is finite."""
    row = Row("trainer", setting, verdict=FAIL, numbers=dict(returncode=returncode, seconds=seconds))
    if returncode != 0 or result is None:
        tail = [line for line in output.strip().splitlines() if line.strip()][-1:] or ["no output"]
        row.result = f"exit code {returncode}, no result file: {tail[0][:160]}"
        row.numbers["output_tail"] = output[-4000:]
        return row
    losses = [entry["loss"] for entry in result["log_history"] if "loss" in entry]
    steps = max((entry.get("step", 0) for entry in result["log_history"]), default=0)
    row.numbers.update(losses=losses, optimizer=result["optimizer"], steps=steps)
    finite = bool(losses) and all(math.isfinite(loss) for loss in losses)
    row.result = f"optimizer {result['optimizer']}, {steps} steps, logged loss "
    row.result += f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "none"
    row.result += f" ({seconds:.0f} s)"
    if result["optimizer"] == "Anon" and finite and steps == TRAINER_STEPS:
        row.verdict = PASS
    return row


# ------------------------------------------------------------------------------------------------ step time


def step_time_rows(ctx: Context, name: str) -> list[Row]:
    shapes = ctx.sets[name]
    where = describe(name, shapes)
    params = make_params(shapes, ctx.device)
    anchor = adamw_fused(params)
    for _ in range(3):
        anchor.step()
    rows = []
    for label, factory in step_candidates().items():
        setting = f"{label}, {where}"
        if ctx.over_budget():
            rows.append(Row("step time", setting, result="time budget spent", verdict=SKIPPED))
            continue
        rows += guarded("step time", setting, lambda f=factory, s=setting: [time_candidate(f, s, params, anchor, ctx)])
        release(ctx.device)
    return rows


def time_candidate(factory, setting: str, params, anchor, ctx: Context) -> Row:
    """Warm-up steps (state, compiling, a refresh), then ``ctx.rounds`` rounds of one anchor step and one candidate
    step (an ordinary step for Anon); medians of the times and of the per-round ratios."""
    optimizer = factory(params)
    ordinary = lambda: set_steps(optimizer, ORDINARY_STEP - 1)  # noqa: E731
    for _ in range(3):
        optimizer.step()
        ordinary()
    anchor_times, times = [], []
    for _ in range(ctx.rounds):
        anchor_times.append(step_seconds(anchor.step, ctx.device))
        ordinary()
        times.append(step_seconds(optimizer.step, ctx.device))
    ratio = statistics.median(t / a for t, a in zip(times, anchor_times, strict=True))
    ms, anchor_ms = statistics.median(times) * 1e3, statistics.median(anchor_times) * 1e3
    numbers = dict(step_ms=ms, anchor_ms=anchor_ms, ratio=ratio, rounds=ctx.rounds)
    return Row(
        "step time", setting, f"{ms:.2f} ms", f"AdamW(fused=True) {anchor_ms:.2f} ms", f"{ratio:.2f}x", numbers=numbers
    )


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ peak memory


def memory_rows(ctx: Context, name: str) -> list[Row]:
    shapes = ctx.sets[name]
    params = make_params(shapes, ctx.device)
    factories = {"AdamW(fused=True)": adamw_fused, **step_candidates()}
    del factories["Anon(foreach=True)"]
    rows = []
    for label, factory in factories.items():
        setting = f"{label}, {describe(name, shapes)}, 3 steps"
        rows += guarded("peak memory", setting, lambda f=factory, s=setting: [measure_memory(f, s, params, ctx)])
        release(ctx.device)
    anchor = rows[0].numbers if rows[0].verdict == MEASURED else None
    return [with_memory_ratio(row, anchor) for row in rows]


def measure_memory(factory, setting: str, params, ctx: Context) -> Row:
    """Peak allocated bytes above the params and gradients over 3 steps (CUDA), and the bytes of the state."""
    release(ctx.device)
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
        base = torch.cuda.memory_allocated(ctx.device)
    optimizer = factory(params)
    for _ in range(3):
        optimizer.step()
    synchronize(ctx.device)
    peak = torch.cuda.max_memory_allocated(ctx.device) - base if cuda else None
    state = state_bytes(optimizer)
    per_param = state / sum(p.numel() for p in params)
    text = f"state {state / 2**20:.0f} MiB ({per_param:.2f} B/param)"
    text = f"peak +{peak / 2**20:.0f} MiB, {text}" if peak is not None else f"{text} (CPU: no allocator peak)"
    return Row("peak memory", setting, result=text, numbers=dict(peak_bytes=peak, state_bytes=state))


def with_memory_ratio(row: Row, anchor: dict | None) -> Row:
    """The row with AdamW's figure as its reference and the ratio to it (peak on CUDA, state bytes on CPU)."""
    if row.verdict != MEASURED or anchor is None:
        return row
    key = "peak_bytes" if anchor["peak_bytes"] is not None else "state_bytes"
    row.reference = f"AdamW(fused=True) {key.split('_')[0]} {anchor[key] / 2**20:.0f} MiB"
    row.ratio = f"{row.numbers[key] / anchor[key]:.2f}x" if anchor[key] else ""
    return row


# ------------------------------------------------------------------------------------------------ the table


def sections(ctx: Context) -> Iterator[tuple[str, Callable[[], list[Row]]]]:
    """(check, rows) in running order: compiling first (cold caches), then correctness, then speed and memory."""
    yield "first compile", lambda: first_compile_rows(ctx)
    yield "parity", lambda: parity_rows(ctx)
    yield "trainer", lambda: trainer_rows(ctx)
    memory_set = "200M" if "200M" in ctx.sets else next(iter(ctx.sets))
    for name in ctx.sets:
        yield "step time", lambda n=name: step_time_rows(ctx, n)
        if name == memory_set:
            yield "peak memory", lambda: memory_rows(ctx, memory_set)


def run_checks(ctx: Context, log=print) -> list[Row]:
    rows = []
    for check, make_rows in sections(ctx):
        if ctx.over_budget():
            rows.append(Row(check, "-", result=f"time budget of {ctx.budget_s:.0f} s spent", verdict=SKIPPED))
            continue
        start = time.perf_counter()
        new = guarded(check, "-", make_rows)
        release(ctx.device)
        for row in new:
            log(f"  {row.verdict:8s} {row.check}: {row.setting}: {row.result} {row.ratio}".rstrip())
        log(f"  ({check}: {time.perf_counter() - start:.0f} s)")
        rows += new
    return rows


def table(rows: list[Row]) -> str:
    """The rows as one markdown table."""
    lines = ["| check | setting | result | reference | ratio / tolerance | verdict |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row.check, row.setting, row.result, row.reference, row.ratio, row.verdict]
        lines.append("| " + " | ".join(str(cell).replace("|", "/").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    info = dict(torch=torch.__version__, python=sys.version.split()[0], device=str(device))
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        info.update(cpu_capability=torch.backends.cpu.get_cpu_capability())
    for package in ("triton", "transformers", "bitsandbytes", "torchao"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            info[package] = version(package)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    info["commit"] = commit.stdout.strip() or "unknown"
    return info


@contextlib.contextmanager
def fresh_compile_caches(enabled: bool) -> Iterator[None]:
    """Inductor's and Triton's on-disk caches in an empty temporary folder, so first-compile times are cold."""
    if not enabled:
        yield
        return
    folder = tempfile.mkdtemp(prefix="anon-gpu-check-inductor-")
    saved = {key: os.environ.get(key) for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.environ.update(TORCHINDUCTOR_CACHE_DIR=folder, TRITON_CACHE_DIR=os.path.join(folder, "triton"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(folder, ignore_errors=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with --tiny (this script's test)")
    parser.add_argument("--tiny", action="store_true", help="one ~0.15M-param set, 3 rounds (CPU self-test)")
    parser.add_argument("--rounds", type=int, default=None, help="paired step-time rounds (default 20; --tiny 3)")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="skip the rows left after this (default 450; --tiny: none)"
    )
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's cache (first compile not cold)")
    parser.add_argument("--json", default=None, help="also write the rows and the environment as JSON here")
    args = parser.parse_args(argv)
    if args.device.startswith("cpu") and not args.tiny:
        parser.error("--device cpu runs only this script's self-test: add --tiny")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu-check: SKIPPED: no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}; "
            "torch.cuda.is_available() is False). Run it on a machine with one CUDA GPU."
        )
        return 0
    if device.type == "cpu":
        os.environ["ANON_HF_CPU_KERNEL"] = "0"  # fused=True then runs the compiled graphs, the path CUDA takes
    budget = args.budget_s if args.budget_s is not None else (math.inf if args.tiny else 450.0)
    ctx = Context(device, shape_sets(args.tiny), args.rounds or (3 if args.tiny else 20), budget)
    info = environment(device)
    print("gpu-check: " + ", ".join(f"{key} {value}" for key, value in info.items()), flush=True)
    with fresh_compile_caches(device.type == "cuda" and not args.warm_cache):
        rows = run_checks(ctx)
    info["wall_s"] = round(time.perf_counter() - ctx.started, 1)
    print(f"\ngpu-check: {len(rows)} rows in {info['wall_s']} s\n\n{table(rows)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(dict(environment=info, rows=[dataclasses.asdict(r) for r in rows]), indent=1, default=str)
        )
    failed = [row for row in rows if row.verdict in (FAIL, FAILED)]
    print(f"\ngpu-check: {'FAILED: ' + str(len(failed)) + ' rows' if failed else 'passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
