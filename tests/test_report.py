"""The comparison report's statistics, on runs whose numbers are known (docs/design.md, "Comparison reports"):
steps to target as bounds, censored and diverged runs, medians, speed-ups with their bootstrap interval,
per-architecture baselines, time courses, n where values are missing, and the terminal table's width."""

from __future__ import annotations

import csv
import io
import itertools
import math
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from bnexp.experiments import report, stats
from bnexp.experiments.records import RunRecord

TARGET = 0.9


def run(arm: str, seed: int, reach: int | None, *, every: int = 50, budget: int = 1000, diverged: int | None = None,
        config: dict | None = None, summary: dict | None = None, rows: dict[int, dict] | None = None) -> RunRecord:
    """A run evaluated every `every` steps: test accuracy 0.5 before step `reach`, 0.95 from it (never when
    None), up to its budget or the step it diverged at; `rows` adds tags to the rows of some steps."""
    end = budget if diverged is None else diverged - 1
    evals = {s: (0.95 if reach is not None and s >= reach else 0.5) for s in range(0, end + 1, every)}
    metrics = [{"step": s, "test/accuracy": a, "test/loss": 1.0 - a, **(rows or {}).get(s, {})}
               for s, a in evals.items()]
    for s, extra in (rows or {}).items():
        if s not in evals:
            metrics.append({"step": s, **extra})
    metrics.sort(key=lambda r: r["step"])
    status = "completed" if diverged is None else "diverged"
    if diverged is not None:
        metrics.append({"step": diverged, "train/diverged": 1.0, "train/loss": 40.0})
    base = {"status": status, "test_accuracy": list(evals.values())[-1], "best_test_accuracy": max(evals.values()),
            "wall_time_s": 1.0, **({"diverged_step": diverged, "steps": diverged} if diverged else {})}
    return RunRecord(arm, seed, Path(f"/x/{arm}/s{seed}"), status, {**base, **(summary or {})}, metrics, budget,
                     config=config or {})


def rows_by_arm(records, arms, baseline, target=TARGET):
    return {r["arm"]: r for r in report.aggregate(records, arms, target, baseline)}


# --- steps to target ----------------------------------------------------------------------------------------

def test_steps_to_target_of_a_run_is_exact_a_bound_or_censored():
    assert stats.steps_to_target(run("a", 0, 300), TARGET) == stats.Bounded(300, 300, 300)
    # Passed at the first evaluation after initialization: anywhere in (0, 50].
    first = stats.steps_to_target(run("a", 0, 50), TARGET)
    assert (first.point, first.lo, first.hi, first.kind) == (50, 0, 50, "upper")
    assert stats.steps_to_target(run("a", 0, 0), TARGET) == stats.Bounded(0, 0, 0)
    never = stats.steps_to_target(run("a", 0, None, budget=800), TARGET)
    assert (never.point, never.lo, never.hi, never.kind) == (800, 800, math.inf, "lower")
    # Reached at 100, diverged at 420: it did not keep the target, so it is censored like a run that never
    # reached it; first_reached still says when it got there.
    gone = run("a", 0, 100, diverged=420)
    assert stats.steps_to_target(gone, TARGET) == stats.Bounded(1000, 1000, math.inf)
    assert stats.first_reached(gone, TARGET) == (100, 50)


def test_a_median_over_bounded_values_keeps_their_bounds():
    exact = stats.Bounded.exact
    assert stats.median([exact(100), exact(300), exact(200)]) == exact(200)
    # One censored run of three does not reach the median; two do.
    assert stats.median([exact(100), exact(200), stats.Bounded(1000, 1000, math.inf)]).kind == "exact"
    two_out = stats.median([exact(100), stats.Bounded(1000, 1000, math.inf), stats.Bounded(1000, 1000, math.inf)])
    assert (two_out.point, two_out.kind) == (1000, "lower")
    bound = stats.median([stats.Bounded(50, 0, 50)] * 2 + [exact(300)])
    assert (bound.point, bound.lo, bound.kind) == (50, 0, "upper")


