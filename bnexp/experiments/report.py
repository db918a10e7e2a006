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
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bnexp.engine.rundir import FINISHED, write_atomic
from bnexp.experiments.plots import write_plots
from bnexp.experiments.records import RunRecord
from bnexp.experiments.sweeps import Points, write_sweep_plots
from bnexp.experiments.why_plots import write_why_plots



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
    return status not in FINISHED and status != "failed"


def aggregate(records: list[RunRecord], arms: list[str], target: float | None,
              baseline: str | None) -> list[dict[str, Any]]:
    """One row per arm, raw numbers (nan = not available); the keys are summary.csv's columns."""
    by_arm: dict[str, list[RunRecord]] = defaultdict(list)
    for rec in records:
        by_arm[rec.arm].append(rec)
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
                         ("running_var_err", "running_var_err"), ("wall_time_s", "wall_time_s"),
                         ("test_loss", "final_loss"), ("best_test_loss", "best_loss"), ("gap_loss", "gap_loss")):
            row[f"{col}_mean"], row[f"{col}_std"] = mean_std([_num(r.summary, key) for r in done])
        row["regression"] = bool(recs) and all(r.regression for r in recs)
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


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table's header: losses instead of accuracies when every arm is a regression task."""
    if rows and all(r["regression"] for r in rows):
        return ["arm", "final loss", "best loss", "steps to target", "speed-up", "gap loss", *COLUMNS[6:]]
    return COLUMNS


def _pm_sig(mean: float, std: float) -> str:
    """Losses span decades: 4 significant digits."""
    if not math.isfinite(mean):
        return ""
    return f"{mean:.4g}" if not math.isfinite(std) else f"{mean:.4g} ± {std:.2g}"


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
        if r["regression"]:
            metrics = [_pm_sig(r["final_loss_mean"], r["final_loss_std"]), _pm_sig(r["best_loss_mean"], r["best_loss_std"])]
            gap = _pm_sig(r["gap_loss_mean"], r["gap_loss_std"])
        else:
            metrics = [_pm(r["final_acc_mean"], r["final_acc_std"], 3), _pm(r["best_acc_mean"], r["best_acc_std"], 3)]
            gap = _pm(r["gap_accuracy_mean"], r["gap_accuracy_std"], 3)
        out.append([r["arm"], *metrics, steps, speed, gap,
                    _pm(r["running_mean_err_mean"], r["running_mean_err_std"], 3),
                    _pm(r["running_var_err_mean"], r["running_var_err_std"], 3),
                    _pm(r["wall_time_s_mean"], r["wall_time_s_std"], 1), diverged])
    return out


def table(rows: list[dict[str, Any]], title: str):
    """The report's table as a rich Table (the CLI prints it on stderr: stdout's last line is kept for
    the comparison directory)."""
    from rich.table import Table

    target = rows[0]["target_accuracy"] if rows else math.nan
    caption = None
    if math.isfinite(target):
        caption = f"steps to test accuracy {target:g} (runs that reached it); speed-up vs {rows[0]['baseline']}"
    out = Table(title=title, caption=caption)
    for col in columns(rows):
        out.add_column(col, justify="left" if col == "arm" else "right")
    for cells in format_rows(rows):
        out.add_row(*cells)
    return out


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
    parts += ["", _md_table(columns(rows), format_rows(rows)), "",
              "mean ± std over the runs that finished (completed or diverged; std is the sample standard "
              "deviation, blank for one run). Final and best accuracy are test accuracy in eval mode "
              "(running statistics); a diverged run counts with its final network. Steps to target: the "
              "first evaluated step whose test accuracy reaches the target, with (runs that reached it / "
              "runs); a run that never reaches it counts as its full step budget, so the mean is then a "
              "lower bound (≥). Speed-up: the baseline's mean steps to target over the arm's, blank when "
              "either mean is 0 (no ratio finer than the evaluation interval can be claimed). gap acc, "
              "run-mean err and run-var err are the final probe values of bnexp's docs/design.md §2 (blank without BN "
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


def write_report(out_dir: Path, records: list[RunRecord], *, title: str, target: float | None,
                 baseline: str | None, arms: list[str], notes: list[str],
                 points: Points | None = None) -> list[dict[str, Any]]:
    """summary.csv, plots/*.png and report.md in `out_dir`; returns the per-arm rows. `points`: each arm's
    declared arm and grid point, for the sweep plots of a grid."""
    out_dir = Path(out_dir)
    rows = aggregate(records, arms, target, baseline)
    plots = write_plots(out_dir / "plots", records, arms, target, title)
    plots += write_sweep_plots(out_dir / "plots", records, points, title)
    plots += write_why_plots(out_dir / "plots", records, arms, points)
    write_atomic(out_dir / "summary.csv", to_csv(rows))
    write_atomic(out_dir / "report.md", to_markdown(rows, records, title, target, baseline, notes, plots, out_dir))
    return rows
