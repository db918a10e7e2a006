"""`bnexp compare`: tiny real comparisons checked against the runs' own files, resume, --jobs, bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import statistics
from pathlib import Path

import pytest
import yaml

from bnexp import cli
from conftest import REPO

# A comparison small enough to train in about a second per run, big enough for BN to matter.
TINY = {
    "name": "tiny",
    "base": {
        "device": "cpu",
        "data": {"dataset": "synthetic", "batch_size": 20,
                 "synthetic": {"num_samples": 300, "num_features": 8, "num_classes": 3}},
        "model": {"hidden": [16, 16], "activation": "sigmoid"},
        "optim": {"lr": 0.5},
        "train": {"steps": 60, "eval_every": 10, "log_every": 5, "checkpoint_every": 20},
        "probes": {"every": 20, "population_batches": 2, "histogram_every": 1000},
    },
    "arms": {"no_bn": {"model.norm": "none"}, "bnexp": {"model.norm": "bnexp"}},
    "seeds": [0, 1],
    "target_accuracy": 0.8,
    "baseline": "no_bn",
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # These nets are tiny: a second intra-op thread buys nothing, and on a busy 2-core machine its
    # spin-waiting makes a step up to 100x slower.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_cfg(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row["arm"]: row for row in csv.DictReader(f)}


def tree(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `path` with its mtime and content, to prove runs were left alone."""
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory) -> tuple[Path, int, str, str]:
    root = tmp_path_factory.mktemp("cmp")
    cfg = write_cfg(root / "tiny.yaml", TINY)
    code, out, err = run_cli(["compare", "--config", str(cfg), "--out", str(root / "c")])
    return root / "c", code, out, err


# --- end to end -------------------------------------------------------------------------------------------