def test_speedup_is_marked_as_a_bound_when_it_comes_from_one():
    recs = [*(run("base", s, r) for s, r in enumerate((800, 850, 900))),
            *(run("first", s, 50) for s in range(3)),          # at the first evaluation: ≤ 50
            *(run("slow", s, None) for s in range(3)),         # never: > 1000
            *(run("mid", s, r) for s, r in enumerate((200, 300, 400)))]
    rows = rows_by_arm(recs, ["base", "first", "slow", "mid"], "base")
    assert rows["first"]["speedup"] == pytest.approx(850 / 50) and rows["first"]["speedup_bound"] == ">="
    assert rows["first"]["speedup_high"] == math.inf
    assert report.speedup_cell(rows["first"], interval=False) == "≥ 17.0×"
    assert report.steps_cell(rows["first"]) == "≤ 50 (3/3)"
    assert rows["slow"]["speedup"] == pytest.approx(850 / 1000) and rows["slow"]["speedup_bound"] == "<="
    assert report.steps_cell(rows["slow"]) == "> 1000 (0/3)"
    assert rows["mid"]["speedup"] == pytest.approx(850 / 300) and rows["mid"]["speedup_bound"] == ""
    assert rows["base"]["speedup"] == 1.0 and math.isnan(rows["base"]["speedup_interval_low"])

    # Against a baseline that never reaches the target: ≥ for an arm that does, nothing for one that doesn't.
    rows = rows_by_arm(recs, ["slow", "mid", "first"], "slow")
    assert rows["mid"]["speedup"] == pytest.approx(1000 / 300) and rows["mid"]["speedup_bound"] == ">="
    both_never = rows_by_arm([*recs, *(run("never", s, None) for s in range(3))], ["slow", "never"], "slow")
    assert math.isnan(both_never["never"]["speedup"]) and both_never["slow"]["speedup"] == 1.0


def test_no_speedup_when_the_target_is_reached_at_step_0():
    recs = [run("a", 0, 0), run("b", 0, 0), run("c", 0, 100)]
    rows = rows_by_arm(recs, ["a", "b", "c"], "a")
    assert rows["a"]["steps_to_target_median"] == 0 and rows["c"]["steps_to_target_median"] == 100
    assert all(math.isnan(r["speedup"]) for r in rows.values())
    rows = rows_by_arm(recs, ["c", "a"], "c")
    assert math.isnan(rows["a"]["speedup"]) and rows["c"]["speedup"] == 1.0


# --- the bootstrap interval ---------------------------------------------------------------------------------

def _median_pmf(values: list[float]) -> Counter:
    """The exact distribution of the median of n draws with replacement from `values`."""
    pmf: Counter = Counter()
    for draw in itertools.product(values, repeat=len(values)):
        pmf[statistics.median(draw)] += 1 / len(values) ** len(values)
    return pmf


def _exact_interval(base: list[float], arm: list[float]) -> tuple[float, float, float]:
    """The percentile interval of the exact bootstrap distribution of median(base) / median(arm), and how
    far the CDF stays from 2.5 % and 97.5 % around its ends (Monte Carlo lands on the same atoms when far)."""
    ratio: Counter = Counter()
    for (b, pb), (a, pa) in itertools.product(_median_pmf(base).items(), _median_pmf(arm).items()):
        ratio[b / a] += pb * pa
    atoms = sorted(ratio)
    cdf = np.cumsum([ratio[x] for x in atoms])
    lo, hi = int(np.searchsorted(cdf, 0.025)), int(np.searchsorted(cdf, 0.975))
    margin = min(cdf[lo] - 0.025, 0.025 - (cdf[lo - 1] if lo else 0.0), cdf[hi] - 0.975, 0.975 - cdf[hi - 1])
    return atoms[lo], atoms[hi], margin


