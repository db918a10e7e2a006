"""The comparison report: per-arm statistics over seeds, as a rich table, summary.csv, report.md and plots.

Everything is computed from each run's own files (summary.json, metrics.jsonl, config.yaml), so a report can
be rebuilt from run directories alone. The definitions (docs/design.md, "Comparison reports"; also written
into report.md):

- final and best accuracy (loss for a regression), the probes' final values and wall time: mean ± sample
  std over the arm's completed runs, n shown where values are missing. A diverged run stopped early: it is
  counted (diverged k/n) and not averaged with runs that trained their whole budget. "best" is the best
  evaluation, selected on the test set.
- steps to target: per run an interval (bnexp.experiments.stats.steps_to_target); per arm the median over
  its completed and diverged runs, with how many completed runs reached the target; a diverged run has not
  (it did not keep it), and "reached then diverged" is counted apart in summary.csv.
- speed-up: the baseline's median steps to target over the arm's, against the baseline of the arm's own
  architecture (`arm_baselines`), "≥"/"≤" when it is a bound, with how far it could be over seeds: a 95 %
  bootstrap interval from 5 runs a side, the range of single-run speed-ups with fewer.
- time course of each probe curve (running-statistic errors, the train/inference gap) over the completed
  runs: its value early, midway and at the end, and its mean over training after initialization.
- runs are counted as completed, diverged, failed (raised, or a damaged run directory) and unfinished
  (interrupted, still running, or never started).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from bnexp.engine.rundir import FINISHED, write_atomic
from bnexp.experiments import stats
from bnexp.experiments.plots import write_plots
from bnexp.experiments.records import RunRecord, number
from bnexp.experiments.sweeps import Points, write_sweep_plots
from bnexp.experiments.why_plots import write_why_plots

# Keys that differ between runs of one arm, or name a run, rather than describe its experiment.
_NOT_SETTINGS = ("seed", "name", "out_dir")
# (summary.csv's prefix, the probe curve: a tag, or a (prefix, kind) averaged over layers)
_CURVES = {"running_mean_err": ("running_stats", "mean_err"), "running_var_err": ("running_stats", "var_err"),
           "gap_accuracy": "gap/accuracy", "gap_loss": "gap/loss"}
_WHEN = ("early", "mid", "average")


# --- statistics -------------------------------------------------------------------------------------------

def _differences(a: Any, b: Any) -> int:
    """How many settings two configs (or parts of them) differ in."""
    if isinstance(a, dict) and isinstance(b, dict):
        return sum(_differences(a.get(key), b.get(key)) for key in set(a) | set(b))
    return int(a != b)


def arm_baselines(records: list[RunRecord], arms: list[str], baseline: str | None) -> dict[str, str | None]:
    """Each arm's baseline for its speed-up: the configured baseline when the arm's model.kind is the
    baseline's; else the arm of the arm's model.kind whose config differs from the baseline's in the fewest
    keys (seed and name aside; the first in the arm list on a tie), i.e. the baseline's settings on that
    architecture (mnist1d: `cnn_bn` against `cnn_no_bn`, not `mlp_no_bn`); None when there is none, and for
    an arm that is the only one of its model.kind (it would be compared with itself)."""
    configs: dict[str, RunRecord] = {}
    for rec in records:
        if rec.config and rec.arm not in configs:
            configs[rec.arm] = rec
    if baseline is None:
        return {arm: None for arm in arms}
    if baseline not in configs:
        return {arm: baseline for arm in arms}
    base = configs[baseline]

    def distance(arm: str) -> int:
        return _differences(*({k: v for k, v in c.items() if k not in _NOT_SETTINGS}
                              for c in (configs[arm].config, base.config)))

    out: dict[str, str | None] = {}
    for arm in arms:
        if arm not in configs or configs[arm].model_kind == base.model_kind:
            out[arm] = baseline
            continue
        same_kind = [a for a in arms if a in configs and configs[a].model_kind == configs[arm].model_kind]
        out[arm] = min(same_kind, key=lambda a: (distance(a), arms.index(a))) if len(same_kind) > 1 else None
    return out


def _curve(rec: RunRecord, curve) -> tuple[Any, Any]:
    if isinstance(curve, tuple):
        return stats.layer_mean_series(rec, *curve)
    return stats.series(rec, curve)


def _put(row: dict[str, Any], prefix: str, values: list[float]) -> None:
    row[f"{prefix}_mean"], row[f"{prefix}_std"], row[f"{prefix}_n"] = stats.mean_std(values)


def _common(values: list[int]) -> float:
    """The step every run shares, nan if they differ."""
    return float(values[0]) if values and len(set(values)) == 1 else math.nan


def aggregate(records: list[RunRecord], arms: list[str], target: float | None,
              baseline: str | None) -> list[dict[str, Any]]:
    """One row per arm, raw numbers (nan = not available); the keys are summary.csv's columns."""
    by_arm: dict[str, list[RunRecord]] = defaultdict(list)
    for rec in records:
        by_arm[rec.arm].append(rec)
    rows, steps = [], {}
    for arm in arms:
        recs = by_arm.get(arm, [])
        done = [r for r in recs if r.status == "completed"]
        finished = [r for r in recs if r.status in FINISHED]
        row: dict[str, Any] = {"arm": arm, "runs": len(recs), "completed": len(done),
                               "diverged": sum(r.status == "diverged" for r in recs),
                               "failed": sum(r.status == "failed" for r in recs),
                               "unfinished": sum(r.status not in FINISHED and r.status != "failed" for r in recs),
                               "regression": bool(recs) and all(r.regression for r in recs)}
        for metric, col in (("accuracy", "acc"), ("loss", "loss")):
            _put(row, f"final_{col}", [r.final(metric) for r in done])
            _put(row, f"best_{col}", [r.best(metric) for r in done])
        for key in ("gap_accuracy", "gap_loss", "running_mean_err", "running_var_err", "wall_time_s"):
            _put(row, key, [number(r.summary.get(key)) for r in done])
        for prefix, curve in _CURVES.items():
            courses = [c for r in done if (c := stats.time_course(*_curve(r, curve))) is not None]
            for when in _WHEN:
                if when != "average":  # None where it would repeat another column of that run
                    row[f"{prefix}_{when}_step"] = _common([getattr(c, f"{when}_step") for c in courses
                                                            if getattr(c, when) is not None])
                _put(row, f"{prefix}_{when}", [getattr(c, when) for c in courses])
        row["target_accuracy"] = target if target is not None else math.nan
        row["reached"] = row["reached_then_diverged"] = 0
        row["steps_to_target_median"] = row["steps_to_target_low"] = row["steps_to_target_high"] = math.nan
        row["steps_to_target_bound"] = ""
        if target is not None and finished:
            steps[arm] = [stats.steps_to_target(r, target) for r in finished]
            row["reached"] = sum(s.hi < math.inf for s in steps[arm])
            row["reached_then_diverged"] = sum(r.status == "diverged" and stats.first_reached(r, target) is not None
                                               for r in finished)
            med = stats.median(steps[arm])
            row["steps_to_target_median"], row["steps_to_target_low"], row["steps_to_target_high"] = \
                med.point, med.lo, med.hi
            row["steps_to_target_bound"] = {"exact": "", "upper": "<=", "lower": ">", "unknown": "?"}[med.kind]
        rows.append(row)
    bases = arm_baselines(records, arms, baseline)
    for row in rows:
        arm = row["arm"]
        row["baseline"] = bases.get(arm) or ""
        row["speedup"] = row["speedup_low"] = row["speedup_high"] = math.nan
        row["speedup_interval"] = ""
        row["speedup_interval_low"] = row["speedup_interval_high"] = math.nan
        row["speedup_bound"] = ""
        base = bases.get(arm)
        if base is None or arm not in steps or base not in steps:
            continue
        if arm == base:  # a baseline (of its architecture): as fast as itself; a median of 0 has no ratio
            ratio = stats.Bounded.exact(1.0) if stats.median(steps[arm]).point > 0 else None
        else:
            ratio = stats.speedup(steps[base], steps[arm])
        if ratio is None:
            continue
        row["speedup"], row["speedup_low"], row["speedup_high"] = ratio.point, ratio.lo, ratio.hi
        row["speedup_bound"] = {"exact": "", "upper": "<=", "lower": ">=", "unknown": "?"}[ratio.kind]
        spread = None if arm == base else stats.speedup_spread(steps[base], steps[arm])
        if spread is not None:
            row["speedup_interval"], row["speedup_interval_low"], row["speedup_interval_high"] = spread
    return rows


