"""Gamma sweep: run a recipe with Anon at several gammas next to AdamW and SGD with momentum, then plot.

For each optimizer configuration (Anon at each gamma, AdamW, SGD with momentum 0.9) the sweep

1. tunes the learning rate on one seed (``--tune_seed``) over a half-decade grid (lr = 10^(j/2)), extending the
   grid while the best lr sits on its edge (at most ``--max_extensions`` times per side), then
2. runs the best lr on the report seeds (``--seeds``, disjoint from the tuning seed), and
3. writes ``<task>.json`` (everything, curves included), ``<task>_runs.csv``, ``<task>_lr_grid.csv``,
   ``<task>_summary.csv`` and the plots (``plots.py``) into ``--out_dir``.

All runs of one task share the recipe's settings (model, data, batch, steps, schedule, warmup, gradient clipping,
weight decay 0); only the optimizer, its lr and the seed change. The starting grid for each configuration is
placed by a rule of thumb, not by peeking: with a gradient RMS near 1e-2, Anon's step scales as lr * 10^(2 (1 -
gamma)) relative to gamma = 1, so its grid is shifted by 4 (1 - gamma) half-decades from AdamW's; SGD (momentum 0.9,
no dampening) sits two half-decades below gamma = 0 (lr scaled by 1 - beta1). The extension fixes a wrong guess.

    python recipes/sweep/sweep.py --task causal_lm --out_dir docs/assets/sweep
    python recipes/sweep/sweep.py --task causal_lm --tiny --out_dir /tmp/sweep   # seconds: checks the plumbing
    python recipes/sweep/sweep.py --task finetune --out_dir docs/assets/sweep     # pretrains once (cached), then sweeps
    python recipes/sweep/sweep.py --task late_vocab --out_dir docs/assets/sweep   # Anon's rules and AdamW, late tokens

The ``finetune`` task fine-tunes a model pretrained here (``recipes/causal_lm/pretrain.py``) on another domain and
compares fixed configurations (:func:`finetune_configs`) instead of a gamma grid.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import logging
import math
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `recipes.<task>.train` resolves as a namespace package from the repo root
    sys.path.insert(0, str(REPO_ROOT))

logger = logging.getLogger("sweep")

DEFAULT_GAMMAS = (-0.25, 0.0, 0.5, 1.0, 1.25)


@dataclass(frozen=True)
class Config:
    """One optimizer configuration: the Trainer's ``--optim`` and ``--optim_args`` plus the grid offset."""

    name: str
    optim: str
    optim_args: str | None
    gamma: float | None  # None for the baselines
    grid_offset: int  # half-decades relative to AdamW's starting grid
    variant: str | None = None  # set for the Anon runs at the library's default eps, drawn apart in the plots
    fixed_lr: float | None = None  # run at this lr, untuned (a library's default lr)
    argv: tuple[str, ...] = ()  # recipe flags of this configuration only, e.g. ("--from_scratch", "true")


@dataclass
class Task:
    """How to run one recipe: its module, fixed argv, the metric to report and AdamW's starting lr grid.

    ``prepare(tiny, cache_dir)`` (optional) builds what the runs need before the first one and returns text substitutions
    for the argv, e.g. ``{"{pretrained}": folder}``; ``base_argv`` keeps the placeholder, so ``--reuse`` compares
    settings, not machine paths. ``make_configs`` (optional) replaces the gamma grid of :func:`configs`.
    """

    name: str
    module: str
    metric: str
    higher_is_better: bool
    adamw_grid: tuple[int, int]  # half-decade indices j (lr = 10^(j/2)), inclusive
    base_argv: list[str] = field(default_factory=list)
    tiny_argv: list[str] = field(default_factory=list)
    max_steps: int = 300
    gammas: tuple[float, ...] = DEFAULT_GAMMAS
    anon_optim_args: str = "eps=1e-8"
    prepare: Callable[[bool, str | None], dict[str, str]] | None = None
    make_configs: Callable[[list[float], str], list[Config]] | None = None

    def runner(self) -> Callable[[list[str]], dict[str, Any]]:
        return importlib.import_module(self.module).main


# Anon8bit at the library's defaults (--optim anon_8bit, no --optim_args), added to a task by --with_8bit.
EIGHT_BIT_DEFAULTS = Config("anon_8bit (defaults)", "anon_8bit", None, 1.0, 0, "8-bit state")

