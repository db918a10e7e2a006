"""Where a run's logged rows go: metrics.jsonl and TensorBoard, written together, in step order.

A row is {key: value} at a step; TensorBoard gets it under the tags bnexp.engine.dashboard names. Rows of
log steps wait for their train/loss and train/accuracy until their steps are read back from the device
(bnexp.engine.step_metrics); rows reach the files in batches, up to the first row still waiting, and always
before a checkpoint, so that a run resumed from one rewrites only the steps after it: TensorBoard purges
them and metrics.jsonl drops their rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

from bnexp.config import Config
from bnexp.engine import dashboard, files
from bnexp.engine.events import EventWriter
from bnexp.engine.rundir import METRICS, json_safe, read_metrics, write_atomic

TRAIN_METRICS = ("train/loss", "train/accuracy")


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, written as it comes (one write per batch of rows,
    unbuffered) so a killed run keeps its rows."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / METRICS
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._f = files.open_append(self.path)

    def _truncate_after(self, step: int) -> None:
        # Rows written after the checkpoint are replayed by the resumed run: drop them so none is doubled.
        # (session.resume has read the file through read_metrics already: a damaged one never gets here.)
        keep = [row for row in read_metrics(self.path.parent) if row["step"] <= step]
        if keep or self.path.exists():
            write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in keep))

    def write_many(self, rows: list[dict[str, Any]]) -> None:
        files.write(self._f, "".join(json.dumps(json_safe(row)) + "\n" for row in rows).encode(), self.path)

    def close(self) -> None:
        self._f.close()


def _waiting(row: dict[str, Any]) -> bool:
    return row.get("train/loss", 0.0) is None


class RunLogs:
    """The two sinks of a run and the rows not written to them yet. Files are opened by `open()` (not by
    the constructor: a Trainer is built before its run directory holds anything)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.events: EventWriter | None = None
        self.metrics: MetricsLog | None = None
        self.rows: list[tuple[int, dict[str, Any]]] = []

    def open(self, resume_step: int | None) -> None:
        """`resume_step`: None for a fresh run, else the step of the checkpoint a resumed run starts from
        (0 when it had none): everything logged after it is rewritten."""
        purge = None
        if resume_step is not None:
            purge = resume_step + 1 if resume_step else 0
            _wait_for_a_later_event_file_name(self.run_dir)
        self.events = EventWriter(self.run_dir, purge_step=purge)
        self.metrics = MetricsLog(self.run_dir, None if resume_step is None else (resume_step or -1))

    def log(self, step: int, row: dict[str, Any]) -> None:
        """A row; one of a log step holds train/loss and train/accuracy as None until its steps are read."""
        self.rows.append((step, row))

    def waiting(self) -> Iterator[tuple[int, dict[str, Any]]]:
        return ((step, row) for step, row in self.rows if _waiting(row))

    def drop_from(self, step: int) -> None:
        """Forget the rows of `step` and later (a diverged run logs nothing from its diverged step on)."""
        self.rows = [(s, row) for s, row in self.rows if s < step]

    def write(self) -> None:
        """Write out the rows up to the first that still waits for its train metrics."""
        ready = next((k for k, (_, row) in enumerate(self.rows) if _waiting(row)), len(self.rows))
        if not ready:
            return
        rows, self.rows = self.rows[:ready], self.rows[ready:]
        for step, row in rows:
            self.events.add_scalars(dashboard.scalars(row), step)
        self.metrics.write_many([{"step": step, **row} for step, row in rows])

    def flush(self) -> None:
        self.events.flush()

    def close(self) -> None:
        """Closing twice, or logs never opened, is harmless."""
        for log in (self.events, self.metrics):
            if log is not None:
                log.close()

    def add_histogram(self, key: str, values, step: int) -> None:
        """A histogram, under the TensorBoard tag of `key` (the probes' writer)."""
        self.events.add_histogram(dashboard.tag(key), values, step)

    def start(self, cfg: Config, regression: bool, probe_layout: list | None) -> None:
        """What a run writes once, at step 0 (a resumed run keeps it): the custom-scalar charts that put
        lines that belong together on one chart, and the run as an hparams session (every config key)."""
        train = [("loss (train, test)", ["train/loss", "test/loss"])]
        if not regression:
            train.append(("accuracy (train, test)", ["train/accuracy", "test/accuracy"]))
        categories = [("loss and accuracy", {title: ["Multiline", keys] for title, keys in train}, False)]
        self.events.add_summary(dashboard.layout_summary(categories + list(probe_layout or [])))
        self.events.add_summary(dashboard.session_start(cfg), 0)

    def end(self, status: str, step: int) -> None:
        """How the run ended, for the hparams view (whose metrics are the last values of logged tags)."""
        self.events.add_summary(dashboard.session_end(status), step)


def _wait_for_a_later_event_file_name(run_dir: Path) -> None:
    """TensorBoard reads a run's event files in file-name order, and applies a resumed writer's purge to
    what it has read so far. Names are events.out.tfevents.<unix second>.<host>.<pid>..., so a resume in
    the same second as the previous writer could sort first (pids compare as strings), and the purged
    steps would then show twice. A strictly later second sorts last."""
    latest = 0
    for f in run_dir.glob("events.out.tfevents.*"):
        stamp = f.name.split(".")[3]
        if stamp.isdigit():
            latest = max(latest, int(stamp))
    wait = latest + 1 - time.time()
    if wait > 0:
        time.sleep(wait)
