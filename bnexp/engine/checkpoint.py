"""Checkpoints: written atomically (temporary file, fsync, rename) so a kill mid-write never leaves a
half file under a real checkpoint name; resume takes the newest complete one.

Each file carries a SHA-256 of its own bytes, in the zip archive's comment (a torch.save file is a zip
archive; the comment is the last field of the archive, where readers, torch.load among them, expect free
text): load() checks it before it unpickles anything, so flipped bytes in the tensor data, which torch.load
reads without complaint, are found. The digest is taken on the writer thread from the bytes it writes; a
digest of the state in the training loop would have cost about as much as serializing it.

The training loop hands its checkpoints to a Writer: the state is serialized at once, at its step, and the
file work (write, fsync, rename, pruning: system calls that release the GIL) is done by a background
thread while training goes on. On the bench workload that took a checkpoint's cost to the loop from
~3.6 ms to ~1.3 ms.

A file under a real name that does not load or does not match its checksum (truncated or damaged after
the fact, by a disk or a person) is reported, never skipped or deleted: silently resuming from an older
state would hide it. The report names the previous checkpoint when that one is intact, so the user can
move the damaged file away and resume from it. Files of formats 1 and 2 (before checksums) load as
unverified.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import os
import re
import stat
import struct
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bnexp.engine import files
from bnexp.engine.rundir import CHECKPOINTS
from bnexp.errors import UserError, excerpt, first_line

_NAME = re.compile(r"^step-(\d+)\.pt$")
_TMP = re.compile(r"^\.step-(\d+)\.pt\.tmp$")
REQUIRED = ("step", "model", "optimizer", "scheduler", "sampler", "rng", "probes")
# 2: the loop's read-back state became "train_metrics" (bnexp.engine.step_metrics); files without a
# "format" key are version 1 and are converted on load. 3: the file carries its checksum (same state).
FORMAT = 3
CHECKSUMMED = 3  # the first format whose files carry a checksum
_EOCD = b"PK\x05\x06"  # a zip archive's end record: 22 bytes, then the comment
_SUM = b"bnexp-sha256:"
KEEP = 2  # the newest plus one fallback


class CheckpointError(UserError):
    """A missing, truncated or corrupted checkpoint: one line naming the file, exit 2."""


def serialize(state: dict[str, Any]) -> memoryview:
    """The bytes of a checkpoint file (one buffer: torch.save writing to a file makes a call per record)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer()


def with_checksum(data: bytes | memoryview) -> bytes:
    """The bytes of a torch.save archive with a SHA-256 of everything before it as the zip comment."""
    data = bytes(data)
    if data[-22:-18] != _EOCD or data[-2:] != b"\0\0":
        raise ValueError("not a torch.save zip archive without a comment")
    head = data[:-2]
    comment = _SUM + hashlib.sha256(head).hexdigest().encode()
    return head + struct.pack("<H", len(comment)) + comment


def _checksum_state(data: bytes) -> str:
    """'ok', 'none' (the archive has no comment of ours) or 'bad' (it has one, which does not match)."""
    comment_len = len(_SUM) + 64
    end = len(data) - comment_len
    if end < 22 or data[end - 22:end - 18] != _EOCD or data[end:end + len(_SUM)] != _SUM:
        return "none"
    if data[end - 2:end] != struct.pack("<H", comment_len):
        return "bad"
    digest = hashlib.sha256(data[:end - 2]).hexdigest().encode()
    return "ok" if data[end + len(_SUM):] == digest else "bad"


def write(run_dir: Path, step: int, data: bytes | memoryview) -> Path:
    """Put serialized checkpoint bytes under their step's name with their checksum, atomically and durably;
    prune old ones. Nothing is written through a symbolic link (a planted temporary, a linked folder)."""
    folder = files.real_dir(run_dir / CHECKPOINTS, create=True)
    final = folder / f"step-{step:08d}.pt"
    files.write_atomic(final, with_checksum(data))
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
    """A checkpoint's state, checked against its checksum; CheckpointError (one line naming the file) for a
    damaged, truncated or foreign one. Older formats are converted (and are not verified: see check)."""
    return _load(path)[0]


def check(path: Path) -> str | None:
    """Raise CheckpointError if the checkpoint at `path` is damaged; return a one-line notice if it can only
    be trusted unverified (an older format, written before checkpoints carried a checksum), else None."""
    version = _load(path)[1]
    if version >= CHECKSUMMED:
        return None
    return (f"note: {path} is of format {version}, written by an older bnexp without a checksum: "
            f"resuming from it unverified")


def check_newest(run_dir: Path) -> tuple[Path | None, str | None]:
    """The newest checkpoint of a run and check()'s notice for it (None, None without one). If it is
    damaged, the CheckpointError says whether the previous one is intact, which resume can then use."""
    found = list_checkpoints(run_dir)
    if not found:
        return None, None
    try:
        return found[-1], check(found[-1])
    except CheckpointError as err:
        hint = ""
        if len(found) > 1:
            try:
                check(found[-2])
                hint = (f"; the previous checkpoint {found[-2].name} is intact: move {found[-1].name} out of "
                        f"{found[-1].parent} to resume from it")
            except CheckpointError:
                hint = f"; the previous checkpoint {found[-2].name} is damaged too"
        raise CheckpointError(f"{err}{hint}") from None


def _read(path: Path) -> bytes:
    """The bytes of a checkpoint file, opened without following a link (a planted `step-*.pt` link to
    another run's checkpoint, or to /dev/zero) and only if it is a regular file."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: a FIFO planted there must not block the open
    except OSError as err:
        if os.path.islink(path):
            raise CheckpointError(f"cannot read checkpoint {path}: it is a symbolic link (bnexp reads "
                                  f"checkpoints only from the run's own files)") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"cannot read checkpoint {path}: not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    finally:
        os.close(fd)


def _load(path: Path) -> tuple[dict[str, Any], int]:
    data = _read(path)
    checksum = _checksum_state(data)
    if checksum == "bad":
        raise CheckpointError(f"damaged checkpoint {path}: its contents do not match the checksum written "
                              f"with it")
    try:
        # Our own files hold RNG states and optimizer dicts: plain tensors and containers only. A foreign
        # file makes torch warn as well as raise: the error line says it all.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"corrupted checkpoint {path}: it holds objects other than tensors and plain "
                              f"containers (not loaded)") from None
    except Exception as err:  # noqa: BLE001 - whatever a damaged file makes the unpickler raise
        raise CheckpointError(f"corrupted or truncated checkpoint {path}: {first_line(err)[:120]}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise CheckpointError(f"corrupted checkpoint {path}: not a bnexp checkpoint")
    version = state.get("format", 1)
    if version not in (1, 2, FORMAT):
        raise CheckpointError(f"checkpoint {path} is of format {excerpt(version)}, from another version of "
                              f"bnexp (this one reads formats 1 to {FORMAT})")
    if version >= CHECKSUMMED and checksum != "ok":
        raise CheckpointError(f"damaged checkpoint {path}: the checksum written with it is missing")
    named = _NAME.match(Path(path).name)
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or (named and step != int(named.group(1))):
        # A file copied or renamed from elsewhere (another run's, an older step's): resuming from it would
        # continue at a step its name does not say.
        raise CheckpointError(f"checkpoint {path} holds the state of step {excerpt(step)}, not the step its "
                              f"name says (copied or renamed from elsewhere?)")
    if version == 1:
        try:
            state = _from_version_1(state)
        except (AttributeError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"corrupted checkpoint {path}: {first_line(err)[:200]}") from None
    state["format"] = FORMAT
    return state, version


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
