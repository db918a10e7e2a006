"""The report's plots: seed bands, divergence crosses, every run's activations, one colour per arm across
plots, PNG at print resolution and SVG."""

from __future__ import annotations

import struct
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bnexp.experiments import figures, plots, sweeps  # noqa: E402
from bnexp.experiments.records import RunRecord  # noqa: E402


def run(arm: str, seed: int, acc: dict[int, float], diverged: int | None = None, extra=None) -> RunRecord:
    """A run with test accuracy `acc` at its evaluated steps, a training loss at every 10th step up to the
    last evaluation, and `extra(step)` tags at each evaluated step."""
    last = max(acc)
    rows = {s: {"step": s, "train/loss": 2.0 / (1 + s)} for s in range(10, last + 1, 10)}
    for s, a in acc.items():
        rows.setdefault(s, {"step": s}).update({"test/accuracy": a, "test/loss": 1 - a, **(extra(s) if extra else {})})
    metrics = [rows[s] for s in sorted(rows)]
    summary = {"status": "completed", "test_accuracy": acc[last], "best_test_accuracy": max(acc.values())}
    if diverged is not None:
        metrics.append({"step": diverged, "train/diverged": 1.0, "train/loss": 50.0})
        summary.update(status="diverged", diverged_step=diverged)
    return RunRecord(arm, seed, Path(f"/x/{arm}/s{seed}"), summary["status"], summary, metrics, 100)


def curve(values: list[float], steps=(0, 20, 40, 60, 80, 100)) -> dict[int, float]:
    return dict(zip(steps, values))


@pytest.fixture
def groups():
    return {
        "bn": [run("bn", 0, curve([0.1, 0.6, 0.8, 0.9, 0.92, 0.95])),
               run("bn", 1, curve([0.1, 0.5, 0.7, 0.85, 0.9, 0.93]))],
        # seed 1 diverged at step 47: its last evaluation is at 40
        "hot": [run("hot", 0, curve([0.1, 0.3, 0.5, 0.6, 0.7, 0.75])),
                run("hot", 1, curve([0.1, 0.4, 0.45], (0, 20, 40)), diverged=47)],
    }


def _line_data(ax):
    return [(tuple(line.get_xdata()), tuple(line.get_ydata()), line) for line in ax.get_lines()]


def test_bands_are_the_mean_over_every_run_and_a_diverged_run_ends_in_a_cross(groups):
    palette = figures.Palette(["bn", "hot"])
    fig, ax = plt.subplots()
    assert plots.plot_bands(ax, groups, lambda r: plots.series(r, "test/accuracy"), palette)
    lines = {line.get_label(): line for line in ax.get_lines()}
    bn = lines["bn (n=2)"]
    assert tuple(bn.get_xdata()) == (0, 20, 40, 60, 80, 100)
    assert np.allclose(bn.get_ydata(), np.mean([[0.1, 0.6, 0.8, 0.9, 0.92, 0.95], [0.1, 0.5, 0.7, 0.85, 0.9, 0.93]], 0))
    # The band spans the runs' minimum to maximum.
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].max() == pytest.approx(0.95) and band[:, 1].min() == pytest.approx(0.1)
    # "hot": the mean only while both runs have values (to step 40), then the run that went on alone.
    hot = lines["hot (n=2, 1 diverged)"]
    assert tuple(hot.get_xdata()) == (0, 20, 40)
    assert np.allclose(hot.get_ydata(), [0.1, 0.35, 0.475])
    data = _line_data(ax)
    assert any(xs == (40, 60, 80, 100) and np.allclose(ys, [0.5, 0.6, 0.7, 0.75]) for xs, ys, _ in data)
    crosses = [(xs, ys, line) for xs, ys, line in data if line.get_marker() == "x" and xs]
    assert [(xs, ys) for xs, ys, _ in crosses] == [((47,), (0.45,))]
    assert crosses[0][2].get_color() == hot.get_color() == palette["hot"].color
    assert "diverged (last value)" in lines
    assert bn.get_color() == palette["bn"].color and bn.get_linestyle() != hot.get_linestyle()
    plt.close(fig)


