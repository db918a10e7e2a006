"""The comparison report's plots over training (matplotlib; PNG and SVG, bnexp.experiments.figures):

  accuracy.png       test accuracy (classification)
  loss.png           training loss (the mean over each log interval, train mode) and test loss (eval mode)
  activations.png    the input to a nonlinearity (the paper's Figure 1b/c): every run, a panel each
  running_stats.png  running-statistic errors against the population statistics
  gap.png            the train/inference gap on the test set

Each arm's curve is the mean over its runs with a band from their minimum to their maximum, over the steps
every run reached; past the step where one stopped (diverged), the runs still going are drawn one by one,
thinner, and each diverged run ends in a cross at the step it diverged, at its last value.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from bnexp.experiments.figures import Palette, Points, legend_outside, save_figure
from bnexp.experiments.records import RunRecord
from bnexp.experiments.stats import layer_mean_series, series

_ACT_TAG = re.compile(r"^activations/(h\d+)/u(\d+)/p(15|50|85)$")
BAND = "mean over seeds, band min–max"
_PERCENTILES = (("15", ":"), ("50", "-"), ("85", "--"))


def _mark_divergence(ax, rec: RunRecord, xs: np.ndarray, ys: np.ndarray, color) -> bool:
    finite = np.isfinite(ys)
    if rec.diverged_step is None or not finite.any():
        return False
    ax.plot([rec.diverged_step], [ys[finite][-1]], marker="x", markersize=7, markeredgewidth=2, color=color,
            linestyle="none", zorder=5)
    return True


def plot_bands(ax, groups: dict[str, list[RunRecord]], get, palette: Palette) -> bool:
    """Each arm's curve of `get(record)` = (steps, values), as the module docstring says; True if any."""
    drew = marked = False
    for arm, recs in groups.items():
        curves = [(rec, *get(rec)) for rec in recs]
        curves = [(rec, xs, ys) for rec, xs, ys in curves if np.isfinite(ys).any()]
        if not curves:
            continue
        style = palette[arm]
        common_end = min(xs[np.isfinite(ys)][-1] for _, xs, ys in curves)  # every run has reached it
        by_step: dict[float, list[float]] = {}
        for _, xs, ys in curves:
            for x, y in zip(xs, ys):
                if x <= common_end and math.isfinite(y):
                    by_step.setdefault(x, []).append(y)
        steps = np.array(sorted(by_step))
        vals = [by_step[s] for s in steps]
        diverged = sum(rec.diverged_step is not None for rec, _, _ in curves)
        label = f"{arm} (n={len(curves)}" + (f", {diverged} diverged" if diverged else "") + ")"
        ax.plot(steps, [np.mean(v) for v in vals], color=style.color, linestyle=style.linestyle, label=label)
        if len(curves) > 1:
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=style.color, alpha=0.18,
                            linewidth=0)
        for rec, xs, ys in curves:
            tail = xs >= common_end
            if tail.sum() > 1:
                ax.plot(xs[tail], ys[tail], color=style.color, linestyle=style.linestyle, linewidth=0.8, alpha=0.8)
            marked |= _mark_divergence(ax, rec, xs, ys, style.color)
        drew = True
    if marked:
        ax.plot([], [], marker="x", markeredgewidth=2, color="0.3", linestyle="none", label="diverged (last value)")
    return drew


def _finish(ax, ylabel: str, title: str, log: bool = False, legend: bool = True) -> None:
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if legend:
        legend_outside(ax)


def _activation_panels(groups: dict[str, list[RunRecord]]):
    """arm -> [(run, layer, unit)]: each run's first tracked unit of its last hidden layer (the units are
    the ones the run logged)."""
    out = {}
    for arm, recs in groups.items():
        panels = []
        for rec in sorted(recs, key=lambda r: (r.seed is None, r.seed)):
            found = {m.groups() for row in rec.metrics for k in row if (m := _ACT_TAG.match(k))}
            if found:
                layer = max({g[0] for g in found}, key=lambda h: int(h[1:]))
                panels.append((rec, layer, min(int(g[1]) for g in found if g[0] == layer)))
        if panels:
            out[arm] = panels
    return out


