"""Reliability (issue 7): signals, resume, kills mid-checkpoint, corrupted checkpoints, divergence and run
directories that are never overwritten or merged.

The central claim is exact: a run interrupted (SIGINT/SIGTERM, or SIGKILL while writing a checkpoint) and
resumed ends with the same weights, buffers, optimizer state, metrics.jsonl and TensorBoard scalars as an
uninterrupted run with the same seed, bit for bit on CPU, with the probes on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from bnexp.cli import main
from bnexp.engine import checkpoint, dashboard, schedule, session
from bnexp.engine import rundir as runs

# A quick run with our BN layer and every probe on; log_every (7) does not divide checkpoint_every (150),
# so an interruption usually lands with losses pending in the log interval, which the checkpoint must keep.
RUN = {
    "name": "rel",
    "device": "cpu",
    "data": {"dataset": "synthetic", "batch_size": 20,
             "synthetic": {"num_samples": 300, "num_features": 8, "num_classes": 3}},
    "model": {"kind": "mlp", "hidden": [16, 16], "norm": "bnexp", "activation": "sigmoid"},
    "optim": {"name": "momentum", "lr": 0.3, "schedule": "cosine", "warmup_steps": 20},
    "train": {"steps": 600, "eval_every": 50, "log_every": 7, "checkpoint_every": 150},
    "probes": {"enabled": True, "every": 100, "population_batches": 2, "histogram_every": 300},
}
STEPS = RUN["train"]["steps"]


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def final_state(run_dir: Path, step: int = STEPS) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step-{step:08d}.pt", weights_only=True)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series as TensorBoard shows it (purged steps of a resumed run dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def files_of(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def assert_same_run(run_dir: Path, ref_dir: Path) -> None:
    """The resumed run equals the uninterrupted one: state, metrics rows, TensorBoard scalars."""
    got, want = final_state(run_dir), final_state(ref_dir)
    assert got["model"].keys() == want["model"].keys()
    for key, tensor in want["model"].items():  # weights and buffers (running stats, num_batches_tracked)
        assert torch.equal(got["model"][key], tensor), key
    for i, st in want["optimizer"]["state"].items():
        for name, tensor in st.items():
            assert torch.equal(got["optimizer"]["state"][i][name], tensor), (i, name)
    assert torch.equal(got["rng"]["torch"], want["rng"]["torch"])
    assert runs.read_metrics(run_dir) == runs.read_metrics(ref_dir)

    tb, tb_ref = scalars(run_dir), scalars(ref_dir)
    assert tb.keys() == tb_ref.keys()
    for tag, series in tb.items():
        steps = [s for s, _ in series]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice"
        assert series == tb_ref[tag], tag
    summary = runs.read_summary(run_dir)
    ref_summary = runs.read_summary(ref_dir)
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    for key in ("test_accuracy", "best_test_accuracy", "gap_accuracy", "running_mean_err", "running_var_err"):
        assert summary[key] == ref_summary[key], key


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks on a busy 2-core machine: a second intra-op thread only adds contention. Subprocesses
    get OMP_NUM_THREADS=1 too, so every run here computes with the same kernels."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread) -> Path:
    """The uninterrupted run every interrupted one is compared with (trained in-process once)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write(tmp / "run.yaml", RUN)
    out = tmp / "ref"
    assert main(["train", "-c", str(cfg), "--out", str(out), "-q"]) == 0
    return out


