"""The report's statistics over seeds, defined in docs/design.md ("Comparison reports").

Steps to target is measured only as finely as the evaluations and not at all for a run that never gets
there, so a run's value is an interval (lo, hi] holding the true one, and what is computed from such values
carries the interval along: a median, a speed-up, its bootstrap interval over seeds. A value whose
interval is a point is exact; one that could only be smaller is shown "≤", one that could only be larger
">" (or "≥" for a speed-up, whose ends are ratios).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bnexp.experiments.records import RunRecord

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # a report is a function of its runs: the same runs give the same interval
CONFIDENCE = 0.95
# Fewer runs than this on a side and the percentile bootstrap says no more than the range of single-run
# ratios (with 3 or fewer on each side its 2.5th and 97.5th percentiles are exactly the range's ends): the
# range is shown instead.
BOOTSTRAP_MIN_RUNS = 5


@dataclass(frozen=True)
class Bounded:
    """A value shown as `point`, known to lie between `lo` and `hi` (either may be infinite)."""

    point: float
    lo: float
    hi: float

    @staticmethod
    def exact(value: float) -> "Bounded":
        return Bounded(value, value, value)

    @property
    def kind(self) -> str:
        """"exact", "upper" (the true value is at most point), "lower" (at least point) or "unknown"."""
        if self.lo == self.hi:
            return "exact"
        if self.hi == self.point:
            return "upper"
        if self.lo == self.point:
            return "lower"
        return "unknown"


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (n − 1; nan for one value) and n of the finite values."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan
    return float(np.mean(vals)), std, len(vals)


# --- steps to target --------------------------------------------------------------------------------------

def first_reached(rec: RunRecord, target: float) -> tuple[int, int | None] | None:
    """(the first evaluated step whose test accuracy ≥ target, the evaluated step before it or None), over
    the run's evaluations (a diverged run's before it diverged); None if no evaluation reached it."""
    previous = None
    for step, acc in rec.evaluations("test/accuracy"):
        if acc >= target:
            return step, previous
        previous = step
    return None


def steps_to_target(rec: RunRecord, target: float) -> Bounded:
    """A finished run's steps to target as an interval:

    - reached at evaluated step s after an evaluation below target at step p > 0: s, exact at the
      evaluations' resolution (the convention: the first evaluated step);
    - reached at the first evaluation after initialization (p = 0, or no earlier evaluation): (0, s], an
      upper bound: the evaluations cannot tell how early;
    - reached at step 0: 0;
    - never reached, or diverged (reached or not: a diverged run does not keep the target): right-censored
      at its budget T (train.steps), (T, ∞).
    """
    budget = float(rec.budget if rec.budget is not None else rec.summary.get("steps") or 0)
    hit = None if rec.status == "diverged" else first_reached(rec, target)
    if hit is None:
        return Bounded(budget, budget, math.inf)
    step, previous = hit
    if step == 0:
        return Bounded.exact(0.0)
    if not previous:
        return Bounded(float(step), 0.0, float(step))
    return Bounded.exact(float(step))


def median(values: Sequence[Bounded]) -> Bounded:
    """The median of interval values: the median of their points, between the medians of their lower and of
    their upper ends (the median is monotone in every value)."""
    return Bounded(float(np.median([v.point for v in values])), float(np.median([v.lo for v in values])),
                   float(np.median([v.hi for v in values])))


def _ratio(num: float | np.ndarray, den: float | np.ndarray):
    """num / den with x / 0 = ∞ for x > 0 (a target reached at the first evaluation could be any earlier)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.true_divide(num, den)


def speedup(baseline: Sequence[Bounded], arm: Sequence[Bounded]) -> Bounded | None:
    """The baseline's median steps to target over the arm's, with its ends; None when a median is 0 (reached
    at step 0: no ratio) or when nothing is known about it (both sides censored the same way)."""
    b, a = median(baseline), median(arm)
    if b.point == 0 or a.point == 0:
        return None
    out = Bounded(b.point / a.point, float(_ratio(b.lo, a.hi)), float(_ratio(b.hi, a.lo)))
    return None if out.lo == 0 and out.hi == math.inf else out


