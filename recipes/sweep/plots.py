"""Plots of a gamma sweep, from the ``<task>.json`` that ``sweep.py`` writes.

    python recipes/sweep/plots.py docs/assets/sweep/causal_lm.json   # re-plot without re-running

Writes next to the JSON (or into ``out_dir``):

* ``<task>_loss_curves.png``: training loss against step, mean over the report seeds with a min-max band, for
  every configuration; the right panel zooms on the second half of training;
* ``<task>_metric_vs_gamma.png``: the final metric against gamma (each seed a dot, mean with a std bar), AdamW
  and SGD as horizontal bands (mean +- std);
* ``<task>_lr_grid.png``: the final metric against lr on the tuning seed, one line per configuration, so that
  a reader can see the chosen lr is not on the edge of what was tried;
* ``<task>_summary.md``: the summary table in Markdown, which the docs' sweep page includes.

With ``--overview OUT.png`` it draws one figure from several ``<task>.json`` instead: a panel per task, each
configuration's report seeds as dots with the mean and std (the rule comparison at the top of the sweep page)::

    python recipes/sweep/plots.py --overview docs/assets/sweep/rules/overview.png docs/assets/sweep/rules/*.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

__all__ = ["plot_overview", "plot_results"]

BASELINE_STYLE = {
    "adamw": {"color": "black", "linestyle": "--"},
    "sgd(momentum=0.9)": {"color": "tab:gray", "linestyle": "-."},
    "adamw (lr 5e-05)": {"color": "tab:gray", "linestyle": "--"},  # the finetune task's untuned AdamW
    "adamw (from scratch)": {"color": "tab:brown", "linestyle": ":"},
}
METRIC_LABELS = {"eval_loss": "eval loss (lower is better)", "eval_accuracy": "eval accuracy (higher is better)"}


VARIANT_STYLE = {"color": "tab:red", "linestyle": ":"}
VARIANT_STYLES = {  # the finetune task's Anon rows beside the gamma line
    "explicit": {"color": "tab:purple", "linestyle": "-."},
    "Trainer's lr": {"color": "tab:orange", "linestyle": ":"},
}


def _style(config: str, gamma: float | None, gammas: list[float], variant: str | None = None) -> dict:
    if variant is not None:
        return VARIANT_STYLES.get(variant, VARIANT_STYLE)
    if gamma is None:
        return BASELINE_STYLE.get(config, {"color": "tab:brown", "linestyle": ":"})
    cmap = matplotlib.colormaps["viridis"]
    position = 0.0 if len(gammas) < 2 else (gamma - min(gammas)) / (max(gammas) - min(gammas))
    return {"color": cmap(0.05 + 0.8 * position), "linestyle": "-"}


def _label(row: dict) -> str:
    return f"{row['config']}, lr {row['lr']:g}"


def _mean_curve(runs: list[dict]) -> tuple[list[int], list[float], list[float], list[float]]:
    curves = [r["curve"] for r in runs if r["curve"]["step"] and not r["diverged"]]
    if not curves:
        return [], [], [], []
    length = min(len(c["step"]) for c in curves)
    steps = curves[0]["step"][:length]
    columns = list(zip(*(c["loss"][:length] for c in curves), strict=True))
    return steps, [sum(c) / len(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def plot_loss_curves(results: dict, path: Path) -> None:
    gammas = [row["gamma"] for row in results["summary"] if row["gamma"] is not None and not row.get("variant")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    tail_values = []
    for row in results["summary"]:
        runs = [r for r in results["runs"] if r["config"] == row["config"]]
        steps, mean, lo, hi = _mean_curve(runs)
        if not steps:
            continue
        style = _style(row["config"], row["gamma"], gammas, row.get("variant"))
        for ax in axes:
            ax.plot(steps, mean, label=_label(row), linewidth=1.8, **style)
            ax.fill_between(steps, lo, hi, color=style["color"], alpha=0.12, linewidth=0)
        half = len(steps) // 2
        tail_values += [v for v in lo[half:] + hi[half:] if math.isfinite(v)]
    if tail_values:
        steps_all = [s for r in results["runs"] for s in r["curve"]["step"]]
        axes[1].set_xlim(max(steps_all) / 2, max(steps_all))
        margin = 0.05 * (max(tail_values) - min(tail_values) or 1.0)
        axes[1].set_ylim(min(tail_values) - margin, max(tail_values) + margin)
    seeds = results["settings"]["seeds"]
    axes[0].set_title(f"{results['task']}: training loss, mean of seeds {seeds} (band: min-max)")
    axes[1].set_title("second half, zoomed")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (mean over the logging interval)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shared_options(rows: list[dict]) -> str:
    """The --optim_args the gamma rows share besides gamma (e.g. ``eps=1e-8``), or ``library eps`` when none."""
    extras = {(row.get("optim_args") or "").partition(",")[2] for row in rows}
    return extras.pop() if len(extras) == 1 and "" not in extras else "library eps" if extras == {""} else "mixed"


def plot_metric_vs_gamma(results: dict, path: Path) -> None:
    metric = results["metric"]
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    anon = [row for row in results["summary"] if row["gamma"] is not None and not row.get("variant")]
    variants = [row for row in results["summary"] if row.get("variant")]
    for row in results["summary"]:
        if row["gamma"] is not None:
            continue
        if not math.isfinite(row["mean"]):
            continue
        style = BASELINE_STYLE.get(row["config"], {"color": "tab:brown", "linestyle": ":"})
        ax.axhline(row["mean"], label=f"{_label(row)}: {row['mean']:.4g} ± {row['std']:.2g}", **style)
        ax.axhspan(row["mean"] - row["std"], row["mean"] + row["std"], color=style["color"], alpha=0.12)
    xs = [row["gamma"] for row in anon]
    for row in anon:
        values = [r["metric"] for r in results["runs"] if r["config"] == row["config"] and not r["diverged"]]
        ax.scatter([row["gamma"]] * len(values), values, color="tab:blue", alpha=0.45, s=18, zorder=3)
    finite = [row for row in anon if math.isfinite(row["mean"])]
    ax.errorbar(
        [row["gamma"] for row in finite],
        [row["mean"] for row in finite],
        yerr=[row["std"] for row in finite],
        color="tab:blue",
        marker="o",
        capsize=4,
        linewidth=1.8,
        label=f"Anon, {_shared_options(anon)}: mean ± std (dots: seeds)",
        zorder=4,
    )
    for row in variants:
        values = [r["metric"] for r in results["runs"] if r["config"] == row["config"] and not r["diverged"]]
        color = VARIANT_STYLES.get(row["variant"], VARIANT_STYLE)["color"]
        ax.scatter([row["gamma"]] * len(values), values, color=color, alpha=0.45, s=18, marker="x", zorder=3)
        if math.isfinite(row["mean"]):
            ax.errorbar(
                [row["gamma"]],
                [row["mean"]],
                yerr=[row["std"]],
                color=color,
                marker="s",
                capsize=4,
                linestyle="none",
                label=f"{_label(row)}: {row['mean']:.4g} ± {row['std']:.2g}",
                zorder=4,
            )
    for row in finite:
        ax.annotate(
            f"lr {row['lr']:g}",
            (row["gamma"], row["mean"]),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=8,
            color="tab:blue",
        )
    ax.set_xticks(xs)
    ax.margins(x=0.2)  # room for the lr labels right of the last point
    ax.set_xlabel("gamma (0: SGD-like, 1: Adam-like)")
    ax.set_ylabel(f"final {METRIC_LABELS.get(metric, metric)}")
    ax.set_title(
        f"{results['task']}: final {metric} vs gamma\n{results['settings']['max_steps']} steps, "
        f"seeds {results['settings']['seeds']}, lr tuned per configuration"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lr_grid(results: dict, path: Path) -> None:
    metric = results["metric"]
    gammas = [row["gamma"] for row in results["summary"] if row["gamma"] is not None and not row.get("variant")]
    fig, ax = plt.subplots(figsize=(11, 5), constrained_layout=True)
    crosses = []
    for row in results["summary"]:
        points = sorted(
            (r["lr"], r["metric"]) for r in results["lr_grid"] if r["config"] == row["config"] and not r["diverged"]
        )
        diverged = sorted(r["lr"] for r in results["lr_grid"] if r["config"] == row["config"] and r["diverged"])
        style = _style(row["config"], row["gamma"], gammas, row.get("variant"))
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{row['config']} (best lr {row['lr']:g})", **style)
        crosses += [(lr, style["color"]) for lr in diverged]
    top = ax.get_ylim()[1]
    for lr, color in crosses:  # diverged runs have no metric: mark them at the top edge
        ax.scatter([lr], [top], marker="x", color=color, clip_on=False)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (peak)")
    ax.set_ylabel(f"final {METRIC_LABELS.get(metric, metric)}")
    ax.set_title(f"{results['task']}: lr search on seed {results['settings']['tune_seed']} (x: diverged)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _code(text: str | None) -> str:
    return f"`{text}`" if text else "-"


def markdown_table(results: dict) -> str:
    """The summary as a Markdown table (the docs include it), best configuration first."""
    metric = results["metric"]
    rows = sorted(
        results["summary"],
        key=lambda r: (not math.isfinite(r["mean"]), -r["mean"] if results["higher_is_better"] else r["mean"]),
    )
    seeds = results["settings"]["seeds"]
    lines = [
        f"| configuration | --optim_args | lr (tuned on seed {results['settings']['tune_seed']} unless fixed) "
        f"| final {metric}, mean ± std over seeds {seeds} | min .. max | vs AdamW |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        diverged = f" ({r['n_diverged']} diverged)" if r["n_diverged"] else ""
        fixed = "" if r.get("lr_tuned", True) else " (fixed)"
        lines.append(
            f"| {r['config']} | {_code(r.get('optim_args'))} | {r['lr']:g}{fixed} "
            f"| {r['mean']:.4f} ± {r['std']:.4f}{diverged} "
            f"| {r['min']:.4f} .. {r['max']:.4f} | {r['vs_adamw']} |"
        )
    return "\n".join(lines) + "\n"


def plot_results(results: dict, out_dir: Path) -> list[Path]:
    """Write the three PNGs and the Markdown summary table for ``results`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{results['task']}_{name}.png" for name in ("loss_curves", "metric_vs_gamma", "lr_grid")]
    plot_loss_curves(results, paths[0])
    plot_metric_vs_gamma(results, paths[1])
    plot_lr_grid(results, paths[2])
    table = out_dir / f"{results['task']}_summary.md"
    table.write_text(markdown_table(results))
    return [*paths, table]


OVERVIEW_ORDER = ("anon (defaults)", "adamw", "anon (published rule)")


def plot_overview(results_list: list[dict], path: Path) -> Path:
    """One panel per task: the final metric of every report seed (dots) and the mean ± std (bar) of each
    configuration, the order of ``OVERVIEW_ORDER`` first; each panel keeps its own metric and scale."""
    fig, axes = plt.subplots(1, len(results_list), figsize=(3.6 * len(results_list), 4.2), squeeze=False)
    for ax, results in zip(axes[0], results_list, strict=True):
        rows = {r["config"]: r for r in results["summary"]}
        names = [n for n in OVERVIEW_ORDER if n in rows] + [n for n in rows if n not in OVERVIEW_ORDER]
        for x, name in enumerate(names):
            row = rows[name]
            style = _style(name, row["gamma"], [1.0], row.get("variant"))
            color = style["color"] if name != "anon (defaults)" else "tab:blue"
            values = [r["metric"] for r in results["runs"] if r["config"] == name and not r["diverged"]]
            ax.scatter([x] * len(values), values, color=color, alpha=0.45, s=22, zorder=3)
            ax.errorbar(x, row["mean"], yerr=row["std"], fmt="o", color=color, capsize=5, markersize=7, zorder=4)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("anon ", "Anon\n").replace("adamw", "AdamW") for n in names], fontsize=8)
        ax.set_xlim(-0.5, len(names) - 0.5)
        seeds = results["settings"]["seeds"]
        ax.set_title(f"{results['task']} ({len(seeds)} seeds)", fontsize=10)
        ax.set_ylabel(METRIC_LABELS.get(results["metric"], results["metric"]), fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Anon at its defaults, AdamW and Anon under the published rule; lr tuned per row (dots: seeds)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if arguments[:1] == ["--overview"]:
        loaded = []
        for name in arguments[2:]:
            with open(name) as f:
                loaded.append(json.load(f))
        print(plot_overview(loaded, Path(arguments[1])))
    else:
        for name in arguments:
            with open(name) as f:
                print("\n".join(str(p) for p in plot_results(json.load(f), Path(name).parent)))