def spawn(args: list[str], cwd: Path, code: str | None = None, env: dict | None = None) -> subprocess.Popen:
    """`python -m bnexp.cli ...`, or a script that patches something first and then calls main."""
    cmd = [sys.executable, "-m", "bnexp.cli", *args] if code is None else [sys.executable, "-c", code, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"child ended early with {proc.returncode}: {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("child made no progress")
        time.sleep(0.005)


def add_callback(monkeypatch, callback) -> None:
    """Every Trainer the engine builds from now on calls `callback.after_step(trainer, step)` at the end of
    each step (the Trainer's public callback seam)."""
    real = session.Trainer
    monkeypatch.setattr(session, "Trainer",
                        lambda *a, callbacks=(), **k: real(*a, callbacks=[*callbacks, callback], **k))


def trainers_built(monkeypatch) -> list:
    """The Trainers the engine builds from now on, in order."""
    built, real = [], session.Trainer

    def build(*a, **k):
        built.append(real(*a, **k))
        return built[-1]

    monkeypatch.setattr(session, "Trainer", build)
    return built


def logged_steps(run_dir: Path) -> int:
    try:
        return len(runs.read_metrics(run_dir))
    except (OSError, ValueError):
        return 0


# --- SIGINT / SIGTERM in a real subprocess ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_run_then_resume_equals_uninterrupted_run(tmp_path, capsys, reference, sig, code):
    cfg = write(tmp_path / "run.yaml", RUN)
    run_dir = tmp_path / "run"
    proc = spawn(["train", "-c", str(cfg), "--out", str(run_dir), "-q"], tmp_path)
    # Signal as soon as training rows appear: well before the last of 600 steps.
    wait_for(lambda: logged_steps(run_dir) >= 3, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)

    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert f"interrupted by {signal.Signals(sig).name}" in err
    assert out.strip().splitlines()[-1] == str(run_dir)
    summary = runs.read_summary(run_dir)
    assert summary["status"] == "interrupted"
    stopped = summary["steps"]
    assert 0 < stopped < STEPS
    assert checkpoint.list_checkpoints(run_dir)[-1].name == f"step-{stopped:08d}.pt"

    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 0, err
    assert out.strip().splitlines()[-1] == str(run_dir)
    assert_same_run(run_dir, reference)


# --- SIGKILL while a checkpoint is being written --------------------------------------------------------

# Runs the CLI with the checkpoint file write patched so that the third checkpoint stops half written (and
# fsynced) under its temporary name, then tells the test by creating a marker file and waits to be killed:
# a deterministic "kill -9 mid-write". (The write runs on the checkpoint writer's thread; the loop blocks at
# the next checkpoint, waiting for it.)
PAUSE_IN_SAVE = """
import os, sys, time
import bnexp.engine.checkpoint as ck
real_write, calls = ck.write, [0]
def write(run_dir, step, data):
    calls[0] += 1
    if calls[0] == 3:
        with open(run_dir / ck.CHECKPOINTS / f".step-{step:08d}.pt.tmp", "wb") as f:
            f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        open(os.environ["PAUSE_MARKER"], "w").close()
        time.sleep(600)
    return real_write(run_dir, step, data)
ck.write = write
from bnexp.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def killed_template(tmp_path_factory) -> Path:
    """One run killed by SIGKILL inside its third checkpoint write (a subprocess is slow to start: the tests
    below each get a copy)."""
    tmp = tmp_path_factory.mktemp("killed")
    cfg = write(tmp / "run.yaml", RUN)
    run_dir = tmp / "run"
    marker = tmp / "paused"
    proc = spawn(["train", "-c", str(cfg), "--out", str(run_dir), "-q"], tmp, code=PAUSE_IN_SAVE,
                 env={"PAUSE_MARKER": str(marker)})
    wait_for(marker.exists, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return run_dir


@pytest.fixture
def killed_mid_save(killed_template, tmp_path) -> Path:
    return Path(shutil.copytree(killed_template, tmp_path / "run"))


@pytest.mark.slow
def test_sigkill_mid_checkpoint_resumes_from_last_complete_one(killed_mid_save, capsys, reference):
    run_dir = killed_mid_save
    # Checkpoints at 150 and 300 are complete; the one for 450 is a half-written temporary file.
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000150.pt", "step-00000300.pt"]
    partial = run_dir / "checkpoints" / ".step-00000450.pt.tmp"
    assert partial.is_file()
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(partial)
    assert runs.read_summary(run_dir)["status"] == "running"  # SIGKILL leaves no chance to mark it
    assert max(r["step"] for r in runs.read_metrics(run_dir)) >= 450  # rows past the fallback are redone

    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 0, err
    assert not partial.exists()  # the stale temporary is cleaned once a newer checkpoint is durable
    assert_same_run(run_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_ours", "empty"])
def test_damaged_checkpoint_is_a_one_line_error_and_deletes_nothing(killed_mid_save, capsys, damage):
    run_dir = killed_mid_save
    newest = checkpoint.list_checkpoints(run_dir)[-1]
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 3])
    elif damage == "garbage":
        newest.write_bytes(bytes(range(256)) * 64)
    elif damage == "not_ours":
        torch.save({"weights": torch.ones(3)}, newest)
    else:
        newest.write_bytes(b"")
    before = files_of(run_dir)

    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert str(newest) in err and "checkpoint" in err
    assert "Traceback" not in err
    assert files_of(run_dir) == before  # nothing deleted, truncated or rewritten


def test_checkpoint_that_does_not_fit_the_config_is_a_user_error(tmp_path, capsys):
    cfg = write(tmp_path / "run.yaml", {**RUN, "train": {**RUN["train"], "steps": 20}})
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "train", "-c", cfg, "--out", run_dir, "-q")[0] == 0
    # Someone swaps the run's config for a wider network and marks the run resumable.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["model"]["hidden"] = [32, 16]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    summary = runs.read_summary(run_dir)
    runs.write_summary(run_dir, {**summary, "status": "interrupted"})
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 2 and err.count("\n") == 1
    assert "step-00000020.pt does not fit the run's config.yaml" in err


# --- signals delivered in-process at chosen moments -----------------------------------------------------

def test_signal_during_startup_creates_nothing(tmp_path, capsys, monkeypatch):
    real_load = session.load_dataset

    def load_then_signal(cfg):
        data = real_load(cfg)
        os.kill(os.getpid(), signal.SIGTERM)  # lands while the data loads: nothing is on disk yet
        return data

    monkeypatch.setattr(session, "load_dataset", load_then_signal)
    cfg = write(tmp_path / "run.yaml", RUN)
    rc, out, err = run_cli(capsys, "train", "-c", cfg, "--out", tmp_path / "run", "-q")
    assert rc == 143
    assert err == "interrupted by SIGTERM during start-up; no run directory was created\n"
    assert out == ""
    assert not (tmp_path / "run").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_signal_after_the_run_dir_exists_checkpoints_step_0(tmp_path, capsys, monkeypatch, reference):
    real = session.Trainer

    def build_then_signal(*args, **kwargs):
        trainer = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # the directory exists: recorded, acted on before step 1
        return trainer

    monkeypatch.setattr(session, "Trainer", build_then_signal)
    cfg = write(tmp_path / "run.yaml", RUN)
    run_dir = tmp_path / "run"
    rc, out, err = run_cli(capsys, "train", "-c", cfg, "--out", run_dir, "-q")
    assert rc == 130 and "Traceback" not in err
    summary = runs.read_summary(run_dir)
    assert (summary["status"], summary["steps"]) == ("interrupted", 0)
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000000.pt"]
    assert [r["step"] for r in runs.read_metrics(run_dir)] == [0]

    monkeypatch.setattr(session, "Trainer", real)
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 0, err
    assert_same_run(run_dir, reference)



class SignalAt:
    """Sends this process `sig` once, at the end of step `step` (after its row is logged)."""

    def __init__(self, step: int, sig: int):
        self.step, self.sig, self.sent = step, sig, False

    def after_step(self, trainer, step: int) -> None:
        if step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.sig)


def signal_after_row(monkeypatch, at_step: int, sig: int) -> None:
    """Make the run signal itself once, right after it logs the row of `at_step`."""
    add_callback(monkeypatch, SignalAt(at_step, sig))


def _blow_up_after_update(monkeypatch, at: int, value: float) -> None:
    """Set the output layer's first bias to `value` right after the update of step `at` (of whichever
    Trainer is training, so a resumed run gets it at the same step)."""
    trainers = trainers_built(monkeypatch)
    real_step = torch.optim.SGD.step

    def step(opt, *args, **kwargs):
        out = real_step(opt, *args, **kwargs)
        if trainers and trainers[-1].step + 1 == at:  # Trainer.step counts the updates before this one
            with torch.no_grad():
                opt.param_groups[0]["params"][-1][0] = value
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)


def assert_a_signal_changes_nothing_in_a_diverging_run(tmp_path, capsys, monkeypatch, cfg: Path,
                                                     at_row: int) -> None:
    """Run `cfg` (it must diverge) straight, then again with a SIGINT after the row of `at_row` and a resume:
    the same divergence, the same final evaluation of the diverged network, the same rows."""
    assert run_cli(capsys, "train", "-c", cfg, "--out", tmp_path / "straight", "-q")[0] == 0
    expected = runs.read_summary(tmp_path / "straight")
    assert expected["status"] == "diverged"
    signal_after_row(monkeypatch, at_row, signal.SIGINT)
    assert run_cli(capsys, "train", "-c", cfg, "--out", tmp_path / "resumed", "-q")[0] == 130
    assert run_cli(capsys, "train", "--resume", tmp_path / "resumed", "-q")[0] == 0
    got = runs.read_summary(tmp_path / "resumed")
    for key in ("status", "diverged_step", "steps", "test_loss", "test_accuracy", "best_test_accuracy"):
        assert got[key] == expected[key] or (got[key] != got[key] and expected[key] != expected[key]), key
    assert runs.read_metrics(tmp_path / "resumed") == runs.read_metrics(tmp_path / "straight")


def test_a_checkpoint_of_format_1_resumes_like_an_uninterrupted_run(tmp_path, capsys, monkeypatch, reference):
    """Checkpoints written before the loop's read-back state became one `train_metrics` entry (format 1: no
    "format" key; read_losses and read_hits, the steps of the log interval in progress; pending_losses and
    pending_correct, steps not read yet, empty since a checkpoint follows a read; loss_window) still resume,
    bit-identically. Interrupted at step 353, mid log interval (log_every 7)."""
    signal_after_row(monkeypatch, 353, signal.SIGTERM)
    cfg = write(tmp_path / "run.yaml", RUN)
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "train", "-c", cfg, "--out", run_dir, "-q")[0] == 143
    newest = checkpoint.list_checkpoints(run_dir)[-1]
    state = torch.load(newest, weights_only=True)
    assert state.pop("format") == checkpoint.FORMAT == 3
    metrics = state.pop("train_metrics")
    assert len(metrics["losses"]) == 353 % 7
    state.update(read_losses=metrics["losses"], read_hits=metrics["hits"], pending_losses=[],
                 pending_correct=[], loss_window=metrics["window"])
    torch.save(state, newest)  # as bnexp wrote it then: no checksum
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 0, err
    assert f"note: {newest} is of format 1, written by an older bnexp without a checksum: resuming from it " \
           f"unverified\n" in err
    assert_same_run(run_dir, reference)


def test_a_checkpoint_of_an_unknown_format_is_a_one_line_error(tmp_path, capsys):
    cfg = write(tmp_path / "run.yaml", {**RUN, "train": {**RUN["train"], "steps": 20}})
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "train", "-c", cfg, "--out", run_dir, "-q")[0] == 0
    newest = checkpoint.list_checkpoints(run_dir)[-1]
    torch.save({**torch.load(newest, weights_only=True), "format": 99}, newest)
    runs.write_summary(run_dir, {**runs.read_summary(run_dir), "status": "interrupted"})
    before = files_of(run_dir)
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 2 and err.count("\n") == 1
    assert f"checkpoint {newest} is of format 99, from another version of bnexp" in err
    assert files_of(run_dir) == before


def test_torn_metrics_line_from_a_kill_is_dropped_on_resume(tmp_path, capsys, monkeypatch, reference):
    signal_after_row(monkeypatch, 350, signal.SIGTERM)
    cfg = write(tmp_path / "run.yaml", RUN)
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "train", "-c", cfg, "--out", run_dir, "-q")[0] == 143
    assert runs.read_summary(run_dir)["steps"] == 350
    with open(run_dir / "metrics.jsonl", "a") as f:  # a row cut off mid-write
        f.write('{"step": 351, "train/lo')
    assert runs.read_metrics(run_dir)[-1]["step"] == 350

    assert run_cli(capsys, "train", "--resume", run_dir, "-q")[0] == 0
    assert_same_run(run_dir, reference)


# --- what --resume refuses ------------------------------------------------------------------------------

def test_resume_refusals(tmp_path, capsys):
    cfg = write(tmp_path / "run.yaml", {**RUN, "train": {**RUN["train"], "steps": 10}})
    done = tmp_path / "done"
    assert run_cli(capsys, "train", "-c", cfg, "--out", done, "-q")[0] == 0
    before = files_of(done)
    cases = {
        done: "already ended (completed)",
        tmp_path / "missing": "run directory not found",
        tmp_path: "not a bnexp run directory",
    }
    for path, message in cases.items():
        rc, out, err = run_cli(capsys, "train", "--resume", path, "-q")
        assert rc == 2 and err.count("\n") == 1 and message in err, err
    rc, _, err = run_cli(capsys, "train", "--resume", done, "-c", cfg)
    assert rc == 2 and "do not combine" in err
    assert files_of(done) == before


def test_resume_refuses_a_run_another_process_is_training(tmp_path, capsys):
    cfg = write(tmp_path / "run.yaml", {**RUN, "train": {**RUN["train"], "steps": 10}})
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "train", "-c", cfg, "--out", run_dir, "-q")[0] == 0
    runs.write_summary(run_dir, {**runs.read_summary(run_dir), "status": "interrupted"})
    before = files_of(run_dir)
    with runs.locked(run_dir):  # what a live `bnexp train` holds while it writes the directory
        rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 2 and "being trained by another process" in err
    assert files_of(run_dir) == before


# --- run directories ------------------------------------------------------------------------------------

def test_runs_started_in_the_same_second_get_distinct_directories(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20250101-000000")
    cfg = write(tmp_path / "run.yaml", {**RUN, "out_dir": "out", "train": {**RUN["train"], "steps": 5}})
    paths = []
    for _ in range(2):
        rc, out, err = run_cli(capsys, "train", "-c", cfg, "-q")
        assert rc == 0, err
        paths.append(Path(out.strip().splitlines()[-1]))
    assert paths == [Path("out/rel/20250101-000000-s0"), Path("out/rel/20250101-000000-s0-2")]
    for p in paths:
        assert runs.read_summary(tmp_path / p)["status"] == "completed"
        assert [r["step"] for r in runs.read_metrics(tmp_path / p)][0] == 0  # one run's rows each


def test_racing_threads_never_share_a_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20250101-000000")
    made: list[Path] = []
    barrier = threading.Barrier(8)

    def make():
        barrier.wait()
        made.append(runs.create_run_dir(tmp_path, "race", 0))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8 and all(p.is_dir() for p in made)


@pytest.mark.parametrize("existing", ["empty_dir", "run_dir", "file"])
def test_existing_out_is_refused_untouched(tmp_path, capsys, existing):
    cfg = write(tmp_path / "run.yaml", {**RUN, "train": {**RUN["train"], "steps": 5}})
    out = tmp_path / "out"
    if existing == "run_dir":
        assert run_cli(capsys, "train", "-c", cfg, "--out", out, "-q")[0] == 0
    elif existing == "empty_dir":
        out.mkdir()
    else:
        out.write_text("notes")
    before = files_of(tmp_path)
    rc, stdout, err = run_cli(capsys, "train", "-c", cfg, "--out", out, "-q")
    assert rc == 2 and stdout == "" and err.count("\n") == 1
    assert f"--out {out} already exists" in err
    if existing == "run_dir":
        assert f"--resume {out}" in err
    assert files_of(tmp_path) == before


def test_out_under_a_file_is_a_user_error(tmp_path, capsys):
    cfg = write(tmp_path / "run.yaml", {**RUN, "train": {**RUN["train"], "steps": 5}})
    (tmp_path / "afile").write_text("x")
    rc, out, err = run_cli(capsys, "train", "-c", cfg, "--out", tmp_path / "afile" / "run", "-q")
    assert rc == 2 and err.startswith("error: cannot create a run directory") and err.count("\n") == 1


# --- divergence -----------------------------------------------------------------------------------------

HIGH_LR = {
    "name": "high_lr",
    "device": "cpu",
    "data": {"dataset": "digits", "batch_size": 60},
    "model": {"kind": "mlp", "hidden": [100, 100, 100], "activation": "sigmoid"},
    "optim": {"name": "sgd", "lr": 25.0},
    "train": {"steps": 400, "eval_every": 100, "log_every": 10, "checkpoint_every": 400},
    "probes": {"enabled": False},
}


def independent_losses(cfg_dict: dict, steps: int) -> list[float]:
    """The per-step training losses, recomputed by a plain loop outside the Trainer."""
    from bnexp.config import validate
    from bnexp.data import BatchSampler, load_dataset
    from bnexp.models import build_model

    cfg = validate(cfg_dict)
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    sampler = BatchSampler(len(data.y_train), cfg.data.batch_size, cfg.seed)
    losses = []
    for _ in range(steps):
        idx = sampler.next()
        loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_high_lr_without_bn_diverges_at_the_recorded_step_and_bn_trains(tmp_path, capsys):
    window, factor = 200, 1.5
    none_cfg = {**HIGH_LR, "model": {**HIGH_LR["model"], "norm": "none"}}
    rc, out, err = run_cli(capsys, "train", "-c", write(tmp_path / "none.yaml", none_cfg), "--out",
                           tmp_path / "none", "-q")
    assert rc == 0, err
    summary = runs.read_summary(tmp_path / "none")
    assert summary["status"] == "diverged"

    # The first step whose trailing `window` losses average above 1.5 x ln(10), by a loop of our own.
    losses = independent_losses(none_cfg, 260)
    assert all(math.isfinite(v) for v in losses)  # float32 saturates rather than overflowing
    limit = factor * math.log(10)
    first = next(s for s in range(window, len(losses) + 1) if sum(losses[s - window:s]) / window > limit)
    assert summary["diverged_step"] == summary["steps"] == first
    tb = scalars(tmp_path / "none")
    assert tb[dashboard.tag("train/diverged")] == [(first, 1.0)]
    assert runs.read_metrics(tmp_path / "none")[-1]["step"] == first

    bn_cfg = {**HIGH_LR, "model": {**HIGH_LR["model"], "norm": "bnexp"}}
    rc, out, err = run_cli(capsys, "train", "-c", write(tmp_path / "bn.yaml", bn_cfg), "--out",
                           tmp_path / "bn", "-q")
    assert rc == 0, err
    bn = runs.read_summary(tmp_path / "bn")
    assert bn["status"] == "completed" and bn["steps"] == 400
    assert bn["test_accuracy"] > 0.85
    assert dashboard.tag("train/diverged") not in scalars(tmp_path / "bn")


def test_non_finite_loss_ends_the_run_at_its_first_step(tmp_path, capsys):
    # At an absurd lr the weights overflow float32 within a few steps: the loss becomes nan/inf.
    cfg = {**HIGH_LR, "optim": {"name": "sgd", "lr": 1e30},
           "model": {**HIGH_LR["model"], "norm": "none", "activation": "relu"},
           "train": {"steps": 50, "eval_every": 25, "log_every": 10, "checkpoint_every": 50,
                     "divergence_factor": None}}
    rc, out, err = run_cli(capsys, "train", "-c", write(tmp_path / "nan.yaml", cfg), "--out",
                           tmp_path / "nan", "-q")
    assert rc == 0, err
    summary = runs.read_summary(tmp_path / "nan")
    losses = independent_losses(cfg, 50)
    first = next(i + 1 for i, v in enumerate(losses) if not math.isfinite(v))
    assert summary["status"] == "diverged"
    assert summary["diverged_step"] == summary["steps"] == first
    assert scalars(tmp_path / "nan")[dashboard.tag("train/diverged")] == [(first, 1.0)]
    last = runs.read_metrics(tmp_path / "nan")[-1]
    assert last["step"] == first and last["train/diverged"] == 1.0 and last["train/loss"] is None
    assert json.loads((tmp_path / "nan" / "summary.json").read_text())  # valid JSON despite the nan
    rc, out, err = run_cli(capsys, "train", "--resume", tmp_path / "nan", "-q")
    assert rc == 2 and "already ended (diverged)" in err


@pytest.mark.slow
def test_divergence_window_survives_an_interruption(tmp_path, capsys, monkeypatch):
    """The window of recent losses is part of the checkpoint: interrupted at step 150 (before the window of
    200 is full) and resumed, the run diverges at the very step an uninterrupted one does."""
    cfg = write(tmp_path / "none.yaml", {**HIGH_LR, "model": {**HIGH_LR["model"], "norm": "none"}})
    assert_a_signal_changes_nothing_in_a_diverging_run(tmp_path, capsys, monkeypatch, cfg, 150)


def test_high_lr_comparison_runs_the_arms_tested_above():
    """configs/compare/high_lr.yaml's lr-25 arms are the networks whose outcome the divergence test checks."""
    from bnexp.experiments.compare import load_compare, plan
    from bnexp.config import validate

    cmp = load_compare(Path(__file__).parents[1] / "configs" / "compare" / "high_lr.yaml", [])
    jobs = {(job.arm, job.seed): job.cfg for job in plan(cmp)}
    assert len(jobs) == 18
    for arm, norm in (("no_bn_lr25", "none"), ("bn_lr25", "bnexp")):
        tested = validate({**HIGH_LR, "model": {**HIGH_LR["model"], "norm": norm}})
        cfg = jobs[(arm, 0)]
        for section in ("data", "model", "optim"):
            assert getattr(cfg, section) == getattr(tested, section), (arm, section)
        assert (cfg.train.divergence_factor, cfg.train.divergence_window) == (1.5, 200)
        assert cfg.seed == tested.seed == 0