def _bootstrap_ratio(base: np.ndarray, arm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The ratio of medians over BOOTSTRAP_RESAMPLES resamples, each side resampled with replacement on its
    own (the runs of two arms are independent)."""
    b = np.median(base[rng.integers(0, len(base), (BOOTSTRAP_RESAMPLES, len(base)))], axis=1)
    a = np.median(arm[rng.integers(0, len(arm), (BOOTSTRAP_RESAMPLES, len(arm)))], axis=1)
    return _ratio(b, a)


def speedup_interval(baseline: Sequence[Bounded], arm: Sequence[Bounded]) -> tuple[float, float] | None:
    """A 95 % percentile bootstrap interval of the speed-up over seeds (None with fewer than 2 runs a side).

    Conservative where values are bounds: the lower end is the 2.5th percentile with every value at the end
    that makes the ratio smallest (the baseline's lower ends, the arm's upper), the upper end the 97.5th
    with every value at the other end; with exact values both are the plain percentile interval. Seeded, so
    the same runs give the same interval."""
    if len(baseline) < 2 or len(arm) < 2:
        return None
    alpha = (1 - CONFIDENCE) / 2
    low = _bootstrap_ratio(np.array([v.lo for v in baseline]), np.array([v.hi for v in arm]),
                           np.random.default_rng(BOOTSTRAP_SEED))
    high = _bootstrap_ratio(np.array([v.hi for v in baseline]), np.array([v.lo for v in arm]),
                            np.random.default_rng(BOOTSTRAP_SEED))
    # 0 / 0 (a resample whose median reached the target at step 0) could be anything: the far end. Order
    # statistics, no interpolation: a resample's ratio may be infinite.
    low, high = np.where(np.isnan(low), 0.0, low), np.where(np.isnan(high), math.inf, high)
    return (float(np.quantile(low, alpha, method="inverted_cdf")),
            float(np.quantile(high, 1 - alpha, method="inverted_cdf")))


def speedup_range(baseline: Sequence[Bounded], arm: Sequence[Bounded]) -> tuple[float, float] | None:
    """The range of the speed-ups of single runs, a baseline run's steps over an arm run's: from the
    smallest (the baseline's lowest lower end over the arm's highest upper end) to the largest (highest
    upper end over lowest lower end); None with fewer than 2 runs a side."""
    if len(baseline) < 2 or len(arm) < 2:
        return None
    low = float(_ratio(min(v.lo for v in baseline), max(v.hi for v in arm)))
    high = float(_ratio(max(v.hi for v in baseline), min(v.lo for v in arm)))
    return (0.0 if math.isnan(low) else low), (math.inf if math.isnan(high) else high)


def speedup_spread(baseline: Sequence[Bounded], arm: Sequence[Bounded]) -> tuple[str, float, float] | None:
    """How far the speed-up could be over seeds: ("95% bootstrap", low, high), speedup_interval, with at
    least BOOTSTRAP_MIN_RUNS runs a side; ("range", low, high), speedup_range, with 2 to 4 on a side; None
    with fewer."""
    if min(len(baseline), len(arm)) >= BOOTSTRAP_MIN_RUNS:
        interval = speedup_interval(baseline, arm)
        return None if interval is None else ("95% bootstrap", *interval)
    spread = speedup_range(baseline, arm)
    return None if spread is None else ("range", *spread)


# --- curves over training ---------------------------------------------------------------------------------

def layer_mean_series(rec: RunRecord, prefix: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """`<prefix>/<layer>/<kind>` averaged over layers at every step that logged it (running_stats/*/mean_err)."""
    head, tail = f"{prefix}/", f"/{kind}"
    pts = []
    for row in rec.metrics:
        vals = [v for k, v in row.items() if k.startswith(head) and k.endswith(tail) and k.count("/") == 2
                and v is not None]
        if vals:
            pts.append((row["step"], float(np.mean(vals))))
    a = np.asarray(pts, dtype=float).reshape(-1, 2)
    return a[:, 0], a[:, 1]


def series(rec: RunRecord, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one logged tag; the row that records a divergence is not a value of any curve."""
    pts = [(row["step"], row[tag]) for row in rec.metrics
           if row.get(tag) is not None and "train/diverged" not in row]
    a = np.asarray(pts, dtype=float).reshape(-1, 2)
    return a[:, 0], a[:, 1]


@dataclass(frozen=True)
class TimeCourse:
    """A probe curve of one run summarized over training after initialization (step 0 left out: its value
    joined by a line to the first probe would weigh by the probe interval, not by the run): its value at the
    first probed step after 0 (early), at the probed step after 0 and before the last that is nearest half
    the run (middle), at the last (final), and its time average over the probed steps after 0 (the area
    under the curve by the trapezoid rule, divided by the steps spanned; the value itself when there is one
    such step). early and mid are None where they would repeat another column (the same step)."""

    early_step: int | None
    early: float | None
    mid_step: int | None
    mid: float | None
    final_step: int
    final: float
    average: float


def time_course(steps: np.ndarray, values: np.ndarray) -> TimeCourse | None:
    keep = np.isfinite(values) & (steps > 0)
    steps, values = steps[keep], values[keep]
    if len(steps) == 0:
        return None
    last = len(steps) - 1
    early = 0 if last > 0 else None  # the first probed step after 0, unless it is the last
    inner = np.arange(last)  # after 0 and strictly before the last
    mid = None
    if len(inner):
        mid = int(inner[np.argmin(np.abs(steps[inner] - steps[-1] / 2))])  # the earlier of two equally near
        if mid == early:
            mid = None
    if last:  # the trapezoid rule
        average = float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(steps))) / float(steps[-1] - steps[0])
    else:
        average = float(values[0])

    def at(i):
        return (None, None) if i is None else (int(steps[i]), float(values[i]))

    return TimeCourse(*at(early), *at(mid), int(steps[-1]), float(values[-1]), average)
