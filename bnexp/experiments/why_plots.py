"""The report's plots of the probes that test why BN helps (bnexp.probes: ics, landscape, sharpness,
signal, rank), drawn when the runs logged them.

Over training, each arm's mean ± std over seeds against the step:
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
from bnexp.experiments.plots import arm_colors, plot_bands, save_figure
from bnexp.experiments.records import RunRecord
from bnexp.experiments.sweeps import Points, numeric_axes

_BLOCK = re.compile(r"^(?:signal|rank)/(h\d+|stem)(?:/|$)")
_ICS = re.compile(r"^ics/(.+)/l2$")
_GRAD = re.compile(r"^grad_norm/h(\d+)$")


def _blocks(rec: RunRecord) -> list[str]:
    """The blocks a run's signal and rank tags name, in network order (stem, h1, h2, ...)."""
    found = {m.group(1) for row in rec.metrics for k in row if (m := _BLOCK.match(k))}
    return sorted(found, key=lambda b: -1 if b == "stem" else int(b[1:]))


def _value_at(rec: RunRecord, tag: str, step: int) -> float:
    row = next((r for r in rec.metrics if r["step"] == step), None)
    v = None if row is None else row.get(tag)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan


def _series(rec: RunRecord, tag: Callable[[RunRecord], str | None]):
    name = tag(rec)
    pts = [] if name is None else [(row["step"], row[name]) for row in rec.metrics if row.get(name) is not None]
    a = np.asarray(pts, dtype=float).reshape(-1, 2)
    return a[:, 0], a[:, 1]


def _last_block(rec: RunRecord) -> str | None:
    blocks = _blocks(rec)
    return blocks[-1] if blocks else None


def _ics_layers(rec: RunRecord) -> list[str]:
    seen = []
    for row in rec.metrics:
        for k in row:
            if (m := _ICS.match(k)) and m.group(1) not in seen:
                seen.append(m.group(1))
    return seen


def _panels() -> dict[str, list[tuple[str, Callable[[RunRecord], str | None], bool]]]:
    """file -> [(panel title, the tag a run shows there, log y axis)]."""
    def ics(which: int, q: str):
        def tag(rec):
            layers = _ics_layers(rec)
            return f"ics/{layers[which]}/{q}" if layers else None
        return tag

    def block(q: str):
        return lambda rec: None if _last_block(rec) is None else f"{q.split('/')[0]}/{_last_block(rec)}" + (
            f"/{q.split('/')[1]}" if "/" in q else "")

    return {
        "ics.png": [("‖G − G'‖, first layer measured", ics(0, "l2"), True),
                    ("cos(G, G'), first layer measured", ics(0, "cos"), False),
                    ("‖G − G'‖, last layer", ics(-1, "l2"), True),
                    ("cos(G, G'), last layer", ics(-1, "cos"), False)],
        "landscape.png": [("loss range along the gradient", lambda r: "landscape/loss_range", True),
                          ("gradient predictiveness max ‖∇L(W_s) − g‖", lambda r: "landscape/grad_pred", True),
                          ("effective β-smoothness", lambda r: "landscape/beta_smooth", True)],
        "sharpness.png": [("top Hessian eigenvalue", lambda r: "sharpness/top_eig", True)],
        "signal.png": [("last block: channel variance", block("signal/var"), True),
                       ("last block: (channel mean)²", block("signal/sq_mean"), True)],
        "rank.png": [("last block: effective rank", block("rank"), False)],
    }


def write_why_plots(plot_dir: Path, records: list[RunRecord], arms: list[str],
                    points: Points | None = None) -> list[Path]:
    """Every figure of the module docstring whose tags some run logged; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    colors = arm_colors(arms)

    def save(fig, name: str) -> None:
        written.append(save_figure(fig, plot_dir / name))

    groups = {arm: [r for r in records if r.arm == arm and r.metrics] for arm in arms}
    groups = {a: rs for a, rs in groups.items() if rs}
    for name, panels in _panels().items():
        present = [(title, tag, log) for title, tag, log in panels
                   if any(len(_series(r, tag)[0]) for rs in groups.values() for r in rs)]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.6), squeeze=False)
        for ax, (title, tag, log) in zip(axes[0], present):
            plot_bands(ax, groups, lambda r, tag=tag: _series(r, tag), colors)
            ax.set(title=title, xlabel="step")
            if log and all(np.all(_series(r, tag)[1] > 0) for rs in groups.values() for r in rs
                           if len(_series(r, tag)[0])):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize="x-small")
        save(fig, name)
    _write_init_plots(records, points, save)
    return written


def _init_values(rec: RunRecord) -> dict[str, float]:
    """A run's quantities at initialization."""
    last = _last_block(rec)
    out = {"first layer gradient norm": _value_at(rec, "grad_norm/h1", 1)}
    if last is not None:
        out["last block channel variance"] = _value_at(rec, f"signal/{last}/var", 0)
        out["last block (channel mean)²"] = _value_at(rec, f"signal/{last}/sq_mean", 0)
        out["last block effective rank"] = _value_at(rec, f"rank/{last}", 0)
    return out


def _write_init_plots(records: list[RunRecord], points: Points | None, save) -> None:
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
            family, point = points[rec.arm]
            label = " ".join([family, *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items() if k != axis)]).strip()
            series[label][float(point[axis])].append(_init_values(rec))
        quantities = sorted({q for by_x in series.values() for vals in by_x.values() for v in vals for q in v})
        fig, axes = plt.subplots(1, len(quantities), figsize=(4.2 * len(quantities), 3.6), squeeze=False)
        for ax, q in zip(axes[0], quantities):
            for label, by_x in series.items():
                xs = sorted(by_x)
                ys = [[v.get(q, math.nan) for v in by_x[x]] for x in xs]
                mean = [np.nanmean(y) if np.isfinite(y).any() else math.nan for y in ys]
                std = [np.nanstd(y, ddof=1) if np.isfinite(y).sum() > 1 else 0.0 for y in ys]
                ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=label or "all")
            ax.set(title=f"{q} at initialization", xlabel=axis)
            if min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
            if q != "last block effective rank":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize="x-small")
        save(fig, "init_depth.png" if axis == "model.depth" else f"init_{axis.rsplit('.', 1)[-1]}.png")

        deepest = max(float(point[axis]) for _, point in points.values())
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for label in series:
            profiles = [_grad_profile(rec) for rec in done
                        if float(points[rec.arm][1][axis]) == deepest and _label(points, rec, axis) == label]
            profiles = [p for p in profiles if len(p)]
            if profiles:
                mean = np.nanmean(np.array([p[:min(map(len, profiles))] for p in profiles]), axis=0)
                ax.plot(np.arange(1, len(mean) + 1), mean, marker=".", label=label or "all")
        ax.set(title=f"gradient norm per layer at initialization ({axis} {deepest:g})", xlabel="layer",
               ylabel="‖∂L/∂W_l‖ (mean over seeds)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
        save(fig, "init_layers.png")


def _label(points: Points, rec: RunRecord, axis: str) -> str:
    family, point = points[rec.arm]
    return " ".join([family, *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items() if k != axis)]).strip()


def _grad_profile(rec: RunRecord) -> list[float]:
    row = next((r for r in rec.metrics if r["step"] == 1), {})
    layers = sorted((int(m.group(1)), v) for k, v in row.items() if (m := _GRAD.match(k)) and v is not None)
    return [v for _, v in layers]