# --- formatting -------------------------------------------------------------------------------------------

_BOUND_MARK = {"exact": "", "upper": "≤ ", "lower": "> ", "unknown": ""}


def _pm(row: dict[str, Any], prefix: str, digits: int | None = 3) -> str:
    """mean ± std (digits decimals, or 4 significant digits when None: losses span decades), "(n=k)" when
    fewer values than completed runs."""
    mean, std, n = row[f"{prefix}_mean"], row[f"{prefix}_std"], row[f"{prefix}_n"]
    if not n:
        return ""
    if digits is None:
        mean_text, std_text = f"{mean:.4g}", f"{std:.2g}"
    else:
        mean_text, std_text = f"{mean:.{digits}f}", f"{std:.{digits}f}"
    text = f"{mean_text} ± {std_text}" if math.isfinite(std) else mean_text
    return text + (f" (n={n})" if n < row["completed"] else "")


def _times(x: float) -> str:
    """A ratio: 117×, 22.0×, 5.3×, 0.83×."""
    if x == math.inf:
        return "∞"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def steps_cell(row: dict[str, Any]) -> str:
    if not math.isfinite(row["steps_to_target_median"]):
        return ""
    finished = row["completed"] + row["diverged"]
    point, lo, hi = row["steps_to_target_median"], row["steps_to_target_low"], row["steps_to_target_high"]
    kind = stats.Bounded(point, lo, hi).kind
    value = (f"{lo:.0f}–{'∞' if hi == math.inf else f'{hi:.0f}'}" if kind == "unknown"
             else f"{_BOUND_MARK[kind]}{point:.0f}")
    return f"{value} ({row['reached']}/{finished})"


