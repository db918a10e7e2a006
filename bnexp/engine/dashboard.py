"""What TensorBoard shows of a run and of a comparison (docs/design.md section 3): the sections its tags go
under, the hparams of a run and of a comparison, and the custom-scalar layout.

Sections. TensorBoard's Scalars and Time Series dashboards group tags by their first path segment, order the
groups by name (digits before letters) and Time Series opens only the first two. A metrics.jsonl key is
logged to TensorBoard as `<section>/<key>`, with numbered sections that put the groups in the order a reader
wants them: loss and accuracy, then what BN does, then the optimization, then the why-BN-helps families,
then the per-unit detail. metrics.jsonl keeps the keys, which reports, plots and runs written before this
read.

Hparams. Every run records all its config keys (a session, written at step 0, so a run in progress is in
the hparams view too) and how it ended. Its metrics are no values of their own but the last value of
tags it logs (test/accuracy, gap/accuracy, ...), as TensorBoard's hparams plugin reads them. A comparison
declares, at its root, the keys that differ between its runs and the metrics its runs logged
(`comparison_hparams`). Integers are recorded as text right-aligned with spaces: as numbers TensorBoard
prints them as "60.000", and as plain text its parallel-coordinates axis, which sorts text, would put 10
before 5; HTML and SVG do not show the spaces.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from bnexp.config import Config, flatten

# First path segment of a metrics.jsonl key -> the TensorBoard group it is shown in.
SECTIONS = {
    "train": "1_training", "test": "1_training",
    "running_stats": "2_bn", "gap": "2_bn",
    "lr": "3_optimization", "grad_norm": "3_optimization",
    "signal": "4_why_bn", "rank": "4_why_bn", "ics": "4_why_bn", "landscape": "4_why_bn", "sharpness": "4_why_bn",
    "activations": "5_units",
}
OTHER_SECTION = "6_other"  # a key of a family not listed above: shown last, never lost
RUNNING_ERRORS = ("mean_err", "var_err")  # running_stats/<l>/<error>, also logged as log10 (see scalars)

_INT_WIDTH = 20  # an int64 in decimal with its sign: text of this width sorts as the numbers do (0 and up)


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key (or histogram): `<section>/<key>`."""
    return f"{SECTIONS.get(key.split('/', 1)[0], OTHER_SECTION)}/{key}"


def scalars(row: dict[str, float]) -> dict[str, float]:
    """A logged row as TensorBoard scalars: every key under its section, and beside each running-statistic
    error its log10 (TensorBoard only: the errors fall by orders of magnitude in the first few hundred steps,
    so on a linear axis everything after is flat; a zero error has no log)."""
    out = {}
    for key, value in row.items():
        out[tag(key)] = value
        if key.startswith("running_stats/"):
            head, _, error = key.rpartition("/")
            if error in RUNNING_ERRORS and not value <= 0:  # NaN goes through: a diverged run's stays NaN
                out[tag(f"{head}/log10_{error}")] = math.log10(value)
    return out


# --- hparams ------------------------------------------------------------------------------------------

def config_items(cfg: Config) -> dict[str, Any]:
    """Every config key, dotted (model.bn.momentum), with its value, in the config's order; `name` as `arm`
    (a comparison names each run by its arm; the hparams view orders its columns by name)."""
    return {"arm" if key == "name" else key: value for key, value in flatten(cfg.model_dump(mode="json")).items()}


def hparam_value(value: Any):
    """A config value as the hparams plugin takes it (a google.protobuf Value); see the module docstring."""
    from google.protobuf import struct_pb2

    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, int):
        return struct_pb2.Value(string_value=f"{value:>{_INT_WIDTH}}")
    if isinstance(value, float):
        return struct_pb2.Value(number_value=value)
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    return struct_pb2.Value(string_value="null" if value is None else json.dumps(value))


def _hparams_summary(tag_: str, **data):
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(**data)
    return Summary(value=[Summary.Value(tag=tag_, metadata=metadata.create_summary_metadata(content),
                                        tensor=metadata.NULL_TENSOR)])


def session_start(cfg: Config):
    """The run as a session of the hparams plugin: every config key."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key, value in config_items(cfg).items():
        info.hparams[key].CopyFrom(hparam_value(value))
    return _hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=info)


def session_end(status: str):
    """How the run ended: completed is a success, diverged a failure (the hparams view can filter by it)."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    code = api_pb2.STATUS_SUCCESS if status == "completed" else api_pb2.STATUS_FAILURE
    info = plugin_data_pb2.SessionEndInfo(status=code, end_time_secs=time.time())
    return _hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=info)


# Config keys that describe any experiment: declared by a comparison beside those that differ.
CONTEXT_KEYS = ("data.dataset", "data.batch_size", "model.kind", "model.norm", "model.activation", "optim.name",
                "optim.lr", "train.steps")
# Final values a comparison's hparams view shows, in this order (the running-statistic errors of every layer
# follow gap/kl): the last value each run logged of these keys.
METRIC_KEYS = ("test/accuracy", "test/loss", "train/accuracy", "train/loss", "gap/accuracy", "gap/loss",
               "gap/logits", "gap/kl")
SHOWN = 5  # the hparams and metrics the hparams view shows before the user ticks more (its frontend's choice)