HF_DEFAULT_LR = 5e-5  # TrainingArguments.learning_rate: what `--optim adamw_torch` trains at unless told otherwise


def finetune_configs(gammas: list[float], anon_optim_args: str = "") -> list[Config]:
    """The fine-tuning comparison: Anon at the library's defaults and at other gammas, AdamW tuned, both at the
    Trainer's default lr, and AdamW on the same architecture from random weights (what pretraining brings).

    ``anon (defaults)`` passes no ``--optim_args`` at all (gamma 1, eps 1e-16, keep_unseen) and has its lr tuned;
    each other gamma gets ``gamma=<g>`` (the library's eps). With ``anon_optim_args`` (e.g. ``"eps=1e-8"``), gamma 1
    is also run with them, as the control that shows whether the defaults still need that setting.
    """
    out = [Config("anon (defaults)", "anon", None, 1.0, 0)]
    out += [
        Config(f"anon(gamma={g:g})", "anon", f"gamma={g:g}", float(g), round(4 * (1 - g)))
        for g in sorted(gammas)
        if g != 1.0
    ]
    if anon_optim_args:
        out.append(
            Config(f"anon(gamma=1, {anon_optim_args})", "anon", f"gamma=1,{anon_optim_args}", 1.0, 0, "explicit")
        )
    out.append(Config(f"anon (defaults, lr {HF_DEFAULT_LR:g})", "anon", None, 1.0, 0, "Trainer's lr", HF_DEFAULT_LR))
    out.append(Config("adamw", "adamw_torch", None, None, 0))
    out.append(Config(f"adamw (lr {HF_DEFAULT_LR:g})", "adamw_torch", None, None, 0, fixed_lr=HF_DEFAULT_LR))
    out.append(Config("adamw (from scratch)", "adamw_torch", None, None, 1, argv=("--from_scratch", "true")))
    return out


# Anon's published rule: no keep_unseen, no limit (the paper's update exactly), at the library's other defaults.
PUBLISHED_RULE = "keep_unseen=false,max_precond_ratio=none"


def rule_configs(gammas: list[float] | None = None, anon_optim_args: str = "") -> list[Config]:
    """Anon at the library's defaults beside Anon under the published rule and AdamW, every lr tuned: what the
    library's rule changes (``--compare_rules``, and the ``late_vocab`` task's configurations)."""
    return [
        Config("anon (defaults)", "anon", None, 1.0, 0),
        Config("anon (published rule)", "anon", PUBLISHED_RULE, 1.0, 0, "published rule"),
        Config("adamw", "adamw_torch", None, None, 0),
    ]


def _pretrained_pydoc(tiny: bool, cache_dir: str | None) -> dict[str, str]:
    from recipes.causal_lm import pretrain

    folder = pretrain.pretrained(
        pretrain.TINY_ARGV if tiny else pretrain.PRETRAIN_ARGV, cache_dir or pretrain.CACHE_DIR
    )
    return {"{pretrained}": str(folder)}


