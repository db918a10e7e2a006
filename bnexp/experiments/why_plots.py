"""The report's plots of the probes that test why BN helps (bnexp.probes: ics, landscape, sharpness,
signal, rank), drawn when the runs logged them.

Over training, each arm's mean over seeds with a min–max band against the step (plots.plot_bands: a diverged
run ends in a cross):
  ics.png        ‖G − G'‖ and cos(G, G') (Santurkar et al.'s Definition 2.1) of the first and the last layer
                 measured
  landscape.png  loss range, gradient predictiveness, effective β-smoothness along the gradient
  sharpness.png  the top Hessian eigenvalue
  signal.png     the last block's channel variance and (channel mean)²
  rank.png       the last block's effective rank
At initialization, for a grid with a numeric axis (the depth of configs/compare/depth_init.yaml):
  init_depth.png   against the axis: the first layer's gradient norm on the first training batch (logged at
                   step 1: the gradient at the initial weights), the last block's channel variance and
                   (channel mean)² and its effective rank at step 0; one line per value of the other factors
  init_layers.png  the gradient norm of every layer at initialization, for the largest value of the axis
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from bnexp.engine.rundir import FINISHED
from bnexp.experiments.figures import Palette, Points, legend_outside, numeric_axes, save_figure, series_label
from bnexp.experiments.plots import BAND, plot_bands
from bnexp.experiments.records import RunRecord
from bnexp.experiments.stats import series
from bnexp.experiments.sweeps import value_axis

_BLOCK = re.compile(r"^(?:signal|rank)/(h\d+|stem)(?:/|$)")
_ICS = re.compile(r"^ics/(.+)/l2$")
_GRAD = re.compile(r"^grad_norm/h(\d+)$")


def _value_at(rec: RunRecord, tag: str, step: int) -> float:
    row = next((r for r in rec.metrics if r["step"] == step), None)
    v = None if row is None else row.get(tag)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan


class _Names:
    """What a run's tags name, found once: its blocks (stem, h1, h2, ...) and the layers with ICS values."""

    def __init__(self, rec: RunRecord):
        keys = list(dict.fromkeys(k for row in rec.metrics for k in row))
        blocks = {m.group(1) for k in keys if (m := _BLOCK.match(k))}
        self.blocks = sorted(blocks, key=lambda b: -1 if b == "stem" else int(b[1:]))
        self.ics = [m.group(1) for k in keys if (m := _ICS.match(k))]

    @property
    def last_block(self) -> str | None:
        return self.blocks[-1] if self.blocks else None


_FAMILIES = {"ics.png": "internal covariate shift", "landscape.png": "loss landscape along the gradient",
             "sharpness.png": "sharpness", "signal.png": "signal propagation", "rank.png": "rank collapse"}


def _panels() -> dict[str, list[tuple[str, Callable[[_Names], str | None], bool]]]:
    """file -> [(panel title, the tag a run shows there given its names, log y axis)]."""
    def ics(which: int, q: str):
        return lambda n: f"ics/{n.ics[which]}/{q}" if n.ics else None

    def block(family: str, q: str = ""):
        return lambda n: None if n.last_block is None else f"{family}/{n.last_block}{q}"

    return {
        "ics.png": [("‖G − G'‖, first layer measured", ics(0, "l2"), True),
                    ("cos(G, G'), first layer measured", ics(0, "cos"), False),
                    ("‖G − G'‖, last layer", ics(-1, "l2"), True),
                    ("cos(G, G'), last layer", ics(-1, "cos"), False)],
        "landscape.png": [("loss range along the gradient", lambda n: "landscape/loss_range", True),
                          ("gradient predictiveness max ‖∇L(W_s) − g‖", lambda n: "landscape/grad_pred", True),
                          ("effective β-smoothness", lambda n: "landscape/beta_smooth", True)],
        "sharpness.png": [("top Hessian eigenvalue", lambda n: "sharpness/top_eig", True)],
        "signal.png": [("last block: channel variance", block("signal", "/var"), True),
                       ("last block: (channel mean)²", block("signal", "/sq_mean"), True)],
        "rank.png": [("last block: effective rank", block("rank"), False)],
    }


def _series(rec: RunRecord, tag: str | None) -> tuple[np.ndarray, np.ndarray]:
    return (np.empty(0), np.empty(0)) if tag is None else series(rec, tag)


