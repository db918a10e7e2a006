"""What a researcher sees in TensorBoard: the scalars equal metrics.jsonl, hparams hold the final metrics, and
the real `tensorboard` server serves them."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from bnexp.engine.rundir import read_metrics, read_summary

TAGS = ["train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr"]


@pytest.fixture
def finished_run(cli, tiny_config, tmp_path):
    r = cli("train", "--config", tiny_config, "--out", "run", "--quiet")
    assert r.code == 0, r.err
    return tmp_path / "run"


def _expected(run, tag: str) -> list[tuple[int, float]]:
    return [(row["step"], row[tag]) for row in read_metrics(run) if tag in row]


def _close(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    # TensorBoard stores scalars as float32.
    return [s for s, _ in got] == [s for s, _ in want] and all(
        math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-7) for (_, g), (_, w) in zip(got, want))


def test_event_file_scalars_and_hparams(finished_run):
    from tbparse import SummaryReader

    reader = SummaryReader(str(finished_run), pivot=False)
    scalars = reader.scalars
    for tag in TAGS:
        rows = scalars[scalars.tag == tag].sort_values("step")
        got = list(zip(rows.step.astype(int), rows.value.astype(float)))
        assert got and _close(got, _expected(finished_run, tag)), tag

    summary = read_summary(finished_run)
    hparams = dict(zip(reader.hparams.tag, reader.hparams.value))
    assert hparams["model.norm"] == "torch" and hparams["seed"] == 0 and hparams["train.steps"] == 40
    final = scalars[scalars.tag == "hparam/test_accuracy"]
    assert list(final.step) == [40]
    assert math.isclose(float(final.value.iloc[0]), summary["test_accuracy"], rel_tol=1e-6)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    with opener.open(url, timeout=5) as resp:
        return json.loads(resp.read().decode())


@pytest.mark.slow
def test_tensorboard_server_serves_the_run(finished_run, tmp_path):
    exe = shutil.which("tensorboard")
    cmd = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    port = _free_port()
    log = open(tmp_path / "tensorboard.log", "w")
    proc = subprocess.Popen([*cmd, "--logdir", str(finished_run), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    base = f"http://127.0.0.1:{port}"
    try:
        tags, deadline = {}, time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "tensorboard.log").read_text()
            try:
                tags = _get_json(f"{base}/data/plugin/scalars/tags")
                if "test/accuracy" in tags.get(".", {}):
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        assert set(TAGS) <= set(tags.get(".", {})), (tags, (tmp_path / "tensorboard.log").read_text())
        for tag in TAGS:
            query = urllib.parse.urlencode({"run": ".", "tag": tag})
            points = _get_json(f"{base}/data/plugin/scalars/scalars?{query}")  # [wall_time, step, value]
            assert _close([(step, value) for _, step, value in points], _expected(finished_run, tag)), tag
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
