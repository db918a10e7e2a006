"""Run directories: created once and never reused, with atomic writes for everything read back later."""

from __future__ import annotations

from bnexp.errors import UserError

import json
import math
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

import bnexp

CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"


class RunDirError(UserError):
    """A user-facing run-directory problem (exists, not a run, not resumable): one line, exit 2."""


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "bnexp": bnexp.__version__}


def create_run_dir(out_dir: str | Path, name: str, seed: int, explicit: str | Path | None = None) -> Path:
    """Make a fresh directory; mkdir is atomic, so two runs racing for one name cannot share it."""
    try:
        return _create_run_dir(out_dir, name, seed, explicit)
    except RunDirError:
        raise
    except (OSError, ValueError) as err:  # a parent that is a file, no permission, a NUL in the path
        where = explicit if explicit is not None else Path(out_dir) / name
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise RunDirError(f"cannot create a run directory at {where}: {reason}") from None


def refuse_existing(explicit: str | Path) -> None:
    """An explicit --out must not exist: checked early (before data loads) and again at mkdir."""
    path = Path(explicit)
    if path.exists() or path.is_symlink():
        what = "a run directory" if is_run_dir(path) else "a file" if not path.is_dir() else "a directory"
        hint = f"; to continue it use --resume {path}" if is_run_dir(path) else ""
        raise RunDirError(f"--out {path} already exists ({what}): bnexp never overwrites or merges runs{hint}")


def _create_run_dir(out_dir: str | Path, name: str, seed: int, explicit: str | Path | None) -> Path:
    if explicit is not None:
        path = Path(explicit)
        refuse_existing(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:  # created by someone else since the check
            refuse_existing(path)
            raise
        return path
    parent = Path(out_dir) / name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 10_000):
        # Two runs started in the same second (a sweep, parallel workers) get -2, -3, ...
        suffix = "" if attempt == 1 else f"-{attempt}"
        path = parent / f"{stamp}-s{seed}{suffix}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"could not create a fresh run directory under {parent}")


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an advisory lock on the run directory while training writes to it.

    A second `--resume` of a run that is still training (another terminal, a stale job) is refused rather
    than interleaving two writers. The kernel drops the lock when the process dies, even by SIGKILL.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): run unguarded
        yield
        return
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # a read-only or vanished directory
        raise RunDirError(f"cannot write to run directory {run_dir}: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(f"run {run_dir} is being trained by another process") from None
        yield
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    # A rename is durable only once the directory entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: a diverged value is recorded as null rather than an invalid file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_atomic(run_dir / SUMMARY, json.dumps(json_safe(summary), indent=2, sort_keys=True) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / SUMMARY).read_text())


def _parse_rows(text: str) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl; a torn last line (the process died mid-write) is dropped, not an error."""
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return rows


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return _parse_rows(path.read_text())


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file() and (Path(path) / SUMMARY).is_file()


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, flushed as written so a killed run keeps its rows."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / METRICS
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._f = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        # Rows written after the checkpoint are replayed by the resumed run: drop them so none is doubled.
        if not self.path.is_file():
            return
        keep = [row for row in _parse_rows(self.path.read_text()) if row["step"] <= step]
        write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in keep))

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(json_safe(row)) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories at or below each path, in a stable order."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if is_run_dir(p):
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(q.parent for q in p.rglob(SUMMARY) if is_run_dir(q.parent)))
    return found
