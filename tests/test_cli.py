"""The command line: help and version, `validate`, and every user error as one line with exit status 2."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import bnexp
from bnexp.config import Config
from conftest import DEFAULT_CONFIG, TINY


def _files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs} | \
           {os.path.relpath(os.path.join(d, s), root) for d, ss, _ in os.walk(root) for s in ss}


def test_help_and_version(cli):
    r = cli("--help")
    assert r.code == 0 and "train" in r.out and "validate" in r.out and "compare" in r.out
    r = cli("--version")
    assert r.code == 0 and r.out.strip() == f"bnexp {bnexp.__version__}"
    r = cli()
    assert r.code == 0 and r.out.count("Usage:") == 1


@pytest.mark.parametrize("command, expect", [
    ("train", "--config"), ("validate", "--config"), ("compare", "--config"), ("check", "--seed"),
    ("bench", "--quick"),
])
def test_each_command_has_help(cli, command, expect):
    r = cli(command, "--help")
    assert r.code == 0 and expect in r.out and r.err == ""


@pytest.mark.parametrize("command, flags", [
    ([], ["--version", "--help"]), (["train"], ["--quiet", "--help"]), (["validate"], ["--help"]),
    (["compare"], ["--quiet", "--yes", "--help"]), (["check"], ["--help"]), (["bench"], ["--quick", "--help"]),
])
def test_help_shows_boolean_flags_as_flags(cli, command, flags):
    """typer's help put `<bool>` after every flag (`--quiet <bool>`), as if it took a value."""
    for help_flag in ("--help", "-h"):
        r = cli(*command, help_flag)
        assert r.code == 0 and r.err == "" and "Usage: bnexp" in r.out
        assert "<bool>" not in r.out and "bool" not in r.out.lower().replace("boolean", "")
        rows = {line.strip("│ *").split()[0]: line.strip("│ *") for line in r.out.splitlines()
                if line.strip("│ *").startswith("--")}
        for flag in flags:
            # The flag, its short form if any, then its help: no value between them.
            assert re.match(rf"{flag} +(-[a-z] +)?[A-Z]", rows[flag]), rows[flag]


def test_console_script_help_version_and_user_error(tmp_path):
    exe = shutil.which("bnexp") or pytest.skip("bnexp console script not on PATH")
    run = lambda *a: subprocess.run([exe, *a], cwd=tmp_path, capture_output=True, text=True,  # noqa: E731
                                    timeout=120)
    assert run("--version").stdout.strip() == f"bnexp {bnexp.__version__}"
    assert "Usage" in run("train", "--help").stdout
    r = run("train", "--config", "missing.yaml")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["error: config file not found: missing.yaml"]
    assert os.listdir(tmp_path) == []


def test_validate_prints_the_resolved_config(cli, write_config):
    path = write_config({"model": {"norm": "torch"}})
    r = cli("validate", "--config", path, "--set", "optim.lr=0.05", "--set", "model.hidden=[8]")
    assert r.code == 0
    resolved = Config.model_validate(yaml.safe_load(r.out))
    expected = Config().model_dump()
    expected["model"].update(norm="torch", hidden=[8])
    expected["optim"]["lr"] = 0.05
    assert resolved.model_dump() == expected


# --- user errors: one line on stderr naming the problem, exit 2, no traceback, nothing written ----------

def _assert_user_error(r, *needles: str) -> str:
    assert r.code == 2, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert "Traceback" not in r.err and r.out == ""
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


