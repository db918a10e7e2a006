"""Run directories: created once and never reused, with atomic writes for everything read back later."""

from __future__ import annotations

from bnexp.errors import UserError

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable

import torch

import bnexp

CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


class RunDirError(UserError):
    """A user-facing run-directory problem (exists, not a run, not resumable): one line, exit 2."""


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "bnexp": bnexp.__version__}


def create_run_dir(out_dir: str | Path, name: str, seed: int, explicit: str | Path | None = None) -> Path:
    """Make a fresh directory; mkdir is atomic, so two runs racing for one name cannot share it."""
    if explicit is not None:
        path = Path(explicit)
        if path.exists():
            raise RunDirError(f"output directory already exists: {path} (bnexp never overwrites a run)")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            raise RunDirError(f"output directory already exists: {path} (bnexp never overwrites a run)") from None
        return path
    parent = Path(out_dir) / name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 10_000):
        suffix = "" if attempt == 1 else f"-{attempt}"
        path = parent / f"{stamp}-s{seed}{suffix}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"could not create a fresh run directory under {parent}")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        write_atomic(self.path, "".join(line + "\n" for line in keep))

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