def test_the_training_loss_curve_does_not_take_the_divergence_row():
    rec = run("hot", 1, curve([0.1, 0.4, 0.45], (0, 20, 40)), diverged=47)
    xs, ys = plots.series(rec, "train/loss")
    assert 47 not in xs and ys.max() < 50


def test_activations_show_every_run_with_the_units_it_logged(groups):
    def units(unit):
        return lambda s: {f"activations/h2/u{unit}/p{p}": s / 100 + k for k, p in enumerate((15, 50, 85))} | {
            f"activations/h1/u0/p{p}": 0.0 for p in (15, 50, 85)}

    recs = {"bn": [run("bn", 0, curve([0.1] * 6), extra=units(3)), run("bn", 1, curve([0.1] * 6), extra=units(7))],
            "none": [run("none", 2, curve([0.1] * 6), extra=units(5))]}
    fig = plots.activations_figure(recs, figures.Palette(["bn", "none"]), "t")
    titles = sorted(ax.get_title() for ax in fig.axes if ax.axison)
    # A panel per run, named by arm and seed, each with the last hidden layer's unit that run logged.
    assert titles == ["bn, seed 0\nh2 unit 3", "bn, seed 1\nh2 unit 7", "none, seed 2\nh2 unit 5"]
    assert len([ax for ax in fig.axes if not ax.axison]) == 1  # the arm with one seed leaves a blank panel
    panel = next(ax for ax in fig.axes if ax.get_title().startswith("bn, seed 1"))
    assert [tuple(line.get_ydata()[:2]) for line in panel.get_lines()] == [(0.0, 0.2), (1.0, 1.2), (2.0, 2.2)]
    assert "every run" in fig.get_suptitle()
    plt.close(fig)


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_write_plots_saves_png_at_print_resolution_and_svg(tmp_path, groups):
    def probes(s):
        return {"running_stats/h1/mean_err": 1 / (1 + s), "running_stats/h1/var_err": 2 / (1 + s), "gap/accuracy": 0.01}

    records = [run("bn", 0, curve([0.1, 0.6, 0.8, 0.9, 0.92, 0.95]), extra=probes), *groups["hot"]]
    written = plots.write_plots(tmp_path, records, ["bn", "hot"], 0.9, "t")
    assert [p.name for p in written] == ["accuracy.png", "loss.png", "running_stats.png", "gap.png"]
    for png in written:
        width, height = _png_size(png)
        assert width >= 6 * figures.DPI and height >= 4 * figures.DPI, png.name  # ≥ 6 × 4 inches at 300 dpi
        assert png.with_suffix(".svg").read_bytes().startswith(b"<?xml")


def test_plots_are_written_in_place_of_a_planted_link_never_through_it(tmp_path, groups):
    from bnexp.engine.files import OutputError

    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not a plot")
    plot_dir = tmp_path / "plots"
    plot_dir.mkdir()
    (plot_dir / "loss.png").symlink_to(outside)
    (plot_dir / "loss.svg").symlink_to(outside)
    written = plots.write_plots(plot_dir, groups["bn"], ["bn"], None, "t")
    assert plot_dir / "loss.png" in written
    assert outside.read_bytes() == b"not a plot"  # the link's target is untouched
    for name in ("loss.png", "loss.svg"):
        assert not (plot_dir / name).is_symlink() and (plot_dir / name).is_file(), name
    assert _png_size(plot_dir / "loss.png")[0] >= 6 * figures.DPI
    # A plots folder that is itself a link: refused in one line, nothing written where it points.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked").symlink_to(elsewhere)
    with pytest.raises(OutputError, match="it is a symbolic link"):
        plots.write_plots(tmp_path / "linked", groups["bn"], ["bn"], None, "t")
    assert list(elsewhere.iterdir()) == []


