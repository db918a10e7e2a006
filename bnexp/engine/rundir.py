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
ERROR_FILE = "error.txt"  # a run that raised outside the training loop: its traceback
# The statuses of a run that ended on its own: nothing left to resume, and its numbers count in a report.
FINISHED = ("completed", "diverged")


class RunDirError(UserError):
    """A user-facing run-directory problem (exists, not a run, not resumable): one line, exit 2."""


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "bnexp": bnexp.__version__}


def create_run_dir(out_dir: str | Path, name: str, seed: int | None, explicit: str | Path | None = None, *,
                   template: str = "{stamp}-s{seed}", what: str = "run") -> Path:
    """Make a fresh directory; mkdir is atomic, so two runs racing for one name cannot share it.

    `template` names a directory under out_dir/name from the timestamp (and seed); `what` names it in errors
    (a comparison uses this too, with "{stamp}").
    """
    try:
        return _create_run_dir(out_dir, name, seed, explicit, template, what)
    except RunDirError:
        raise
    except (OSError, ValueError) as err:  # a parent that is a file, no permission, a NUL in the path
        where = explicit if explicit is not None else Path(out_dir) / name
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise RunDirError(f"cannot create a {what} directory at {where}: {reason}") from None


def refuse_existing(explicit: str | Path) -> None:
    """An explicit --out must not exist: checked early (before data loads) and again at mkdir."""
    path = Path(explicit)
    if path.exists() or path.is_symlink():
        what = "a run directory" if is_run_dir(path) else "a file" if not path.is_dir() else "a directory"
        hint = f"; to continue it use --resume {path}" if is_run_dir(path) else ""
        raise RunDirError(f"--out {path} already exists ({what}): bnexp never overwrites or merges runs{hint}")


def _create_run_dir(out_dir: str | Path, name: str, seed: int | None, explicit: str | Path | None,
                    template: str, what: str) -> Path:
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
        path = parent / (template.format(stamp=stamp, seed=seed) + suffix)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"could not create a fresh {what} directory under {parent}")


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
    """summary.json as a dict; a torn or hand-edited file is a RunDirError naming it, never a JSON traceback."""
    path = Path(run_dir) / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"not a bnexp run directory (no {SUMMARY}): {run_dir}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        detail = err.strerror if isinstance(err, OSError) and err.strerror else "not valid JSON"
        raise RunDirError(f"corrupted {path}: {detail}") from None
    if not isinstance(summary, dict):
        raise RunDirError(f"corrupted {path}: not a JSON object")
    status = summary.get("status")
    if status is not None and not isinstance(status, str):
        raise RunDirError(f"corrupted {path}: status is not a string")
    return summary


def read_status(run_dir: Path) -> str | None:
    """The run's status (e.g. one of FINISHED, interrupted, running); RunDirError if summary.json is damaged."""
    return read_summary(run_dir).get("status")


def parse_rows(text: str) -> list[dict[str, Any]]:
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
    try:
        rows = parse_rows(path.read_text())
    except OSError as err:
        raise RunDirError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, ValueError):
        raise RunDirError(f"corrupted {path}: a line before the last is not valid JSON") from None
    if not all(isinstance(row, dict) and isinstance(row.get("step"), int) for row in rows):
        raise RunDirError(f"corrupted {path}: every row must be a JSON object with an integer step")
    return rows


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file() and (Path(path) / SUMMARY).is_file()


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