def test_bootstrap_interval_of_the_speedup_matches_the_exact_bootstrap_and_scipy():
    from scipy.stats import bootstrap

    base_steps, arm_steps = [300, 450, 500, 700, 900], [100, 150, 150, 250, 400]
    recs = [*(run("base", s, r) for s, r in enumerate(base_steps)), *(run("bn", s, r) for s, r in enumerate(arm_steps))]
    row = rows_by_arm(recs, ["base", "bn"], "base")["bn"]
    assert row["speedup"] == pytest.approx(500 / 150)
    low, high, margin = _exact_interval(base_steps, arm_steps)
    assert margin > 0.006  # ~4 Monte Carlo standard errors at 10,000 resamples
    assert (row["speedup_interval_low"], row["speedup_interval_high"]) == pytest.approx((low, high))
    ref = bootstrap((np.array(base_steps, float), np.array(arm_steps, float)),
                    lambda b, a, axis: np.median(b, axis=axis) / np.median(a, axis=axis), vectorized=True,
                    paired=False, method="percentile", n_resamples=10_000, rng=np.random.default_rng(1))
    assert (row["speedup_interval_low"], row["speedup_interval_high"]) == pytest.approx(
        (ref.confidence_interval.low, ref.confidence_interval.high))
    # Deterministic: the same runs give the same interval.
    again = rows_by_arm(recs, ["base", "bn"], "base")["bn"]
    assert [again[k] for k in ("speedup_interval_low", "speedup_interval_high")] == \
        [row[k] for k in ("speedup_interval_low", "speedup_interval_high")]
    assert report.speedup_cell(row) == f"{500 / 150:.1f}× [{low:.1f}–{high:.1f}]"


def test_bootstrap_interval_is_open_where_a_resample_could_be_a_bound():
    # One run passed the target at its first evaluation (≤ 50): the median is exact (100), but a resample
    # of it three times has a median anywhere in (0, 50], so the interval has no upper end; its lower end is
    # the exact bootstrap's with that run at 50.
    base_steps, arm_steps = [500, 600, 700, 800, 900], [50, 100, 150, 200, 250]
    recs = [*(run("base", s, r) for s, r in enumerate(base_steps)),
            *(run("bn", s, r) for s, r in enumerate(arm_steps))]
    row = rows_by_arm(recs, ["base", "bn"], "base")["bn"]
    assert row["speedup"] == pytest.approx(700 / 150) and row["speedup_bound"] == ""
    low, _, margin = _exact_interval(base_steps, arm_steps)
    assert margin > 0.006
    assert row["speedup_interval"] == "95% bootstrap"
    assert row["speedup_interval_low"] == pytest.approx(low) and row["speedup_interval_high"] == math.inf
    assert report.speedup_cell(row).endswith("–∞]")


def test_with_fewer_than_5_runs_a_side_the_interval_is_the_range_and_says_so():
    # With 3 runs a side the bootstrap's 2.5th and 97.5th percentiles are the smallest and the largest
    # single-run ratio: the range, which the report then calls by its name.
    base_steps, arm_steps = [600, 700, 800], [100, 150, 200]
    low, high, _ = _exact_interval(base_steps, arm_steps)
    assert (low, high) == (600 / 200, 800 / 100)
    recs = [*(run("base", s, r) for s, r in enumerate(base_steps)),
            *(run("bn", s, r) for s, r in enumerate(arm_steps))]
    rows = rows_by_arm(recs, ["base", "bn"], "base")
    row = rows["bn"]
    assert (row["speedup_interval"], row["speedup_interval_low"], row["speedup_interval_high"]) == (
        "range", 3.0, 8.0)
    assert report.speedup_cell(row) == "4.7× [3.0–8.0]"
    assert "speed-up [range]" in report.columns(list(rows.values()))
    legend = " ".join(report.legend(list(rows.values())))
    assert "[range]: with fewer than 5 runs on a side, the range of the speed-ups of single runs" in legend
    assert "95 %" not in legend
    # A bound widens it: a run at its first evaluation (≤ 50) could be any faster.
    recs[3] = run("bn", 0, 50)
    row = rows_by_arm(recs, ["base", "bn"], "base")["bn"]
    assert (row["speedup_interval_low"], row["speedup_interval_high"]) == (3.0, math.inf)
    # 4 runs a side: still the range; 5 on one side and 4 on the other: still the range.
    recs = [*(run("base", s, r) for s, r in enumerate((600, 700, 800, 900, 1000))),
            *(run("bn", s, r) for s, r in enumerate((100, 150, 200, 250)))]
    row = rows_by_arm(recs, ["base", "bn"], "base")["bn"]
    assert (row["speedup_interval"], row["speedup_interval_low"], row["speedup_interval_high"]) == (
        "range", 600 / 250, 10.0)
    # A table with both kinds names the range in its cells.
    recs += [*(run("mix", s, r) for s, r in enumerate((100, 150, 200, 250, 300)))]
    recs = [r for r in recs if r.arm != "bn"] + [run("bn", s, r) for s, r in enumerate((100, 150))]
    rows = list(rows_by_arm(recs, ["base", "mix", "bn"], "base").values())
    assert report.columns(rows)[5] == "speed-up [95% CI]"
    cells = {r[0]: r[5] for r in report.format_rows(rows)}
    assert cells["bn"] == "6.4× [range 4.0–10.0]" and "range" not in cells["mix"]