TASKS = {
    "causal_lm": Task(
        name="causal_lm",
        module="recipes.causal_lm.train",
        metric="eval_loss",
        higher_is_better=False,
        adamw_grid=(-6, -3),  # 1e-3 .. 3.2e-2
        base_argv=["--per_device_train_batch_size", "16", "--block_size", "64", "--warmup_steps", "0.1"],
        tiny_argv=[
            "--max_train_samples",
            "64",
            "--max_eval_samples",
            "16",
            "--hidden_size",
            "32",
            "--intermediate_size",
            "64",
            "--num_hidden_layers",
            "1",
        ],
    ),
    "classification": Task(
        name="classification",
        module="recipes.classification.train",
        metric="eval_accuracy",
        higher_is_better=True,
        adamw_grid=(-8, -6),  # 1e-4 .. 1e-3
        # MiniLM (22.7M parameters) costs ~100x the tiny Llama per step on a CPU: short texts, a 2,000-tweet
        # subset and 400 held-out tweets keep a run near half a minute on one thread.
        base_argv=[
            "--per_device_train_batch_size",
            "16",
            "--max_length",
            "32",
            "--max_train_samples",
            "2000",
            "--max_eval_samples",
            "400",
            "--eval_before",
            "false",
            "--warmup_steps",
            "0.1",
        ],
        tiny_argv=["--max_train_samples", "64", "--max_eval_samples", "32"],
    ),
    # A model pretrained here on the Python docs (recipes/causal_lm/pretrain.py, built once and cached), then
    # fine-tuned on another domain: the tweets' text, with the pretraining tokenizer. 3,000 tweets bound the
    # tokenization; 150 steps of 16 see 2,400 of them once.
    "finetune": Task(
        name="finetune",
        module="recipes.causal_lm.train",
        metric="eval_loss",
        higher_is_better=False,
        adamw_grid=(-7, -5),  # 3.16e-4 .. 3.16e-3
        base_argv=[
            "--model_name_or_path",
            "{pretrained}",
            "--corpus",
            "tweets",
            "--per_device_train_batch_size",
            "16",
            "--block_size",
            "64",
            "--warmup_steps",
            "0.1",
            "--max_train_samples",
            "3000",
            "--max_eval_samples",
            "400",
        ],
        tiny_argv=["--max_train_samples", "64", "--max_eval_samples", "16"],
        max_steps=150,
        gammas=(0.5,),
        anon_optim_args="eps=1e-8",
        prepare=_pretrained_pydoc,
        make_configs=finetune_configs,
    ),
    # One run, one optimizer: the Python docs for the first half of the steps, then tweets, with a tokenizer trained
    # on both; the tweets' own tokens have embedding rows first seen at the switch (recipes/sweep/late_vocab.py).
    "late_vocab": Task(
        name="late_vocab",
        module="recipes.sweep.late_vocab",
        metric="eval_loss",
        higher_is_better=False,
        adamw_grid=(-6, -4),  # 1e-3 .. 1e-2
        base_argv=[
            "--per_device_train_batch_size",
            "16",
            "--block_size",
            "64",
            "--warmup_steps",
            "0.1",
            "--max_eval_samples",
            "400",
        ],
        tiny_argv=[
            "--max_train_samples",
            "64",
            "--max_eval_samples",
            "16",
            "--hidden_size",
            "32",
            "--intermediate_size",
            "64",
            "--num_hidden_layers",
            "1",
        ],
        make_configs=rule_configs,
    ),
}


def configs(
    gammas: list[float], anon_optim_args: str = "", default_eps_gammas: tuple[float, ...] = ()
) -> list[Config]:
    """Anon at each gamma, then AdamW and SGD with momentum 0.9, with their grid offsets (see module doc).

    ``anon_optim_args`` (e.g. ``"eps=1e-8"``) is added to every Anon configuration except those of
    ``default_eps_gammas``, which run with the library's defaults besides gamma and show what the setting changes.
    """
    extra = f",{anon_optim_args}" if anon_optim_args else ""
    out = [
        Config(f"anon(gamma={g:g})", "anon", f"gamma={g:g}{extra}", float(g), round(4 * (1 - g)))
        for g in sorted(gammas)
    ]
    out += [
        Config(f"anon(gamma={g:g}, default eps)", "anon", f"gamma={g:g}", float(g), round(4 * (1 - g)), "default eps")
        for g in sorted(default_eps_gammas)
    ]
    out.append(Config("adamw", "adamw_torch", None, None, 0))
    out.append(Config("sgd(momentum=0.9)", "sgd", "momentum=0.9", None, round(4 * (1 - 0.0)) - 2))
    return out


def lr_of(j: int) -> float:
    return float(f"{10 ** (j / 2):.3g}")


