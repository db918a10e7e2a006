"""What a researcher sees in TensorBoard, read back with tensorboard's own reader and server: metrics.jsonl's
rows under the sections that order the dashboards, the custom-scalar layout, every run as an hparams
session with every config key, and a comparison's hparams summary that keeps every run in the view."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from bnexp.engine import dashboard
from bnexp.engine.rundir import read_metrics

TRAINING = ["train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr"]
PROBED = {"probes": {"enabled": True, "every": 20, "population_batches": 2, "units_per_layer": 2,
                     "histogram_every": 20}}


@pytest.fixture
def finished_run(cli, tiny_config, tmp_path):
    r = cli("train", "--config", tiny_config, "--out", "run", "--quiet")
    assert r.code == 0, r.err
    return tmp_path / "run"


@pytest.fixture
def probed_run(cli, tiny_config, tmp_path):
    """A BN run with every default probe on."""
    cfg = yaml.safe_load(tiny_config.read_text()) | PROBED
    tiny_config.write_text(yaml.safe_dump(cfg))
    r = cli("train", "--config", tiny_config, "--out", "probed", "--quiet")
    assert r.code == 0, r.err
    return tmp_path / "probed"


def _accumulator(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _series(run: Path, key: str) -> list[tuple[int, float]]:
    return [(row["step"], row[key]) for row in read_metrics(run) if key in row]


def _close(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    # TensorBoard stores scalars as float32.
    return [s for s, _ in got] == [s for s, _ in want] and all(
        math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-7) for (_, g), (_, w) in zip(got, want))


def _group(tag: str) -> str:
    return tag.split("/", 1)[0]


def _tensorboard_order(group: str) -> tuple[int, str]:
    # TensorBoard orders tag groups by name, a leading number by its value, digits before letters.
    number = re.match(r"\d+", group)
    assert number, f"group {group!r} has no number: its place among the groups would be alphabetical"
    return int(number.group()), group


def test_scalars_are_the_metrics_rows_under_their_sections(probed_run):
    got = _scalars(_accumulator(probed_run))
    keys = list(dict.fromkeys(k for row in read_metrics(probed_run) for k in row if k != "step"))
    assert set(TRAINING) <= set(keys) and any(k.startswith("activations/") for k in keys)
    for key in keys:
        # The tag is the metrics.jsonl key behind its section.
        assert dashboard.tag(key).split("/", 1)[1] == key
        assert _close(got[dashboard.tag(key)], _series(probed_run, key)), key
    # TensorBoard only: the log10 of each running-statistic error, and nothing else (no one-point hparam/*).
    extra = set(got) - {dashboard.tag(k) for k in keys}
    errors = [k for k in keys if re.fullmatch(r"running_stats/[^/]+/(mean|var)_err", k)]
    assert errors and extra == {dashboard.tag(k.replace("/mean_err", "/log10_mean_err")
                                              .replace("/var_err", "/log10_var_err")) for k in errors}
    for key in errors:
        head, _, error = key.rpartition("/")
        log10 = [(s, math.log10(v)) for s, v in _series(probed_run, key)]
        assert _close(got[dashboard.tag(f"{head}/log10_{error}")], log10), key


def test_dashboards_open_on_loss_and_accuracy_then_bn_and_end_on_units(probed_run):
    acc = _accumulator(probed_run)
    tags = acc.Tags()["scalars"] + acc.Tags()["histograms"]
    groups = sorted({_group(t) for t in tags}, key=_tensorboard_order)
    # Time Series opens the first two groups.
    assert {t.split("/", 1)[1] for t in tags if _group(t) == groups[0]} == set(TRAINING) - {"lr"}
    assert {t.split("/", 2)[1] for t in tags if _group(t) == groups[1]} == {"gap", "running_stats"}
    between = {t.split("/", 2)[1] for t in tags if _group(t) in groups[2:-1]}
    assert {"lr", "grad_norm", "signal", "rank"} <= between
    last = [t for t in tags if _group(t) == groups[-1]]
    assert {t.split("/", 2)[1] for t in last} == {"activations"}
    assert set(acc.Tags()["histograms"]) <= set(last)


def _layout(acc):
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    (event,) = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def test_custom_scalars_layout(probed_run):
    acc = _accumulator(probed_run)
    layout, tags = _layout(acc), set(acc.Tags()["scalars"])
    titles = [c.title for c in layout.category]
    assert "loss" in titles[0] and "BN" in titles[1]
    for category in layout.category:
        for chart in category.chart:
            if chart.HasField("multiline"):
                # TensorBoard takes each entry as a regular expression: each is one tag, and at most two
                # quantities share a chart (train and test), so no chart holds more than two lines per run.
                matched = [[t for t in tags if re.search(rx, t)] for rx in chart.multiline.tag]
                assert all(len(m) == 1 for m in matched) and len(matched) <= 2, (chart.title, matched)
    # Figure 1: a band per tracked unit, its median between the 15th and 85th percentiles; TensorBoard (2.21)
    # shows a category's Margin charts last to first, so they are stored that way round.
    bands = [s for c in layout.category for chart in c.chart if chart.HasField("margin")
             for s in chart.margin.series]
    assert all(b.value.endswith("/p50") and b.lower == b.value[:-3] + "p15" and b.upper == b.value[:-3] + "p85"
               and {b.value, b.lower, b.upper} <= tags for b in bands)
    units = [k.rpartition("/")[0] for k in read_metrics(probed_run)[0] if k.startswith("activations/")
             and k.endswith("/p50")]
    assert [dashboard.tag(u) for u in units] == [b.value.rpartition("/")[0] for b in reversed(bands)]
    # The running statistics on a log scale, next after loss and accuracy.
    running = layout.category[1]
    assert "running statistics" in running.title and all("log10_" in rx for chart in running.chart
                                                          for rx in chart.multiline.tag)


def _hparams_data(acc):
    from tensorboard.plugins.hparams import metadata

    return acc.PluginTagToContent(metadata.PLUGIN_NAME)


def test_a_run_is_an_hparams_session_with_every_config_key(finished_run):
    from tensorboard.plugins.hparams import api_pb2, metadata

    acc = _accumulator(finished_run)
    content = _hparams_data(acc)
    assert metadata.EXPERIMENT_TAG not in content  # a comparison declares one for all its runs
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_SUCCESS

    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]

    config = dict(flat(yaml.safe_load((finished_run / "config.yaml").read_text())))
    config["arm"] = config.pop("name")
    assert set(start.hparams) == set(config)
    for key, want in config.items():
        got = start.hparams[key]
        kind = got.WhichOneof("kind")
        if isinstance(want, bool):
            assert got.bool_value == want, key
        elif isinstance(want, int):  # shown as the integer it is, not 60.000
            assert kind == "string_value" and got.string_value.strip() == str(want), key
        elif isinstance(want, float):
            assert got.number_value == want, key
        elif want is None:
            assert got.string_value == "null", key
        else:
            assert got.string_value == (want if isinstance(want, str) else json.dumps(want)), key
    assert not any(t.startswith("hparam/") for t in acc.Tags()["scalars"])


def test_integers_read_as_integers_and_sort_as_numbers():
    # The parallel-coordinates axis of a text hparam sorts the text: 10 must not come before 5.
    numbers = [50, 5, 20, 10, 0, 123456789, 9, 10**18]
    text = [dashboard.hparam_value(n).string_value for n in numbers]
    assert sorted(text) == [dashboard.hparam_value(n).string_value for n in sorted(numbers)]
    assert [int(t) for t in text] == numbers


def test_comparison_metrics_keep_every_run_in_the_view():
    from bnexp.config import Config

    configs = [Config(seed=s, name=arm) for arm in ("a", "b") for s in (0, 1)]
    training = ["test/accuracy", "test/loss", "train/accuracy", "train/loss"]
    bn = ["gap/accuracy", "running_stats/h1/mean_err"]

    def declared(run_keys):
        return [m.display_name for m in dashboard.comparison_hparams(configs, run_keys).metric_infos]

    # Fewer metrics than TensorBoard shows are common to every run: one a run lacks would be shown, and
    # that run left out of the parallel coordinates: it is not declared.
    assert declared([training + bn, training + bn, training, training]) == training
    assert declared([training + bn] * 4) == training + bn
    # Enough common ones: the others follow them, shown only when the user ticks them.
    common = training + ["gap/kl"]
    assert declared([common + bn, common + bn, common, common]) == ["test/accuracy", "test/loss", "train/accuracy",
                                                                    "train/loss", "gap/kl"] + bn
    assert len(common) >= dashboard.SHOWN


def _write_compare(write_config, tmp_path: Path) -> Path:
    base = {k: v for k, v in yaml.safe_load((tmp_path / "config.yaml").read_text()).items() if k != "name"} | PROBED
    return write_config({"name": "tb", "base": {**base, "train": {**base["train"], "steps": 20}},
                         "arms": {"bn": {"model.norm": "bnexp"},
                                  "bn_m05": {"model.norm": "bnexp", "model.bn.momentum": 0.5},
                                  "no_bn": {"model.norm": "none"}},
                         "seeds": [0, 1], "target_accuracy": None, "baseline": "bn"}, "compare.yaml")


@pytest.fixture
def comparison(cli, tiny_config, write_config, tmp_path):
    r = cli("compare", "--config", _write_compare(write_config, tmp_path), "--out", "comparison", "--quiet")
    assert r.code == 0, r.err
    return tmp_path / "comparison"


@pytest.mark.slow
def test_comparison_declares_what_differs_and_metrics_every_run_has(comparison):
    from tensorboard.plugins.hparams import api_pb2, metadata

    content = _hparams_data(_accumulator(comparison))  # the event file at its root (the run ".")
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    infos = {h.name: h for h in experiment.hparam_infos}
    differs = {name for name, h in infos.items() if h.differs}
    assert differs == {"arm", "seed", "model.norm", "model.bn.momentum"}
    assert set(dashboard.CONTEXT_KEYS) <= set(infos)
    seed = infos["seed"]
    assert seed.type == api_pb2.DATA_TYPE_STRING and [int(v.string_value) for v in seed.domain_discrete.values] == [0, 1]
    momentum = infos["model.bn.momentum"]
    assert momentum.type == api_pb2.DATA_TYPE_FLOAT64
    assert (momentum.domain_interval.min_value, momentum.domain_interval.max_value) == (0.1, 0.5)
    assert [v.string_value for v in infos["arm"].domain_discrete.values] == ["bn", "bn_m05", "no_bn"]
    # Every run has every declared metric, as the last value of a tag it logged.
    metrics = [m.name.tag for m in experiment.metric_infos]
    assert dashboard.tag("test/accuracy") in metrics
    runs = sorted(p.parent for p in comparison.rglob("summary.json"))
    assert len(runs) == 6
    for run in runs:
        assert set(metrics) <= set(_accumulator(run).Tags()["scalars"]), run


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: dict | None = None):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with opener.open(req, timeout=10) as resp:
        return json.loads(resp.read().decode())


@pytest.mark.slow
def test_tensorboard_server_serves_the_comparison(comparison, tmp_path):
    exe = shutil.which("tensorboard")
    cmd = [exe] if exe else [sys.executable, "-m", "tensorboard.main"]
    port = _free_port()
    log = open(tmp_path / "tensorboard.log", "w")
    proc = subprocess.Popen([*cmd, "--logdir", str(comparison), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    base = f"http://127.0.0.1:{port}"
    runs = [f"{arm}/s{seed}" for arm in ("bn", "bn_m05", "no_bn") for seed in (0, 1)]
    try:
        tags, deadline = {}, time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "tensorboard.log").read_text()
            try:
                tags = _request(f"{base}/data/plugin/scalars/tags")
                if all(dashboard.tag("test/accuracy") in tags.get(run, {}) for run in runs):
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        # Runs are named <arm>/s<seed> when TensorBoard is pointed at the comparison.
        assert set(runs) <= set(tags), (tags.keys(), (tmp_path / "tensorboard.log").read_text())
        for run in runs:
            for key in TRAINING:
                query = urllib.parse.urlencode({"run": run, "tag": dashboard.tag(key)})
                points = _request(f"{base}/data/plugin/scalars/scalars?{query}")  # [wall_time, step, value]
                assert _close([(step, value) for _, step, value in points], _series(comparison / run, key)), key
        # The hparams view: the comparison's summary, and every run in it with a value for every metric
        # (the parallel-coordinates view leaves out a run that lacks one it shows).
        experiment = _request(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        assert [h["name"] for h in experiment["hparamInfos"]][:4] == ["arm", "model.bn.momentum", "model.norm", "seed"]
        metrics = [m["name"] for m in experiment["metricInfos"]]
        groups = _request(f"{base}/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"hparam": "seed", "includeInResult": True}]
                         + [{"metric": m, "includeInResult": True} for m in metrics]})["sessionGroups"]
        assert sorted(g["name"] for g in groups) == runs
        assert all(len(g["metricValues"]) == len(metrics) for g in groups)
        assert all(g["hparams"]["seed"].strip() in ("0", "1") for g in groups)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
