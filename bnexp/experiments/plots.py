"""The comparison report's plots (matplotlib, PNG): test accuracy, the input to a nonlinearity (the paper's
Figure 1b/c), running-statistic errors and the train/inference gap, each arm's mean ± std over seeds."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from bnexp.experiments.records import RunRecord

_STYLES = ["-", "--", "-.", ":"]
_ACT_TAG = re.compile(r"^activations/(h\d+)/u(\d+)/p(15|50|85)$")


def _series(rec: RunRecord, tag: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(row["step"], row[tag]) for row in rec.metrics if row.get(tag) is not None]
    if not pts:
        return np.empty(0), np.empty(0)
    a = np.asarray(pts, dtype=float)
    return a[:, 0], a[:, 1]


def _layer_mean_series(rec: RunRecord, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """running_stats/<layer>/<kind> averaged over BN layers, step by step."""
    tag = re.compile(rf"^running_stats/[^/]+/{kind}$")
    pts = []
    for row in rec.metrics:
        vals = [v for k, v in row.items() if tag.match(k) and v is not None]
        if vals:
            pts.append((row["step"], float(np.mean(vals))))
    if not pts:
        return np.empty(0), np.empty(0)
    a = np.asarray(pts)
    return a[:, 0], a[:, 1]


def _band(series: list[tuple[np.ndarray, np.ndarray]]):
    """Mean and std across runs at every step any run logged (a diverged run stops contributing)."""
    by_step: dict[float, list[float]] = defaultdict(list)
    for steps, vals in series:
        for s, v in zip(steps, vals):
            if math.isfinite(v):
                by_step[s].append(v)
    xs = np.array(sorted(by_step))
    mean = np.array([np.mean(by_step[s]) for s in xs])
    std = np.array([np.std(by_step[s], ddof=1) if len(by_step[s]) > 1 else 0.0 for s in xs])
    return xs, mean, std


def plot_bands(ax, groups: dict[str, list[RunRecord]], get, colors) -> bool:
    """Each arm's mean ± std over its runs of the series `get(record)` = (steps, values); True if any."""
    drew = False
    for arm, recs in groups.items():
        series = [get(r) for r in recs]
        series = [s for s in series if len(s[0])]
        if not series:
            continue
        xs, mean, std = _band(series)
        # Line styles differ too: two arms that train identically (bnexp vs torch BN) stay visible.
        ax.plot(xs, mean, color=colors[arm], linestyle=_STYLES[list(colors).index(arm) % len(_STYLES)],
                label=f"{arm} (n={len(series)})")
        ax.fill_between(xs, mean - std, mean + std, color=colors[arm], alpha=0.2, linewidth=0)
        drew = True
    return drew


def arm_colors(arms: list[str]) -> dict[str, str]:
    """One colour per arm, the same in every plot of a report."""
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {arm: cycle[i % len(cycle)] for i, arm in enumerate(arms)}


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(plot_dir: Path, records: list[RunRecord], arms: list[str], target: float | None,
                title: str) -> list[Path]:
    """Each plot is skipped when no run has its tags (e.g. probes off): returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {arm: [r for r in records if r.arm == arm and r.metrics] for arm in arms}
    groups = {a: rs for a, rs in groups.items() if rs}
    colors = arm_colors(arms)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        written.append(save_figure(fig, plot_dir / name))

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if records and all(r.regression for r in records):  # no accuracy: the test loss, on a log axis
        if plot_bands(ax, groups, lambda r: _series(r, "test/loss"), colors):
            ax.set(xlabel="step", ylabel="test loss (eval mode)", title=f"{title}: test loss, mean ± std")
            ax.set_yscale("log")
            ax.legend(fontsize="small")
            ax.grid(alpha=0.3)
            save(fig, "loss.png")
        else:
            plt.close(fig)
    elif plot_bands(ax, groups, lambda r: _series(r, "test/accuracy"), colors):
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.set(xlabel="step", ylabel="test accuracy (eval mode)", title=f"{title}: test accuracy, mean ± std")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right", fontsize="small")
        ax.grid(alpha=0.3)
        save(fig, "accuracy.png")
    else:
        plt.close(fig)

    # Figure 1b/c: the input to the nonlinearity of one fixed unit of the last hidden layer, first seed.
    panels = []
    for arm, recs in groups.items():
        for rec in sorted(recs, key=lambda r: (r.seed is None, r.seed)):
            found = {m.groups() for row in rec.metrics for k in row if (m := _ACT_TAG.match(k))}
            if found:
                layer = max({g[0] for g in found}, key=lambda h: int(h[1:]))
                unit = min(int(g[1]) for g in found if g[0] == layer)
                panels.append((arm, rec, layer, unit))
                break
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
        for ax, (arm, rec, layer, unit) in zip(axes[0], panels):
            for p, style in (("15", ":"), ("50", "-"), ("85", "--")):
                xs, ys = _series(rec, f"activations/{layer}/u{unit}/p{p}")
                ax.plot(xs, ys, style, color=colors[arm], label=f"p{p}")
            ax.set(title=f"{arm}: {layer} unit {unit}", xlabel="step")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("input to the nonlinearity")
        axes[0][0].legend(fontsize="small")
        save(fig, "activations.png")

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6))
    drew_mean = plot_bands(axes[0], groups, lambda r: _layer_mean_series(r, "mean_err"), colors)
    drew_var = plot_bands(axes[1], groups, lambda r: _layer_mean_series(r, "var_err"), colors)
    if drew_mean or drew_var:
        axes[0].set(xlabel="step", ylabel="running_mean error (population std units)",
                    title="running mean vs population")
        axes[1].set(xlabel="step", ylabel="|log running_var / population var|", title="running var vs population")
        for ax in axes:
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.set_yscale("log")
                ax.legend(fontsize="small")
        save(fig, "running_stats.png")
    else:
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if plot_bands(ax, groups, lambda r: _series(r, "gap/accuracy"), colors):
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set(xlabel="step", ylabel="acc(batch stats) − acc(running stats)",
               title="train/inference gap on the test set")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        save(fig, "gap.png")
    else:
        plt.close(fig)
    return written