def _finite_or(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else default


def run_one(task: Task, config: Config, lr: float, seed: int, args: argparse.Namespace, work_dir: Path) -> dict:
    """One training run in this process; returns the metric, the final losses and the training-loss curve."""
    argv = list(task.base_argv) + (list(task.tiny_argv) if args.tiny else []) + list(config.argv)
    argv = [getattr(args, "substitutions", {}).get(a, a) for a in argv]
    argv += ["--optim", config.optim, "--learning_rate", repr(lr), "--seed", str(seed)]
    argv += ["--max_steps", str(args.max_steps), "--logging_steps", str(args.logging_steps)]
    argv += ["--output_dir", str(work_dir / "run"), "--save_final_model", "false", "--disable_tqdm", "true"]
    argv += ["--report_to", "none", "--log_level", "error"]
    if config.optim_args:
        argv += ["--optim_args", config.optim_args]
    argv += args.extra
    record = {"config": config.name, "optimizer": config.optim, "gamma": config.gamma, "lr": lr, "seed": seed}
    cached = getattr(args, "cache", {}).get((config.name, config.optim_args, lr, seed))
    if cached is not None:  # the same run (same settings) in the results given to --reuse
        logger.info("%-18s lr=%-8g seed=%d reused: %s=%s", config.name, lr, seed, task.metric, cached["metric"])
        return {**cached, "reused": True}
    started = time.perf_counter()
    log_path = work_dir / f"{task.name}_{config.optim}_{config.gamma}_{lr:g}_{seed}.log"
    try:
        with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            result = task.runner()(argv)
    except FloatingPointError as err:  # NonFinitePreconditionerError: the lr was too large for this gamma
        logger.info("%s lr=%g seed=%d diverged: %s", config.name, lr, seed, err)
        return {
            **record,
            "metric": None,
            "eval_loss": None,
            "train_loss": None,
            "diverged": True,
            "curve": {"step": [], "loss": []},
            "seconds": time.perf_counter() - started,
        }
    curve = regular_curve(result["log_history"], args.logging_steps)
    metric = result["eval"].get(task.metric)
    diverged = not all(math.isfinite(loss) for _, loss in curve) or metric is None or not math.isfinite(metric)
    record.update(
        metric=metric,
        eval_loss=result["eval"].get("eval_loss"),
        train_loss=curve[-1][1] if curve else None,
        diverged=diverged,
        curve={"step": [s for s, _ in curve], "loss": [loss for _, loss in curve]},
        seconds=time.perf_counter() - started,
    )
    logger.info("%-18s lr=%-8g seed=%d %s=%s (%.1f s)", config.name, lr, seed, task.metric, metric, record["seconds"])
    return record


def regular_curve(log_history: list[dict], every: int) -> list[tuple[int, float]]:
    """Training loss averaged over windows of ``every`` steps, from the Trainer's log history.

    Each logged ``loss`` is the mean over the steps since the previous log. Anon's callback adds log lines at its
    refresh steps (1, 2, 4, ...), so the raw entries cover uneven spans; re-weighting them by span gives every
    optimizer the same windows. A trailing partial window is dropped.
    """
    entries = sorted((h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h)
    curve, previous, total = [], 0, 0.0
    for step, loss in entries:
        total += loss * (step - previous)
        previous = step
        if step % every == 0:
            curve.append((step, total / every))
            total = 0.0
    return curve


def tune_lr(task: Task, config: Config, args: argparse.Namespace, work_dir: Path) -> tuple[float, list[dict]]:
    """Best lr on the tuning seed over a half-decade grid, extended while the best sits on an edge.

    A configuration with ``fixed_lr`` is not tuned: that lr, no runs.
    """
    if config.fixed_lr is not None:
        return config.fixed_lr, []
    lo, hi = task.adamw_grid
    lo, hi = lo + config.grid_offset, hi + config.grid_offset
    if args.lr_points is not None:  # a narrower grid centred in the default one (the tiny mode)
        lo = (lo + hi + 1 - args.lr_points) // 2
        hi = lo + args.lr_points - 1
    worst = -math.inf if task.higher_is_better else math.inf
    scores: dict[int, float] = {}
    records: list[dict] = []
    extensions = {"down": 0, "up": 0}
    todo = list(range(lo, hi + 1))
    while todo:
        for j in todo:
            rec = run_one(task, config, lr_of(j), args.tune_seed, args, work_dir)
            records.append(rec)
            scores[j] = worst if rec["diverged"] else _finite_or(rec["metric"], worst)
        pick = max if task.higher_is_better else min
        best = pick(sorted(scores), key=lambda k: scores[k])
        todo = []
        if best == min(scores) and extensions["down"] < args.max_extensions:
            extensions["down"] += 1
            todo = [best - 1]
        elif best == max(scores) and extensions["up"] < args.max_extensions and scores[best] != worst:
            extensions["up"] += 1
            todo = [best + 1]
    best = (max if task.higher_is_better else min)(sorted(scores), key=lambda k: scores[k])
    return lr_of(best), records


def summarize(task: Task, cfgs: list[Config], runs: list[dict], best_lr: dict[str, float]) -> list[dict]:
    """Mean/std/min/max of the metric over the report seeds, and a verdict against AdamW."""
    rows = []
    for cfg in cfgs:
        values = [r["metric"] if not r["diverged"] else math.nan for r in runs if r["config"] == cfg.name]
        finite = [v for v in values if math.isfinite(v)]
        row = {
            "config": cfg.name,
            "optimizer": cfg.optim,
            "gamma": cfg.gamma,
            "variant": cfg.variant,
            "optim_args": cfg.optim_args,
            "lr": best_lr[cfg.name],
            "lr_tuned": cfg.fixed_lr is None,
            "n_seeds": len(values),
            "n_diverged": len(values) - len(finite),
            "mean": statistics.fmean(finite) if finite else math.nan,
            "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "min": min(finite) if finite else math.nan,
            "max": max(finite) if finite else math.nan,
        }
        rows.append(row)
    ref = next(r for r in rows if r["config"] == "adamw")
    for row in rows:
        row["vs_adamw"] = verdict(row, ref, task.higher_is_better)
    return rows


def verdict(row: dict, ref: dict, higher_is_better: bool) -> str:
    """'win', 'loss' or 'tie' vs ``ref``: a tie when the means differ by less than two standard errors."""
    if row is ref or row["config"] == ref["config"]:
        return "baseline"
    if min(row["n_seeds"], ref["n_seeds"]) < 2:
        return "n/a (1 seed)"
    if row["n_diverged"] or not math.isfinite(row["mean"]):
        return "loss"
    n = max(1, row["n_seeds"])
    standard_error = math.sqrt(row["std"] ** 2 / n + ref["std"] ** 2 / max(1, ref["n_seeds"]))
    diff = row["mean"] - ref["mean"]
    if abs(diff) <= 2 * standard_error:
        return "tie"
    return "win" if (diff > 0) == higher_is_better else "loss"


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _versions() -> dict[str, str]:
    import os

    import torch
    import transformers

    import anon_hf

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "anon_hf": anon_hf.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
    }


def anon_rule() -> str:
    """Anon's update rule at its defaults, recorded with every sweep: runs made under another rule are not reused.
    ``"keep_unseen=True"`` names the sweeps made before ``max_precond_ratio`` existed."""
    import inspect

    import anon_hf

    parameters = inspect.signature(anon_hf.Anon).parameters
    rule = [
        f"{name}={parameters[name].default}" for name in ("keep_unseen", "max_precond_ratio") if name in parameters
    ]
    if rule and _late_row_moves_at_once():
        rule.append("late_seen=moves")
    return ",".join(rule) or "published"


def _late_row_moves_at_once() -> bool:
    """Whether Anon, at its defaults, moves a weight at its first gradient when that comes between two refreshes
    (step 3): the late-seen rule, which names no parameter of its own, recorded by what it does."""
    import torch

    import anon_hf

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = anon_hf.Anon([param], lr=1e-3, foreach=False)
    for step in (1, 2, 3):
        param.grad = torch.tensor([1.0, 1.0 if step == 3 else 0.0])
        optimizer.step()
    return bool(param.detach()[1] != 0)


def prepared(args: argparse.Namespace) -> dict[str, str]:
    """What ``Task.prepare`` built, by folder name (it carries the settings' hash), not by machine path."""
    return {key: Path(value).name for key, value in getattr(args, "substitutions", {}).items()}


def load_reusable_runs(
    path: str, task: Task, args: argparse.Namespace, cfgs: list[Config], baselines_only: bool = False
) -> dict[tuple, dict]:
    """Runs of an earlier ``<task>.json`` keyed by (config, optim_args, lr, seed), after checking its settings match.

    A run is deterministic on CPU given its argv, so a sweep with more lr points or seeds can reuse what was done.
    Anon's runs are reused only when the earlier sweep ran under the same refresh rule (:func:`anon_rule`; a file
    without the record predates ``keep_unseen`` and ran the published rule); the baselines' runs do not depend on it.
    ``baselines_only`` (``--reuse_baselines_only``) reuses no Anon run at all: for a sweep whose Anon code changed
    its arithmetic without changing the rule that :func:`anon_rule` records.
    """
    with open(path) as f:
        old = json.load(f)
    old_settings = old["settings"]
    mismatches = {
        key: (old_settings.get(key, default), new)
        for key, default, new in (
            ("max_steps", None, args.max_steps),
            ("logging_steps", 10, args.logging_steps),
            ("base_argv", None, task.base_argv),
            ("extra_argv", None, args.extra),
            ("tiny", None, args.tiny),
            ("tune_seed", None, args.tune_seed),
            ("prepared", {}, prepared(args)),
        )
        if old_settings.get(key, default) != new
    }
    if old["task"] != task.name or mismatches:
        raise ValueError(f"--reuse {path}: its runs were made with other settings ({old['task']}, {mismatches})")
    same_rule = old_settings.get("anon_rule", "published") == anon_rule() and not baselines_only
    optim_args = {c.name: c.optim_args for c in cfgs if not c.optim.startswith("anon") or same_rule}
    return {
        (r["config"], optim_args.get(r["config"]), r["lr"], r["seed"]): r
        for r in old["lr_grid"] + old["runs"]
        if r["config"] in optim_args
        and optim_args[r["config"]]
        == next((c["optim_args"] for c in old.get("configs", []) if c["config"] == r["config"]), None)
    }


def for_task(task: Task, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the task's defaults where the command line left ``--gammas``, ``--anon_optim_args``,
    ``--max_steps`` unset (None); the tiny mode takes 4 steps and gammas 0 and 1 (the task's own when it has
    ``make_configs``)."""
    args = argparse.Namespace(**vars(args))
    if args.gammas is None:
        args.gammas = [0.0, 1.0] if args.tiny and task.make_configs is None else list(task.gammas)
    if args.anon_optim_args is None:
        args.anon_optim_args = task.anon_optim_args
    if args.max_steps is None:
        args.max_steps = 4 if args.tiny else task.max_steps
    return args


def sweep(task: Task, args: argparse.Namespace, command: str) -> dict:
    """Tune, run the seeds, write numbers and plots; return the results dict written to ``<task>.json``."""
    args = for_task(task, args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.compare_rules:
        cfgs = rule_configs()
    elif task.make_configs is not None:
        cfgs = task.make_configs(args.gammas, args.anon_optim_args)
    else:
        cfgs = configs(args.gammas, args.anon_optim_args, tuple(args.default_eps_gammas))
    if args.with_8bit:
        cfgs.append(EIGHT_BIT_DEFAULTS)
    args.substitutions = task.prepare(args.tiny, args.cache_dir) if task.prepare is not None else {}
    args.cache = {}
    for path in args.reuse or []:
        args.cache.update(load_reusable_runs(path, task, args, cfgs, getattr(args, "reuse_baselines_only", False)))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"sweep-{task.name}-") as tmp:
        work_dir = Path(tmp)
        grid_records, best_lr, runs = [], {}, []
        for cfg in cfgs:
            best_lr[cfg.name], records = tune_lr(task, cfg, args, work_dir)
            grid_records += records
        for cfg in cfgs:
            for seed in args.seeds:
                runs.append(run_one(task, cfg, best_lr[cfg.name], seed, args, work_dir))
    summary = summarize(task, cfgs, runs, best_lr)
    results = {
        "task": task.name,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "command": command,
        "configs": [
            {
                "config": c.name,
                "optim": c.optim,
                "optim_args": c.optim_args,
                "variant": c.variant,
                "fixed_lr": c.fixed_lr,
                "argv": list(c.argv),
            }
            for c in cfgs
        ],
        "settings": {
            "max_steps": args.max_steps,
            "logging_steps": args.logging_steps,
            "seeds": args.seeds,
            "tune_seed": args.tune_seed,
            "gammas": args.gammas,
            "anon_optim_args": args.anon_optim_args,
            "default_eps_gammas": args.default_eps_gammas,
            "tiny": args.tiny,
            "base_argv": task.base_argv,
            "extra_argv": args.extra,
            "max_extensions": args.max_extensions,
            "anon_rule": anon_rule(),
            "prepared": prepared(args),
        },
        "versions": _versions(),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "reused_from": args.reuse,
        "summary": summary,
        "lr_grid": grid_records,
        "runs": runs,
    }
    with open(out_dir / f"{task.name}.json", "w") as f:
        json.dump(results, f, indent=1, allow_nan=True)
    columns = [
        "config",
        "optimizer",
        "gamma",
        "lr",
        "seed",
        "metric",
        "eval_loss",
        "train_loss",
        "diverged",
        "seconds",
    ]
    _write_csv(out_dir / f"{task.name}_runs.csv", runs, columns)
    _write_csv(out_dir / f"{task.name}_lr_grid.csv", grid_records, columns)
    _write_csv(out_dir / f"{task.name}_summary.csv", summary, list(summary[0]))
    from recipes.sweep.plots import plot_results  # matplotlib is imported only here

    plot_results(results, out_dir)
    return results


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--task", choices=sorted(TASKS), nargs="+", default=["causal_lm"])
    parser.add_argument("--out_dir", default="docs/assets/sweep")
    parser.add_argument(
        "--gammas", type=float, nargs="+", default=None, help=f"default: the task's ({DEFAULT_GAMMAS}; finetune 0.5)"
    )
    parser.add_argument(
        "--anon_optim_args",
        default=None,
        help="added to every Anon run's --optim_args except the library-default rows; '' for none "
        "(default: eps=1e-8; the finetune task adds it to a gamma=1 control row only)",
    )
    parser.add_argument(
        "--default_eps_gammas",
        type=float,
        nargs="*",
        default=[1.0],
        help="gammas also run without --anon_optim_args (the library's eps 1e-16), to show what it changes",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="report seeds")
    parser.add_argument("--tune_seed", type=int, default=0, help="seed of the lr search (not reported)")
    parser.add_argument("--max_steps", type=int, default=None, help="default: the task's (300; finetune 150)")
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument(
        "--max_extensions", type=int, default=2, help="grid extensions per side when best is on an edge"
    )
    parser.add_argument(
        "--with_8bit",
        action="store_true",
        help="also run Anon8bit at the library's defaults (--optim anon_8bit), lr tuned like the other rows",
    )
    parser.add_argument(
        "--compare_rules",
        action="store_true",
        help="run Anon at the library's defaults, Anon under the published rule "
        f"({PUBLISHED_RULE}) and AdamW only (the late_vocab task's configurations)",
    )
    parser.add_argument(
        "--reuse",
        nargs="+",
        default=None,
        help="earlier <task>.json files whose runs with the same settings (and Anon rule) are reused",
    )
    parser.add_argument(
        "--reuse_baselines_only",
        action="store_true",
        help="reuse only AdamW's and SGD's runs from --reuse and re-make every Anon run (Anon's code changed its "
        "arithmetic, not its rule)",
    )
    parser.add_argument(
        "--cache_dir", default=None, help="where the finetune task's pretrained model is cached (outputs/pretrained)"
    )
    parser.add_argument("--lr_points", type=int, default=None, help="use only this many grid points (centred)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a plumbing check in seconds: tiny model and data, 4 steps, gammas 0 and 1, one seed "
        "(finetune: a tiny pretrained model, cached like the real one)",
    )
    args, extra = parser.parse_known_args(argv)
    args.extra = extra  # passed through to the recipe, e.g. --weight_decay 0.01
    if args.tiny:
        args.logging_steps, args.seeds = 1, args.seeds[:1]
        args.lr_points, args.max_extensions = args.lr_points or 1, 0
        args.default_eps_gammas = []
    if args.tune_seed in args.seeds:
        parser.error(f"--tune_seed {args.tune_seed} is also a report seed; report seeds must not be tuned on")
    return args, extra


def main(argv: list[str] | None = None) -> dict[str, dict]:
    argv = sys.argv[1:] if argv is None else argv
    args, _ = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    # Bind the library loggers' handlers to the real stderr now: each run's output is redirected to a log file.
    logging.getLogger("recipes").setLevel(logging.WARNING)
    logging.getLogger("anon_hf").setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    command = "python recipes/sweep/sweep.py " + shlex.join(argv)
    return {name: sweep(TASKS[name], args, command) for name in args.task}


if __name__ == "__main__":
    main()
