"""Sweep plots: for a grid with a numeric axis (data.batch_size, optim.lr, ...), the final and the best test
metric against that axis, one line per value of the other factors (and per declared arm), mean ± std over
seeds: Wu & He 2018's error-against-batch-size figure as bnexp draws it.

The metric is test accuracy, or test loss for a regression task. Runs count as in the report's table:
those that finished (completed or diverged, a diverged run with its final network). The x axis is
logarithmic when the values are positive and span a factor of 10 or more. Each figure's points are also
written as a CSV beside it (plots/sweep_<axis>.csv), to re-plot or check.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnexp.engine.rundir import FINISHED, write_atomic
from bnexp.experiments.records import RunRecord

Points = dict[str, tuple[str, dict[str, Any]]]  # arm -> (declared arm, grid point)


@dataclass
class Series:
    label: str  # the declared arm and the other axes' values; "" when there is nothing else
    x: list[float]
    final: list[tuple[float, float, int]]  # (mean, std, n) at each x
    best: list[tuple[float, float, int]]


def numeric_axes(points: Points) -> list[str]:
    """The grid keys whose values are all numbers, with at least two of them."""
    keys: dict[str, set] = defaultdict(set)
    for _, point in points.values():
        for key, value in point.items():
            keys[key].add(value if _is_number(value) else None)
    return [key for key, values in keys.items() if None not in values and len(values) >= 2]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _stats(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def _metric(records: list[RunRecord]) -> tuple[str, str, str]:
    """(summary key of the final value, of the best value, axis label)."""
    if records and all(r.regression for r in records):
        return "test_loss", "best_test_loss", "test loss"
    return "test_accuracy", "best_test_accuracy", "test accuracy"


def sweep_series(records: list[RunRecord], points: Points, axis: str) -> list[Series]:
    final_key, best_key, _ = _metric(records)
    runs: dict[str, dict[float, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        if rec.arm not in points or rec.status not in FINISHED:
            continue
        family, point = points[rec.arm]
        others = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items() if key != axis]
        label = " ".join(part for part in [family, *others] if part)
        runs[label][float(point[axis])].append(rec)
    out = []
    for label, by_x in runs.items():
        xs = sorted(by_x)
        final = [_stats([_num(r.summary.get(final_key)) for r in by_x[x]]) for x in xs]
        best = [_stats([_num(r.summary.get(best_key)) for r in by_x[x]]) for x in xs]
        out.append(Series(label, xs, final, best))
    return out


def _num(value: Any) -> float:
    return float(value) if _is_number(value) else math.nan


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


def sweep_figure(series: list[Series], axis: str, ylabel: str, title: str):
    """The figure (two panels: final, best) of one axis's series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2), sharey=True)
    xs = sorted({x for s in series for x in s.x})
    for ax, which in zip(axes, ("final", "best")):
        for s in series:
            stats = getattr(s, which)
            mean = np.array([m for m, _, _ in stats])
            std = np.array([d for _, d, _ in stats])
            n = min(k for _, _, k in stats)
            ax.errorbar(s.x, mean, yerr=std, marker="o", capsize=3, label=f"{s.label or 'all'} (n≥{n})")
        value_axis(ax, xs)
        ax.set(xlabel=axis, title=f"{which} {ylabel}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{ylabel} (mean ± std over seeds)")
    axes[1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{title}: {ylabel} against {axis}")
    fig.tight_layout()
    return fig


def _csv(series: list[Series]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["series", "x", "final_mean", "final_std", "best_mean", "best_std", "n"])
    for s in series:
        for x, (fm, fs, n), (bm, bs, _) in zip(s.x, s.final, s.best):
            writer.writerow([s.label, x, fm, fs, bm, bs, n])
    return buf.getvalue()


def write_sweep_plots(plot_dir: Path, records: list[RunRecord], points: Points | None, title: str) -> list[Path]:
    """plots/sweep_<axis>.png and .csv for every numeric grid axis; returns the PNG paths."""
    if not points:
        return []
    import matplotlib.pyplot as plt

    _, _, ylabel = _metric(records)
    written = []
    for axis in numeric_axes(points):
        series = sweep_series(records, points, axis)
        if not series:
            continue
        plot_dir.mkdir(parents=True, exist_ok=True)
        stem = f"sweep_{axis.rsplit('.', 1)[-1]}"
        fig = sweep_figure(series, axis, ylabel, title)
        fig.savefig(plot_dir / f"{stem}.png", dpi=100)
        plt.close(fig)
        write_atomic(plot_dir / f"{stem}.csv", _csv(series))
        written.append(plot_dir / f"{stem}.png")
    return written
