"""Progress on stderr while runs train (stdout is kept for the run or comparison directory).

In a terminal, rich's live bars. In a pipe or a file a live display shows nothing until it stops, so there a
plain line is printed every BNEXP_PROGRESS_SECONDS seconds (default 5; 0 prints at every update, which is
what tests use). A line fits in WIDTH columns.
"""

from __future__ import annotations

import math
import os
import time
from typing import Sequence

from rich.console import Console

from bnexp.errors import UserError, excerpt

ENV = "BNEXP_PROGRESS_SECONDS"
DEFAULT_SECONDS = 5.0
WIDTH = 100


def seconds() -> float:
    """The interval between plain progress lines; a value that is not a number >= 0 is a user error (the
    CLI asks before it creates anything)."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return DEFAULT_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{ENV}={excerpt(text)}: expected a number of seconds >= 0 (the interval between "
                        f"progress lines in a pipe or file)")
    return value


def stderr_console(width: int | None = None) -> Console:
    return Console(stderr=True, highlight=False, width=width)


def clock(seconds_: float) -> str:
    """1:02:03, as rich's time columns show a duration."""
    s = max(0, int(round(seconds_)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _Every:
    """due() is true once `seconds` have passed since the last time it was (or since it was made)."""

    def __init__(self, seconds_: float):
        self.seconds, self.last = seconds_, time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


def fit(head: str, items: Sequence[str], width: int = WIDTH, sep: str = ", ") -> str:
    """head + as many of `items` as fit in `width` columns, then ", and N more" for the rest."""
    shown: list[str] = []
    for k, item in enumerate(items):
        left = len(items) - k - 1
        line = head + sep.join([*shown, item]) + (f"{sep}and {left} more" if left else "")
        if len(line) > width and shown:
            break
        shown.append(item)
    left = len(items) - len(shown)
    return head + sep.join(shown) + (f"{sep}and {left} more" if left else "")


def wrapped(head: str, items: Sequence[str], width: int = WIDTH, indent: str = "    ", sep: str = ", ") -> list[str]:
    """head + every one of `items`, over as many lines of `width` columns as they take (an item is never
    split; the lines after the first start with `indent`)."""
    lines, line = [], head
    for k, item in enumerate(items):
        piece = item + (sep.rstrip() if k < len(items) - 1 else "")
        if line not in (head, indent) and len(line) + 1 + len(piece) > width:
            lines.append(line.rstrip())
            line = indent
        line += ("" if line in (head, indent) else " ") + piece
    return [*lines, line.rstrip()]


class RunProgress:
    """One run's steps (`bnexp train`): a bar with the step, the info (loss, accuracy) and the time left in a
    terminal; in a pipe, "step 300/1000 (30%)  loss 0.41  test acc 0.912  41.2 steps/s  ETA 0:00:17", and
    the last state once more when the run stops (as the bar's last state stays on a terminal)."""

    def __init__(self, total: int, start: int, quiet: bool):
        self.bar = self.lines = None
        self.shown = not quiet  # a quiet run's loop need not format what update() would drop
        if quiet:
            return
        console = stderr_console()
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                console=console, transient=False, redirect_stdout=False)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()
        else:
            self.console, self.total, self.start = console, total, start
            self.lines, self.t0 = _Every(seconds()), time.monotonic()
            self.last: tuple[int, str] | None = None  # the state not printed yet

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif self.lines is not None:
            self.last = (step, info)
            if self.lines.due():
                self._line()

    def _line(self) -> None:
        step, info = self.last
        self.last = None
        parts = [f"step {step}/{self.total} ({100 * step // self.total}%)"] + ([info] if info else [])
        elapsed = time.monotonic() - self.t0
        if step > self.start and elapsed > 0:
            rate = (step - self.start) / elapsed
            parts += [f"{rate:.1f} steps/s", f"ETA {clock((self.total - step) / rate)}"]
        self.console.print("  ".join(parts), soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.lines is not None and self.last is not None:
            self._line()


class RunsProgress:
    """Several runs (`bnexp compare`): in a terminal, a bar for the runs done and one for each run in progress;
    in a pipe, "2/6 runs done, ETA 0:01:10; running: no_bn/s0 step 1090/3000, no_bn/s1 step 1080/3000".

    `update(done, total, running)` with running = [(name, step, steps), ...]. The ETA is the steps left
    (the runs not started counted as long as the average run seen) at the rate steps were trained since the
    first run was seen, all runs together; a resumed run counts from the step it resumed at.
    """

    def __init__(self, console: Console, quiet: bool):
        self.console, self.bar, self.lines = console, None, None
        self.t0: float | None = None  # when the first run was seen training
        self.seen: dict[str, list[int]] = {}  # name: [first step seen, last step seen, steps]
        self.quiet, self.tasks = quiet, {}
        if not quiet and not console.is_terminal:
            self.lines = _Every(seconds())

    def _start_bars(self) -> None:
        """In a terminal, on the first update: a command that ends before any run trains (a user error, a
        report on existing runs) draws nothing."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), MofNCompleteColumn(), BarColumn(),
                            TimeRemainingColumn(), console=self.console, transient=True, redirect_stdout=False)
        self.runs = self.bar.add_task("runs", total=None)
        self.bar.start()

    def update(self, done: int, total: int, running: Sequence[tuple[str, int, int]]) -> None:
        if self.bar is None and not self.quiet and self.console.is_terminal:
            self._start_bars()
        if self.bar is not None:
            self.bar.update(self.runs, completed=done, total=total)
            names = {name for name, _, _ in running}
            for name in [n for n in self.tasks if n not in names]:
                self.bar.remove_task(self.tasks.pop(name))
            for name, step, steps in running:
                if name not in self.tasks:
                    self.tasks[name] = self.bar.add_task(f"  {name}", total=steps)
                self.bar.update(self.tasks[name], completed=step, total=steps)
        elif self.lines is not None:
            self._count(running)
            if not self.lines.due():
                return
            head = f"{done}/{total} runs done"
            if (eta := self._eta(done, total, running)) is not None:
                head += f", ETA {clock(eta)}"
            if running:
                self.console.print(fit(head + "; running: ", [f"{name} step {step}/{steps}"
                                                              for name, step, steps in running]), soft_wrap=True)
            else:
                self.console.print(head, soft_wrap=True)

    def _count(self, running: Sequence[tuple[str, int, int]]) -> None:
        if running and self.t0 is None:
            self.t0 = time.monotonic()
        names = set()
        for name, step, steps in running:
            names.add(name)
            entry = self.seen.setdefault(name, [step, step, steps])
            entry[1:] = [step, steps]
        for name, entry in self.seen.items():
            if name not in names:  # it ended: trained to its end (or near it, if it failed)
                entry[1] = entry[2]

    def _eta(self, done: int, total: int, running: Sequence[tuple[str, int, int]]) -> float | None:
        trained = sum(last - first for first, last, _ in self.seen.values())
        if self.t0 is None or trained <= 0:
            return None
        rate = trained / (time.monotonic() - self.t0)
        average = sum(steps for _, _, steps in self.seen.values()) / len(self.seen)
        left = sum(max(steps - step, 0) for _, step, steps in running)
        left += max(total - done - len(running), 0) * average
        return left / rate

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        self.quiet = True  # nothing more is drawn
