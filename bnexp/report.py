"""The comparison report: per-arm statistics over seeds, as a rich table, summary.csv, report.md and plots.

Everything is computed from each run's own files (summary.json, metrics.jsonl), so a report can be rebuilt
from run directories alone. Conventions, also written into report.md:

- mean ± std over the arm's runs that finished (completed or diverged); std is the sample standard
  deviation (n − 1), blank for a single run. A diverged run counts with the accuracy of its final network.
- steps to target: the first evaluated step whose test/accuracy ≥ target. A run that never reaches it
  counts as its full budget (train.steps), so the arm's mean is then a lower bound, shown as "≥".
- speed-up = baseline's mean steps to target / the arm's ("same accuracy in N× fewer steps"); "≥" when
  only the baseline's mean is a lower bound, "≤" when only the arm's is, blank when both are. Blank too
  when either mean is 0 (reached at the first evaluation): the runs cannot resolve a ratio finer than
  train.eval_every, and 0 steps has none.
- runs are counted as completed, diverged, failed (raised, or a damaged run directory) and unfinished
  (interrupted, still running, or never started).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_STYLES = ["-", "--", "-.", ":"]
_ACT_TAG = re.compile(r"^activations/(h\d+)/u(\d+)/p(15|50|85)$")


@dataclass
class RunRecord:
    arm: str
    seed: int | None
    run_dir: Path
    status: str  # completed | diverged | interrupted | running | failed | missing
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    budget: int | None = None  # train.steps of the run's config
    error: str | None = None


def load_record(arm: str, seed: int | None, run_dir: Path) -> RunRecord:
    """A run's record from its files; a damaged file is a UserError naming it (RunDirError, ConfigError)."""
    from bnexp.config import read_yaml
    from bnexp.runs import CONFIG, ERROR_FILE, SUMMARY, read_metrics, read_summary

    run_dir = Path(run_dir)
    rec = RunRecord(arm, seed, run_dir, "missing")
    if (run_dir / SUMMARY).is_file():
        rec.summary = read_summary(run_dir)
        rec.status = rec.summary.get("status") or "missing"
        rec.metrics = read_metrics(run_dir)
    if (run_dir / ERROR_FILE).is_file():
        rec.status = "failed"
        lines = [ln for ln in (run_dir / ERROR_FILE).read_text(errors="replace").splitlines() if ln.strip()]
        rec.error = lines[-1] if lines else "failed"
    if (run_dir / CONFIG).is_file():
        train = read_yaml(run_dir / CONFIG).get("train")
        steps = train.get("steps") if isinstance(train, dict) else None
        rec.budget = steps if isinstance(steps, int) and not isinstance(steps, bool) else None
    return rec


# --- statistics -------------------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan


def steps_to_target(metrics: list[dict[str, Any]], target: float) -> int | None:
    for row in metrics:
        acc = row.get("test/accuracy")
        if isinstance(acc, (int, float)) and not isinstance(acc, bool) and acc >= target:
            return int(row["step"])
    return None


def _num(summary: dict[str, Any], key: str) -> float:
    v = summary.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _unfinished(status: str) -> bool:
    from bnexp.runs import FINISHED

    return status not in FINISHED and status != "failed"


