"""Checkpoints: written atomically (temporary file, fsync, rename) so a kill mid-write never leaves a
half file under a real checkpoint name; resume takes the newest complete one.

The training loop hands its checkpoints to a Writer: the state is serialized at once, at its step, and the
file work (write, fsync, rename, pruning: system calls that release the GIL) is done by a background
thread while training goes on. On the bench workload that took a checkpoint's cost to the loop from
~3.6 ms to ~1.3 ms.

A file under a real name that does not load (truncated or damaged after the fact, by a disk or a person)
is reported, never skipped or deleted: silently resuming from an older state would hide it.
"""

from __future__ import annotations

import io
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bnexp.engine import files
from bnexp.engine.rundir import CHECKPOINTS
from bnexp.errors import UserError, first_line

_NAME = re.compile(r"^step-(\d+)\.pt$")
_TMP = re.compile(r"^\.step-(\d+)\.pt\.tmp$")
REQUIRED = ("step", "model", "optimizer", "scheduler", "sampler", "rng", "probes")
# 2: the loop's read-back state became "train_metrics" (bnexp.engine.step_metrics); files without a
# "format" key are version 1 and are converted on load.
FORMAT = 2
KEEP = 2  # the newest plus one fallback


class CheckpointError(UserError):
    """A missing, truncated or corrupted checkpoint: one line naming the file, exit 2."""


def serialize(state: dict[str, Any]) -> memoryview:
    """The bytes of a checkpoint file (one buffer: torch.save writing to a file makes a call per record)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer()


def write(run_dir: Path, step: int, data: bytes | memoryview) -> Path:
    """Put serialized checkpoint bytes under their step's name, atomically and durably; prune old ones.
    Nothing is written through a symbolic link (a planted temporary, a linked folder)."""
    folder = files.real_dir(run_dir / CHECKPOINTS, create=True)
    final = folder / f"step-{step:08d}.pt"
    files.write_atomic(final, data)
    # Only once the new one is durable: older checkpoints beyond the fallback, and temporaries left by a
    # process killed mid-write (the run directory's lock makes this process the only writer).
    for old in list_checkpoints(run_dir)[:-KEEP]:
        files.unlink(old)
    for stale in folder.iterdir():
        if _TMP.match(stale.name):
            files.unlink(stale)
    return final


class Writer:
    """Writes a run's checkpoints on one background thread, one at a time, in order.

    save() serializes the state before it returns, so the file holds exactly the state of its step whatever
    the loop does next. The next save() and wait() block until the previous file is durable, and raise
    what writing it raised (a full disk, say): a run never reports a checkpoint it does not have.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._pool: ThreadPoolExecutor | None = None  # started by the first save
        self._pending: Future | None = None

    def save(self, step: int, state: dict[str, Any]) -> None:
        data = serialize(state)
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bnexp-checkpoint")
        self._pending = self._pool.submit(write, self.run_dir, step, data)

    def wait(self) -> Path | None:
        """Block until the last checkpoint handed over is on disk; its path (None if there was none)."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files from an interrupted write are not listed)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load(path: Path) -> dict[str, Any]:
    try:
        # Our own files hold RNG states and optimizer dicts: plain tensors and containers only.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever a damaged file makes the unpickler raise
        first = first_line(err)
        raise CheckpointError(f"corrupted or truncated checkpoint {path}: {first[:200]}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise CheckpointError(f"corrupted checkpoint {path}: not a bnexp checkpoint")
    version = state.get("format", 1)
    if version == 1:
        try:
            return _from_version_1(state)
        except (AttributeError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"corrupted checkpoint {path}: {first_line(err)[:200]}") from None
    if version != FORMAT:
        raise CheckpointError(f"checkpoint {path} is of format {version!r}, from another version of bnexp "
                              f"(this one reads formats 1 and {FORMAT})")
    return state


def _from_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """Version 1 kept the loop's read-back lists: the steps read since the last log row (read_losses,
    read_hits), those not read yet (pending_losses, pending_correct; a checkpoint is written after a read,
    so these were empty) and the divergence window. Version 2 keeps the first two as one interval."""
    losses = [float(v) for v in state.pop("read_losses", torch.zeros(0)).tolist()]
    hits = [int(v) for v in state.pop("read_hits", torch.zeros(0)).tolist()]
    pending = [float(t) for t in state.pop("pending_losses", [])]
    losses += pending
    hits += [int(t) for t in state.pop("pending_correct", [])]
    window = [float(v) for v in state.pop("loss_window", torch.zeros(0)).tolist()] + pending
    state["train_metrics"] = {"losses": torch.tensor(losses, dtype=torch.float64),
                              "hits": torch.tensor(hits, dtype=torch.int64),
                              "window": torch.tensor(window, dtype=torch.float64)}
    state["format"] = FORMAT
    return state
