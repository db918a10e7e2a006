"""TensorBoard event files, written by the training loop itself: synchronously, in batches.

torch's SummaryWriter hands every event to a background thread, which frames it as a TFRecord with a
CRC-32C that tensorboard (without TensorFlow) computes in pure Python, ~0.1 µs a byte while holding the
GIL. With a row every log interval that thread took the training loop's time in bursts. Even with the
CRC swapped for google-crc32c's, the thread and its queue cost the loop a few percent: measured
alternately on the bench workload, `bnexp bench`'s loop ratio was 0.910 with SummaryWriter against
0.937 with this writer (probes off) and 0.811 against 0.880 (probes on). Here an event is serialized and
framed when it is added (CRC-32C from google-crc32c) and reaches the file at flush(): the Trainer
flushes before every checkpoint, and add_event does once flush_secs have passed, as SummaryWriter's
thread did; close() flushes too.

The files are the ones SummaryWriter writes: same name pattern (readers order them by it), the same first
event, the same purge events on resume, and summaries built by torch.utils.tensorboard.summary.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path

import google_crc32c
import numpy as np

from bnexp.engine import files

_uid = itertools.count()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum (tensorboard's masked_crc32c), from google-crc32c's C implementation."""
    x = google_crc32c.value(data)
    return ((((x >> 15) | (x << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    header = struct.pack("<Q", len(data))
    return b"".join((header, struct.pack("<I", masked_crc32c(header)), data,
                     struct.pack("<I", masked_crc32c(data))))


def _default_bins() -> list[float]:
    # SummaryWriter's default ("tensorflow") histogram buckets, built the way it builds them.
    v, buckets = 1e-12, []
    while v < 1e20:
        buckets.append(v)
        v *= 1.1
    return [-b for b in reversed(buckets)] + [0] + buckets


def histogram_proto(values: np.ndarray, bins: np.ndarray):
    """The HistogramProto that SummaryWriter.add_histogram writes (torch's make_histogram, max_bins None),
    field for field, at a fifth of its cost (~25 against ~130 µs for 360 values): the buckets are found for
    the values (a few hundred) rather than counted over every one of the ~1,500 default bins, and the
    trimming to the occupied range that make_histogram does afterwards falls out of that directly."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    values = values.reshape(-1)
    if values.size == 0:
        raise ValueError("The input has no element.")
    # np.histogram's buckets: [b_i, b_i+1), the last one closed; values outside the edges are not counted.
    inside = values[(values >= bins[0]) & (values <= bins[-1])]
    idx = np.minimum(np.searchsorted(bins, inside, side="right") - 1, len(bins) - 2)
    if idx.size == 0:
        raise ValueError("The histogram is empty, please file a bug report.")
    start, end = int(idx.min()), int(idx.max()) + 1  # the first and one past the last occupied bucket
    # TensorBoard takes each bucket's right edge; an empty bucket on the left carries the leftmost one.
    low = max(start - 1, 0)
    counts = np.bincount(idx - low, minlength=end - low)
    if start == 0:
        counts = np.concatenate([[0], counts])
    # Serialized by hand and parsed: every field is a double, the two lists packed ones, so their bytes are
    # numpy's; building the message from ~600-element Python lists was a third of the cost.
    limits, counts = bins[start:end + 1].astype("<f8").tobytes(), counts.astype("<f8").tobytes()
    head = struct.pack("<BdBdBdBdBd", 0x09, values.min(), 0x11, values.max(), 0x19, len(values),
                       0x21, values.sum(), 0x29, values.dot(values))
    return HistogramProto.FromString(b"".join((head, b"\x32", _varint(len(limits)), limits,
                                               b"\x3a", _varint(len(counts)), counts)))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class EventWriter:
    """The part of SummaryWriter that bnexp uses, with the writes described in the module docstring."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None, flush_secs: float = 120.0):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._Event, self._Summary = Event, Summary
        self.log_dir = Path(log_dir)
        self.flush_secs = flush_secs
        self.path = self.log_dir / (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                                    f"{os.getpid()}.{next(_uid)}")
        self._file = files.open_new(self.path)  # unbuffered, never through a planted link
        self._pending: list[bytes] = []
        self._bins: np.ndarray | None = None
        self._next_flush = float("inf")  # set by the flush below
        self.add_event(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            # What SummaryWriter(purge_step=...) writes: readers drop the steps from here on that earlier
            # files of the run hold.
            self.add_event(Event(step=purge_step, file_version="brain.Event:2"), purge_step)
            self.add_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)), purge_step)
        self.flush()

    def add_event(self, event, step: int | None = None) -> None:
        event.wall_time = time.time()
        if step is not None:
            event.step = int(step)
        self._pending.append(frame(event.SerializeToString()))
        if event.wall_time >= self._next_flush:
            self.flush()

    def add_summary(self, summary, step: int | None = None) -> None:
        self.add_event(self._Event(summary=summary), step)

    def add_scalars(self, values: dict[str, float], step: int) -> None:
        """Every scalar of a row in one event: SummaryWriter.add_scalar per tag costs ~8x more, which
        with the ~50 probe tags was a third of the probes' overhead. Readers see the same scalars."""
        Value = self._Summary.Value
        self.add_summary(self._Summary(value=[Value(tag=tag, simple_value=float(v)) for tag, v in values.items()]),
                         step)

    def add_scalar(self, tag: str, value: float, step: int | None = None) -> None:
        from torch.utils.tensorboard.summary import scalar

        self.add_summary(scalar(tag, value), step)

    def add_histogram(self, tag: str, values, step: int | None = None) -> None:
        if self._bins is None:
            self._bins = np.array(_default_bins())
        values = values.detach().cpu().double().numpy() if hasattr(values, "detach") else np.asarray(
            values, dtype=np.float64)
        self.add_summary(self._Summary(value=[self._Summary.Value(tag=tag, histo=histogram_proto(values,
                                                                                                self._bins))]),
                         step)

    def add_custom_scalars(self, layout: dict) -> None:
        from torch.utils.tensorboard.summary import custom_scalars

        self.add_summary(custom_scalars(layout))

    def flush(self) -> None:
        if self._file is None:
            return
        if self._pending:
            data, self._pending = b"".join(self._pending), []
            files.write(self._file, data, self.path)
        self._next_flush = time.time() + self.flush_secs

    def close(self) -> None:
        """Flush and close; closing twice is harmless."""
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