def test_no_interval_from_a_single_run():
    recs = [run("base", 0, 500), run("base", 1, 600), run("bn", 0, 100)]
    row = rows_by_arm(recs, ["base", "bn"], "base")["bn"]
    assert row["speedup"] == pytest.approx(5.5) and math.isnan(row["speedup_interval_low"])
    assert report.speedup_cell(row) == "5.5×"


# --- diverged, failed and unfinished runs; n ----------------------------------------------------------------

def test_diverged_runs_are_counted_not_averaged_and_do_not_count_as_reaching_the_target():
    recs = [run("hot", 0, 100, summary={"test_accuracy": 0.97, "best_test_accuracy": 0.98}),
            run("hot", 1, 100, diverged=400),    # reached the target at 100, then diverged
            run("hot", 2, None, diverged=150)]
    row = report.aggregate(recs, ["hot"], TARGET, "hot")[0]
    assert (row["runs"], row["completed"], row["diverged"]) == (3, 1, 2)
    assert (row["final_acc_mean"], row["final_acc_n"], row["best_acc_mean"]) == (0.97, 1, 0.98)
    assert math.isnan(row["final_acc_std"])
    assert row["reached"] == 1 and row["reached_then_diverged"] == 1
    # Steps: 100, > 1000, > 1000: the median is censored.
    assert (row["steps_to_target_median"], row["steps_to_target_bound"]) == (1000, ">")
    assert report.steps_cell(row) == "> 1000 (1/3)"
    assert report.diverged_cell(row) == "2/3 (1 after reaching the target)"


def test_a_diverged_runs_final_and_best_are_over_its_evaluations_before_divergence():
    # The engine's summary of a diverged run: test_accuracy of the network it stopped with (past the
    # diverged step), best over the evaluations (before it): "best below final".
    rec = run("a", 0, None, diverged=180, summary={"test_accuracy": 0.194, "best_test_accuracy": 0.138},
              rows={s: {"test/accuracy": a} for s, a in ((0, 0.1), (50, 0.138), (100, 0.11), (150, 0.12))})
    rec.metrics.insert(-1, {"step": 200, "test/accuracy": 0.3})  # after the diverged step: not the run's
    assert rec.final() == 0.12 and rec.best() == 0.138 >= rec.final()
    text = report.to_markdown(report.aggregate([rec], ["a"], TARGET, "a"), [rec], "t", TARGET, "a", [], [],
                              Path("/x"))
    assert "| a | 0 | diverged at step 180 | 0.1200 | 0.1380 | > 1000 |" in text


def test_failed_and_unfinished_runs_are_counted_and_n_shows_missing_values():
    recs = [run("a", 0, 100, summary={"gap_accuracy": 0.01, "test_accuracy": 0.9}),
            run("a", 1, 100, summary={"gap_accuracy": 0.03, "test_accuracy": 0.8}),
            run("a", 2, 100, summary={"test_accuracy": 0.85}),  # no gap value
            RunRecord("a", 3, Path("/x/a/s3"), "interrupted", {"status": "interrupted", "test_accuracy": 0.0}),
            RunRecord("a", 4, Path("/x/a/s4"), "failed", error="boom")]
    (row,) = report.aggregate(recs, ["a"], None, "a")
    assert (row["runs"], row["completed"], row["failed"], row["unfinished"]) == (5, 3, 1, 1)
    assert row["final_acc_mean"] == pytest.approx(statistics.mean([0.9, 0.8, 0.85]))
    assert row["final_acc_std"] == pytest.approx(statistics.stdev([0.9, 0.8, 0.85]))
    assert (row["gap_accuracy_mean"], row["gap_accuracy_n"]) == (pytest.approx(0.02), 2)
    cells = dict(zip(report.columns([row]), report.format_rows([row])[0]))
    assert cells["gap acc"] == f"0.020 ± {statistics.stdev([0.01, 0.03]):.3f} (n=2)"
    assert cells["n"] == "3"
    assert report.diverged_cell(row) == "0/5 (1 failed, 1 unfinished)"