def comparison_hparams(configs: list[Config], run_keys: list[list[str]]):
    """The hparams plugin's experiment for the runs of a comparison (`configs`, and the metrics.jsonl keys
    each logged, `run_keys`, in their order).

    Hparams: the keys that differ between the runs (arm and seed among them), then CONTEXT_KEYS, each with
    its type and the values the runs have (TensorBoard shows them sorted by name, those that differ first:
    arm first of all). Metrics: METRIC_KEYS and the running-statistic errors that some run logged; those every
    run logged come first, and the others only when at least SHOWN do: the view drops from its plot a run
    that lacks a metric it shows, and TensorBoard shows the first SHOWN.
    """
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2

    items = [config_items(cfg) for cfg in configs]
    values = {key: [hparam_value(it[key]) for it in items] for key in items[0]}
    differs = [key for key, vs in values.items() if len({v.SerializeToString() for v in vs}) > 1]
    hparams = []
    for key in dict.fromkeys(differs + list(CONTEXT_KEYS)):
        vs = values[key]
        kinds = {v.WhichOneof("kind") for v in vs}
        info = api_pb2.HParamInfo(name=key, differs=key in differs)
        if kinds == {"number_value"}:
            info.type = api_pb2.DATA_TYPE_FLOAT64
            info.domain_interval.min_value = min(v.number_value for v in vs)
            info.domain_interval.max_value = max(v.number_value for v in vs)
        else:
            info.type = api_pb2.DATA_TYPE_BOOL if kinds == {"bool_value"} else api_pb2.DATA_TYPE_STRING
            distinct = {v.SerializeToString(): v for v in vs}.values()
            info.domain_discrete.CopyFrom(struct_pb2.ListValue(values=sorted(
                distinct, key=lambda v: (v.WhichOneof("kind"), str(getattr(v, v.WhichOneof("kind")))))))
        hparams.append(info)

    logged = list(dict.fromkeys(k for keys in run_keys for k in keys))
    errors = [k for k in logged if k.startswith("running_stats/") and k.rpartition("/")[2] in RUNNING_ERRORS]
    candidates = [k for k in METRIC_KEYS if k in logged] + errors
    everywhere = [k for k in candidates if all(k in keys for keys in run_keys)]
    metrics = everywhere + ([k for k in candidates if k not in everywhere] if len(everywhere) >= SHOWN else [])
    return api_pb2.Experiment(hparam_infos=hparams, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag(k)), display_name=k) for k in metrics])


def experiment_summary(experiment):
    from tensorboard.plugins.hparams import metadata

    return _hparams_summary(metadata.EXPERIMENT_TAG, experiment=experiment)


# --- custom scalars -----------------------------------------------------------------------------------

def layout_summary(categories: list[tuple[str, dict[str, list], bool]]):
    """The custom-scalars layout: (title, {chart title: ["Multiline", [keys]] or ["Margin", [value, lower,
    upper]]}, closed) per category, keys as in metrics.jsonl. A Multiline chart's entries are regular
    expressions to TensorBoard: each key is matched whole (h1 is not h10)."""
    import re

    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    def chart(title: str, kind: str, keys: list[str]):
        if kind == "Margin":
            value, lower, upper = (tag(k) for k in keys)
            return layout_pb2.Chart(title=title, margin=layout_pb2.MarginChartContent(
                series=[layout_pb2.MarginChartContent.Series(value=value, lower=lower, upper=upper)]))
        return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(
            tag=[f"^{re.escape(tag(k))}$" for k in keys]))

    def charts_of(charts: dict[str, list]) -> list:
        out = [chart(name, kind, keys) for name, (kind, keys) in charts.items()]
        # TensorBoard (2.21) shows a category's Margin charts last to first: written so that they read in order.
        margins = [c for c in out if c.HasField("margin")][::-1]
        return [c if not c.HasField("margin") else margins.pop(0) for c in out]

    layout = layout_pb2.Layout(category=[layout_pb2.Category(title=title, closed=closed, chart=charts_of(charts))
                                         for title, charts, closed in categories if charts])
    tensor = TensorProto(dtype="DT_STRING", string_val=[layout.SerializeToString()], tensor_shape=TensorShapeProto())
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor,
                                        metadata=metadata.create_summary_metadata())])


# --- a comparison ---------------------------------------------------------------------------------------

def write_comparison(comp_dir: Path, runs: list[tuple[Path, Config]]) -> None:
    """The comparison's hparams summary, in an event file at its root (the run "." when TensorBoard is
    pointed at the comparison), replacing one written before (a resumed comparison has more to declare).
    Runs that logged nothing (failed at start) still count for the hparams, not for the metrics."""
    from bnexp.engine import files
    from bnexp.engine.events import EventWriter
    from bnexp.engine.rundir import RunDirError, read_metrics

    run_keys = []
    for run_dir, _ in runs:
        try:
            rows = read_metrics(run_dir)
        except (RunDirError, OSError):
            continue  # the report names a damaged run; its metrics are simply not declared
        if rows:
            run_keys.append([k for k in dict.fromkeys(k for row in rows for k in row) if k != "step"])
    experiment = comparison_hparams([cfg for _, cfg in runs], run_keys)
    for old in comp_dir.glob("events.out.tfevents.*"):
        files.unlink(old)
    writer = EventWriter(comp_dir)
    try:
        writer.add_summary(experiment_summary(experiment))
    finally:
        writer.close()
