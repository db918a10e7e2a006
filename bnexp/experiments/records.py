"""A run as a report sees it: its status, summary and metrics, read from its directory alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnexp.config import read_yaml
from bnexp.data import REGRESSION
from bnexp.engine.rundir import CONFIG, ERROR_FILE, FINISHED, SUMMARY, read_metrics, read_summary


@dataclass
class RunRecord:
    arm: str
    seed: int | None
    run_dir: Path
    status: str  # completed | diverged | interrupted | running | failed | missing
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    budget: int | None = None  # train.steps of the run's config
    error: str | None = None
    regression: bool = False  # a regression task: a test loss, no accuracy


def load_record(arm: str, seed: int | None, run_dir: Path) -> RunRecord:
    """A run's record from its files; a damaged file is a UserError naming it (RunDirError, ConfigError)."""
    run_dir = Path(run_dir)
    rec = RunRecord(arm, seed, run_dir, "missing")
    if (run_dir / SUMMARY).is_file():
        rec.summary = read_summary(run_dir)
        rec.status = rec.summary.get("status") or "missing"
        rec.metrics = read_metrics(run_dir)
    # An error file beside a summary of a run that ended is stale: the run failed once (an attempt to
    # resume it while another process trained it, say) and completed later; a run writes its ended
    # summary last.
    if (run_dir / ERROR_FILE).is_file() and rec.status not in FINISHED:
        rec.status = "failed"
        lines = [ln for ln in (run_dir / ERROR_FILE).read_text(errors="replace").splitlines() if ln.strip()]
        rec.error = lines[-1] if lines else "failed"
    if (run_dir / CONFIG).is_file():
        cfg = read_yaml(run_dir / CONFIG)
        train, data = cfg.get("train"), cfg.get("data")
        steps = train.get("steps") if isinstance(train, dict) else None
        rec.budget = steps if isinstance(steps, int) and not isinstance(steps, bool) else None
        rec.regression = isinstance(data, dict) and data.get("dataset") in REGRESSION
    return rec
