"""TensorBoard event files, written by the training loop itself: synchronously, in batches.

torch's SummaryWriter hands every event to a background thread, which frames it as a TFRecord with a
CRC-32C that tensorboard (without TensorFlow) computes in pure Python, ~0.1 µs a byte while holding the
GIL. With a row every log interval that thread took the training loop's time in bursts: about 3 % of a
step of the paper's network with probes off, more with the probe rows and histograms. Here an event is
serialized and framed when it is added (CRC-32C from numpy tables, ~20x faster on a probe row) and reaches
the file at flush(): the Trainer flushes before every checkpoint, and add_event does once flush_secs have
passed, as SummaryWriter's thread did; close() flushes too.

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

import numpy as np

_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
_BLOCK = 2048  # bytes per table lookup; the tables take _BLOCK x 256 x 4 bytes
_uid = itertools.count()


def _byte_table() -> list[int]:
    table = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _byte_table()
_by_distance: np.ndarray | None = None


def _tables() -> np.ndarray:
    """Row d (flattened, 256 entries each, last row first): what byte b contributes to the register when
    d more bytes follow it. CRC is linear over XOR, so a block's CRC is the XOR of its bytes' rows."""
    global _by_distance
    if _by_distance is None:
        table = np.array(_TABLE, dtype=np.uint32)
        rows = np.empty((_BLOCK, 256), dtype=np.uint32)
        rows[0] = table
        for d in range(1, _BLOCK):  # one more zero byte after it: the register steps once
            prev = rows[d - 1]
            rows[d] = table[prev & 0xFF] ^ (prev >> 8)
        _by_distance = np.ascontiguousarray(rows[::-1]).reshape(-1)
    return _by_distance


def crc32c(data: bytes) -> int:
    n = len(data)
    if n <= 64:  # numpy's per-call cost is more than a short loop's
        crc = 0xFFFFFFFF
        for b in data:
            crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    rows = _tables()
    base = np.arange(0, _BLOCK * 256, 256, dtype=np.intp)
    buf = np.frombuffer(data, dtype=np.uint8)
    crc = 0xFFFFFFFF
    for start in range(0, n, _BLOCK):
        block = buf[start:start + _BLOCK].astype(np.intp)
        k = len(block)
        # The register going in acts as if XORed into the block's first 4 bytes; what of it a block
        # shorter than 4 bytes does not reach is only shifted down.
        reach = min(k, 4)
        block[:reach] ^= [(crc >> (8 * i)) & 0xFF for i in range(reach)]
        rest = crc >> (8 * k) if k < 4 else 0
        crc = int(np.bitwise_xor.reduce(rows[base[_BLOCK - k:] + block])) ^ rest
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum (tensorboard's masked_crc32c)."""
    x = crc32c(data)
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
        self._file = open(self.path, "wb")
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
        from torch.utils.tensorboard.summary import histogram

        if self._bins is None:
            # An array: numpy converts a list of bin edges on every call, which was half the cost.
            self._bins = np.array(_default_bins())
        self.add_summary(histogram(tag, values, self._bins), step)

    def add_custom_scalars(self, layout: dict) -> None:
        from torch.utils.tensorboard.summary import custom_scalars

        self.add_summary(custom_scalars(layout))

    def flush(self) -> None:
        if self._file is None:
            return
        if self._pending:
            self._file.write(b"".join(self._pending))
            self._pending = []
        self._file.flush()
        self._next_flush = time.time() + self.flush_secs

    def close(self) -> None:
        """Flush and close; closing twice is harmless."""
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
