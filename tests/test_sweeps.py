"""Grid sweeps in comparison configs (grid, lr_scale, max_runs) and the sweep plots of their numeric axes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from bnexp.experiments.compare import CompareError, load_compare, plan
from bnexp.experiments.records import RunRecord
from bnexp.experiments.sweeps import log_scale, numeric_axes, sweep_figure, sweep_series

BASE = {"device": "cpu", "data": {"dataset": "digits", "batch_size": 30},
        "model": {"hidden": [16], "activation": "relu"}, "optim": {"lr": 0.2},
        "train": {"steps": 20, "eval_every": 10, "log_every": 5, "checkpoint_every": 20},
        "probes": {"enabled": False}}


def _write(tmp_path: Path, cmp: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cmp, sort_keys=False))
    return path


def test_a_grid_expands_to_the_product_with_names_from_its_values(tmp_path):
    cmp = load_compare(_write(tmp_path, {"base": BASE, "seeds": [0, 1],
                                         "grid": {"data.batch_size": [2, 4, 8], "model.norm": ["bnexp", "group", "none"]}}),
                       [])
    jobs = plan(cmp)
    assert len(jobs) == 3 * 3 * 2
    assert cmp.arm_names[:4] == ["batch_size-2_norm-bnexp", "batch_size-2_norm-group", "batch_size-2_norm-none",
                                 "batch_size-4_norm-bnexp"]
    for job in jobs:
        point = {arm.name: arm.point for arm in cmp.expanded}[job.arm]
        assert (job.cfg.data.batch_size, job.cfg.model.norm) == (point["data.batch_size"], point["model.norm"])
    assert {job.seed for job in jobs} == {0, 1}


def test_arms_and_a_grid_combine_each_arm_with_every_point(tmp_path):
    cmp = load_compare(_write(tmp_path, {"base": BASE, "seeds": [0],
                                         "arms": {"sgd": {"optim.name": "sgd"}, "adam": {"optim": {"name": "adam"}}},
                                         "grid": {"optim.lr": [0.01, 0.1]}}), [])
    assert cmp.arm_names == ["sgd_lr-0.01", "sgd_lr-0.1", "adam_lr-0.01", "adam_lr-0.1"]
    cfgs = {job.arm: job.cfg for job in plan(cmp)}
    assert (cfgs["adam_lr-0.1"].optim.name, cfgs["adam_lr-0.1"].optim.lr) == ("adam", 0.1)
    assert [arm.family for arm in cmp.expanded] == ["sgd", "sgd", "adam", "adam"]


@pytest.mark.parametrize("scale, factor", [("linear", lambda r: r), ("sqrt", math.sqrt), ("none", lambda r: 1.0)])
def test_lr_scale_scales_each_runs_lr_with_its_batch_size(tmp_path, scale, factor):
    cmp = load_compare(_write(tmp_path, {"base": BASE, "seeds": [0], "lr_scale": scale,
                                         "grid": {"data.batch_size": [15, 30, 120]}}), [])
    lrs = {job.cfg.data.batch_size: job.cfg.optim.lr for job in plan(cmp)}
    assert lrs == pytest.approx({m: 0.2 * factor(m / 30) for m in (15, 30, 120)})


@pytest.mark.parametrize("change, message", [
    ({"grid": {"data.batch_size": []}}, "grid.data.batch_size: needs at least one value"),
    ({"grid": {"data.batch_size": [2, 2]}}, "grid.data.batch_size: each value may appear once"),
    ({"grid": {"seed": [0, 1]}}, "grid.seed"),
    ({"grid": {"model.norm": ["none"]}, "arms": {"a": {"model.norm": "bnexp"}}}, "arms.a.model.norm: also a grid key"),
    ({"grid": {"model.norm": ["none", "bogus"]}}, "model.norm"),
    ({"grid": {"data.batch_size": [2, 4]}, "baseline": "nope"}, "baseline: 'nope' is not an arm"),
    ({"lr_scale": "cubic", "grid": {"data.batch_size": [2]}}, "lr_scale"),
    ({}, "arms: missing"),
])
def test_bad_grids_are_one_line_user_errors(cli, tmp_path, change, message):
    path = _write(tmp_path, {"base": BASE, **change})
    r = cli("compare", "-c", path, "--out", "out")
    assert r.code == 2 and message in r.err and r.err.count("\n") == 1, r.err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_more_runs_than_max_runs_need_yes(cli, tmp_path):
    path = _write(tmp_path, {"base": BASE, "seeds": [0, 1], "max_runs": 3, "grid": {"model.norm": ["none", "bnexp"]}})
    r = cli("compare", "-c", path, "--out", "out", "-q")
    assert r.code == 2 and r.err.count("\n") == 1
    assert "would start 4 runs (2 arms x 2 seeds), more than max_runs (3): add --yes" in r.err
    assert not (tmp_path / "out").exists()
    r = cli("compare", "-c", path, "--out", "out", "-q", "--yes")
    assert r.code == 0, r.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["norm-bnexp", "norm-none", "plots"]


# --- the sweep plots ---------------------------------------------------------------------------------------

def _rec(arm: str, seed: int, final: float, best: float, status: str = "completed") -> RunRecord:
    return RunRecord(arm, seed, Path(arm), status, {"test_accuracy": final, "best_test_accuracy": best})


def test_sweep_series_are_means_over_seeds_per_other_factor():
    points = {f"bs{m}_{n}": ("", {"data.batch_size": m, "model.norm": n}) for m in (2, 32) for n in ("bn", "gn")}
    records = [_rec("bs2_bn", 0, 0.5, 0.6), _rec("bs2_bn", 1, 0.7, 0.8), _rec("bs32_bn", 0, 0.9, 0.95),
               _rec("bs2_gn", 0, 0.8, 0.85), _rec("bs32_gn", 0, 0.82, 0.9),
               _rec("bs32_gn", 1, 0.1, 0.2, status="failed")]  # not a finished run: not counted
    assert numeric_axes(points) == ["data.batch_size"]
    series = {s.label: s for s in sweep_series(records, points, "data.batch_size")}
    assert sorted(series) == ["norm=bn", "norm=gn"]
    bn = series["norm=bn"]
    assert bn.x == [2.0, 32.0]
    assert bn.final[0] == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1), 2))
    # One run has no spread: its std is nan (blank in the CSV, no error bar), not 0.
    assert bn.best[1][0::2] == (0.95, 1) and math.isnan(bn.best[1][1])
    assert series["norm=gn"].final[1][0::2] == (0.82, 1) and math.isnan(series["norm=gn"].final[1][1])
    assert log_scale(list(series.values())) and not log_scale([bn.__class__("", [2.0, 8.0], [], [])])
    fig = sweep_figure(list(series.values()), "data.batch_size", "test accuracy", "t")
    final_ax, best_ax = fig.axes[:2]
    assert final_ax.get_xscale() == "log" and final_ax.get_xlabel() == "data.batch_size"
    # One errorbar container per series: its data line, and the std as the bars' half-length.
    drawn = sorted((tuple(c.lines[0].get_xdata()), tuple(c.lines[0].get_ydata())) for c in final_ax.containers)
    assert drawn == [((2.0, 32.0), pytest.approx((0.6, 0.9))), ((2.0, 32.0), pytest.approx((0.8, 0.82)))]
    # A bar only where there are two runs or more: bs2_bn's, of half-length its std.
    bars = [seg for c in final_ax.containers for coll in c.lines[2] for seg in coll.get_segments()
            if len(seg) and np.isfinite(seg).all()]
    assert len(bars) == 1 and bars[0][:, 0].tolist() == [2.0, 2.0]
    std = np.std([0.5, 0.7], ddof=1)
    assert bars[0][:, 1].tolist() == pytest.approx([0.6 - std, 0.6 + std])


def test_the_sweep_csv_leaves_the_std_of_one_run_blank(tmp_path):
    from bnexp.experiments.sweeps import write_sweep_plots

    points = {f"bs{m}": ("", {"data.batch_size": m}) for m in (2, 32)}
    records = [_rec("bs2", 0, 0.5, 0.6), _rec("bs2", 1, 0.7, 0.8), _rec("bs32", 0, 0.9, 0.95)]
    write_sweep_plots(tmp_path, records, points, "t")
    with open(tmp_path / "sweep_batch_size.csv") as f:
        rows = {float(r["x"]): r for r in csv.DictReader(f)}
    assert float(rows[2.0]["final_std"]) == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert (rows[32.0]["final_std"], rows[32.0]["best_std"], rows[32.0]["n"]) == ("", "", "1")


@pytest.mark.slow
def test_a_grid_comparison_writes_sweep_plots_of_its_numeric_axis(tmp_path):
    from bnexp.cli import main

    path = _write(tmp_path, {"name": "sweep", "base": BASE, "seeds": [0, 1], "lr_scale": "linear",
                             "arms": {"bn": {"model.norm": "bnexp"}, "ln": {"model.norm": "layer"}},
                             "grid": {"data.batch_size": [6, 60]}})
    assert main(["compare", "-c", str(path), "--out", str(tmp_path / "c"), "-q"]) == 0
    plots = tmp_path / "c" / "plots"
    assert (plots / "sweep_batch_size.png").stat().st_size > 0
    with open(plots / "sweep_batch_size.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["series"], float(r["x"])) for r in rows} == {(a, m) for a in ("bn", "ln") for m in (6.0, 60.0)}
    for r in rows:
        arm = f"{r['series']}_batch_size-{int(float(r['x']))}"
        accs = [json.loads((tmp_path / "c" / arm / f"s{s}" / "summary.json").read_text())["test_accuracy"]
                for s in (0, 1)]
        assert float(r["final_mean"]) == pytest.approx(np.mean(accs)) and int(r["n"]) == 2
    assert "sweep_batch_size.png" in (tmp_path / "c" / "report.md").read_text()
    # Linear lr scaling from the base's batch of 30: lr 0.04 at batch 6, 0.4 at 60.
    cfg = yaml.safe_load((tmp_path / "c" / "bn_batch_size-6" / "s0" / "config.yaml").read_text())
    assert cfg["optim"]["lr"] == pytest.approx(0.04)
