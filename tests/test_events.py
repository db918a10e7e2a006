"""bnexp.engine.events: the synchronous TensorBoard event writer reads back as SummaryWriter's files do."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from bnexp.engine import events


def test_masked_crc32c_equals_tensorboards():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    rng = random.Random(0)
    for n in list(range(0, 40)) + [255, 256, 257, 4096, 9000]:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert events.masked_crc32c(data) == masked_crc32c(data), n


def _read(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_rows_histograms_and_purge_read_back(tmp_path):
    w = events.EventWriter(tmp_path)
    for step in range(5):
        w.add_scalars({"a": step * 1.5, "b/c": -step}, step)
    w.add_histogram("h", torch.arange(100.0), 3)
    w.close()
    w.close()  # harmless
    acc = _read(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("a")] == [(s, s * 1.5) for s in range(5)]
    assert [e.value for e in acc.Scalars("b/c")] == [0, -1, -2, -3, -4]
    (h,) = acc.Histograms("h")
    assert h.step == 3 and h.histogram_value.num == 100 and h.histogram_value.max == 99
    from torch.utils.tensorboard.summary import make_histogram

    want = make_histogram(np.arange(100.0), events._default_bins())  # SummaryWriter.add_histogram's
    assert list(h.histogram_value.bucket_limit) == list(want.bucket_limit)
    assert list(h.histogram_value.bucket) == list(want.bucket)

    # A resumed writer purges the steps from purge_step on that the earlier file holds.
    w = events.EventWriter(tmp_path, purge_step=3)
    while len(list(tmp_path.glob("events.out.tfevents.*"))) < 2:  # pragma: no cover - same-second name
        w.close()
        w = events.EventWriter(tmp_path, purge_step=3)
    w.add_scalars({"a": 100.0}, 3)
    w.close()
    assert [(e.step, e.value) for e in _read(tmp_path).Scalars("a")] == [(0, 0), (1, 1.5), (2, 3.0), (3, 100.0)]


def test_events_reach_the_file_at_flush_or_after_flush_secs(tmp_path):
    w = events.EventWriter(tmp_path, flush_secs=3600)
    size = os.path.getsize(w.path)
    assert size > 0  # the file-version event, written at once
    w.add_scalars({"a": 1.0}, 1)
    assert os.path.getsize(w.path) == size  # held until flush
    w.flush()
    assert os.path.getsize(w.path) > size
    w.close()
    (tmp_path / "v").mkdir()
    v = events.EventWriter(tmp_path / "v", flush_secs=0)
    size = os.path.getsize(v.path)
    v.add_scalars({"a": 1.0}, 1)
    assert os.path.getsize(v.path) > size  # flush_secs passed: on disk without a flush
    v.close()


def test_histogram_bins_are_summary_writers(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    reference = SummaryWriter(str(tmp_path / "tb"))
    reference.close()
    assert events._default_bins() == reference.default_bins
    np.testing.assert_array_equal(np.diff(events._default_bins()) > 0, True)


@pytest.mark.parametrize("case", ["normal", "wide", "edges", "zeros", "one", "negative", "outside", "ints"])
def test_histogram_proto_is_summary_writers(case):
    """Our histogram builder writes the very proto torch's make_histogram builds (SummaryWriter's)."""
    from torch.utils.tensorboard.summary import make_histogram

    bins = np.array(events._default_bins())
    rng = np.random.default_rng(0)
    for trial in range(20):
        values = {
            "normal": lambda: rng.normal(size=360),
            "wide": lambda: rng.normal(size=500) * 10.0 ** rng.integers(-8, 12, size=500),
            "edges": lambda: rng.choice(bins[700:900], size=100),  # exactly on bucket edges
            "zeros": lambda: np.concatenate([np.zeros(7), rng.normal(size=5)]),
            "one": lambda: rng.normal(size=1),
            "negative": lambda: -np.abs(rng.normal(size=50)),
            "outside": lambda: np.concatenate([rng.normal(size=30), [1e21, -1e21, bins[-1], bins[0]]]),
            "ints": lambda: rng.integers(-3, 4, size=40).astype(float),
        }[case]()
        want = make_histogram(values.copy(), bins)
        got = events.histogram_proto(values, bins)
        assert got == want, (case, trial)


def test_histogram_proto_refuses_what_make_histogram_refuses():
    from torch.utils.tensorboard.summary import make_histogram

    bins = np.array(events._default_bins())
    for values in (np.array([]), np.array([1e25, -1e25])):
        with pytest.raises(ValueError):
            make_histogram(values, bins)
        with pytest.raises(ValueError):
            events.histogram_proto(values, bins)
