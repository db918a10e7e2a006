"""Checkpoints: written atomically (temporary file, fsync, rename) so a kill mid-write never leaves a
half file under a real checkpoint name; resume takes the newest complete one.

A file under a real name that does not load (truncated or damaged after the fact, by a disk or a person)
is reported, never skipped or deleted: silently resuming from an older state would hide it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from bnexp.errors import UserError, first_line
from bnexp.runs import CHECKPOINTS, fsync_dir

_NAME = re.compile(r"^step-(\d+)\.pt$")
_TMP = re.compile(r"^\.step-(\d+)\.pt\.tmp$")
REQUIRED = ("step", "model", "optimizer", "scheduler", "sampler", "rng", "probes")
KEEP = 2  # the newest plus one fallback


class CheckpointError(UserError):
    """A missing, truncated or corrupted checkpoint: one line naming the file, exit 2."""


def save(run_dir: Path, step: int, state: dict[str, Any]) -> Path:
    folder = run_dir / CHECKPOINTS
    folder.mkdir(exist_ok=True)
    final = folder / f"step-{step:08d}.pt"
    tmp = folder / f".step-{step:08d}.pt.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(folder)
    # Only once the new one is durable: older checkpoints beyond the fallback, and temporaries left by a
    # process killed mid-write (the run directory's lock makes this process the only writer).
    for old in list_checkpoints(run_dir)[:-KEEP]:
        old.unlink(missing_ok=True)
    for stale in folder.iterdir():
        if _TMP.match(stale.name):
            stale.unlink(missing_ok=True)
    return final


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
    return state