BAD_FILES = {
    "unknown_key": ({"model": {"nrom": "none"}}, "model.nrom"),
    "wrong_type": ({"optim": {"lr": "fast"}}, "optim.lr"),
    "lr_zero": ({"optim": {"lr": 0}}, "optim.lr"),
    "lr_negative": ({"optim": {"lr": -0.5}}, "optim.lr"),
    "batch_of_one_with_bn": ({"data": {"batch_size": 1}}, "data.batch_size"),
    "steps_zero": ({"train": {"steps": 0}}, "train.steps"),
    "unknown_dataset": ({"data": {"dataset": "imagenet"}}, "data.dataset"),
    "unknown_model": ({"model": {"kind": "transformer"}}, "model.kind"),
    "resnet_depth": ({"model": {"kind": "resnet", "depth": 21}}, "model.depth"),
    "vgg_depth": ({"model": {"kind": "vgg", "depth": 12}}, "model.depth"),
    "depth_of_a_cnn": ({"model": {"kind": "cnn", "depth": 5}}, "model.depth"),
    "instance_norm_of_vectors": ({"model": {"norm": "instance"}}, "model.norm"),
    "augment_a_signal": ({"data": {"dataset": "mnist1d", "augment": "crop_flip"}}, "data.augment"),
    "norm_groups_zero": ({"model": {"norm": "group", "norm_groups": 0}}, "model.norm_groups"),
    "epochs_zero": ({"train": {"epochs": 0}}, "train.epochs"),
    "unknown_shortcut": ({"model": {"kind": "resnet", "shortcut": "C"}}, "model.shortcut"),
    "unknown_norm": ({"model": {"norm": "layernorm"}}, "model.norm"),
    "batch_larger_than_data": ({"data": {"batch_size": 5000}}, "data.batch_size"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_file(cli, write_config, tmp_path, case):
    data, key = BAD_FILES[case]
    path = write_config(data)
    r = cli("train", "--config", path, "--quiet")
    _assert_user_error(r, f"{key}:")
    assert _files(tmp_path) == {"config.yaml"}


def test_malformed_yaml(cli, write_config, tmp_path):
    path = write_config("model:\n  norm: torch\n   kind: mlp\n")
    _assert_user_error(cli("train", "--config", path), "malformed YAML", "config.yaml", "line 3")
    assert _files(tmp_path) == {"config.yaml"}


def test_train_needs_a_config(cli, tmp_path):
    _assert_user_error(cli("train", "--quiet"), "--config")
    assert _files(tmp_path) == set()


def test_missing_config_file(cli, tmp_path):
    _assert_user_error(cli("train", "--config", "nope.yaml"), "config file not found: nope.yaml")
    assert _files(tmp_path) == set()


@pytest.mark.parametrize("bad", ["model.norm", "=none", "a..b=1"])
def test_bad_set_syntax(cli, tmp_path, bad):
    _assert_user_error(cli("train", "--config", DEFAULT_CONFIG, "--set", bad), "bad --set", bad)
    assert _files(tmp_path) == set()


def test_set_is_validated_like_the_file(cli, tmp_path):
    _assert_user_error(cli("train", "--config", DEFAULT_CONFIG, "--set", "model.norm=batch"), "model.norm:")
    assert _files(tmp_path) == set()


def test_bad_flag(cli, tmp_path):
    _assert_user_error(cli("train", "--config", DEFAULT_CONFIG, "--bogus"), "--bogus")
    _assert_user_error(cli("train", "--set"), "--set")
    _assert_user_error(cli("frobnicate"), "frobnicate")
    assert _files(tmp_path) == set()


def test_existing_out_directory_is_never_touched(cli, tiny_config, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_user_error(cli("train", "--config", tiny_config, "--out", out, "--quiet"), "already exists", "taken")
    assert _files(tmp_path) == {"config.yaml", "taken", os.path.join("taken", "keep.txt")}
    assert (out / "keep.txt").read_text() == "mine"


def test_cuda_requested_without_cuda(cli, write_config, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = write_config({**TINY, "device": "cuda"})
    _assert_user_error(cli("train", "--config", path), "device:")
    assert _files(tmp_path) == {"config.yaml"}


def test_run_directory_path_is_the_last_line_of_stdout(cli, tiny_config, tmp_path):
    r = cli("train", "--config", tiny_config, "--quiet")
    assert r.code == 0, r.err
    run_dir = r.path
    assert run_dir.parent == Path("runs") / "tiny"
    assert run_dir.name.endswith("-s0") and (tmp_path / run_dir / "summary.json").is_file()


@pytest.mark.parametrize("override, key", [("seed=99999999999999999999999", "seed:"),
                                           ("seed=9223372036854775808", "seed:"),
                                           ("data.seed=4294967296", "data.seed:")])
def test_seed_beyond_what_torch_and_sklearn_take(cli, tiny_config, tmp_path, override, key):
    _assert_user_error(cli("train", "--config", tiny_config, "--set", override, "--out", "o2", "--quiet"), key)
    assert _files(tmp_path) == {"config.yaml"}


def test_largest_seeds_train(cli, tiny_config):
    r = cli("train", "--config", tiny_config, "--set", f"seed={2**63 - 1}", "--set", f"data.seed={2**32 - 1}",
            "--set", "train.steps=2", "--set", "probes.enabled=true", "--set", "model.bn.precise.when=end",
            "--quiet")
    assert r.code == 0, r.err


def test_a_run_that_fails_to_start_leaves_no_directory(cli, tiny_config, tmp_path, monkeypatch):
    from bnexp.engine import session
    from bnexp.errors import UserError

    def fail(*args, **kwargs):
        raise UserError("refused while building the trainer")

    monkeypatch.setattr(session, "Trainer", fail)
    _assert_user_error(cli("train", "--config", tiny_config, "--out", "o", "--quiet"), "refused")
    _assert_user_error(cli("train", "--config", tiny_config, "--quiet"), "refused")
    assert _files(tmp_path) == {"config.yaml"}  # not even the runs/tiny/ made for it


def test_logged_lr_is_the_one_the_step_trained_with(cli, tiny_config, tmp_path):
    from bnexp.engine.rundir import read_metrics

    r = cli("train", "--config", tiny_config, "--set", "optim.warmup_steps=10", "--set", "optim.lr=1.0",
            "--set", "train.log_every=1", "--set", "train.steps=12", "--quiet")
    assert r.code == 0, r.err
    lrs = {row["step"]: row["lr"] for row in read_metrics(tmp_path / r.path) if "lr" in row}
    # Step s is the s-th update, which warm-up runs at s/10 of the base lr.
    assert lrs == pytest.approx({s: min(s, 10) / 10 for s in range(1, 13)})


def test_compare_help_describes_compare_not_train(cli):
    r = cli("compare", "--help")
    text = " ".join(r.out.replace("│", " ").split())
    assert r.code == 0 and "base.train.steps" in text and "model.norm=none" not in text
    assert "no table" in text and "No progress bar" not in text


def test_paths_of_the_wrong_kind_say_so(cli, tiny_config, tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    _assert_user_error(cli("train", "--config", "adir"), "adir is a directory")
    _assert_user_error(cli("train", "--resume", "afile"), "afile", "is a file, not a run directory")
    _assert_user_error(cli("train", "--config", tiny_config, "--out", "afile/sub", "--quiet"),
                       "afile is a file")
    _assert_user_error(cli("compare", "--config", tiny_config, "--out", "afile/sub"), "afile is a file")
    assert _files(tmp_path) == {"config.yaml", "adir", "afile"}
    assert (tmp_path / "afile").read_text() == "x"


# --- issue 17: inputs that no OS call accepts -----------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("flag", ["--out", "--resume"])
def test_a_path_whose_name_is_too_long_is_one_line(cli, tiny_config, tmp_path, command, flag):
    long = "x" * 300  # a name may be 255 bytes
    args = [command, flag, long] + (["--config", tiny_config] if flag == "--out" else [])
    line = _assert_user_error(cli(*args), f"{flag} ", "File name too long")
    assert len(line) < 250
    assert _files(tmp_path) == {"config.yaml"}


def test_too_many_threads_is_a_config_error_that_leaves_nothing_behind(cli, tiny_config, tmp_path):
    _assert_user_error(cli("train", "--config", tiny_config, "--set", "threads=1099511627776", "--quiet"),
                       "threads: Input should be less than or equal to 1024")
    assert _files(tmp_path) == {"config.yaml"}


def test_a_nul_byte_in_the_data_root_is_a_config_error(cli, tiny_config, tmp_path):
    _assert_user_error(cli("train", "--config", tiny_config, "--set", "data.dataset=mnist1d",
                           "--set", 'data.root="data\\0x"', "--quiet"), "data.root: a path cannot contain a NUL byte")
    assert _files(tmp_path) == {"config.yaml"}


# --- progress in a pipe -------------------------------------------------------------------------------------

def _lines_of(stream):
    """The lines of a pipe as they arrive, read on a thread: get(timeout=...) never hangs the test."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue()

    def pump():
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _first_line_matching(proc, lines, pattern: str, timeout: float = 180):
    """The first line matching `pattern` and the lines before it; the timeout only guards against a hang."""
    import queue
    import re

    seen = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            proc.kill()
            pytest.fail(f"no line matching {pattern!r} in {timeout} s; got {seen}")
        assert line is not None, f"stderr ended without a line matching {pattern!r}: {seen}"
        if m := re.fullmatch(pattern, line):
            return m, seen
        seen.append(line)


def _popen_bnexp(args, cwd, **env):
    import signal
    import sys

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "bnexp.cli", *map(str, args)], cwd=cwd, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True), signal


@pytest.mark.slow
def test_train_prints_progress_lines_to_a_pipe_while_it_trains(tmp_path, write_config):
    """With stderr a pipe, `train` prints "step N/M (P%)  loss ...  test acc ...  R steps/s  ETA h:mm:ss"
    lines (at every update here: BNEXP_PROGRESS_SECONDS=0) while it trains: the line arrives while the run
    is far from done, and the run is then stopped by a signal, not ended."""
    steps = 1_000_000
    cfg = write_config({**TINY, "train": {**TINY["train"], "steps": steps, "eval_every": 100,
                                         "checkpoint_every": steps}})
    proc, signal = _popen_bnexp(["train", "-c", cfg, "--out", tmp_path / "run"], tmp_path, BNEXP_PROGRESS_SECONDS="0")
    lines = _lines_of(proc.stderr)
    m, _ = _first_line_matching(proc, lines, rf"step (\d+)/{steps} \((\d+)%\)  loss ([0-9.]+)  test acc ([0-9.]+)  "
                                             rf"([0-9.]+) steps/s  ETA (\d+):(\d\d):(\d\d)")
    assert proc.poll() is None  # still training
    step = int(m.group(1))
    assert 0 < step < steps and int(m.group(2)) == 100 * step // steps and float(m.group(5)) > 0
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    summary = yaml.safe_load((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and step <= summary["steps"] < steps


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_compare_prints_progress_lines_to_a_pipe_while_runs_train(tmp_path, write_config, jobs):
    """With stderr a pipe, `compare` prints "D/N runs done[, ETA ...]; running: arm/sS step K/M, ..." lines
    while its runs train, before any run has ended."""
    steps = 100_000
    base = {**TINY, "train": {**TINY["train"], "steps": steps, "checkpoint_every": steps}}
    cfg = write_config({"name": "p", "base": base, "seeds": [0, 1],
                        "arms": {"no_bn": {"model.norm": "none"}, "torch_bn": {"model.norm": "torch"}}}, "c.yaml")
    proc, signal = _popen_bnexp(["compare", "-c", cfg, "--out", tmp_path / "c", "--jobs", jobs], tmp_path,
                                BNEXP_PROGRESS_SECONDS="0")
    lines = _lines_of(proc.stderr)
    running = r"no_bn/s0 step (\d+)/100000" + (r", no_bn/s1 step (\d+)/100000" if jobs == 2 else "")
    m, before = _first_line_matching(proc, lines, rf"0/4 runs done(, ETA \d+:\d\d:\d\d)?; running: {running}")
    while int(m.group(2)) == 0:  # until the first run has trained a step
        m, _ = _first_line_matching(proc, lines, m.re.pattern)
    assert proc.poll() is None and not any("] no_bn seed" in line for line in before)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_progress_interval_is_a_user_error(cli, tiny_config, write_config, tmp_path, monkeypatch, value):
    monkeypatch.setenv("BNEXP_PROGRESS_SECONDS", value)
    expected = (f"error: BNEXP_PROGRESS_SECONDS='{value}': expected a number of seconds >= 0 (the interval between "
                f"progress lines in a pipe or file)\n")
    r = cli("train", "-c", tiny_config)
    assert (r.code, r.out, r.err) == (2, "", expected)
    cmp = write_config({"base": TINY, "arms": {"a": {}}, "seeds": [0]}, "c.yaml")
    r = cli("compare", "-c", cmp)
    assert (r.code, r.out, r.err) == (2, "", expected)
    assert _files(tmp_path) == {"config.yaml", "c.yaml"}
    assert cli("train", "-c", tiny_config, "--quiet").code == 0  # quiet prints no progress: the value is unused


def test_fit_lists_what_fits_and_counts_the_rest():
    from bnexp.engine.progress import fit

    names = [f"arm_{i}/s{i % 3}" for i in range(40)]
    line = fit("  not started (40): ", names, width=100)
    assert len(line) <= 100 and line.startswith("  not started (40): arm_0/s0, arm_1/s1, ")
    shown = line.split(": ", 1)[1].split(", ")
    assert shown[-1] == f"and {40 - len(shown) + 1} more" and shown[:-1] == names[:len(shown) - 1]
    assert fit("  x (2): ", ["a", "b"]) == "  x (2): a, b"
    assert fit("h: ", ["a" * 120]) == "h: " + "a" * 120  # one item is shown even when it alone is too long


def test_wrapped_names_every_item_over_lines_of_the_width():
    from bnexp.engine.progress import wrapped

    items = [f"arm_{i}/s{i} at step {i * 1111}" for i in range(9)]
    lines = wrapped("  stopped at a checkpoint, resumable (9): ", items, width=80)
    assert len(lines) > 1 and all(len(line) <= 80 for line in lines)
    assert lines[0].startswith("  stopped at a checkpoint, resumable (9): arm_0/s0 at step 0,")
    assert all(line.startswith("    arm_") for line in lines[1:])
    assert " ".join(line.strip() for line in lines).split(": ", 1)[1] == ", ".join(items)
    assert wrapped("  x (1): ", ["a"]) == ["  x (1): a"]
