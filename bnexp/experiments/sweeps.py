"""Sweep plots: for a grid with a numeric axis (data.batch_size, optim.lr, ...), the final and the best test
metric against that axis, one line per value of the other factors (and per declared arm), mean ± std over
seeds: Wu & He 2018's error-against-batch-size figure as bnexp draws it.

The metric is test accuracy, or test loss for a regression task. Runs count as in the report's table:
the mean ± std is over the completed runs of a point; a diverged run is not averaged in but drawn as a
cross at its last evaluation before it diverged. The x axis is logarithmic when the values are positive
and span a factor of 10 or more. A series has its arms' colour (bnexp.experiments.figures). Each figure's
points are also written as a CSV beside it (plots/sweep_<axis>.csv), to re-plot or check.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnexp.engine.rundir import write_atomic
from bnexp.experiments.figures import Palette, Points, legend_outside, numeric_axes, save_figure, series_label
from bnexp.experiments.records import RunRecord
from bnexp.experiments.stats import mean_std


@dataclass
class Series:
    label: str  # the declared arm and the other axes' values; "" when there is nothing else
    x: list[float]
    final: list[tuple[float, float, int]]  # (mean, std, n) over the completed runs at each x; std nan for n = 1
    best: list[tuple[float, float, int]]
    # at each x, the final and best value of each diverged run (over its evaluations before it diverged)
    diverged_final: list[list[float]] = field(default_factory=list)
    diverged_best: list[list[float]] = field(default_factory=list)


def _metric(records: list[RunRecord]) -> tuple[str, str]:
    """(the metric RunRecord.final and .best take, axis label)."""
    if records and all(r.regression for r in records):
        return "loss", "test loss"
    return "accuracy", "test accuracy"


def sweep_series(records: list[RunRecord], points: Points, axis: str) -> list[Series]:
    metric, _ = _metric(records)
    runs: dict[str, dict[float, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        if rec.arm not in points or rec.status not in ("completed", "diverged"):
            continue
        runs[series_label(points, rec.arm, axis)][float(points[rec.arm][1][axis])].append(rec)
    out = []
    for label, by_x in runs.items():
        xs = sorted(by_x)
        done = [[r for r in by_x[x] if r.status == "completed"] for x in xs]
        lost = [[r for r in by_x[x] if r.status == "diverged"] for x in xs]
        out.append(Series(label, xs, [mean_std([r.final(metric) for r in rs]) for rs in done],
                          [mean_std([r.best(metric) for r in rs]) for rs in done],
                          [[r.final(metric) for r in rs] for rs in lost],
                          [[r.best(metric) for r in rs] for rs in lost]))
    return out


def log_scale(series: list[Series]) -> bool:
    return spans_decades([x for s in series for x in s.x])


def spans_decades(xs: list[float]) -> bool:
    return bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 10


def value_axis(ax, xs: list[float]) -> None:
    """An x axis of swept values: logarithmic across decades, ticked at the values, in plain numbers."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    if spans_decades(xs):
        ax.set_xscale("log")
    ax.set_xticks(sorted(set(xs)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def sweep_figure(series: list[Series], axis: str, ylabel: str, title: str, colors: dict[str, Any] | None = None):
    """The figure (two panels: final, best) of one axis's series; `colors`: series label -> colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2), sharey=True)
    xs = sorted({x for s in series for x in s.x})
    colors = colors or Palette([s.label for s in series]).series([s.label for s in series])
    for ax, which in zip(axes, ("final", "best")):
        crossed = False
        for s in series:
            stats = getattr(s, which)
            mean = np.array([m for m, _, _ in stats])
            std = np.array([d for _, d, _ in stats])  # nan (one run): no bar, not a bar of length 0
            counts = sorted({k for _, _, k in stats if k})
            n = "n=0" if not counts else f"n={counts[0]}" + (f"–{counts[-1]}" if len(counts) > 1 else "")
            lost = sum(map(len, s.diverged_final))
            label = f"{s.label or 'all'} ({n}" + (f", {lost} diverged" if lost else "") + ")"
            ax.errorbar(s.x, mean, yerr=std, marker="o", capsize=3, color=colors[s.label], label=label)
            for x, values in zip(s.x, getattr(s, f"diverged_{which}") or []):
                values = [v for v in values if math.isfinite(v)]
                if values:
                    ax.plot([x] * len(values), values, marker="x", markersize=7, markeredgewidth=2,
                            linestyle="none", color=colors[s.label])
                    crossed = True
        if crossed:
            ax.plot([], [], marker="x", markeredgewidth=2, color="0.3", linestyle="none",
                    label="diverged run (its last evaluation)")
        value_axis(ax, xs)
        ax.set(xlabel=axis, title=f"{which} {ylabel}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{ylabel} (mean ± std over completed runs)")
    legend_outside(axes[1], axes[0])
    fig.suptitle(f"{title}: {ylabel} against {axis}")
    fig.tight_layout()
    return fig


def _csv(series: list[Series]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["series", "x", "final_mean", "final_std", "best_mean", "best_std", "n", "diverged"])
    for s in series:
        lost = s.diverged_final or [[] for _ in s.x]
        for x, (fm, fs, n), (bm, bs, _), d in zip(s.x, s.final, s.best, lost):
            writer.writerow([s.label, x, *("" if math.isnan(v) else v for v in (fm, fs, bm, bs)), n, len(d)])
    return buf.getvalue()


def write_sweep_plots(plot_dir: Path, records: list[RunRecord], points: Points | None, title: str,
                      arms: list[str] | None = None) -> list[Path]:
    """plots/sweep_<axis>.png, .svg and .csv for every numeric grid axis; returns the PNG paths. `arms`: the
    comparison's, in order, for the colours (bnexp.experiments.figures.Palette)."""
    if not points:
        return []
    _, ylabel = _metric(records)
    palette = Palette(arms if arms is not None else list(points), points)
    written = []
    for axis in numeric_axes(points):
        series = sweep_series(records, points, axis)
        if not series:
            continue
        stem = f"sweep_{axis.rsplit('.', 1)[-1]}"
        fig = sweep_figure(series, axis, ylabel, title, palette.series([s.label for s in series]))
        written.append(save_figure(fig, plot_dir / f"{stem}.png"))
        write_atomic(plot_dir / f"{stem}.csv", _csv(series))
    return written