def activations_figure(groups: dict[str, list[RunRecord]], palette: Palette, title: str):
    """The paper's Figure 1b/c for every run: a column per arm, a row per seed; None without activation tags."""
    import matplotlib.pyplot as plt

    panels = _activation_panels(groups)
    if not panels:
        return None
    rows = max(len(p) for p in panels.values())
    fig, axes = plt.subplots(rows, len(panels), figsize=(3.2 * len(panels), 2.5 * rows + 0.6), squeeze=False,
                             sharex=True, sharey="col")
    for col, (arm, runs) in enumerate(panels.items()):
        color = palette[arm].color
        for row in range(rows):
            ax = axes[row][col]
            if row >= len(runs):
                ax.set_axis_off()
                continue
            rec, layer, unit = runs[row]
            for p, style in _PERCENTILES:
                xs, ys = series(rec, f"activations/{layer}/u{unit}/p{p}")
                ax.plot(xs, ys, linestyle=style, color=color)
                _mark_divergence(ax, rec, xs, ys, color)
            seed = "" if rec.seed is None else f", seed {rec.seed}"
            ax.set_title(f"{arm}{seed}\n{layer} unit {unit}", fontsize="medium")
            ax.grid(alpha=0.3)
            if row == len(runs) - 1 or row == rows - 1:
                ax.set_xlabel("step")
        axes[0][col].set_ylabel("input to the nonlinearity" if col == 0 else "")
    fig.suptitle(f"{title}: input to the nonlinearity over the test set, every run\n"
                 f"percentiles 15 (dotted), 50 (solid), 85 (dashed)")
    return fig


def write_plots(plot_dir: Path, records: list[RunRecord], arms: list[str], target: float | None,
                title: str, points: Points | None = None) -> list[Path]:
    """Each plot is skipped when no run has its tags (e.g. probes off): returns the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {arm: [r for r in records if r.arm == arm and r.metrics] for arm in arms}
    groups = {a: rs for a, rs in groups.items() if rs}
    palette = Palette(arms, points)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        written.append(save_figure(fig, plot_dir / name))

    regression = bool(records) and all(r.regression for r in records)
    if not regression:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        if plot_bands(ax, groups, lambda r: series(r, "test/accuracy"), palette):
            if target is not None:
                ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
            ax.set_ylim(0, 1)
            _finish(ax, "test accuracy (eval mode)", f"{title}: test accuracy, {BAND}")
            save(fig, "accuracy.png")
        else:
            plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2))
    drew_train = plot_bands(axes[0], groups, lambda r: series(r, "train/loss"), palette)
    drew_test = plot_bands(axes[1], groups, lambda r: series(r, "test/loss"), palette)
    if drew_train or drew_test:
        _finish(axes[0], "training loss (train mode, mean over each log interval)", "training loss", log=True,
                legend=False)
        _finish(axes[1], "test loss (eval mode)", "test loss", log=True, legend=False)
        legend_outside(axes[1], axes[0])
        fig.suptitle(f"{title}: loss, {BAND}")
        save(fig, "loss.png")
    else:
        plt.close(fig)

    fig = activations_figure(groups, palette, title)
    if fig is not None:
        save(fig, "activations.png")

    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2))
    drew_mean = plot_bands(axes[0], groups, lambda r: layer_mean_series(r, "running_stats", "mean_err"), palette)
    drew_var = plot_bands(axes[1], groups, lambda r: layer_mean_series(r, "running_stats", "var_err"), palette)
    if drew_mean or drew_var:
        _finish(axes[0], "|running mean − μ_pop| / σ_pop, mean over BN layers", "running mean vs population",
                log=True, legend=False)
        _finish(axes[1], "|log running var / σ²_pop|, mean over BN layers", "running var vs population", log=True,
                legend=False)
        legend_outside(axes[1], axes[0])
        fig.suptitle(f"{title}: running statistics, {BAND}")
        save(fig, "running_stats.png")
    else:
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    gap = "gap/loss" if regression else "gap/accuracy"
    if plot_bands(ax, groups, lambda r: series(r, gap), palette):
        ax.axhline(0, color="grey", linewidth=0.8)
        metric = "loss" if regression else "acc"
        _finish(ax, f"{metric}(batch stats) − {metric}(running stats)",
                f"{title}: train/inference gap on the test set, {BAND}")
        save(fig, "gap.png")
    else:
        plt.close(fig)
    return written
