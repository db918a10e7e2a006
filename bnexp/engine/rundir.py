"""Run directories: created complete (or not at all) and never reused, locked while a process writes them,
with atomic writes for everything read back later."""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import secrets
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

import bnexp
# write_atomic is this module's too: report.py, logs.py, session.py and compare.py take it from here.
from bnexp.engine.files import OutputError, OutputFailed, sync_dir, write_all, write_atomic  # noqa: F401
from bnexp.errors import UserError, shown_path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

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
                   template: str = "{stamp}-s{seed}", what: str = "run", files: dict[str, str] | None = None) -> Path:
    """Make a fresh directory holding `files` ({name: text}); it appears complete or not at all (see
    new_run_dir, which also holds its lock while a block runs)."""
    with new_run_dir(out_dir, name, seed, explicit, template=template, what=what, files=files) as path:
        return path


@contextmanager
def new_run_dir(out_dir: str | Path, name: str, seed: int | None, explicit: str | Path | None = None, *,
                template: str = "{stamp}-s{seed}", what: str = "run",
                files: dict[str, str] | None = None) -> Iterator[Path]:
    """Create a fresh directory (out_dir/name/<template>, or exactly `explicit`) that holds `files` and its
    lock from the moment it exists, and hold the lock while the block runs.

    The directory is made under a hidden temporary name beside its final one, filled, and renamed into
    place: a process killed at any moment leaves either no directory or a complete one (for a run:
    config.yaml and a `running` summary.json, which --resume continues), never an empty one that neither
    --resume nor --out would take. Two processes racing for one name cannot share it: a rename onto a
    directory that holds anything fails, and the loser tries the next name.

    A block that raises before the directory holds more than what was created here (training wrote
    nothing: a failure at start-up) removes it, and the parent folders made for it.
    """
    files = files or {}
    where = Path(explicit) if explicit is not None else Path(out_dir) / name
    made: list[Path] = []
    try:
        parent = where.parent if explicit is not None else where
        made = _missing_folders(parent)
        parent.mkdir(parents=True, exist_ok=True)
        path, fd = _create_complete(where if explicit is not None else None, parent, files, template, seed, what)
    except BaseException as err:
        _remove_empty(made)
        if isinstance(err, (OSError, ValueError)):  # a parent that is a file, no permission, a NUL in the path
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise RunDirError(f"cannot create a {what} directory at {shown_path(where)}: {reason}") from None
        raise
    key = _dir_key(path)
    _held[key] = fd
    try:
        yield path
    except BaseException as err:
        # Kept after an OS error on the folder (a full disk, say): complete, it resumes once that is fixed.
        if _unstarted(path, files) and not isinstance(err, (OutputError, OutputFailed)):
            _remove(path, [*files, LOCK], made)
        raise
    finally:
        _held.pop(key, None)
        os.close(fd)


