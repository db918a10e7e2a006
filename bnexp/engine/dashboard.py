"""What TensorBoard shows of a run (docs/design.md section 3): the sections its tags go under, its hparams
and the custom-scalar layout.

Sections. TensorBoard's Scalars and Time Series dashboards group tags by their first path segment, order the
groups by name (digits before letters) and Time Series opens only the first two. A metrics.jsonl key is
logged to TensorBoard as `<section>/<key>`, with numbered sections that put the groups in the order a reader
wants them: loss and accuracy, then what BN does, then the optimization, then the why-BN-helps families,
then the per-unit detail. metrics.jsonl keeps the keys, which reports, plots and runs written before this
read.

Hparams. Every run records all its config keys (a session, written at step 0, so a run in progress is in
the hparams view too) and how it ended. Its metrics are no values of their own but the last value of
tags it logs (test/accuracy, gap/accuracy, ...), as TensorBoard's hparams plugin reads them. Integers are recorded as text right-aligned with spaces: as numbers TensorBoard
prints them as "60.000", and as plain text its parallel-coordinates axis, which sorts text, would put 10
before 5; HTML and SVG do not show the spaces.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from bnexp.config import Config

# First path segment of a metrics.jsonl key -> the TensorBoard group it is shown in.
SECTIONS = {
    "train": "1_training", "test": "1_training",
    "running_stats": "2_bn", "gap": "2_bn",
    "lr": "3_optimization", "grad_norm": "3_optimization",
    "signal": "4_why_bn", "rank": "4_why_bn", "ics": "4_why_bn", "landscape": "4_why_bn", "sharpness": "4_why_bn",
    "activations": "5_units",
}
OTHER_SECTION = "6_other"  # a key of a family not listed above: last but one, never lost
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
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(cfg.model_dump(mode="json"), "")
    return {"arm" if key == "name" else key: value for key, value in out.items()}


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