# --- per-architecture baselines ------------------------------------------------------------------------------

def _cfg(kind: str, norm: str, **more) -> dict:
    return {"seed": 0, "name": "x", "model": {"kind": kind, "norm": norm, **more}, "optim": {"lr": 0.1}}


def test_each_arm_is_compared_with_the_baseline_of_its_own_architecture():
    # configs/compare/mnist1d.yaml's layout: the baseline is an MLP without BN.
    arms = {"mlp_no_bn": ("mlp", "none", (900, 1000)), "mlp_bn": ("mlp", "bnexp", (300, 300)),
            "cnn_no_bn": ("cnn", "none", (600, 800)), "cnn_bn": ("cnn", "bnexp", (100, 200))}
    recs = [run(arm, s, r, config=_cfg(kind, norm)) for arm, (kind, norm, reach) in arms.items()
            for s, r in enumerate(reach)]
    rows = rows_by_arm(recs, list(arms), "mlp_no_bn")
    assert {a: r["baseline"] for a, r in rows.items()} == {
        "mlp_no_bn": "mlp_no_bn", "mlp_bn": "mlp_no_bn", "cnn_no_bn": "cnn_no_bn", "cnn_bn": "cnn_no_bn"}
    assert rows["cnn_bn"]["speedup"] == pytest.approx(statistics.median([600, 800]) / statistics.median([100, 200]))
    assert rows["cnn_no_bn"]["speedup"] == 1.0
    assert rows["mlp_bn"]["speedup"] == pytest.approx(950 / 300)
    # The terminal table names each speed-up's baseline when they differ.
    assert "vs" in report.columns(list(rows.values()), full=False)


def test_the_baseline_of_another_architecture_is_its_nearest_arm():
    # configs/compare/norm_batch.yaml's layout: a CNN at batch 32 with BN is the baseline; a ResNet-20 arm's
    # is the ResNet-20 at batch 32 with BN (the same settings, differing in the architecture's keys only).
    arms = {f"{k}_bs{m}_{n}": (k, n, m) for k in ("cnn", "resnet") for m in (8, 32) for n in ("bnexp", "none")}
    recs = [run(arm, 0, 200, config={**_cfg(kind, norm, **({"depth": 20} if kind == "resnet" else {})),
                                      "data": {"batch_size": m}})
            for arm, (kind, norm, m) in arms.items()]
    bases = report.arm_baselines(recs, list(arms), "cnn_bs32_bnexp")
    assert {a: bases[a] for a in arms if a.startswith("resnet")} == dict.fromkeys(
        ["resnet_bs8_bnexp", "resnet_bs8_none", "resnet_bs32_bnexp", "resnet_bs32_none"], "resnet_bs32_bnexp")
    assert {bases[a] for a in arms if a.startswith("cnn")} == {"cnn_bs32_bnexp"}
    # An architecture with no arm but itself has no baseline (never itself); runs without a config keep the
    # configured one.
    lone = [run("mlp", s, 500 + 100 * s, config=_cfg("mlp", "none")) for s in (0, 1)] + \
        [run("mlp_bn", s, 100 + 50 * s, config=_cfg("mlp", "bnexp")) for s in (0, 1)] + \
        [run("vgg", s, 100, config=_cfg("vgg", "none")) for s in (0, 1)]
    assert report.arm_baselines(lone, ["mlp", "mlp_bn", "vgg"], "mlp") == {"mlp": "mlp", "mlp_bn": "mlp",
                                                                           "vgg": None}
    rows = rows_by_arm(lone, ["mlp", "mlp_bn", "vgg"], "mlp")
    assert math.isnan(rows["vgg"]["speedup"]) and rows["vgg"]["baseline"] == ""
    assert rows["mlp"]["speedup"] == 1.0 and rows["mlp_bn"]["speedup"] == pytest.approx(550 / 125)
    cells = {c[0]: c for c in report.format_rows(list(rows.values()), full=False)}
    vs = report.columns(list(rows.values()), full=False).index("vs")
    assert (cells["vgg"][vs - 1], cells["vgg"][vs]) == ("", "—") and cells["mlp"][vs - 1] == "1.0×"
    assert ("vs —: no other arm of its architecture (model.kind) to compare with: no speed-up."
            in report.legend(list(rows.values())))
    assert report.arm_baselines([run("a", 0, 1), run("b", 0, 1)], ["a", "b"], "a") == {"a": "a", "b": "a"}


