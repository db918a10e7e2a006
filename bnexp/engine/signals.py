"""SIGINT/SIGTERM for a training command, in two phases.

Before a run directory exists (reading the config, importing torch, loading data) a signal raises
`Interrupted` at once: nothing is on disk yet, so there is nothing to save and nothing half-made. Inside
an import, though, an exception thrown from a signal handler does not come out as itself: it left modules
half-imported (a RecursionError in numpy's lazy attributes, "ImportError: cannot load module more than once
per process"; the issue saw "initialization failed" and an abort in torch's), or a library's
`except Exception` swallowed it and the run trained on. A signal that lands in an import before the run
directory exists therefore ends the process on the spot, with the guard's one-line note and the exit
status a shell reports for the signal. From
`defer()` on (just before the run directory is created, or a resumed run starts writing) a signal is only
recorded; the training loop polls it between steps, writes a checkpoint, marks the run `interrupted` and
raises `Interrupted`, so a step, a checkpoint or a log row is never cut in half.

This module imports nothing heavy, so the CLI can install the handlers before it imports torch.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived. `run_dir` is set when the run's checkpoint was written and it can be resumed.

    A BaseException, as KeyboardInterrupt is: raised during start-up from a handler, it may land in a
    library's `except Exception`, which must not swallow it."""

    def __init__(self, signum: int, run_dir: Path | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir = run_dir
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them


class Guard:
    def __init__(self, note: str | None = None) -> None:
        self.received: list[int] = []
        self.deferred = False
        # Printed ("{signal}" filled in) when a signal must end start-up inside an import.
        self.note = note

    def defer(self) -> None:
        self.deferred = True

    def _handle(self, signum: int, frame) -> None:
        if not self.deferred:
            if _importing(frame):
                _exit_now(signum, self.note)
            raise Interrupted(signum)
        self.received.append(signum)


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _exit_now(signum: int, note: str | None) -> None:
    if note:
        os.write(2, (note.format(signal=signal.Signals(signum).name) + "\n").encode())
    os._exit(128 + signum)


_active: Guard | None = None


@contextmanager
def catch_signals(note: str | None = None) -> Iterator[Guard]:
    """Install the handlers for the duration; nested uses share the outermost guard. `note`: the line a
    signal inside an import prints before it ends the process (see the module's docstring).

    Outside the main thread Python cannot install handlers: the guard then never receives anything and
    the thread's owner is responsible for stopping it.
    """
    global _active
    if _active is not None:
        yield _active
        return
    guard = Guard(note)
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


@contextmanager
def held() -> Iterator[None]:
    """SIGINT and SIGTERM held back (blocked) in this thread for the block, and delivered when it ends.
    Processes started inside are born with them blocked, a mask surviving fork and exec: a child can then
    ignore them before a signal could kill it half-started (multiprocessing starts its resource tracker
    this way)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