def aggregate(records: list[RunRecord], arms: list[str], target: float | None,
              baseline: str | None) -> list[dict[str, Any]]:
    """One row per arm, raw numbers (nan = not available); the keys are summary.csv's columns."""
    by_arm: dict[str, list[RunRecord]] = defaultdict(list)
    for rec in records:
        by_arm[rec.arm].append(rec)
    from bnexp.runs import FINISHED

    rows = []
    for arm in arms:
        recs = by_arm.get(arm, [])
        done = [r for r in recs if r.status in FINISHED]
        row: dict[str, Any] = {"arm": arm, "runs": len(recs),
                               "completed": sum(r.status == "completed" for r in recs),
                               "diverged": sum(r.status == "diverged" for r in recs),
                               "failed": sum(r.status == "failed" for r in recs),
                               "unfinished": sum(_unfinished(r.status) for r in recs)}
        for key, col in (("test_accuracy", "final_acc"), ("best_test_accuracy", "best_acc"),
                         ("gap_accuracy", "gap_accuracy"), ("running_mean_err", "running_mean_err"),
                         ("running_var_err", "running_var_err"), ("wall_time_s", "wall_time_s")):
            row[f"{col}_mean"], row[f"{col}_std"] = mean_std([_num(r.summary, key) for r in done])
        row["target_accuracy"] = target if target is not None else math.nan
        row["reached"], row["steps_to_target_mean"], row["steps_to_target_std"] = 0, math.nan, math.nan
        row["steps_to_target_lower_bound"] = False
        if target is not None and done:
            steps, censored = [], False
            for r in done:
                s = steps_to_target(r.metrics, target)
                if s is None:
                    censored = True
                    s = r.budget if r.budget is not None else _num(r.summary, "steps")
                else:
                    row["reached"] += 1
                steps.append(float(s))
            row["steps_to_target_mean"], row["steps_to_target_std"] = mean_std(steps)
            row["steps_to_target_lower_bound"] = censored
        rows.append(row)
    base = next((r for r in rows if r["arm"] == baseline), None)
    for row in rows:
        row["baseline"] = baseline or ""
        row["speedup"], row["speedup_bound"] = math.nan, ""
        b_mean = base["steps_to_target_mean"] if base is not None else math.nan
        a_mean = row["steps_to_target_mean"]
        # A mean of 0 (target reached at step 0) gives 0× or an infinite ratio: no speed-up is measurable.
        if not (math.isfinite(b_mean) and math.isfinite(a_mean)) or b_mean == 0 or a_mean == 0:
            continue
        b_low, a_low = base["steps_to_target_lower_bound"], row["steps_to_target_lower_bound"]
        if row is base:
            row["speedup"] = 1.0
        elif not (b_low and a_low):
            row["speedup"] = b_mean / a_mean
            row["speedup_bound"] = ">=" if b_low else "<=" if a_low else ""
    return rows


# --- formatting -------------------------------------------------------------------------------------------

COLUMNS = ["arm", "final acc", "best acc", "steps to target", "speed-up", "gap acc", "run-mean err",
           "run-var err", "wall s", "diverged"]


def _pm(mean: float, std: float, digits: int) -> str:
    if not math.isfinite(mean):
        return ""
    if not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        steps = _pm(r["steps_to_target_mean"], r["steps_to_target_std"], 0)
        if steps:
            bound = "≥ " if r["steps_to_target_lower_bound"] else ""
            steps = f"{bound}{steps} ({r['reached']}/{r['completed'] + r['diverged']})"
        speed = ""
        if math.isfinite(r["speedup"]):
            speed = {">=": "≥ ", "<=": "≤ ", "": ""}[r["speedup_bound"]] + f"{r['speedup']:.1f}×"
        others = [f"{r[k]} {k}" for k in ("failed", "unfinished") if r[k]]
        diverged = f"{r['diverged']}/{r['runs']}" + (f" ({', '.join(others)})" if others else "")
        out.append([r["arm"], _pm(r["final_acc_mean"], r["final_acc_std"], 3),
                    _pm(r["best_acc_mean"], r["best_acc_std"], 3), steps, speed,
                    _pm(r["gap_accuracy_mean"], r["gap_accuracy_std"], 3),
                    _pm(r["running_mean_err_mean"], r["running_mean_err_std"], 3),
                    _pm(r["running_var_err_mean"], r["running_var_err_std"], 3),
                    _pm(r["wall_time_s_mean"], r["wall_time_s_std"], 1), diverged])
    return out