# --- time course ----------------------------------------------------------------------------------------------

def test_time_course_of_the_running_statistics_errors():
    from scipy.integrate import trapezoid

    steps = np.arange(0, 1001, 50)

    def err(t, scale):  # an EMA's lag: large early, small late
        return scale / (1 + t / 50)

    def rows(scale):
        return {int(t): {"running_stats/h1/mean_err": err(t, scale), "running_stats/h2/mean_err": 2 * err(t, scale),
                         "running_stats/h1/var_err": 0.5} for t in steps}

    recs = [run("ema", 0, 100, rows=rows(1.0), summary={"running_mean_err": 1.5 * err(1000, 1.0)}),
            run("ema", 1, 100, rows=rows(3.0), summary={"running_mean_err": 1.5 * err(1000, 3.0)})]
    (row,) = report.aggregate(recs, ["ema"], None, "ema")
    layer_mean = {scale: 1.5 * err(steps, scale) for scale in (1.0, 3.0)}  # (h1 + h2) / 2
    assert (row["running_mean_err_early_step"], row["running_mean_err_mid_step"]) == (50, 500)
    assert row["running_mean_err_early_mean"] == pytest.approx(np.mean([layer_mean[1.0][1], layer_mean[3.0][1]]))
    assert row["running_mean_err_mid_mean"] == pytest.approx(np.mean([layer_mean[1.0][10], layer_mean[3.0][10]]))
    # Over training after initialization: the trapezoid over the probed steps from 50 (step 0 left out).
    averages = [trapezoid(layer_mean[s][1:], steps[1:]) / 950 for s in (1.0, 3.0)]
    assert row["running_mean_err_average_mean"] == pytest.approx(np.mean(averages))
    assert row["running_mean_err_average_std"] == pytest.approx(np.std(averages, ddof=1))
    assert row["running_var_err_average_mean"] == pytest.approx(0.5)
    # report.md's table shows them under the steps they were taken at.
    table = report.time_course_table([row])
    assert "| arm | step 50 | step 500 | final | average over training |" in table
    assert f"{row['running_mean_err_early_mean']:.3f} ± {row['running_mean_err_early_std']:.3f}" in table


def test_time_course_average_leaves_out_step_0():
    # The value at initialization, however large, is not part of the average over training: joined by a
    # line to the first probe, it would weigh by the probe interval (0.104 with probes every 10 against
    # 0.246 every 50 on one run before this was fixed).
    steps = np.arange(0, 201, 10, dtype=float)
    values = 0.2 + 0.1 * np.sin(steps / 40)
    averages = []
    for at_init in (values[0], 50.0):
        course = stats.time_course(steps, np.concatenate([[at_init], values[1:]]))
        averages.append(course.average)
    assert averages[0] == averages[1]
    assert averages[0] == pytest.approx(np.trapezoid(values[1:], steps[1:]) / 190)
    assert (course.early_step, course.early, course.final_step) == (10, values[1], 200)


@pytest.mark.parametrize("steps, early, mid", [
    ([0, 50, 100], 50, None),  # the only step between 0 and the last is the early one: no mid
    ([0, 100], None, None),  # the first probed step after 0 is the last: neither (not step 0)
    ([0, 40, 60, 100], 40, None),  # 40 and 60 equally near 50: the earlier, which is the early one
    ([0, 25, 50, 75, 100], 25, 50),
])
def test_time_course_mid_is_after_0_before_the_last_and_never_repeats(steps, early, mid):
    steps = np.array(steps, dtype=float)
    course = stats.time_course(steps, 1 / (1 + steps))
    assert (course.early_step, course.mid_step, course.final_step) == (early, mid, 100)
    assert course.mid is None if mid is None else course.mid == pytest.approx(1 / (1 + mid))
    # report.md's table leaves out a column that would repeat another.
    rows = {int(t): {"gap/accuracy": 1 / (1 + t)} for t in steps}
    (row,) = report.aggregate([run("a", 0, None, budget=100, rows=rows)], ["a"], None, None)
    header = report.time_course_table([row]).splitlines()[2]
    assert header == "| arm | " + "".join(f"step {s} | " for s in (early, mid) if s is not None) + \
        "final | average over training |"