def test_one_colour_per_arm_in_every_plot_of_a_grid():
    # A grid with a numeric axis: the arms of one series share its colour and differ in line style, and the
    # sweep plot draws the series in that colour.
    points = {f"{fam}_bs{m}": (fam, {"data.batch_size": m}) for fam in ("bn", "gn") for m in (2, 8, 32)}
    arms = list(points)
    palette = figures.Palette(arms, points)
    assert palette["bn_bs2"].color == palette["bn_bs32"].color != palette["gn_bs2"].color
    assert len({palette[f"bn_bs{m}"].linestyle for m in (2, 8, 32)}) == 3
    records = [RunRecord(arm, 0, Path(arm), "completed", {"test_accuracy": 0.9, "best_test_accuracy": 0.95})
               for arm in arms]
    series = sweeps.sweep_series(records, points, "data.batch_size")
    fig = sweeps.sweep_figure(series, "data.batch_size", "test accuracy", "t",
                              palette.series([s.label for s in series]))
    drawn = {c.get_label().split(" (")[0]: c.lines[0].get_color() for c in fig.axes[0].containers}
    assert drawn == {"bn": palette["bn_bs2"].color, "gn": palette["gn_bs2"].color}
    plt.close(fig)
    # Without a grid, by position in the arm list: the same whichever arms have runs to draw.
    assert figures.Palette(["a", "b", "c"])["c"].color == figures.Palette(["a", "b", "c", "d"])["c"].color
    assert len({figures.Palette([str(i) for i in range(15)])[str(i)].color for i in range(15)}) == 15


def test_a_sweep_marks_diverged_runs_instead_of_averaging_them():
    points = {f"lr{x}": ("", {"optim.lr": x}) for x in (0.1, 1.0, 10.0)}
    recs = [RunRecord("lr0.1", 0, Path("a"), "completed", {"test_accuracy": 0.8, "best_test_accuracy": 0.85}),
            RunRecord("lr1.0", 0, Path("b"), "completed", {"test_accuracy": 0.9, "best_test_accuracy": 0.92}),
            RunRecord("lr10.0", 0, Path("c"), "diverged", {"status": "diverged", "diverged_step": 30},
                      [{"step": 0, "test/accuracy": 0.1}, {"step": 20, "test/accuracy": 0.3}])]
    (s,) = sweeps.sweep_series(recs, points, "optim.lr")
    assert s.x == [0.1, 1.0, 10.0] and s.final[2][2] == 0 and s.diverged_final == [[], [], [0.3]]
    fig = sweeps.sweep_figure([s], "optim.lr", "test accuracy", "t")
    crosses = [line for line in fig.axes[0].get_lines() if line.get_marker() == "x" and len(line.get_xdata())]
    assert [(tuple(c.get_xdata()), tuple(c.get_ydata())) for c in crosses] == [((10.0,), (0.3,))]
    plt.close(fig)


def test_init_plots_of_a_grid_draw_only_what_the_runs_logged(tmp_path):
    # configs/compare/norm_lr.yaml: probes every 500 steps, so step 1 (the gradient at initialization) is
    # not probed while the signal at step 0 is; its report used to fail drawing an all-NaN log axis.
    from bnexp.experiments.why_plots import write_why_plots

    points = {f"lr{x}": ("", {"optim.lr": x}) for x in (0.1, 1.0)}
    records = [RunRecord(arm, 0, Path(arm), "completed", {"test_accuracy": 0.9},
                         [{"step": 0, "signal/h1/var": 0.5 * (i + 1), "signal/h1/sq_mean": 0.1, "rank/h1": 3.0},
                          {"step": 500, "test/accuracy": 0.9}])
               for i, arm in enumerate(points)]
    written = write_why_plots(tmp_path, records, list(points), points, "t")
    assert [p.name for p in written] == ["signal.png", "rank.png", "init_lr.png"]
    assert (tmp_path / "init_lr.svg").is_file()