def speedup_cell(row: dict[str, Any], interval: bool = True, name_range: bool = False) -> str:
    """The speed-up, with its interval in brackets ("[range a–b]" when `name_range` and it is a range: a
    table whose header cannot say which)."""
    if not math.isfinite(row["speedup"]):
        return ""
    bound = row["speedup_bound"]
    if bound == "?":
        value = f"{_times(row['speedup_low'])}–{_times(row['speedup_high'])}×"
    else:
        value = {">=": "≥ ", "<=": "≤ ", "": ""}[bound] + f"{_times(row['speedup'])}×"
    if interval and row["speedup_interval"]:
        label = "range " if name_range and row["speedup_interval"] == "range" else ""
        value += f" [{label}{_times(row['speedup_interval_low'])}–{_times(row['speedup_interval_high'])}]"
    return value


def _vs_cell(row: dict[str, Any]) -> str:
    """The arm the speed-up is against; "—" when there is none (the only arm of its architecture)."""
    if not row["baseline"]:
        return "—"
    return row["baseline"] if math.isfinite(row["speedup"]) else ""


def diverged_cell(row: dict[str, Any]) -> str:
    others = [f"{row[k]} {k}" for k in ("failed", "unfinished") if row[k]]
    if row["reached_then_diverged"]:
        others.insert(0, f"{row['reached_then_diverged']} after reaching the target")
    return f"{row['diverged']}/{row['runs']}" + (f" ({', '.join(others)})" if others else "")


