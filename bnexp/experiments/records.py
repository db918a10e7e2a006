"""A run as a report sees it: its status, summary and metrics, read from its directory alone.

What a report takes from a run is decided here, once, for the table, the CSV and the plots alike:

- its evaluations (test accuracy and loss at the evaluated steps of metrics.jsonl), those of a diverged run
  stopping before the step it diverged at (the engine evaluates nothing after it);
- its final and best value: a completed run's from summary.json (the network at the last step, which is
  always evaluated, so the best includes it); a diverged run's from its evaluations before divergence (the
  last one and the best of them). summary.json's `test_accuracy` of a diverged run is the network the
  engine stopped with, up to a read interval past the diverged step: a network that has diverged, which the
  report does not use (its `best_test_accuracy` never saw it, hence "best below final").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnexp.config import ModelConfig, read_yaml
from bnexp.data import REGRESSION
from bnexp.engine.rundir import CONFIG, ERROR_FILE, FINISHED, SUMMARY, read_metrics, read_summary


def number(value: Any) -> float:
    """A finite number from a summary or a metrics row, else nan (None, a bool, inf, a string)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return math.nan


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
    config: dict[str, Any] = field(default_factory=dict)  # the run's config.yaml, as written

    @property
    def diverged_step(self) -> int | None:
        if self.status != "diverged":
            return None
        step = self.summary.get("diverged_step", self.summary.get("steps"))
        return step if isinstance(step, int) and not isinstance(step, bool) else None

    def evaluations(self, tag: str) -> list[tuple[int, float]]:
        """(step, value) of `tag` (test/accuracy, test/loss) at every evaluated step, finite values only,
        those of a diverged run before the step it diverged at."""
        stop = self.diverged_step
        return [(int(row["step"]), v) for row in self.metrics
                if math.isfinite(v := number(row.get(tag))) and (stop is None or row["step"] < stop)]

    def final(self, metric: str = "accuracy") -> float:
        """The run's final test `metric` (accuracy or loss): see the module docstring; nan if unknown."""
        if self.status == "completed":
            return number(self.summary.get(f"test_{metric}"))
        if self.status == "diverged":
            evals = self.evaluations(f"test/{metric}")
            return evals[-1][1] if evals else math.nan
        return math.nan

    def best(self, metric: str = "accuracy") -> float:
        """The best test `metric` over the run's evaluations (highest accuracy, lowest loss): selected on
        the test set."""
        if self.status == "completed":
            return number(self.summary.get(f"best_test_{metric}"))
        if self.status == "diverged":
            values = [v for _, v in self.evaluations(f"test/{metric}")]
            return (max if metric == "accuracy" else min)(values) if values else math.nan
        return math.nan

    @property
    def model_kind(self) -> str:
        model = self.config.get("model")
        kind = model.get("kind") if isinstance(model, dict) else None
        return kind if isinstance(kind, str) else ModelConfig().kind


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
        rec.config = cfg
        train, data = cfg.get("train"), cfg.get("data")
        steps = train.get("steps") if isinstance(train, dict) else None
        rec.budget = steps if isinstance(steps, int) and not isinstance(steps, bool) else None
        rec.regression = isinstance(data, dict) and data.get("dataset") in REGRESSION
    return rec