def test_resume_names_the_run_config_that_no_longer_validates(tmp_path, capsys):
    cfg = write(tmp_path / "run.yaml", {**RUN, "train": {**RUN["train"], "steps": 10}})
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "train", "-c", cfg, "--out", run_dir, "-q")[0] == 0
    runs.write_summary(run_dir, {**runs.read_summary(run_dir), "status": "interrupted"})
    with open(run_dir / "config.yaml", "a") as f:
        f.write("nmae: typo\n")
    before = files_of(run_dir)
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 2 and err == f"error: {run_dir / 'config.yaml'}: invalid config: nmae: unknown key (did you mean name?)\n"
    assert files_of(run_dir) == before


@pytest.mark.parametrize("norm", ["bnexp", "torch", "none"])
def test_hot_loop_reads_nothing_back_from_the_device_between_log_steps(tmp_path, monkeypatch, norm):
    """Divergence is detected once per log interval: an ordinary step makes no host-device sync (no .item(),
    no bool() of a tensor, no copy to the CPU), which on a GPU would stall the queue every step."""
    from bnexp.config import validate
    from bnexp.data import BatchSampler

    events: list[str] = []
    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            events.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    real_next = BatchSampler.next
    monkeypatch.setattr(BatchSampler, "next", lambda self: events.append("STEP") or real_next(self))

    steps = 30
    cfg = validate({**RUN, "model": {**RUN["model"], "norm": norm}, "probes": {"enabled": False},
                    "train": {"steps": steps, "eval_every": steps, "log_every": steps, "checkpoint_every": steps}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert session.train(cfg, run_dir)["status"] == "completed"
    segments = "|".join(events).split("STEP")
    assert len(segments) == steps + 1
    # segments[k] is what step k did after drawing its batch; only the last step logs and evaluates.
    assert all(seg.strip("|") == "" for seg in segments[1:steps]), segments[1:steps]
    assert segments[steps].strip("|") != ""  # the log step does read back: the test can see a sync


def test_every_row_is_on_disk_when_a_checkpoint_is_written(tmp_path, monkeypatch):
    """A SIGKILL after a checkpoint may lose only rows after it: when its file is written (on the
    checkpoint writer's thread, while training goes on), metrics.jsonl and the TensorBoard event file on
    disk already hold every row logged up to its step (the writer's queue is flushed)."""
    from bnexp.config import validate

    cfg = validate({**RUN, "train": {**RUN["train"], "steps": 300}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    seen: list[tuple[int, set[int], set[int]]] = []
    real_write = checkpoint.write

    def write_after_looking(folder, step, data):
        on_disk = scalars(folder)  # read back as a separate reader would, e.g. after the process died
        tb_steps = {s for series in on_disk.values() for s, _ in series}
        rows = {r["step"] for r in runs.read_metrics(folder)}
        seen.append((step, rows, tb_steps))
        return real_write(folder, step, data)

    monkeypatch.setattr(checkpoint, "write", write_after_looking)
    assert session.train(cfg, run_dir)["status"] == "completed"
    logged = [r["step"] for r in runs.read_metrics(run_dir)]
    assert [s for s, _, _ in seen] == [150, 300]
    for step, rows, tb_steps in seen:
        upto = {s for s in logged if s <= step}
        assert step in upto and upto <= rows, sorted(upto - rows)
        assert upto <= tb_steps, sorted(upto - tb_steps)


def test_logged_train_loss_and_accuracy_match_an_independent_loop(tmp_path):
    """The loop counts correct predictions for a whole log interval at once, from the logits it kept: each
    row still holds the mean loss and the accuracy of exactly its own steps, as a plain loop sees them."""
    from bnexp.config import validate
    from bnexp.data import BatchSampler, load_dataset
    from bnexp.models import build_model

    raw = {**RUN, "optim": {"name": "sgd", "lr": 0.3}, "probes": {"enabled": False},
           "train": {"steps": 23, "eval_every": 100, "log_every": 5, "checkpoint_every": 100}}
    cfg = validate(raw)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert session.train(cfg, run_dir)["status"] == "completed"
    rows = {r["step"]: r for r in runs.read_metrics(run_dir) if "train/loss" in r}
    assert sorted(rows) == [5, 10, 15, 20, 23]

    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    sampler = BatchSampler(len(data.y_train), cfg.data.batch_size, cfg.seed)
    losses, correct = [], []
    for _ in range(23):
        idx = sampler.next()
        out = model(data.x_train[idx])
        loss = torch.nn.functional.cross_entropy(out, data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        correct.append(int((out.argmax(1) == data.y_train[idx]).sum()))
    for end, start in ((5, 0), (10, 5), (15, 10), (20, 15), (23, 20)):
        n = end - start
        assert rows[end]["train/loss"] == pytest.approx(math.fsum(losses[start:end]) / n, rel=1e-12)
        assert rows[end]["train/accuracy"] == sum(correct[start:end]) / (n * cfg.data.batch_size)


@pytest.mark.parametrize("value, at, expected", [(float("inf"), 50, 50), (1e30, 50, None),
                                                 (float("inf"), 23, 24)])
def test_non_finite_weights_end_the_run_at_the_first_step_that_shows_them(tmp_path, monkeypatch, value, at,
                                                                         expected):
    """Steps are read back ten log rows at a time (here at step 50, then at the last, 60). A weight made
    non-finite by the update of the last step a read covers ends the run at that step, though no loss saw
    it yet; one made non-finite earlier ends it at the next step, whose loss is the first to show it. The
    check reads one norm per weight tensor: a huge but finite weight overflows its norm, and must then pass
    the exact test rather than count as divergence."""
    from bnexp.config import validate

    cfg = validate({**RUN, "model": {**RUN["model"], "norm": "none"}, "optim": {"name": "sgd", "lr": 0.1},
                    "probes": {"enabled": False},
                    "train": {"steps": 60, "eval_every": 100, "log_every": 5, "checkpoint_every": 100,
                              "divergence_factor": None}})
    assert schedule.READ_ROWS * cfg.train.log_every == 50
    _blow_up_after_update(monkeypatch, at, value)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = session.train(cfg, run_dir)
    rows = runs.read_metrics(run_dir)
    if expected is None:
        assert summary["status"] == "completed" and summary["steps"] == 60
        assert [r["step"] for r in rows] == [0, *range(5, 61, 5)]
    else:
        assert (summary["status"], summary["diverged_step"]) == ("diverged", expected)
        # The rows before the diverged step's interval, then its train/diverged row.
        assert [r["step"] for r in rows] == [0, *range(5, expected, 5), expected]
        assert rows[-1]["train/diverged"] == 1.0


def test_rows_logged_before_a_crash_are_on_disk(tmp_path, monkeypatch):
    """Rows wait to be read back in batches of ten; a run that raises still leaves every row it logged in
    metrics.jsonl and the event file, with the train metrics an uncrashed run logs."""
    from bnexp.config import validate
    from bnexp.data import BatchSampler

    cfg = validate({**RUN, "probes": {"enabled": False},
                    "train": {**RUN["train"], "steps": 100, "eval_every": 1000, "checkpoint_every": 1000}})
    (tmp_path / "whole").mkdir()
    session.train(cfg, tmp_path / "whole")
    whole = {r["step"]: r for r in runs.read_metrics(tmp_path / "whole")}
    real_next, draws = BatchSampler.next, []

    def next_(sampler):
        draws.append(1)
        if len(draws) == 64:  # steps 7, 14, ..., 63 are logged, none read back yet
            raise RuntimeError("simulated crash")
        return real_next(sampler)

    monkeypatch.setattr(BatchSampler, "next", next_)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(RuntimeError, match="simulated crash"):
        session.train(cfg, run_dir)
    rows = runs.read_metrics(run_dir)
    logged = list(range(7, 64, 7))
    assert [r["step"] for r in rows] == [0, *logged]
    assert rows[1:] == [whole[s] for s in logged]
    assert [s for s, _ in scalars(run_dir)[dashboard.tag("train/accuracy")]] == logged


# --- checkpoints written off the training thread --------------------------------------------------------

def test_checkpoint_writer_saves_the_state_of_its_step_and_waits_for_the_file(tmp_path, monkeypatch):
    """save() returns before the file is written, but serializes first: changing the tensors afterwards
    does not reach the file. wait() returns once the file is durable under its name."""
    started, release = threading.Event(), threading.Event()
    real_write = checkpoint.write

    def slow_write(run_dir, step, data):
        started.set()
        assert release.wait(30)
        return real_write(run_dir, step, data)

    monkeypatch.setattr(checkpoint, "write", slow_write)
    state = {**{k: torch.zeros(3) if k == "model" else None for k in checkpoint.REQUIRED}, "step": 7}
    writer = checkpoint.Writer(tmp_path)
    writer.save(7, state)
    assert started.wait(30)
    state["model"] += 1  # the loop trains on while the file is written
    assert checkpoint.list_checkpoints(tmp_path) == []
    release.set()
    assert writer.wait() == tmp_path / "checkpoints" / "step-00000007.pt"
    assert torch.equal(checkpoint.load(checkpoint.list_checkpoints(tmp_path)[-1])["model"], torch.zeros(3))
    writer.close()


def test_a_failed_checkpoint_write_fails_the_run(tmp_path, monkeypatch):
    """An error on the writer's thread (a full disk, say) is raised in the loop at the next checkpoint, and
    the run ends as a crash: no summary claims a checkpoint that is not there."""
    from bnexp.config import validate

    def full_disk(run_dir, step, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write", full_disk)
    cfg = validate({**RUN, "probes": {"enabled": False}, "train": {**RUN["train"], "steps": 200}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(OSError, match="No space left"):
        session.train(cfg, run_dir)
    assert checkpoint.list_checkpoints(run_dir) == []
    assert not (run_dir / runs.SUMMARY).exists() or runs.read_summary(run_dir)["status"] != "completed"


def test_interrupted_run_reports_only_once_its_checkpoint_is_on_disk(tmp_path, capsys, monkeypatch):
    """A signal's checkpoint is written on the writer's thread (slowly here); the run still says it can be
    resumed only after the file is durable, and a resume continues from it."""
    real_write = checkpoint.write

    def slow_write(run_dir, step, data):
        time.sleep(0.3)
        return real_write(run_dir, step, data)

    monkeypatch.setattr(checkpoint, "write", slow_write)
    signal_after_row(monkeypatch, 210, signal.SIGINT)
    cfg = write(tmp_path / "run.yaml", {**RUN, "train": {**RUN["train"], "steps": 300}})
    run_dir = tmp_path / "run"
    rc, out, err = run_cli(capsys, "train", "-c", cfg, "--out", run_dir, "-q")
    assert rc == 130 and "Traceback" not in err
    summary = runs.read_summary(run_dir)
    assert (summary["status"], summary["steps"]) == ("interrupted", 210)
    assert checkpoint.list_checkpoints(run_dir)[-1].name == "step-00000210.pt"
    assert checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1])["step"] == 210


# --- reads of the training metrics: scheduled by step, complete before anything looks at the network ---

@pytest.mark.parametrize("at, expected", [(47, 48), (49, 50), (100, 100), (147, 148), (149, 150)])
def test_no_evaluation_probe_or_checkpoint_sees_a_diverged_network(tmp_path, monkeypatch, at, expected):
    """log_every 7 divides none of eval_every 50, probes.every 100, checkpoint_every 150: the read before
    each of them covers the steps after the last log row too, and checks the weights. A weight set to NaN
    by update `at` ends the run at the first step whose loss shows it, or at `at` itself when a read falls
    there (100: an evaluation and a probe); nothing is evaluated, probed or checkpointed from then on."""
    from bnexp.config import validate

    cfg = validate({**RUN, "model": {**RUN["model"], "norm": "none"}, "optim": {"name": "sgd", "lr": 0.1},
                    "probes": {**RUN["probes"], "every": 100},
                    "train": {"steps": 300, "eval_every": 50, "log_every": 7, "checkpoint_every": 150,
                              "divergence_factor": None}})
    from bnexp.engine import trainer as trainer_module
    from bnexp.probes import Probes

    _blow_up_after_update(monkeypatch, at, float("nan"))
    trainers = trainers_built(monkeypatch)
    looked_at: dict[str, list[int]] = {}  # the steps at which the network was evaluated, probed, checkpointed
    for owner, name in ((trainer_module, "evaluate"), (Probes, "measure"), (checkpoint.Writer, "save")):
        real = getattr(owner, name)
        looked_at[name] = []
        monkeypatch.setattr(owner, name, lambda *a, _real=real, _seen=looked_at[name], **k:
                            _seen.append(trainers[-1].step) or _real(*a, **k))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = session.train(cfg, run_dir)
    assert (summary["status"], summary["diverged_step"]) == ("diverged", expected)
    # Only the summary's final evaluation sees the network as it stopped, at the read that found it diverged.
    stopped = trainers[-1].step
    *during, final = looked_at["evaluate"]
    assert final == stopped >= expected and during and max(during) < expected, looked_at
    assert all(s < expected for s in looked_at["measure"] + looked_at["save"]), looked_at
    rows = runs.read_metrics(run_dir)
    assert (rows[-1]["step"], rows[-1]["train/diverged"]) == (expected, 1.0)
    assert all(r["step"] < expected for r in rows[:-1])
    looked = [r["step"] for r in rows if "test/loss" in r or any(k.startswith("gap/") for k in r)]
    assert looked and max(looked) < expected
    assert all(math.isfinite(r["test/loss"]) for r in rows if "test/loss" in r)
    assert all(int(p.name[5:13]) < expected for p in checkpoint.list_checkpoints(run_dir))


@pytest.mark.parametrize("at, value", [(27, 1e4), (30, float("inf"))])
def test_a_signal_does_not_move_the_reads_of_a_resumed_run(tmp_path, capsys, monkeypatch, at, value):
    """Interrupted at step 15 (a read of its own, off the schedule) and resumed, a run that then diverges
    stops at the very read, with the very network, of an uninterrupted one: reads fall at multiples of
    READ_ROWS log rows by step number, and a signal's read checks the losses but not the weights."""
    raw = {**RUN, "optim": {"name": "sgd", "lr": 0.1}, "probes": {"enabled": False},
           "train": {"steps": 200, "eval_every": 1000, "log_every": 1, "checkpoint_every": 1000,
                     "divergence_window": 3}}
    _blow_up_after_update(monkeypatch, at, value)
    assert_a_signal_changes_nothing_in_a_diverging_run(tmp_path, capsys, monkeypatch,
                                                       write(tmp_path / "run.yaml", raw), 15)


def test_a_read_that_fails_changes_nothing(tmp_path, monkeypatch):
    """A read that raises (here in the weight check of the second scheduled read, at step 140) leaves the
    steps not read yet as they were: the crash path's own read (losses only) then completes every row up to
    the crash with the train metrics of an uncrashed run."""
    from bnexp.config import validate

    cfg = validate({**RUN, "probes": {"enabled": False},
                    "train": {**RUN["train"], "steps": 200, "eval_every": 1000, "checkpoint_every": 1000}})
    whole = tmp_path / "whole"
    whole.mkdir()
    session.train(cfg, whole)
    expected = {r["step"]: r for r in runs.read_metrics(whole)}
    real_norm, calls = torch._foreach_norm, []

    def norm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("simulated")
        return real_norm(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", norm)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(MemoryError):
        session.train(cfg, run_dir)
    rows = runs.read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, *range(7, 141, 7)]
    assert rows == [expected[r["step"]] for r in rows]


# --- issue 17: damaged checkpoints and metrics, signals and kills at start-up ----------------------------

@pytest.fixture(scope="module")
def interrupted_template(tmp_path_factory, one_thread) -> Path:
    """RUN interrupted by SIGTERM after step 350 (checkpoints at 300 and 350 kept), trained in-process once;
    the tests below each damage a copy."""
    tmp = tmp_path_factory.mktemp("interrupted")
    run_dir = tmp / "run"
    cfg = write(tmp / "run.yaml", RUN)
    real = session.Trainer
    session.Trainer = lambda *a, callbacks=(), **k: real(*a, callbacks=[*callbacks, SignalAt(350, signal.SIGTERM)],
                                                          **k)
    try:
        assert main(["train", "-c", str(cfg), "--out", str(run_dir), "-q"]) == 143
    finally:
        session.Trainer = real
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000300.pt", "step-00000350.pt"]
    return run_dir


@pytest.fixture
def interrupted(interrupted_template, tmp_path) -> Path:
    return Path(shutil.copytree(interrupted_template, tmp_path / "run", symlinks=True))


def flip_tensor_bytes(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of the largest tensor record of a torch.save archive: the damage
    of the issue, which torch.load reads without complaint."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # The record's bytes follow its local header (30 bytes, the name, the extra field).
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + (info.file_size - count) // 2
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["step"] > 0  # still loads: only a checksum can tell


def test_a_damaged_checkpoint_is_found_by_its_checksum_and_its_intact_predecessor_resumes(interrupted, capsys,
                                                                                          reference):
    run_dir = interrupted
    damaged = run_dir / "checkpoints" / "step-00000350.pt"
    flip_tensor_bytes(damaged)
    before = files_of(run_dir)
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err == (f"error: damaged checkpoint {damaged}: its contents do not match the checksum written with "
                   f"it; the previous checkpoint step-00000300.pt is intact: move step-00000350.pt out of "
                   f"{damaged.parent} to resume from it\n")
    assert files_of(run_dir) == before

    damaged.rename(run_dir / "step-00000350.pt.damaged")  # what the message says to do
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 0, err
    assert_same_run(run_dir, reference)


def test_checkpoints_without_their_checksum_or_with_a_damaged_one_are_refused(interrupted, capsys):
    run_dir = interrupted
    newest, previous = checkpoint.list_checkpoints(run_dir)[::-1]
    data = newest.read_bytes()
    newest.write_bytes(data[:-10] + bytes(b ^ 1 for b in data[-10:]))  # a flip in the checksum itself
    with pytest.raises(checkpoint.CheckpointError, match="do not match the checksum"):
        checkpoint.load(newest)
    torch.save(torch.load(previous, weights_only=True), newest)  # format 3 contents, no checksum
    with pytest.raises(checkpoint.CheckpointError, match="the checksum written with it is missing"):
        checkpoint.load(newest)
    assert checkpoint.check(previous) is None  # an intact one: verified, no notice


@pytest.mark.parametrize("damage, line, what", [
    (b"garbage that is not JSON\n", 3, "not valid JSON"),
    (b'{"train/loss": 1.0}\n', 3, "not a JSON object with an integer step"),
    (b'{"step": 14, "x": "\xff\xfe"}\n', 3, "not UTF-8 text"),
])
def test_a_damaged_metrics_file_is_refused_before_resume_writes_anything(interrupted, capsys, damage, line, what):
    run_dir = interrupted
    lines = (run_dir / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_bytes(b"".join(lines[:line - 1]) + damage + b"".join(lines[line:]))
    before = files_of(run_dir)
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err == f"error: corrupted {run_dir / 'metrics.jsonl'}: line {line} is {what}\n"
    assert files_of(run_dir) == before  # no new event file, nothing truncated


def test_a_torn_last_metrics_line_cut_inside_a_character_is_dropped(interrupted, capsys, reference):
    run_dir = interrupted
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write('{"step": 351, "note": "€'.encode()[:-1])  # killed between the bytes of a character
    assert run_cli(capsys, "train", "--resume", run_dir, "-q")[0] == 0
    assert_same_run(run_dir, reference)


# Imported by the child at start-up (PYTHONPATH): sends the child SIGINT while it imports a given module, in
# code that swallows any Exception, as a library's import-time `try: ... except Exception:` does. On a
# busy machine a real Ctrl-C lands in such code at random.
SITECUSTOMIZE = """
import importlib.abc, os, signal, sys
class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == os.environ.get("SIGNAL_AT_IMPORT"):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(100000))  # the handler runs here, inside the import of `name`
            except Exception:
                pass
        return None
sys.meta_path.insert(0, Hook())
"""


@pytest.mark.slow
@pytest.mark.parametrize("module, code, err", [
    # Before a command installs bnexp's handlers: Ctrl-C's default action, silent (a shell reports 130).
    ("typer", -signal.SIGINT, ""),
    # After: the process ends on the spot, with the one line a signal at start-up gets.
    ("sklearn.datasets", 130, "interrupted by SIGINT during start-up; no run directory was created\n"),
])
def test_a_signal_inside_an_import_at_start_up_is_a_clean_exit(tmp_path, module, code, err):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    cfg = write(tmp_path / "run.yaml", {**RUN, "data": {"dataset": "digits", "batch_size": 20}})
    path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    proc = spawn(["train", "-c", str(cfg), "--out", str(tmp_path / "run"), "-q"], tmp_path,
                 env={"SIGNAL_AT_IMPORT": module, "PYTHONPATH": path})
    out, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, out, stderr) == (code, "", err)
    assert sorted(os.listdir(tmp_path)) == ["run.yaml", "site"]


@pytest.mark.slow
def test_a_run_directory_killed_as_soon_as_it_appears_is_complete_and_resumes(tmp_path, capsys, reference):
    """SIGKILL the moment --out exists: it holds config.yaml and a `running` summary.json (it appears whole),
    so --resume continues it; never an empty folder that neither --resume nor --out would take."""
    cfg = write(tmp_path / "run.yaml", RUN)
    run_dir = tmp_path / "run"
    proc = spawn(["train", "-c", str(cfg), "--out", str(run_dir), "-q"], tmp_path)
    wait_for(run_dir.exists, proc, timeout=120)
    proc.kill()
    proc.communicate(timeout=60)
    assert {"config.yaml", "summary.json"} <= set(os.listdir(run_dir))
    assert runs.read_summary(run_dir)["status"] == "running"
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 0, err
    assert_same_run(run_dir, reference)


# --- issue 17: the output folder refuses a write (full, read-only, ...), or holds planted links -----------

def fail_writes(monkeypatch, name: str, err: int, after: int) -> list[str]:
    """Fake a disk that fails at the OS-call boundary: os.write to a file whose name contains `name` writes
    half its bytes on the call after the first `after` ones, and raises OSError(err) from then on (what a
    full disk does). Returns the paths it failed, as the kernel names them."""
    real, calls, failed = os.write, [0], []

    def write(fd, data):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if name in os.path.basename(path):
            calls[0] += 1
            if calls[0] > after:
                if not failed:
                    failed.append(path)
                    return real(fd, memoryview(data)[: max(1, len(data) // 2)])
                raise OSError(err, os.strerror(err))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return failed


@pytest.mark.parametrize("name, err, after, code", [
    ("metrics.jsonl", errno.ENOSPC, 4, 2),
    (".step-", errno.EDQUOT, 1, 2),
    ("events.out.tfevents", errno.EIO, 5, 1),  # not the user's doing: exit status 1
])
def test_a_write_the_disk_refuses_is_one_line_and_the_run_resumes_once_it_is_fixed(tmp_path, capsys, monkeypatch,
                                                                                    reference, name, err, after,
                                                                                    code):
    cfg = write(tmp_path / "run.yaml", RUN)
    run_dir = tmp_path / "run"
    failed = fail_writes(monkeypatch, name, err, after)
    rc, out, stderr = run_cli(capsys, "train", "-c", cfg, "--out", run_dir, "-q")
    assert failed and rc == code and out == "", stderr
    path = failed[0][:-len(".tmp")].replace("/.step-", "/step-") if name == ".step-" else failed[0]
    assert stderr == (f"error: cannot write {path}: {os.strerror(err)}; once that is fixed, continue with: "
                      f"bnexp train --resume {run_dir}\n")
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # a failed checkpoint leaves no temporary
    monkeypatch.undo()
    rc, out, stderr = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 0, stderr
    assert_same_run(run_dir, reference)


def _can_mount() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True).returncode == 0


FULL_DISK = """
set -u
mnt=$(mktemp -d)
mount -t tmpfs -o size="$SIZE" tmpfs "$mnt"
python -m bnexp.cli train -c "$CFG" --out "$mnt/run" -q > "$DEST/out1" 2> "$DEST/err1"; echo $? > "$DEST/rc1"
mount -o remount,size=64m "$mnt"
python -m bnexp.cli train --resume "$mnt/run" -q > "$DEST/out2" 2> "$DEST/err2"; echo $? > "$DEST/rc2"
echo "$mnt" > "$DEST/mnt"
cp -a "$mnt/run" "$DEST/run"
"""


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount(), reason="needs a private mount namespace (unshare -m) to mount a tmpfs")
def test_a_full_disk_is_one_line_and_the_run_resumes_bit_identical_once_space_is_freed(tmp_path, reference):
    """A real full disk: the run's folder on a 160 kB tmpfs (the run needs about 270 kB), then the same
    tmpfs grown and the run resumed."""
    cfg = write(tmp_path / "run.yaml", RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIZE": "160k", "CFG": str(cfg), "DEST": str(tmp_path)}
    subprocess.run(["unshare", "-m", "sh", "-c", FULL_DISK], env=env, cwd=tmp_path, check=True, timeout=600)
    run_in_mnt = Path((tmp_path / "mnt").read_text().strip()) / "run"
    err = (tmp_path / "err1").read_text()
    assert (tmp_path / "rc1").read_text().strip() == "2" and (tmp_path / "out1").read_text() == ""
    assert err.startswith(f"error: cannot write {run_in_mnt}/") and err.count("\n") == 1
    assert err.endswith(f": No space left on device; once that is fixed, continue with: bnexp train --resume "
                        f"{run_in_mnt}\n")
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()
    assert_same_run(tmp_path / "run", reference)


def test_planted_temporaries_are_replaced_not_followed(interrupted, capsys, reference, tmp_path):
    """Links named like the temporaries a resumed run writes (summary, metrics, a checkpoint) point at files
    outside the run: the run replaces the links and leaves the files alone."""
    run_dir = interrupted
    victims = {}
    for name in (".summary.json.tmp", ".metrics.jsonl.tmp", "checkpoints/.step-00000450.pt.tmp"):
        victim = tmp_path / f"victim-{len(victims)}"
        victim.write_text("not bnexp's")
        (run_dir / name).symlink_to(victim)
        victims[name] = victim
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 0, err
    assert all(v.read_text() == "not bnexp's" for v in victims.values())
    assert not any((run_dir / name).is_symlink() for name in victims)
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize("name", ["checkpoints", "metrics.jsonl", "summary.json"])
def test_a_link_where_a_resumed_run_writes_is_refused(interrupted, capsys, tmp_path, name):
    run_dir = interrupted
    elsewhere = tmp_path / f"elsewhere-{name}"
    shutil.move(run_dir / name, elsewhere)
    (run_dir / name).symlink_to(elsewhere)
    before, outside = files_of(run_dir), files_of(tmp_path / "elsewhere-checkpoints") if name == "checkpoints" \
        else elsewhere.read_bytes()
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err == (f"error: {run_dir / name} is a symbolic link: bnexp does not write through links (replace it "
                   f"with the file or folder itself)\n")
    assert files_of(run_dir) == before
    assert (files_of(elsewhere) if name == "checkpoints" else elsewhere.read_bytes()) == outside


# --- issue 17 review: checkpoints through links or under another step's name, resume without one ---------

@pytest.mark.parametrize("plant", ["link to another run's checkpoint", "link to /dev/zero", "fifo",
                                   "copy under another step's name"])
def test_a_planted_or_renamed_checkpoint_is_refused_not_resumed(interrupted, interrupted_template, capsys, plant):
    """The newest `step-*.pt` is what resume takes: a link there (to another run's intact checkpoint, to an
    endless device), a FIFO, or a checkpoint of another step under this name is one line naming it."""
    run_dir = interrupted
    planted = run_dir / "checkpoints" / "step-00009999.pt"
    other = interrupted_template / "checkpoints" / "step-00000300.pt"
    if plant == "link to another run's checkpoint":
        planted.symlink_to(other)
        why = "it is a symbolic link"
    elif plant == "link to /dev/zero":
        planted.symlink_to("/dev/zero")
        why = "it is a symbolic link"
    elif plant == "fifo":
        os.mkfifo(planted)
        why = "not a regular file"
    else:
        shutil.copyfile(other, planted)
        why = "holds the state of step 300, not the step its name says"
    before = files_of(run_dir)
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: ") and str(planted) in err and why in err, err
    assert files_of(run_dir) == before and runs.read_status(run_dir) == "interrupted"


def _as_killed_before(run_dir: Path, step: int) -> None:
    """Make `run_dir` look like a run SIGKILLed at `step` before any checkpoint: no checkpoints, a `running`
    summary at step 0, metrics rows up to `step`."""
    shutil.rmtree(run_dir / "checkpoints")
    summary = runs.read_summary(run_dir)
    summary.update(status="running", steps=0)
    runs.write_summary(run_dir, summary)
    rows = (run_dir / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_bytes(b"".join(r for r in rows if json.loads(r)["step"] <= step))


@pytest.mark.parametrize("damage, message", [
    ("checkpoints removed", "but its summary.json records 350 steps trained"),
    ("checkpoints emptied", "but its summary.json records 350 steps trained"),
    ("killed past the second checkpoint step, checkpoints removed", "but its metrics.jsonl has rows up to step 350"),
])
def test_resume_without_the_checkpoints_a_run_had_is_refused(interrupted, capsys, damage, message):
    """An interrupted run whose checkpoints are gone would silently train again from step 0 and say
    completed: refused in one line, nothing changed."""
    run_dir = interrupted
    if damage == "checkpoints emptied":
        for path in (run_dir / "checkpoints").iterdir():
            path.unlink()
    elif damage == "checkpoints removed":
        shutil.rmtree(run_dir / "checkpoints")
    else:
        _as_killed_before(run_dir, 350)
    before = files_of(run_dir)
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err == (f"error: cannot resume {run_dir}: no checkpoint in {run_dir / 'checkpoints'} {message}; "
                   f"restore the checkpoints to continue it (nothing was changed)\n")
    assert files_of(run_dir) == before


def test_a_run_killed_before_its_first_checkpoint_still_starts_over(interrupted, capsys, reference):
    run_dir = interrupted
    _as_killed_before(run_dir, 140)
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 0, err
    assert_same_run(run_dir, reference)


def test_a_file_where_the_checkpoints_folder_goes_is_refused_before_anything_is_written(interrupted, capsys):
    run_dir = interrupted
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "checkpoints").write_text("not a folder")
    before = files_of(run_dir)
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err == (f"error: cannot resume {run_dir}: {run_dir / 'checkpoints'} is not a folder (move it away to "
                   f"start over; nothing was changed)\n")
    assert files_of(run_dir) == before  # metrics.jsonl not truncated


def test_a_resume_removes_the_error_file_of_an_earlier_failure(interrupted, capsys, reference):
    run_dir = interrupted
    (run_dir / "error.txt").write_text("Traceback (most recent call last):\nRuntimeError: an earlier attempt\n")
    rc, out, err = run_cli(capsys, "train", "--resume", run_dir, "-q")
    assert rc == 0, err
    assert not (run_dir / "error.txt").exists()
    assert_same_run(run_dir, reference)