def print_table(rows: list[dict[str, Any]], title: str, notes: list[str] = ()) -> None:
    """The report's table on stderr: stdout's last line is kept for the comparison directory."""
    from rich.console import Console
    from rich.table import Table

    target = rows[0]["target_accuracy"] if rows else math.nan
    caption = None
    if math.isfinite(target):
        caption = f"steps to test accuracy {target:g} (runs that reached it); speed-up vs {rows[0]['baseline']}"
    table = Table(title=title, caption=caption)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "arm" else "right")
    for cells in format_rows(rows):
        table.add_row(*cells)
    console = Console(stderr=True)
    if not console.is_terminal:  # a log file or pipe: no terminal width to respect, keep rows on one line
        console = Console(stderr=True, width=200)
    console.print(table)
    for note in notes:
        console.print(note, highlight=False, soft_wrap=True)


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
    return buf.getvalue()


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def to_markdown(rows: list[dict[str, Any]], records: list[RunRecord], title: str, target: float | None,
                baseline: str | None, notes: list[str], plots: list[Path], root: Path) -> str:
    parts = [f"# Comparison: {title}", ""]
    parts += [f"- {n}" for n in notes]
    if target is not None:
        parts.append(f"- target accuracy {target:g}; speed-up against `{baseline}`")
    parts += ["", _md_table(COLUMNS, format_rows(rows)), "",
              "mean ± std over the runs that finished (completed or diverged; std is the sample standard "
              "deviation, blank for one run). Final and best accuracy are test accuracy in eval mode "
              "(running statistics); a diverged run counts with its final network. Steps to target: the "
              "first evaluated step whose test accuracy reaches the target, with (runs that reached it / "
              "runs); a run that never reaches it counts as its full step budget, so the mean is then a "
              "lower bound (≥). Speed-up: the baseline's mean steps to target over the arm's, blank when "
              "either mean is 0 (no ratio finer than the evaluation interval can be claimed). gap acc, "
              "run-mean err and run-var err are the final probe values of DESIGN.md §2 (blank without BN "
              "or probes).", ""]
    parts += ["## Runs", ""]
    body = []
    for r in records:
        acc, wall = _num(r.summary, "test_accuracy"), _num(r.summary, "wall_time_s")
        s = steps_to_target(r.metrics, target) if target is not None else None
        body.append([r.arm, "" if r.seed is None else str(r.seed), r.status + (f": {r.error}" if r.error else ""),
                     "" if math.isnan(acc) else f"{acc:.4f}", "" if s is None else str(s),
                     "" if math.isnan(wall) else f"{wall:.1f}", str(_rel(r.run_dir, root))])
    parts += [_md_table(["arm", "seed", "status", "final acc", "steps to target", "wall s", "run"], body), ""]
    if plots:
        parts += ["## Plots", ""]
        parts += [f"![{p.stem}]({_rel(p, root)})" for p in plots]
        parts.append("")
    return "\n".join(parts)


def _rel(path: Path, root: Path) -> Path:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return Path(path)


# --- plots ------------------------------------------------------------------------------------------------

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


def _plot_bands(ax, groups: dict[str, list[RunRecord]], get, colors) -> bool:
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


def write_plots(plot_dir: Path, records: list[RunRecord], arms: list[str], target: float | None,
                title: str) -> list[Path]:
    """Each plot is skipped when no run has its tags (e.g. probes off): returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {arm: [r for r in records if r.arm == arm and r.metrics] for arm in arms}
    groups = {a: rs for a, rs in groups.items() if rs}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {arm: cycle[i % len(cycle)] for i, arm in enumerate(arms)}
    written: list[Path] = []

    def save(fig, name: str) -> None:
        plot_dir.mkdir(parents=True, exist_ok=True)
        path = plot_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if _plot_bands(ax, groups, lambda r: _series(r, "test/accuracy"), colors):
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
    drew_mean = _plot_bands(axes[0], groups, lambda r: _layer_mean_series(r, "mean_err"), colors)
    drew_var = _plot_bands(axes[1], groups, lambda r: _layer_mean_series(r, "var_err"), colors)
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
    if _plot_bands(ax, groups, lambda r: _series(r, "gap/accuracy"), colors):
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set(xlabel="step", ylabel="acc(batch stats) − acc(running stats)",
               title="train/inference gap on the test set")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        save(fig, "gap.png")
    else:
        plt.close(fig)
    return written


def write_report(out_dir: Path, records: list[RunRecord], *, title: str, target: float | None,
                 baseline: str | None, arms: list[str], notes: list[str]) -> list[dict[str, Any]]:
    """summary.csv, plots/*.png and report.md in `out_dir`; returns the per-arm rows."""
    from bnexp.runs import write_atomic

    out_dir = Path(out_dir)
    rows = aggregate(records, arms, target, baseline)
    plots = write_plots(out_dir / "plots", records, arms, target, title)
    write_atomic(out_dir / "summary.csv", to_csv(rows))
    write_atomic(out_dir / "report.md", to_markdown(rows, records, title, target, baseline, notes, plots, out_dir))
    return rows
