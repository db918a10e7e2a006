"""SIGINT/SIGTERM for a training command, in two phases.

Before a run directory exists (reading the config, importing torch, loading data) a signal raises
`Interrupted` at once: nothing is on disk yet, so there is nothing to save and nothing half-made. From
`defer()` on (just before the run directory is created, or a resumed run starts writing) a signal is only
recorded; the training loop polls it between steps, writes a checkpoint, marks the run `interrupted` and
raises `Interrupted`, so a step, a checkpoint or a log row is never cut in half.

This module imports nothing heavy, so the CLI can install the handlers before it imports torch.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived. `run_dir` is set when the run's checkpoint was written and it can be resumed."""

    def __init__(self, signum: int, run_dir: Path | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir = run_dir
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them


class Guard:
    def __init__(self) -> None:
        self.received: list[int] = []
        self.deferred = False

    def defer(self) -> None:
        self.deferred = True

    def _handle(self, signum: int, _frame) -> None:
        if not self.deferred:
            raise Interrupted(signum)
        self.received.append(signum)


_active: Guard | None = None


@contextmanager
def catch_signals() -> Iterator[Guard]:
    """Install the handlers for the duration; nested uses share the outermost guard.

    Outside the main thread Python cannot install handlers: the guard then never receives anything and
    the thread's owner is responsible for stopping it.
    """
    global _active
    if _active is not None:
        yield _active
        return
    guard = Guard()
    if threading.current_thread() is not threading.main_thread():
        guard.defer()
        yield guard
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _active = guard
    try:
        for s in SIGNALS:
            signal.signal(s, guard._handle)
        yield guard
    finally:
        _active = None
        for s, handler in previous.items():
            # None means a handler installed from C; the default is the closest we can restore.
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def defer() -> None:
    """From now on record signals instead of raising (no-op without an active guard)."""
    if _active is not None:
        _active.defer()