def write_why_plots(plot_dir: Path, records: list[RunRecord], arms: list[str],
                    points: Points | None = None, title: str = "") -> list[Path]:
    """Every figure of the module docstring whose tags some run logged; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    palette = Palette(arms, points)

    def save(fig, name: str) -> None:
        written.append(save_figure(fig, plot_dir / name))

    groups = {arm: [r for r in records if r.arm == arm and r.metrics] for arm in arms}
    groups = {a: rs for a, rs in groups.items() if rs}
    names = {id(r): _Names(r) for rs in groups.values() for r in rs}
    for name, panels in _panels().items():
        drawn = []
        for title, tag, log in panels:
            curves = {id(r): _series(r, tag(names[id(r)])) for rs in groups.values() for r in rs}
            if any(len(xs) for xs, _ in curves.values()):
                drawn.append((title, curves, log))
        if not drawn:
            continue
        fig, axes = plt.subplots(1, len(drawn), figsize=(4.2 * len(drawn), 3.6), squeeze=False)
        for ax, (title, curves, log) in zip(axes[0], drawn):
            plot_bands(ax, groups, lambda r, curves=curves: curves[id(r)], palette)
            ax.set(title=title, xlabel="step")
            if log and all(np.all(ys > 0) for _, ys in curves.values()):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        legend_outside(axes[0][-1], *axes[0][:-1])
        fig.suptitle(f"{title}: {_FAMILIES[name]}, {BAND}" if title else f"{_FAMILIES[name]}, {BAND}")
        save(fig, name)
    _write_init_plots(records, points, save, palette)
    return written


def _init_values(rec: RunRecord) -> dict[str, float]:
    """A run's quantities at initialization."""
    last = _Names(rec).last_block
    out = {"first layer gradient norm": _value_at(rec, "grad_norm/h1", 1)}
    if last is not None:
        out["last block channel variance"] = _value_at(rec, f"signal/{last}/var", 0)
        out["last block (channel mean)²"] = _value_at(rec, f"signal/{last}/sq_mean", 0)
        out["last block effective rank"] = _value_at(rec, f"rank/{last}", 0)
    return out


def _write_init_plots(records: list[RunRecord], points: Points | None, save, palette: Palette) -> None:
    """At initialization against each numeric grid axis (see the module docstring)."""
    import matplotlib.pyplot as plt

    if not points:
        return
    done = [r for r in records if r.arm in points and r.status in FINISHED and r.metrics]
    if not any("grad_norm/h1" in row or any(k.startswith("signal/") for k in row) for r in done for row in r.metrics[:2]):
        return
    for axis in numeric_axes(points):
        series: dict[str, dict[float, list[dict[str, float]]]] = defaultdict(lambda: defaultdict(list))
        for rec in done:
            series[series_label(points, rec.arm, axis)][float(points[rec.arm][1][axis])].append(_init_values(rec))
        colors = palette.series(list(series))
        # A quantity no run logged at initialization (the gradient norm when step 1 is not probed) has no
        # panel: an axis of nothing but NaN cannot be drawn, on a log scale least of all.
        quantities = sorted({q for by_x in series.values() for vals in by_x.values() for v in vals
                             for q, value in v.items() if math.isfinite(value)})
        if not quantities:
            continue
        fig, axes = plt.subplots(1, len(quantities), figsize=(4.2 * len(quantities), 3.6), squeeze=False)
        for ax, q in zip(axes[0], quantities):
            drawn = []
            for label, by_x in series.items():
                xs = sorted(by_x)
                ys = [[v.get(q, math.nan) for v in by_x[x]] for x in xs]
                mean = [np.nanmean(y) if np.isfinite(y).any() else math.nan for y in ys]
                std = [np.nanstd(y, ddof=1) if np.isfinite(y).sum() > 1 else 0.0 for y in ys]
                ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, color=colors[label], label=label or "all")
                drawn += [m for m in mean if math.isfinite(m)]
            ax.set(title=f"{q} at initialization", xlabel=axis)
            value_axis(ax, [x for by_x in series.values() for x in by_x])
            if q != "last block effective rank" and min(drawn) > 0:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize="x-small")
        save(fig, "init_depth.png" if axis == "model.depth" else f"init_{axis.rsplit('.', 1)[-1]}.png")

        deepest = max(float(point[axis]) for _, point in points.values())
        profiles = {label: [p for rec in done if float(points[rec.arm][1][axis]) == deepest
                            and series_label(points, rec.arm, axis) == label and len(p := _grad_profile(rec))]
                    for label in series}
        if not any(profiles.values()):
            continue  # no gradient norms on the first training batch (logged only when step 1 is probed)
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for label, runs in profiles.items():
            if runs:
                mean = np.nanmean(np.array([p[:min(map(len, runs))] for p in runs]), axis=0)
                ax.plot(np.arange(1, len(mean) + 1), mean, marker=".", color=colors[label], label=label or "all")
        ax.set(title=f"gradient norm per layer at initialization ({axis} {deepest:g})", xlabel="layer",
               ylabel="‖∂L/∂W_l‖ (mean over seeds)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
        save(fig, "init_layers.png")


def _grad_profile(rec: RunRecord) -> list[float]:
    row = next((r for r in rec.metrics if r["step"] == 1), {})
    layers = sorted((int(m.group(1)), v) for k, v in row.items() if (m := _GRAD.match(k)) and v is not None)
    return [v for _, v in layers]