def _expected(comp: Path, arm: str, target: float) -> dict[str, float]:
    """Recompute an arm's row from its runs' summary.json and metrics.jsonl, independently of bnexp.experiments.report."""
    accs, bests, steps, walls = [], [], [], []
    reached = 0
    for run in sorted((comp / arm).iterdir()):
        summary = json.loads((run / "summary.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        accs.append(summary["test_accuracy"])
        bests.append(summary["best_test_accuracy"])
        walls.append(summary["wall_time_s"])
        hit = [r["step"] for r in rows if "test/accuracy" in r and r["test/accuracy"] >= target]
        reached += bool(hit)
        steps.append(hit[0] if hit else TINY["base"]["train"]["steps"])
    return {"final_acc_mean": statistics.mean(accs), "final_acc_std": statistics.stdev(accs),
            "best_acc_mean": statistics.mean(bests), "best_acc_std": statistics.stdev(bests),
            "steps_to_target_median": statistics.median(steps), "wall_time_s_mean": statistics.mean(walls),
            "reached": reached}


@pytest.mark.slow
def test_comparison_end_to_end_table_matches_runs(tiny_comparison):
    comp, code, out, err = tiny_comparison
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(comp)
    # The resolved comparison is written and is itself a valid comparison config.
    resolved = yaml.safe_load((comp / "compare.yaml").read_text())
    assert resolved["arms"] == TINY["arms"] and resolved["seeds"] == [0, 1]
    for arm in TINY["arms"]:
        for seed in TINY["seeds"]:
            run = comp / arm / f"s{seed}"
            summary = json.loads((run / "summary.json").read_text())
            assert summary["status"] == "completed" and summary["seed"] == seed
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            assert cfg["model"]["norm"] == TINY["arms"][arm]["model.norm"] and cfg["seed"] == seed
            assert list(run.glob("events.out.tfevents.*")), "TensorBoard must be able to overlay the runs"

    table = read_csv(comp / "summary.csv")
    assert list(table) == ["no_bn", "bnexp"]
    report = (comp / "report.md").read_text()
    target = TINY["target_accuracy"]
    exp = {arm: _expected(comp, arm, target) for arm in TINY["arms"]}
    for arm, e in exp.items():
        row = table[arm]
        for key in ("final_acc_mean", "final_acc_std", "best_acc_mean", "best_acc_std",
                    "steps_to_target_median", "wall_time_s_mean"):
            assert float(row[key]) == pytest.approx(e[key], abs=1e-9), (arm, key)
        assert int(row["reached"]) == e["reached"]
        assert int(row["runs"]) == 2 and int(row["diverged"]) == 0 and int(row["failed"]) == 0
        # The markdown table shows the same numbers, rounded.
        assert f"| {arm} | 2 | {e['final_acc_mean']:.3f} ± {e['final_acc_std']:.3f} |" in report
        assert f"{e['steps_to_target_median']:.0f} ({e['reached']}/2)" in report
    speedup = exp["no_bn"]["steps_to_target_median"] / exp["bnexp"]["steps_to_target_median"]
    assert float(table["bnexp"]["speedup"]) == pytest.approx(speedup)
    assert float(table["no_bn"]["speedup"]) == 1.0
    # Running-statistic errors come from the BN runs' summaries and are blank for the arm without BN.
    bn_errs = [json.loads((comp / "bnexp" / f"s{s}" / "summary.json").read_text())["running_var_err"]
               for s in (0, 1)]
    assert float(table["bnexp"]["running_var_err_mean"]) == pytest.approx(statistics.mean(bn_errs))
    assert table["no_bn"]["running_mean_err_mean"] == "" and table["no_bn"]["running_var_err_mean"] == ""
    # The same table went to the terminal (stderr), and every plot was made from the probes' tags.
    assert "no_bn" in err and f"{exp['bnexp']['final_acc_mean']:.3f}" in err
    for name in ("accuracy", "loss", "activations", "running_stats", "gap"):
        png = comp / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (comp / "plots" / f"{name}.svg").read_bytes().startswith(b"<?xml")
        assert f"](plots/{name}.png)" in report


@pytest.mark.slow
def test_report_from_existing_run_directories(tiny_comparison, tmp_path, monkeypatch):
    comp, code, _, _ = tiny_comparison
    assert code == 0
    monkeypatch.chdir(tmp_path)
    runs = [str(comp / arm / f"s{s}") for arm in TINY["arms"] for s in TINY["seeds"]]
    code, out, err = run_cli(["compare", *runs, "-q"])
    assert code == 0, err
    report_dir = Path(out.strip().splitlines()[-1])
    assert report_dir.parent == Path("runs/compare/report") and report_dir.is_dir()
    # Same runs, same target and baseline (taken from their compare.yaml): the same table, minus nothing.
    assert read_csv(report_dir / "summary.csv") == read_csv(comp / "summary.csv")
    assert (report_dir / "plots" / "accuracy.png").is_file()

    # A run outside a comparison layout is named by its config's name; --set picks target and baseline.
    code, out, err = run_cli(["train", "-c", str(write_cfg(tmp_path / "one.yaml", {
        **TINY["base"], "name": "solo", "model": {**TINY["base"]["model"], "norm": "none"}})),
        "--out", str(tmp_path / "solo_run"), "-q"])
    assert code == 0, err
    code, out, err = run_cli(["compare", runs[2], str(tmp_path / "solo_run"), "--out", str(tmp_path / "r2"),
                              "--set", "target_accuracy=0.5", "--set", "baseline=solo", "-q"])
    assert code == 0, err
    table = read_csv(tmp_path / "r2" / "summary.csv")
    assert list(table) == ["bnexp", "solo"]
    assert table["solo"]["baseline"] == "solo" and table["bnexp"]["target_accuracy"] == "0.5"
    assert int(table["bnexp"]["runs"]) == 1 and table["bnexp"]["final_acc_std"] == ""


@pytest.mark.slow
def test_jobs_2_runs_every_run_in_worker_processes(tmp_path):
    cfg = write_cfg(tmp_path / "tiny.yaml", {**TINY, "base": {**TINY["base"], "probes": {"enabled": False}}})
    code, out, err = run_cli(["compare", "-c", str(cfg), "--out", str(tmp_path / "c"), "--jobs", "2"])
    assert code == 0, err
    # Each run sets its own torch threads (config `threads`, default 1): that is what is reported.
    assert "2 worker processes, 1 torch thread(s) each" in err
    comp = tmp_path / "c"
    table = read_csv(comp / "summary.csv")
    for arm in TINY["arms"]:
        assert int(table[arm]["completed"]) == 2
        expected = _expected(comp, arm, TINY["target_accuracy"])
        assert float(table[arm]["final_acc_mean"]) == pytest.approx(expected["final_acc_mean"])
    # Each worker trained with the run's own seed: the two seeds of an arm are different runs, and the
    # network at step 0 is the one that seed makes in-process too.
    from bnexp.config import validate
    from bnexp.engine.session import prepare
    from bnexp.engine.trainer import Trainer, evaluate

    raw = yaml.safe_load((comp / "no_bn" / "s1" / "config.yaml").read_text())
    cfg1 = validate(raw)
    (tmp_path / "ref").mkdir()
    trainer = Trainer(cfg1, tmp_path / "ref", prepare(cfg1))
    _, acc0 = evaluate(trainer.model, trainer.data.x_test, trainer.data.y_test)
    rows = [json.loads(line) for line in (comp / "no_bn" / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["test/accuracy"] == pytest.approx(acc0)


@pytest.mark.slow
def test_resume_finishes_interrupted_and_missing_runs_and_leaves_completed_ones(tmp_path, monkeypatch):
    import signal

    from bnexp.engine import session

    cfg = write_cfg(tmp_path / "tiny.yaml", TINY)
    comp = tmp_path / "c"
    # Interrupt the third run (bnexp seed 0) at step 30 the way Ctrl-C would: the training loop checkpoints,
    # marks it interrupted, and the comparison stops there, leaving bnexp seed 1 not even started.

    class CtrlC:
        def after_step(self, trainer, step):
            if trainer.cfg.name == "bnexp" and trainer.cfg.seed == 0 and step == 30:
                signal.raise_signal(signal.SIGINT)

    real = session.Trainer
    monkeypatch.setattr(session, "Trainer", lambda *a, callbacks=(), **k: real(*a, callbacks=[*callbacks, CtrlC()], **k))
    code, out, err = run_cli(["compare", "-c", str(cfg), "--out", str(comp)])
    monkeypatch.undo()
    assert code == 130, err
    assert out.strip().splitlines()[-1] == str(comp)
    assert err.strip().splitlines()[-5:] == [
        "interrupted by SIGINT; of the comparison's 4 runs:",
        "  stopped at a checkpoint, resumable (1): bnexp/s0 at step 30",
        "  completed (2): no_bn/s0, no_bn/s1",
        "  not started (1): bnexp/s1",
        f"finish with: bnexp compare --resume {comp}",
    ]
    interrupted = json.loads((comp / "bnexp" / "s0" / "summary.json").read_text())
    assert interrupted["status"] == "interrupted" and interrupted["steps"] == 30
    assert not (comp / "bnexp" / "s1").exists() and not (comp / "report.md").exists()
    done = {s: tree(comp / "no_bn" / f"s{s}") for s in (0, 1)}

    code, out, err = run_cli(["compare", "--resume", str(comp)])
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(comp)
    assert "2 of 4 runs to finish" in err
    for s in (0, 1):
        assert tree(comp / "no_bn" / f"s{s}") == done[s], "a completed run was touched"
        summary = json.loads((comp / "bnexp" / f"s{s}" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 60
    rows = [json.loads(line) for line in (comp / "bnexp" / "s0" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 60, "resumed metrics must not double or skip rows"
    assert int(read_csv(comp / "summary.csv")["bnexp"]["completed"]) == 2

    # Nothing left to do: a second resume trains nothing and rebuilds the same table.
    before = tree(comp / "bnexp")
    code, _, err = run_cli(["compare", "--resume", str(comp), "-q"])
    assert code == 0 and tree(comp / "bnexp") == before


@pytest.mark.slow
def test_failed_and_diverged_runs_are_recorded_and_the_comparison_goes_on(tmp_path, monkeypatch):
    from bnexp.engine.trainer import Trainer

    cmp = {**TINY, "seeds": [0], "base": {**TINY["base"], "probes": {"enabled": False}},
           "arms": {"ok": {"model.norm": "none"}, "boom": {"model.norm": "none"},
                    "div": {"model.norm": "none", "model.activation": "relu", "optim.lr": 1.0e6}},
           "baseline": "ok"}
    original = Trainer.run

    def run(self, *a, **k):
        if self.cfg.name == "boom":
            raise RuntimeError("simulated crash")
        return original(self, *a, **k)

    monkeypatch.setattr(Trainer, "run", run)
    code, out, err = run_cli(["compare", "-c", str(write_cfg(tmp_path / "c.yaml", cmp)), "--out",
                              str(tmp_path / "c")])
    assert code == 0, err
    comp = tmp_path / "c"
    assert "RuntimeError: simulated crash" in (comp / "boom" / "s0" / "error.txt").read_text()
    table = read_csv(comp / "summary.csv")
    assert table["boom"]["failed"] == "1" and table["boom"]["final_acc_mean"] == ""
    assert table["div"]["diverged"] == "1"
    div_summary = json.loads((comp / "div" / "s0" / "summary.json").read_text())
    assert div_summary["status"] == "diverged"
    # The log line says where it diverged, not the stopped network's accuracy.
    assert f"div seed 0: diverged at step {div_summary['diverged_step']}" in err
    assert table["ok"]["completed"] == "1"
    assert "boom | 0 | failed: RuntimeError: simulated crash" in (comp / "report.md").read_text()


# --- user errors: one line on stderr, exit 2, nothing created ----------------------------------------------

def _bad(tmp_path: Path, monkeypatch, argv: list[str]) -> str:
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(argv)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a user error must leave nothing behind"
    return err


@pytest.mark.parametrize("change, expected", [
    ({"arms": {}}, "arms: at least one arm"),
    ({"arms": None}, "arms"),
    ({"arms": {"a": {"model.nrom": "none"}}}, "arms.a: model.nrom: unknown key (did you mean model.norm?)"),
    ({"arms": {"a": {"optim.lr": -1}}}, "arms.a: optim.lr"),
    ({"arms": {"a": {"model.norm": "batch"}}}, "arms.a: model.norm"),
    ({"arms": {"a": {"seed": 3}}}, "arms.a.seed"),
    ({"baseline": "nope"}, "baseline: 'nope' is not an arm"),
    ({"seeds": []}, "seeds"),
    ({"seeds": [1, 1]}, "seeds: each seed may appear once"),
    ({"bogus": 1}, "bogus: unknown key\n"),
    ({"seed": 1}, "seed: unknown key (did you mean seeds?)"),
    ({"model": {"norm": "none"}}, "model: unknown key (did you mean base.model?)"),  # base: forgotten
    ({"arms": {"..": {}}}, "an arm name must be"),
    ({"arms": {".": {}}}, "an arm name must be"),
    ({"name": ".."}, "name: '..' is not a usable directory name"),
    ({"seeds": [True, 1.0]}, "seeds.0"),
    ({"seeds": [0, 1.0]}, "seeds.1"),
    ({"target_accuracy": True}, "target_accuracy"),
    ({"base": {**TINY["base"], "optim": {"lr": 0}}}, "base: optim.lr"),
    ({"base": "missing.yaml"}, "base: config file not found"),
    ({"arms": {"a": {}, "reg": {"data.dataset": "linear_regression", "model.kind": "linear"}}},
     "target_accuracy: arm `reg` is a regression (data.dataset linear_regression, an MSE loss)"),
])
def test_bad_comparison_configs(tmp_path, monkeypatch, change, expected):
    cfg = {**TINY, **change}
    if "arms" in change:
        del cfg["baseline"]  # defaults to the first arm
    if cfg["arms"] is None:
        del cfg["arms"]
    write_cfg(tmp_path / "c.yaml", cfg)
    err = _bad(tmp_path, monkeypatch, ["compare", "-c", "c.yaml"])
    assert expected in err


def test_a_regression_comparison_says_its_model_without_an_activation_and_refuses_a_target(tmp_path, monkeypatch):
    cfg = {"name": "reg", "seeds": [0],
           "base": {"device": "cpu", "model": {"kind": "linear", "depth": 2},
                    "data": {"dataset": "linear_regression", "batch_size": 16,
                             "linear_regression": {"num_samples": 64, "num_test": 16, "num_features": 4}},
                    "train": {"steps": 4, "eval_every": 2, "log_every": 2, "checkpoint_every": 4},
                    "probes": {"enabled": False}},
           "arms": {"plain": {"model.norm": "none"}}}
    write_cfg(tmp_path / "c.yaml", cfg)
    code, out, err = run_cli(["compare", "-c", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "c"), "-q"])
    assert code == 0, err
    text = (tmp_path / "c" / "report.md").read_text()
    assert "model: linear; optimizer" in text, text.splitlines()[2]
    # A target accuracy on these runs: refused, nothing created.
    err = _bad(tmp_path, monkeypatch, ["compare", str(tmp_path / "c" / "plain" / "s0"), "--set",
                                       "target_accuracy=0.5"])
    assert "target_accuracy: arm `plain` is a regression" in err


@pytest.mark.parametrize("argv, expected", [
    (["--set", "base.optim.lr=-1"], "base: optim.lr"),
    (["--set", "arms.no_bn.model.nrom=none"], "arms.no_bn: model.nrom: unknown key"),
    (["--set", "seedz=[1]"], "seedz: unknown key (did you mean seeds?)"),
    (["--set", "base.optim.lrr=1"], "base: optim.lrr: unknown key (did you mean optim.lr?)"),
    (["--out", "existing"], "already exists"),
    (["--resume", "existing"], "do not combine"),
    (["--out", "afile/x"], "cannot create a comparison directory at afile/x"),
    (["--set", "out_dir=afile"], "cannot create a comparison directory at afile/compare/tiny"),
])
def test_bad_flags(tmp_path, monkeypatch, argv, expected):
    write_cfg(tmp_path / "c.yaml", {**TINY, "seeds": [0]})
    (tmp_path / "existing").mkdir()
    (tmp_path / "afile").write_text("a file where a directory would go")
    err = _bad(tmp_path, monkeypatch, ["compare", "-c", "c.yaml", *argv])
    assert expected in err


def test_base_file_and_set_overrides_are_resolved(tmp_path):
    from bnexp.experiments.compare import load_compare, plan

    (tmp_path / "sub").mkdir()
    write_cfg(tmp_path / "sub" / "base.yaml", TINY["base"])
    # Arm a is written nested, arm b with a dotted key: both mean an override of model.norm.
    arms = {"a": {"model": {"norm": "none"}}, "b": {"model.norm": "torch"}}
    write_cfg(tmp_path / "sub" / "c.yaml", {**TINY, "base": "base.yaml", "baseline": "b", "arms": arms})
    cmp = load_compare(tmp_path / "sub" / "c.yaml", ["base.train.steps=7", "seeds=[3]", "arms.a.optim.lr=2.0"])
    jobs = {j.arm: j.cfg for j in plan(cmp)}
    assert cmp.seeds == [3] and cmp.baseline == "b"
    assert jobs["a"].train.steps == 7 and jobs["a"].optim.lr == 2.0 and jobs["a"].model.norm == "none"
    assert jobs["b"].optim.lr == 0.5 and jobs["b"].model.norm == "torch" and jobs["b"].seed == 3


def test_not_a_run_directory(tmp_path, monkeypatch):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    err = _bad(tmp_path, monkeypatch, ["compare", "junk"])
    assert "junk is not a bnexp run directory" in err
    err = _bad(tmp_path, monkeypatch, ["compare", "nowhere"])
    assert "nowhere does not exist" in err
    err = _bad(tmp_path, monkeypatch, ["compare", "--resume", "junk"])
    assert "not a comparison directory" in err


def _fake_run(path: Path, cfg: dict, summary: dict | str) -> Path:
    """A run directory as bnexp writes it (config.yaml, summary.json), without training."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    (path / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    return path


@pytest.mark.parametrize("config, summary, expected", [
    ({"name": "a"}, '{"status": "compl', "corrupted run/summary.json: not valid JSON"),
    ({"name": "a"}, "[1, 2]", "corrupted run/summary.json: not a JSON object"),
    ({"name": "a"}, '{"status": [1]}', "corrupted run/summary.json: status is not a string"),
    ("model: [", {"status": "completed"}, "malformed YAML in run/config.yaml"),
])
def test_damaged_run_directory_is_a_user_error(tmp_path, monkeypatch, config, summary, expected):
    _fake_run(tmp_path / "run", config, summary)
    err = _bad(tmp_path, monkeypatch, ["compare", "run"])
    assert expected in err


def test_damaged_metrics_is_a_user_error(tmp_path, monkeypatch):
    run = _fake_run(tmp_path / "run", {"name": "a"}, {"status": "completed"})
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": \n{"step": 20}\n')
    err = _bad(tmp_path, monkeypatch, ["compare", "run"])
    assert "corrupted run/metrics.jsonl" in err


def test_runs_named_alike_with_different_configs_are_different_arms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for norm, acc in (("none", 0.5), ("bnexp", 0.9)):
        for seed in (0, 1):
            _fake_run(tmp_path / f"{norm}{seed}", {"name": "default", "seed": seed, "out_dir": f"o{seed}",
                                                   "model": {"norm": norm, "hidden": [4]}},
                      {"status": "completed", "seed": seed, "test_accuracy": acc + seed / 100})
    code, out, err = run_cli(["compare", "none0", "none1", "bnexp0", "bnexp1", "--out", "r", "-q"])
    assert code == 0, err
    table = read_csv(tmp_path / "r" / "summary.csv")
    # Named by the one key that tells them apart; seed and out_dir do not make an arm.
    assert list(table) == ["model.norm-none", "model.norm-bnexp"]
    assert [int(table[a]["runs"]) for a in table] == [2, 2]
    assert float(table["model.norm-bnexp"]["final_acc_mean"]) == pytest.approx(0.905)


def test_a_damaged_run_in_a_comparison_is_recorded_as_failed(tiny_comparison, tmp_path):
    import shutil

    comp, code, _, _ = tiny_comparison
    assert code == 0
    copy = tmp_path / "c"
    shutil.copytree(comp, copy)
    (copy / "bnexp" / "s1" / "summary.json").write_text('{"status": "compl')
    before = tree(copy / "no_bn")
    code, out, err = run_cli(["compare", "--resume", str(copy)])
    assert code == 0, err
    assert "0 of 4 runs to finish" in err and "corrupted" in err
    assert tree(copy / "no_bn") == before
    table = read_csv(copy / "summary.csv")
    assert table["bnexp"]["failed"] == "1" and table["bnexp"]["completed"] == "1"
    assert "| bnexp | 1 | failed: corrupted " in (copy / "report.md").read_text()


def test_resume_never_deletes_outside_the_comparison(tiny_comparison, tmp_path, monkeypatch):
    import shutil

    comp, code, _, _ = tiny_comparison
    assert code == 0
    copy = tmp_path / "c"
    shutil.copytree(comp, copy)
    outside = tmp_path / "outside"
    (outside / "s0").mkdir(parents=True)
    (outside / "s0" / "keep.txt").write_text("not bnexp's")
    shutil.rmtree(copy / "no_bn")
    (copy / "no_bn").symlink_to(outside)  # s0 below it is not a run: resume would delete it
    code, out, err = run_cli(["compare", "--resume", str(copy)])
    assert code == 2 and "refusing to delete" in err and len(err.strip().splitlines()) == 1
    assert (outside / "s0" / "keep.txt").read_text() == "not bnexp's"


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "compare").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_comparison_config_plans(path):
    """A comparison config in the repository that no longer validates would only fail when a user runs it."""
    from bnexp.experiments.compare import load_compare, plan

    cmp = load_compare(path, [])
    jobs = plan(cmp)
    assert len(jobs) == len(cmp.arm_names) * len(cmp.seeds) <= cmp.max_runs
    assert {j.arm for j in jobs} == set(cmp.arm_names)


@pytest.mark.parametrize("path", [REPO / "configs" / "default.yaml",
                                  *sorted((REPO / "configs" / "ablations").glob("*.yaml"))], ids=lambda p: p.stem)
def test_every_shipped_experiment_config_validates(path):
    from bnexp.config import load

    assert load(path).name


# --- issue 17: killed comparisons, two resumes at once, runs another process trains, links ----------------

def _copy_with_a_run_to_finish(tiny_comparison, tmp_path, run: str = "bnexp/s1") -> Path:
    """A copy of the tiny comparison whose `run` is marked interrupted at its last checkpoint (resuming it
    trains nothing and completes it again)."""
    import shutil

    comp, code, _, _ = tiny_comparison
    assert code == 0
    copy = tmp_path / "c"
    shutil.copytree(comp, copy)
    summary = copy / run / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "status": "interrupted"}))
    return copy


def test_a_second_resume_of_a_comparison_is_refused_and_changes_nothing(tiny_comparison, tmp_path):
    from bnexp.engine import rundir

    copy = _copy_with_a_run_to_finish(tiny_comparison, tmp_path)
    with rundir.locked(copy):  # what a running `compare` or `compare --resume` of it holds
        before = tree(copy)
        code, out, err = run_cli(["compare", "--resume", str(copy)])
        assert (code, out) == (2, "")
        assert err == f"error: comparison {copy} is being run or resumed by another process\n"
        assert tree(copy) == before
    code, out, err = run_cli(["compare", "--resume", str(copy), "-q"])  # once the other one is done
    assert code == 0, err
    assert read_csv(copy / "summary.csv")["bnexp"]["completed"] == "2"


def test_a_run_another_process_trains_is_busy_not_failed(tiny_comparison, tmp_path):
    """A run whose lock another process holds (a worker orphaned by a killed comparison, say) is skipped
    without an error file; the next resume finishes it."""
    from bnexp.engine import rundir

    copy = _copy_with_a_run_to_finish(tiny_comparison, tmp_path)
    with rundir.locked(copy / "bnexp" / "s1"):
        code, out, err = run_cli(["compare", "--resume", str(copy)])
    assert code == 0, err
    assert f"bnexp seed 1: busy: run {copy / 'bnexp' / 's1'} is being trained by another process" in err
    assert not (copy / "bnexp" / "s1" / "error.txt").exists()
    row = read_csv(copy / "summary.csv")["bnexp"]
    assert (row["completed"], row["failed"], row["unfinished"]) == ("1", "0", "1")
    assert run_cli(["compare", "--resume", str(copy), "-q"])[0] == 0
    row = read_csv(copy / "summary.csv")["bnexp"]
    assert (row["completed"], row["failed"], row["unfinished"]) == ("2", "0", "0")


def test_an_error_file_beside_a_run_that_completed_later_is_stale(tiny_comparison, tmp_path):
    copy = _copy_with_a_run_to_finish(tiny_comparison, tmp_path, "no_bn/s0")
    (copy / "no_bn" / "s0" / "summary.json").write_text((tiny_comparison[0] / "no_bn" / "s0" / "summary.json")
                                                       .read_text())  # completed after all
    (copy / "no_bn" / "s0" / "error.txt").write_text("RunDirError: run is being trained by another process\n")
    code, out, err = run_cli(["compare", "--resume", str(copy), "-q"])
    assert code == 0, err
    row = read_csv(copy / "summary.csv")["no_bn"]
    assert (row["completed"], row["failed"]) == ("2", "0")


def test_an_arm_folder_that_is_a_link_is_refused(tiny_comparison, tmp_path):
    import shutil

    copy = _copy_with_a_run_to_finish(tiny_comparison, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(copy / "bnexp", elsewhere)
    (copy / "bnexp").symlink_to(elsewhere)
    before = tree(elsewhere)
    code, out, err = run_cli(["compare", "--resume", str(copy)])
    assert code == 2 and err.count("\n") == 1
    assert err == (f"error: {copy / 'bnexp'} is a symbolic link or a file, not a folder inside the comparison: "
                   f"refusing to delete or write through it\n")
    assert tree(elsewhere) == before  # nothing trained into the other folder


def test_resume_of_a_read_only_comparison_is_one_line(tiny_comparison, tmp_path, monkeypatch):
    """A read-only folder, faked at the OS-call boundary (EROFS from every call that would change
    something below it; the test runs as root, which a chmod would not stop)."""
    import errno
    import io
    import os

    copy = _copy_with_a_run_to_finish(tiny_comparison, tmp_path)
    root = str(copy)

    def refuse(real, writes=lambda *a: True):
        def call(path, *args, **kwargs):
            if str(os.path.abspath(os.fspath(path))).startswith(root) and writes(*args):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return real(path, *args, **kwargs)
        return call

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    monkeypatch.setattr(os, "open", refuse(os.open, lambda flags, *a: flags & write_flags))
    monkeypatch.setattr(io, "open", refuse(io.open, lambda mode="r", *a: any(c in mode for c in "wax+")))
    for name in ("mkdir", "unlink", "rmdir", "rename", "replace", "remove"):
        monkeypatch.setattr(os, name, refuse(getattr(os, name)))
    before = tree(copy)
    code, out, err = run_cli(["compare", "--resume", str(copy)])
    assert (code, out) == (2, "")
    assert err == f"error: cannot write to comparison directory {copy}: Read-only file system\n"
    monkeypatch.undo()
    assert tree(copy) == before


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _start_killable(argv: list[str], cwd: Path, comp: Path):
    """`bnexp compare ... --jobs 2` in its own process group, once both its workers train; with their pids."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bnexp.cli", "compare", *argv, "--jobs", "2"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    workers: list[int] = []
    while len(workers) < 2:  # both workers are up (the resource tracker is a child too, not a worker)
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        workers = [p for p in _children(proc.pid) if "resource_tracker" not in open(f"/proc/{p}/cmdline").read()]
        time.sleep(0.05)
    started = {r: (r / "metrics.jsonl").stat().st_size if (r / "metrics.jsonl").exists() else -1
               for r in comp.glob("*/s*")}
    while sum((r / "metrics.jsonl").exists() and (r / "metrics.jsonl").stat().st_size > started.get(r, -1)
              for r in comp.glob("*/s*")) < 2:  # and both train
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc, workers


def _stopped(proc, workers: list[int]) -> tuple[str, str]:
    """Wait for `proc` to end and its workers to be gone (at most a minute each); its stdout and stderr.
    Workers still alive then are killed, and the test fails."""
    import os
    import signal
    import subprocess
    import time

    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)  # not communicate(): workers that outlived it would hold its pipes open
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [p for p in [proc.pid, *workers] if _alive(p)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert not survivors, "a worker outlived its comparison"
    return out, err


@pytest.mark.slow
def test_workers_die_with_their_comparison_and_it_resumes_cleanly(tmp_path):
    """`compare --jobs 2` stopped while both workers train, twice: by SIGTERM (the parent has them checkpoint
    and stop, and says so) and, resumed, by SIGKILL (the kernel kills them with their parent). No worker
    outlives its comparison, and a resume right after completes every run, none counted as failed."""
    import signal

    cfg = write_cfg(tmp_path / "c.yaml", {**TINY, "base": {**TINY["base"], "probes": {"enabled": False},
                                                        "train": {**TINY["base"]["train"], "steps": 1000,
                                                                  "checkpoint_every": 250}}})
    comp = tmp_path / "c"
    proc, workers = _start_killable(["-c", str(cfg), "--out", str(comp)], tmp_path, comp)
    started = sorted(comp.glob("*/s*"))
    proc.send_signal(signal.SIGTERM)
    out, err = _stopped(proc, workers)
    assert proc.returncode == 143 and "Traceback" not in err
    assert sorted(comp.glob("*/s*")) == started  # no queued run started after the signal
    assert err.strip().splitlines()[-3:] == [
        "  stopped at a checkpoint, resumable (2): " + ", ".join(
            f"{r.parent.name}/{r.name} at step {json.loads((r / 'summary.json').read_text())['steps']}" for r in started),
        "  not started (2): bnexp/s0, bnexp/s1",
        f"finish with: bnexp compare --resume {comp}"]
    assert out.strip().splitlines()[-1] == str(comp)
    assert "interrupted" in [json.loads((r / "summary.json").read_text())["status"] for r in comp.glob("*/s*")]

    proc, workers = _start_killable(["--resume", str(comp)], tmp_path, comp)
    proc.kill()
    _stopped(proc, workers)

    code, out, err = run_cli(["compare", "--resume", str(comp)])
    assert code == 0, err
    assert not list(comp.glob("*/s*/error.txt"))
    table = read_csv(comp / "summary.csv")
    assert all((table[arm]["completed"], table[arm]["failed"]) == ("2", "0") for arm in TINY["arms"])


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _wait_for(proc, condition, timeout: float = 180) -> None:
    """Poll `condition` while `proc` runs; the timeout only guards against a hang."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


# Six long runs (three arms x two seeds): more than two workers can take at once, and none ends by itself
# before the test has signalled the comparison.
LONG = {**TINY, "arms": {**TINY["arms"], "torch_bn": {"model.norm": "torch"}},
        "base": {**TINY["base"], "probes": {"enabled": False},
                 "train": {**TINY["base"]["train"], "steps": 100_000, "eval_every": 1000, "checkpoint_every": 50_000}}}


@pytest.mark.slow
def test_ctrl_c_to_compare_jobs_2_starts_no_queued_run_and_says_what_it_stopped(tmp_path):
    """Ctrl-C (SIGINT to the whole process group: the comparison and its workers, which may finish their
    checkpoints before the comparison has heard of it) once its two workers train the first two of six
    runs: those two checkpoint, none of the four queued runs gets a directory, and stderr lists what was
    stopped and what never started. (A `kill` of the comparison alone: the test above.)"""
    import os
    import signal

    from bnexp.engine.checkpoint import list_checkpoints

    cfg = write_cfg(tmp_path / "c.yaml", LONG)
    comp = tmp_path / "c"
    proc, workers = _start_killable(["-c", str(cfg), "--out", str(comp)], tmp_path, comp)
    _wait_for(proc, lambda: sum('"train/loss"' in _read(r / "metrics.jsonl") for r in comp.glob("*/s*")) == 2)
    started = sorted(str(r.relative_to(comp)) for r in comp.glob("*/s*"))
    os.killpg(proc.pid, signal.SIGINT)
    out, err = _stopped(proc, workers)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert out.strip().splitlines()[-1] == str(comp)
    assert sorted(str(r.relative_to(comp)) for r in comp.glob("*/s*")) == started == ["no_bn/s0", "no_bn/s1"], err
    steps = {}
    for run in started:
        summary = json.loads((comp / run / "summary.json").read_text())
        assert summary["status"] == "interrupted" and 0 < summary["steps"] < 100_000
        newest = list_checkpoints(comp / run)[-1]  # the signal's checkpoint, which the summary describes
        assert int(newest.stem.split("-")[1]) == summary["steps"]
        steps[run] = summary["steps"]
    lines = err.strip().splitlines()
    assert lines[-4:] == [
        "interrupted by SIGINT; of the comparison's 6 runs:",
        f"  stopped at a checkpoint, resumable (2): no_bn/s0 at step {steps['no_bn/s0']}, "
        f"no_bn/s1 at step {steps['no_bn/s1']}",
        "  not started (4): bnexp/s0, bnexp/s1, torch_bn/s0, torch_bn/s1",
        f"finish with: bnexp compare --resume {comp}",
    ]


def test_an_arm_folder_made_by_the_other_worker_meanwhile_is_taken(tmp_path, monkeypatch):
    """The two workers of `--jobs 2` start two seeds of one arm at once: the second to make the arm's folder
    finds it made (here the folder appears between the look and the mkdir, faked at the OS call), and its
    run trains rather than failing with "File exists" (seen in the signal test above)."""
    import errno
    import os

    from bnexp.engine import files

    arm = tmp_path / "no_bn"
    real_lstat = os.lstat

    def made_meanwhile(path, *args, **kwargs):
        if Path(path) == arm and not arm.exists():
            os.mkdir(arm)  # the other worker, just now
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", made_meanwhile)
    assert files.real_dir(arm, create=True) == arm and arm.is_dir()


@pytest.mark.slow
def test_a_signal_as_a_run_ends_starts_no_other_run_with_jobs_1(tmp_path, monkeypatch):
    """`compare` (one run at a time, in-process) signalled at the last step of its second run: that run
    completes (there is nothing left to stop), the two queued runs never start, and stderr says so."""
    import signal

    from bnexp.engine import session

    cfg = write_cfg(tmp_path / "tiny.yaml", TINY)
    comp = tmp_path / "c"

    class CtrlCAtTheEnd:
        def after_step(self, trainer, step):
            if trainer.cfg.name == "no_bn" and trainer.cfg.seed == 1 and step == TINY["base"]["train"]["steps"]:
                signal.raise_signal(signal.SIGTERM)

    real = session.Trainer
    monkeypatch.setattr(session, "Trainer",
                        lambda *a, callbacks=(), **k: real(*a, callbacks=[*callbacks, CtrlCAtTheEnd()], **k))
    code, out, err = run_cli(["compare", "-c", str(cfg), "--out", str(comp)])
    assert code == 143, err
    assert sorted(p.name for p in comp.iterdir() if p.is_dir()) == ["no_bn"]
    assert err.strip().splitlines()[-4:] == [
        "interrupted by SIGTERM; of the comparison's 4 runs:",
        "  completed (2): no_bn/s0, no_bn/s1",
        "  not started (2): bnexp/s0, bnexp/s1",
        f"finish with: bnexp compare --resume {comp}",
    ]
    assert out.strip().splitlines()[-1] == str(comp)


@pytest.mark.slow
def test_a_signal_before_any_run_started_keeps_no_comparison(tmp_path):
    """`compare --jobs 2` signalled as soon as its directory appears, while the workers start: what it
    says matches what it left. Nearly always no run had started (workers take seconds to import torch):
    then the comparison directory is gone, stdout is empty and stderr says nothing was created; should a
    run have started, the directory is kept and named for --resume."""
    import os
    import signal
    import subprocess
    import sys

    cfg = write_cfg(tmp_path / "c.yaml", LONG)
    comp = tmp_path / "c"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bnexp.cli", "compare", "-c", str(cfg), "--out", str(comp),
                             "--jobs", "2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    _wait_for(proc, lambda: (comp / "compare.yaml").is_file())
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    if not comp.exists():
        assert out == ""
        assert err.strip().splitlines()[-1] == ("interrupted by SIGINT during start-up; no comparison directory "
                                                "was created")
        assert sorted(os.listdir(tmp_path)) == ["c.yaml"]
    else:
        assert out.strip().splitlines()[-1] == str(comp)
        assert err.strip().splitlines()[-1] == f"finish with: bnexp compare --resume {comp}"


def test_a_run_config_given_to_compare_says_to_use_train(tmp_path, monkeypatch):
    run_cfg = write_cfg(tmp_path / "run.yaml", TINY["base"])
    err = _bad(tmp_path, monkeypatch, ["compare", "-c", "run.yaml"])
    assert err == ("error: run.yaml is a run config (device, data, model, ...): train it with bnexp train -c "
                   "run.yaml, or name it as the base: of a comparison config\n")
    # Arms given with --set make it a comparison whose keys are misplaced: the error says where they go.
    err = _bad(tmp_path, monkeypatch, ["compare", "-c", str(run_cfg), "--set", "arms={a: {}}"])
    assert err == "error: invalid comparison config: device: unknown key (did you mean base.device?)\n"


# Loaded at start-up by every Python process of the test below (PYTHONPATH): in compare's workers only, it
# holds session.prepare (the worker's dataset load, before a run's directory exists) until the test says go.
_HOLD_PREPARE = '''
import os, pathlib, time
if "spawn_main" in open("/proc/self/cmdline").read():
    import bnexp.engine.session as session
    hold, prepare = pathlib.Path(os.environ["BNEXP_TEST_HOLD"]), session.prepare

    def held(cfg):
        (hold / f"entered-{os.getpid()}").touch()
        while not (hold / "go").exists():
            time.sleep(0.02)
        return prepare(cfg)

    session.prepare = held
'''


@pytest.mark.slow
def test_a_signal_to_one_worker_before_its_run_starts_interrupts_the_comparison(tmp_path):
    """SIGINT to one worker of `compare --jobs 2` alone, while it loads its data (before its run's directory
    exists): its run is cancelled and the others stop; the comparison says it was interrupted (it once
    cancelled every run and exited 0 with a report of no runs)."""
    import os
    import signal
    import subprocess
    import sys

    hold = tmp_path / "hold"
    hold.mkdir()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_HOLD_PREPARE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BNEXP_TEST_HOLD": str(hold),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    cfg, comp = write_cfg(tmp_path / "c.yaml", LONG), tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-m", "bnexp.cli", "compare", "-c", str(cfg), "--out", str(comp),
                             "--jobs", "2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    _wait_for(proc, lambda: any(hold.glob("entered-*")))
    worker = int(next(hold.glob("entered-*")).name.split("-")[1])
    workers = [p for p in _children(proc.pid) if "resource_tracker" not in open(f"/proc/{p}/cmdline").read()]
    os.kill(worker, signal.SIGINT)
    (hold / "go").touch()
    out, err = _stopped(proc, workers)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted by SIGINT" in err
    # Either no run had started (then, as for a signal to the comparison itself, no comparison directory is
    # kept) or the other worker's run had, and it was stopped at a checkpoint: never a report.
    assert not (comp / "report.md").exists()
    assert not comp.exists() or f"finish with: bnexp compare --resume {comp}" in err


# --- issue 17 review: a run folder that trained but lost its run files; a signal during the report --------

@pytest.mark.parametrize("kept", ["checkpoints", "metrics.jsonl"])
def test_resume_refuses_to_delete_a_run_folder_that_trained(tiny_comparison, tmp_path, kept):
    """A run folder without config.yaml and summary.json never started (resume deletes and retrains it),
    unless it holds checkpoints or metrics: then it trained, and resume refuses in one line, deleting
    nothing (another run's folder included)."""
    import shutil

    copy = _copy_with_a_run_to_finish(tiny_comparison, tmp_path)
    run = copy / "no_bn" / "s1"
    for name in ("config.yaml", "summary.json"):
        (run / name).unlink()
    if kept == "checkpoints":
        (run / "metrics.jsonl").unlink()
    else:
        shutil.rmtree(run / "checkpoints")
    (copy / "bnexp" / "s0" / "summary.json").unlink()  # a run that never started, listed before it: kept too
    before = tree(copy)
    code, out, err = run_cli(["compare", "--resume", str(copy)])
    assert (code, out) == (2, "")
    assert err == (f"error: {run} holds {kept} but no config.yaml and summary.json: refusing to delete a run "
                   f"that trained (restore its files, or move it away to train it again)\n")
    assert tree(copy) == before


def test_a_signal_during_the_report_is_the_commands_exit_status_once_the_report_is_written(
        tiny_comparison, tmp_path, monkeypatch):
    import os
    import signal

    from bnexp.experiments import report

    copy = _copy_with_a_run_to_finish(tiny_comparison, tmp_path)
    (copy / "summary.csv").unlink()
    real = report.write_report

    def interrupted_report(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the report is being written
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "write_report", interrupted_report)
    code, out, err = run_cli(["compare", "--resume", str(copy), "-q"])
    assert code == 130
    assert err == "interrupted by SIGINT after the runs ended; the report was written in full first\n"
    assert out == f"{copy}\n"
    assert read_csv(copy / "summary.csv")["bnexp"]["completed"] == "2"  # the report is whole