def _regression(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and all(r["regression"] for r in rows)


def _has(rows: list[dict[str, Any]], cell) -> bool:
    return any(cell(r) for r in rows)


def _columns(rows: list[dict[str, Any]], full: bool) -> list[tuple[str, Any]]:
    """(header, cell of a row) of the table: every column in report.md (`full`), the ones that carry the
    comparison in the terminal (a target's steps and speed-up, or without one the probes' final values)."""
    target = rows[0]["target_accuracy"] if rows else math.nan
    reg = _regression(rows)
    metric, col = ("loss", "loss") if reg else ("acc", "acc")
    digits = None if reg else 3
    cols: list[tuple[str, Any]] = [
        ("arm", lambda r: r["arm"]), ("n", lambda r: str(r["completed"])),
        (f"final {metric}", lambda r: _pm(r, f"final_{col}", digits)),
        (f"best {metric}†", lambda r: _pm(r, f"best_{col}", digits))]
    if math.isfinite(target):
        kinds = {r["speedup_interval"] for r in rows} - {""}
        header = {frozenset(): "speed-up", frozenset({"range"}): "speed-up [range]"}.get(
            frozenset(kinds), "speed-up [95% CI]")
        cols += [(f"steps to {target:g}", steps_cell),
                 (header, lambda r: speedup_cell(r, name_range=len(kinds) > 1))]
        if full or len({r["baseline"] for r in rows}) > 1:
            cols.append(("vs", _vs_cell))
    gap = "gap_loss" if reg else "gap_accuracy"
    probes = [(f"gap {metric}", lambda r: _pm(r, gap, digits)),
              ("run-mean err", lambda r: _pm(r, "running_mean_err")),
              ("run-var err", lambda r: _pm(r, "running_var_err"))]
    if full:
        cols += probes + [("wall s", lambda r: _pm(r, "wall_time_s", 1))]
    elif not math.isfinite(target):
        cols += [c for c in probes if _has(rows, c[1])]
    cols.append(("diverged", diverged_cell))
    return cols


def columns(rows: list[dict[str, Any]], full: bool = True) -> list[str]:
    return [header for header, _ in _columns(rows, full)]


def format_rows(rows: list[dict[str, Any]], full: bool = True) -> list[list[str]]:
    cols = _columns(rows, full)
    return [[cell(r) for _, cell in cols] for r in rows]


def legend(rows: list[dict[str, Any]]) -> list[str]:
    """What the table's columns mean, a sentence each (the terminal's caption, report.md's notes)."""
    reg = _regression(rows)
    metric = "test loss" if reg else "test accuracy"
    out = [f"n: completed runs; final and best {metric}: mean ± std over them (n=k where values are missing); "
           f"a diverged run is counted in 'diverged', not averaged. † best: the best evaluation, selected on "
           f"the test set (optimistic)."]
    target = rows[0]["target_accuracy"] if rows else math.nan
    if math.isfinite(target):
        bases = {r["baseline"] for r in rows if r["baseline"]}
        against = f"vs {bases.pop()}" if len(bases) == 1 else "vs the baseline of the arm's architecture"
        kinds = {r["speedup_interval"] for r in rows}
        spread = []
        if "95% bootstrap" in kinds:
            spread.append(f"[95% CI]: a 95 % bootstrap interval over seeds ({stats.BOOTSTRAP_MIN_RUNS} runs or "
                          f"more a side)")
        if "range" in kinds:
            spread.append(f"[range]: with fewer than {stats.BOOTSTRAP_MIN_RUNS} runs on a side, the range of the "
                          f"speed-ups of single runs (a baseline run's steps / an arm run's), not a confidence "
                          f"interval")
        out.append(f"steps to {target:g}: median over completed and diverged runs (reached/runs; a diverged run "
                   f"has not reached it); ≤ reached at the first evaluation, > not reached within the budget. "
                   f"speed-up: baseline's median steps / the arm's, {against}; ≥/≤ when bounded"
                   + "".join(f"; {x}" for x in spread) + ".")
        if any(not r["baseline"] for r in rows):
            out.append("vs —: no other arm of its architecture (model.kind) to compare with: no speed-up.")
    return out


class _Table:
    """The terminal's table, laid out for the console it is printed on (rich asks with its width)."""

    ARM_MIN = 12  # an arm name longer than the space left wraps, at no fewer characters than this

    def __init__(self, rows: list[dict[str, Any]], title: str):
        self.title, self.legend = title, legend(rows)
        self.headers, self.body = columns(rows, full=False), format_rows(rows, full=False)

    def widths(self, width: int) -> list[int]:
        """Each column's width within `width`: as wide as its cells; when that is too wide, headers wrap
        first, then arm names (anywhere, down to ARM_MIN), then the cells of numbers that save most (at
        their spaces, into the parts _BREAK keeps whole)."""
        from rich.cells import cell_len

        cols = list(zip(self.headers, *self.body))
        content = [max(cell_len(c) for c in col[1:]) if len(col) > 1 else 0 for col in cols]
        natural = [max(cell_len(h), c) for h, c in zip(self.headers, content)]
        # A cell of numbers wraps into its parts: "mean ±" over "std", a value over its "[interval]" or
        # "(reached/runs)".
        parts = [max((cell_len(p) for cell in col[1:] for p in _BREAK.split(cell)), default=0) for col in cols]
        header_words = [max(cell_len(w) for w in (_BREAK.split(h) if _BREAK.search(h) else h.split()))
                        for h in self.headers]
        unwrapped = [max(c, hw) for c, hw in zip(content, header_words)]
        least = [min(n, self.ARM_MIN) if h == "arm" else n if h in _NO_WRAP else max(p, hw)
                 for h, n, p, hw in zip(self.headers, natural, parts, header_words)]
        budget = width - 2 * len(cols) + 1  # one space of padding after each column, one between them
        out = natural if sum(natural) <= budget else unwrapped
        arm = self.headers.index("arm")
        # Arm names first, then the cells of numbers that save most; a cell that wraps takes two lines
        # whatever its width, so it goes to its least and what it frees goes back to the names.
        for i in [arm, *sorted((i for i in range(len(cols)) if i != arm), key=lambda i: least[i] - out[i])]:
            excess = sum(out) - budget
            if excess <= 0:
                break
            out[i] = max(least[i], out[i] - excess) if i == arm else least[i]
        out[arm] = min(natural[arm], out[arm] + max(0, budget - sum(out)))
        return out

    def __rich_console__(self, console, options):
        from rich import box
        from rich.cells import cell_len
        from rich.table import Table
        from rich.text import Text

        # Text, not str: rich would read "[range]" in a header or the legend as markup and drop it.
        out = Table(title=self.title, caption=Text("\n".join(self.legend)), box=box.SIMPLE_HEAD,
                    caption_justify="left", show_edge=False, padding=(0, 1, 0, 0))
        for header, width in zip(self.headers, self.widths(options.max_width)):
            shown = "\n".join(_BREAK.split(header)) if cell_len(header) > width else header  # "speed-up" over "[range]"
            out.add_column(Text(shown), justify="left" if header == "arm" else "right", width=width,
                           overflow="fold", no_wrap=header in _NO_WRAP)
        for cells in self.body:
            out.add_row(*(Text(c) for c in cells))
        yield out


_NO_WRAP = ("n", "vs", "diverged")
_BREAK = re.compile(r"(?<=±) | (?=[\[(])")


def table(rows: list[dict[str, Any]], title: str) -> _Table:
    """The comparison's table for the terminal, a rich renderable: the columns that carry the comparison
    (report.md and summary.csv have them all), laid out for the console's width (at 100 columns every
    cell on one line but the longest arm names); nothing is cut."""
    return _Table(rows, title)


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    return buf.getvalue()


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


_CURVE_NAMES = {"running_mean_err": "run-mean err", "running_var_err": "run-var err", "gap_accuracy": "gap acc",
                "gap_loss": "gap loss"}


def time_course_table(rows: list[dict[str, Any]]) -> str:
    """Each probe curve early, midway, at the end and on average over training (empty without probes)."""
    parts = []
    for prefix, name in _CURVE_NAMES.items():
        if not any(r[f"{prefix}_average_n"] for r in rows):
            continue
        digits = None if prefix == "gap_loss" else 3
        header, keys = ["arm"], []
        for when in ("early", "mid"):  # a column no run has (it would repeat another) is left out
            steps = {r[f"{prefix}_{when}_step"] for r in rows if r[f"{prefix}_{when}_n"]}
            if not steps:
                continue
            shared = steps.pop() if len(steps) == 1 else math.nan
            header.append(f"step {shared:.0f}" if math.isfinite(shared) else when)
            keys.append(f"{prefix}_{when}")
        header += ["final", "average over training"]
        body = [[r["arm"], *(_pm(r, key, digits) for key in (*keys, prefix, f"{prefix}_average"))]
                for r in rows if r[f"{prefix}_average_n"]]
        parts += [f"**{name}**", "", _md_table(header, body), ""]
    return "\n".join(parts)


def _rel(path: Path, root: Path) -> Path:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return Path(path)


def _run_cells(rec: RunRecord, target: float | None) -> list[str]:
    metric = "loss" if rec.regression else "accuracy"
    final, best, wall = rec.final(metric), rec.best(metric), number(rec.summary.get("wall_time_s"))
    status = rec.status + (f": {rec.error}" if rec.error else "")
    if rec.diverged_step is not None:
        status += f" at step {rec.diverged_step}"
    steps = ""
    if target is not None and rec.status in FINISHED:
        s = stats.steps_to_target(rec, target)
        steps = f"{_BOUND_MARK[s.kind]}{s.point:.0f}"
        hit = stats.first_reached(rec, target) if rec.status == "diverged" else None
        if hit is not None:
            steps += f" (reached at {hit[0]}, then diverged)"
    num = (lambda v: "" if math.isnan(v) else f"{v:.4g}") if rec.regression else \
        (lambda v: "" if math.isnan(v) else f"{v:.4f}")
    return [rec.arm, "" if rec.seed is None else str(rec.seed), status, num(final), num(best), steps,
            "" if math.isnan(wall) else f"{wall:.1f}"]


def to_markdown(rows: list[dict[str, Any]], records: list[RunRecord], title: str, target: float | None,
                baseline: str | None, notes: list[str], plots: list[Path], root: Path) -> str:
    parts = [f"# Comparison: {title}", ""]
    parts += [f"- {n}" for n in notes]
    if target is not None:
        parts.append(f"- target accuracy {target:g}; speed-up against `{baseline}`, or for an arm of another "
                     f"architecture (model.kind) the arm of its own that is nearest to it (column vs)")
    parts += ["", _md_table(columns(rows), format_rows(rows)), ""]
    parts += [" ".join(legend(rows)) + " gap, run-mean err and run-var err are the final probe values of "
              "bnexp's docs/design.md §2 (blank without BN or probes); wall s: training wall time.", ""]
    course = time_course_table(rows)
    if course:
        parts += ["## Over training", "",
                  "Probe curves of the completed runs (mean ± std over seeds): at the first probed step after "
                  "initialization, at the probed step nearest half the run (before the last; left out where it "
                  "would repeat another column), at the end, and their mean over training after initialization "
                  "(area under the curve by the trapezoid rule over the probed steps after step 0 / steps "
                  "spanned). What a final value hides shows here: a slow running average lags early and catches "
                  "up by the end.", "", course]
    parts += ["## Runs", ""]
    body = [_run_cells(r, target) + [str(_rel(r.run_dir, root))] for r in records]
    metric = "loss" if records and all(r.regression for r in records) else "acc"
    parts += [_md_table(["arm", "seed", "status", f"final {metric}", f"best {metric}†", "steps to target",
                         "wall s", "run"], body), "",
              "A diverged run's final and best are over its evaluations before it diverged.", ""]
    if plots:
        parts += ["## Plots", ""]
        for p in plots:
            vector = p.with_suffix(".svg")
            link = f" ([SVG]({_rel(vector, root)}))" if vector.is_file() else ""
            parts.append(f"![{p.stem}]({_rel(p, root)}){link}")
        parts.append("")
    return "\n".join(parts)


def write_report(out_dir: Path, records: list[RunRecord], *, title: str, target: float | None,
                 baseline: str | None, arms: list[str], notes: list[str],
                 points: Points | None = None) -> list[dict[str, Any]]:
    """summary.csv, plots/*.png and .svg and report.md in `out_dir`; returns the per-arm rows. `points`:
    each arm's declared arm and grid point, for the sweep plots of a grid."""
    out_dir = Path(out_dir)
    rows = aggregate(records, arms, target, baseline)
    plots = write_plots(out_dir / "plots", records, arms, target, title, points)
    plots += write_sweep_plots(out_dir / "plots", records, points, title, arms)
    plots += write_why_plots(out_dir / "plots", records, arms, points, title)
    write_atomic(out_dir / "summary.csv", to_csv(rows))
    write_atomic(out_dir / "report.md", to_markdown(rows, records, title, target, baseline, notes, plots, out_dir))
    return rows
