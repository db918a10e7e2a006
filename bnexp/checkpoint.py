"""Checkpoints: written atomically (temporary file, fsync, rename) so a kill mid-write never leaves a
half file under a real checkpoint name; resume takes the newest complete one."""

from __future__ import annotations

from bnexp.errors import UserError

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from bnexp.runs import CHECKPOINTS

_NAME = re.compile(r"^step-(\d+)\.pt$")
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
    _fsync_dir(folder)
    for old in list_checkpoints(run_dir)[:-KEEP]:
        old.unlink(missing_ok=True)
    return final


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files from an interrupted write are not listed)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_latest(run_dir: Path) -> dict[str, Any]:
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"no checkpoint to resume from in {Path(run_dir) / CHECKPOINTS}")
    return load(ckpts[-1])


def load(path: Path) -> dict[str, Any]:
    try:
        # Our own files hold RNG states and optimizer dicts: plain tensors and containers only.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"corrupted or truncated checkpoint {path}: {first}") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"corrupted checkpoint {path}: not a bnexp checkpoint")
    return state
