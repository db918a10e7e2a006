"""End-to-end training through the CLI: the default config, the run directory, bnexp vs torch BN curves,
determinism, the cnn on 1-D signals and images, and the progress bar."""

from __future__ import annotations

import math

import pytest
import yaml

from bnexp.config import Config, load, validate
from bnexp.engine.rundir import read_metrics, read_summary
from conftest import DEFAULT_CONFIG, TINY


def _assert_rows_close(a: list[dict], b: list[dict], rtol: float, atol: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), ra["step"]
        for k in ra:
            assert math.isclose(ra[k], rb[k], rel_tol=rtol, abs_tol=atol), (ra["step"], k, ra[k], rb[k])


@pytest.mark.slow
def test_default_config_trains_on_digits(cli, tmp_path):
    r = cli("train", "--config", DEFAULT_CONFIG, "--quiet")
    assert r.code == 0, r.err
    run = tmp_path / r.path
    assert r.path.parent.as_posix() == "runs/default" and r.path.name.endswith("-s0")
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(("events.", "."))) == \
        ["checkpoints", "config.yaml", "metrics.jsonl", "summary.json"]
    assert list(run.glob("events.out.tfevents.*"))
    assert load(run / "config.yaml") == Config()  # exactly what ran
    assert (run / "checkpoints" / "step-00002000.pt").is_file()

    s = read_summary(run)
    assert s["status"] == "completed" and s["steps"] == 2000 and s["seed"] == 0
    assert s["test_accuracy"] > 0.95 and s["best_test_accuracy"] >= s["test_accuracy"]
    assert set(s["versions"]) == {"python", "torch", "bnexp"}
    for key in ("gap_accuracy", "running_mean_err", "running_var_err", "wall_time_s"):
        assert isinstance(s[key], float), key

    rows = read_metrics(run)
    assert [r["step"] for r in rows if "test/accuracy" in r] == list(range(0, 2001, 100))
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(10, 2001, 10))
    assert rows[-1]["test/accuracy"] == s["test_accuracy"]
    assert all(r["lr"] == 0.5 for r in rows if "lr" in r)
    assert r.err.strip().splitlines()[-1].startswith("completed after 2000 steps, test accuracy 0.9")


@pytest.mark.slow
def test_bnexp_and_torch_bn_give_the_same_curves(cli, write_config, tmp_path):
    """The paper's sigmoid MLP, same seed: our layer and torch's agree to float tolerance, probes included."""
    base = {"device": "cpu", "train": {"steps": 400, "eval_every": 50, "log_every": 10},
            "probes": {"every": 100, "histogram_every": 400}}
    runs = {}
    for norm in ("bnexp", "torch"):
        path = write_config({**base, "model": {"norm": norm}}, f"{norm}.yaml")
        r = cli("train", "--config", path, "--out", norm, "--quiet")
        assert r.code == 0, r.err
        runs[norm] = read_metrics(tmp_path / norm)
    assert any("running_stats/h1/mean_err" in row for row in runs["bnexp"])
    _assert_rows_close(runs["bnexp"], runs["torch"], rtol=1e-3, atol=1e-4)
    last = runs["bnexp"][-1]["test/accuracy"]
    assert last > 0.9 and last == pytest.approx(runs["torch"][-1]["test/accuracy"], abs=1 / 360)


@pytest.mark.slow
def test_same_config_and_seed_give_identical_metrics(cli, write_config, tmp_path):
    cfg = {**TINY, "model": {"norm": "bnexp", "hidden": [32, 32]},
           "probes": {"enabled": True, "every": 20, "histogram_every": 40, "population_batches": 3}}
    path = write_config(cfg)
    rows = []
    for out in ("first", "second", "other-seed"):
        extra = ["--set", "seed=1"] if out == "other-seed" else []
        r = cli("train", "--config", path, "--out", out, "--quiet", *extra)
        assert r.code == 0, r.err
        rows.append(read_metrics(tmp_path / out))
    assert len(rows[0]) == 5 and any("gap/accuracy" in row for row in rows[0])
    assert rows[0] == rows[1]  # every value, bit for bit
    assert rows[0] != rows[2]


@pytest.mark.slow
@pytest.mark.parametrize("dataset, steps, min_acc", [("digits", 150, 0.5), ("mnist1d", 150, 0.2)])
def test_cnn_trains(cli, write_config, tmp_path, mnist1d_root, dataset, steps, min_acc):
    path = write_config({"device": "cpu", "data": {"dataset": dataset, "root": str(mnist1d_root)},
                         "model": {"kind": "cnn", "activation": "relu", "channels": [8, 16]},
                         "optim": {"lr": 0.1, "name": "momentum"},
                         "train": {"steps": steps, "eval_every": 50}, "probes": {"enabled": False}})
    r = cli("train", "--config", path, "--out", "run", "--quiet")
    assert r.code == 0, r.err
    s = read_summary(tmp_path / "run")
    assert s["status"] == "completed" and s["test_accuracy"] > min_acc  # chance is 0.1
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["kind"] == "cnn" and saved["data"]["dataset"] == dataset


def test_progress_shows_step_loss_and_test_accuracy(cli, tiny_config, monkeypatch):
    import re

    # A pipe (pytest captures stderr): plain lines, the last of them once the run has ended.
    r = cli("train", "--config", tiny_config)
    assert r.code == 0, r.err
    last = r.err.strip().splitlines()[-2]  # the final state, then the one-line report
    assert re.fullmatch(r"step 40/40 \(100%\)  loss [0-9.]+  test acc [0-9.]+  [0-9.]+ steps/s  ETA 0:00:00", last)
    # A terminal 80 columns wide (rich's own switch): the live bar, whose final state stays, in 80 columns.
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "80")
    r = cli("train", "--config", tiny_config)
    assert r.code == 0, r.err
    frames = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", f) for f in re.split(r"[\r\n]", r.err)]
    bar = [f for f in frames if "40/40" in f][-1]
    assert "━" in bar and "loss" in bar and "test acc" in bar
    assert max(len(f) for f in frames) <= 80
    quiet = cli("train", "--config", tiny_config, "--quiet").err
    assert quiet == "completed after 40 steps, test accuracy " + quiet.split()[-1] + "\n"  # no progress


@pytest.mark.parametrize("intervals", [(10, 100, 500, 100), (7, 21, 35, 5), (4, 6, 9, None), (3, 5, 7, 11)])
def test_schedule_is_due_by_the_definition_at_every_step(intervals):
    """Schedule.due answers steps that fall between all intervals without working them out: at every step
    of a run, with intervals that do and do not divide each other, it must say what the definition says."""
    from bnexp.engine.schedule import READ_ROWS, Schedule

    log_every, eval_every, checkpoint_every, probe_every = intervals
    steps = 397
    cfg = validate({"train": {"steps": steps, "log_every": log_every, "eval_every": eval_every,
                              "checkpoint_every": checkpoint_every}}).train
    sched = Schedule(cfg, probe_every)
    for step in range(1, steps + 1):
        last = step == steps
        evaluate, checkpoint = step % eval_every == 0 or last, step % checkpoint_every == 0 or last
        probe = probe_every is not None and (step % probe_every == 0 or last)
        assert tuple(sched.due(step)) == (step % log_every == 0 or last, evaluate, probe, checkpoint,
                                          evaluate or probe or checkpoint or step % (READ_ROWS * log_every) == 0)