def _missing_folders(folder: Path) -> list[Path]:
    """The folders of `folder` (itself and its ancestors) that do not exist yet, deepest first."""
    missing = []
    for p in (folder, *folder.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    return missing


def _create_complete(explicit: Path | None, parent: Path, files: dict[str, str], template: str,
                     seed: int | None, what: str) -> tuple[Path, int]:
    """Fill a hidden staging directory in `parent` (its lock held) and rename it to its final name."""
    staging = parent / f".bnexp-new-{secrets.token_hex(6)}"
    os.mkdir(staging)
    fd = -1
    try:
        fd = _lock_fd(staging)
        for name, text in files.items():
            _write_new(staging / name, text)
        sync_dir(staging)
        if explicit is not None:
            try:
                os.rename(staging, explicit)
            except OSError as err:
                if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    refuse_existing(explicit)  # created by someone else since the first check
                raise
            sync_dir(parent)
            return explicit, fd
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(1, 10_000):
            # Two runs started in the same second (a sweep, parallel workers) get -2, -3, ...
            suffix = "" if attempt == 1 else f"-{attempt}"
            path = parent / (template.format(stamp=stamp, seed=seed) + suffix)
            try:
                os.rename(staging, path)
            except OSError as err:
                if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    continue
                raise
            sync_dir(parent)
            return path, fd
        raise RunDirError(f"could not create a fresh {what} directory under {shown_path(parent)}")
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _remove(staging, [*files, LOCK], [])
        raise


def _write_new(path: Path, text: str) -> None:
    # Into the fresh staging directory, which nobody else has seen: no temporary and rename needed.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _unstarted(path: Path, files: dict[str, str]) -> bool:
    """Does the directory still hold only what new_run_dir put there (nothing trained into it)?"""
    try:
        return set(os.listdir(path)) <= {*files, LOCK}
    except OSError:
        return False


def _remove(path: Path, names: list[str], made: list[Path]) -> None:
    """Best effort: remove `names` in `path`, then `path` and the empty folders in `made`."""
    for name in names:
        with suppress(OSError):
            os.unlink(path / name)
    _remove_empty([path, *made])


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty; one never made is passed over."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):  # holds something else: keep it and what is above
                break


def refuse_existing(explicit: str | Path) -> None:
    """An explicit --out must not exist: checked early (before data loads) and again when it is created."""
    path = Path(explicit)
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    except (OSError, ValueError) as err:  # a name too long, a NUL byte
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise RunDirError(f"--out {shown_path(path)}: {reason}") from None
    what = "a run directory" if is_run_dir(path) else "a file" if not path.is_dir() else "a directory"
    hint = f"; to continue it use --resume {shown_path(path)}" if is_run_dir(path) else ""
    raise RunDirError(f"--out {shown_path(path)} already exists ({what}): bnexp never overwrites or merges "
                      f"runs{hint}")


class RunBusy(RunDirError):
    """Another process holds the directory's lock (it is training the run, or running the comparison)."""


# Locks held by new_run_dir's blocks, by directory (device, inode): locked() inside one takes it as held.
_held: dict[tuple[int, int], int] = {}


def _dir_key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _lock_fd(folder: Path) -> int:
    """The directory's lock file opened (not through a link) and locked; RunBusy if another process has it."""
    import fcntl

    fd = os.open(Path(folder) / LOCK, os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunBusy("busy") from None
    return fd


@contextmanager
def locked(run_dir: Path, what: str = "run") -> Iterator[None]:
    """Hold an advisory lock on the run (or comparison) directory while this process writes to it.

    A second `--resume` of a run that is still training (another terminal, a stale job) is refused rather
    than interleaving two writers. The kernel drops the lock when the process dies, even by SIGKILL. The
    block of new_run_dir that created the directory holds its lock already, and enters freely.
    """
    try:
        key = _dir_key(run_dir)
    except (OSError, ValueError) as err:
        raise RunDirError(f"cannot open {what} directory {shown_path(run_dir)}: "
                          f"{getattr(err, 'strerror', None) or err}") from None
    if key in _held:
        yield
        return
    try:
        fd = _lock_fd(run_dir)
    except RunBusy:
        doing = "trained" if what == "run" else "run or resumed"
        raise RunBusy(f"{what} {shown_path(run_dir)} is being {doing} by another process") from None
    except OSError as err:  # a read-only or vanished directory, a link planted as the lock file
        raise RunDirError(f"cannot write to {what} directory {shown_path(run_dir)}: "
                          f"{err.strerror or err}") from None
    try:
        yield
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


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(json_safe(summary), indent=2, sort_keys=True) + "\n"


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_atomic(run_dir / SUMMARY, summary_json(summary))


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


def parse_rows(data: bytes | str, path: str | Path = METRICS) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl. A torn last line (the process died mid-write) is dropped; any other line that
    is not a JSON object with an integer step (garbage, bytes that are not UTF-8, a row without its step)
    is a RunDirError naming the file and the line."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    lines = [(n, line) for n, line in enumerate(raw.split(b"\n"), start=1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            if i == len(lines) - 1:
                break
            what = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else "not valid JSON"
            raise RunDirError(f"corrupted {shown_path(path)}: line {n} is {what}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
            raise RunDirError(f"corrupted {shown_path(path)}: line {n} is not a JSON object with an integer step")
        rows.append(row)
    return rows


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows (none when there is no file); a damaged file is a RunDirError naming it."""
    path = Path(run_dir) / METRICS
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise RunDirError(f"cannot read {shown_path(path)}: {err.strerror or err}") from None
    return parse_rows(data, path)


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
            # Hidden folders are not runs: a directory being created (new_run_dir) is filled under one.
            found.extend(sorted(q.parent for q in p.rglob(SUMMARY) if is_run_dir(q.parent)
                                and not any(part.startswith(".") for part in q.parent.relative_to(p).parts)))
    return found