# --- the terminal table ---------------------------------------------------------------------------------------

def _render(rows, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(report.table(rows, "mnist1d"))
    return console.export_text()


@pytest.fixture
def wide_rows():
    """A comparison with every kind of cell: bounds, intervals, per-architecture baselines, a diverged arm."""
    arms = {"mlp_no_bn": ("mlp", "none", (1500, 1700, 1900)), "mlp_bn": ("mlp", "bnexp", (300, 350, 400)),
            "cnn_no_bn": ("cnn", "none", (700, 800, 900)), "cnn_bn": ("cnn", "bnexp", (50, 50, 50)),
            "cnn_bn_lr_much_too_high": ("cnn", "bnexp", (None, None, None))}
    recs = [run(arm, s, r, budget=3000, config=_cfg(kind, norm), diverged=(200 if "high" in arm and s else None),
                summary={"test_accuracy": 0.9 + s / 1000, "best_test_accuracy": 0.95 + s / 1000})
            for arm, (kind, norm, reach) in arms.items() for s, r in enumerate(reach)]
    return report.aggregate(recs, list(arms), 0.6, "mlp_no_bn")


@pytest.mark.parametrize("width", [80, 100])
def test_the_table_fits_the_console_and_cuts_nothing(wide_rows, width):
    text = _render(wide_rows, width)
    lines = text.splitlines()
    assert max(map(len, lines)) <= width
    assert "…" not in text
    for cells in report.format_rows(wide_rows, full=False):
        for cell in cells[1:]:
            for word in cell.split():  # every number, bound and name is whole on some line
                assert any(word in line.split() for line in lines), (cell, word)
    if width == 100:  # every cell of numbers on one line
        for cells in report.format_rows(wide_rows, full=False):
            for cell in cells[1:]:
                assert any(cell in line for line in lines), cell
    header = report.columns(wide_rows, full=False)
    assert header == ["arm", "n", "final acc", "best acc†", "steps to 0.6", "speed-up [range]", "vs", "diverged"]
    words = " ".join(text.split())
    assert "selected on the test set" in words and "vs the baseline of the arm's architecture" in words
    # Shown as written, not read as rich markup (which dropped "[range]" from the header and the legend).
    assert "[range]" in text.split("─")[0]  # in the header, above its rule
    assert "[range]: with fewer than" in words


def test_the_arm_names_wrap_but_are_whole(wide_rows):
    text = _render(wide_rows, 80)
    arm_column = "".join(line.split(" ")[0] for line in text.splitlines())  # the first column, line by line
    for row in wide_rows:
        assert row["arm"] in arm_column


def test_report_md_and_summary_csv_have_every_column(tmp_path, wide_rows):
    recs = [run("a", 0, 100), run("a", 1, 150), run("b", 0, 300), run("b", 1, None, diverged=500)]
    rows = report.aggregate(recs, ["a", "b"], TARGET, "b")
    text = report.to_markdown(rows, recs, "t", TARGET, "b", ["a note"], [], tmp_path)
    assert ("| arm | n | final acc | best acc† | steps to 0.9 | speed-up [range] | vs | gap acc | run-mean err | "
            "run-var err | wall s | diverged |") in text
    assert "selected on the test set" in text and "diverged at step 500" in text
    parsed = {r["arm"]: r for r in csv.DictReader(io.StringIO(report.to_csv(rows)))}
    # b: 300 and > 1000: the median is censored; a: 100 and 150. An infinite end is written as inf.
    assert parsed["b"]["steps_to_target_bound"] == ">" and float(parsed["b"]["steps_to_target_median"]) == 650
    assert parsed["a"]["speedup_bound"] == ">=" and parsed["a"]["speedup_high"] == "inf"
    assert parsed["a"]["baseline"] == "b" and parsed["a"]["final_acc_n"] == "2"
