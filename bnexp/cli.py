"""The `bnexp` command line: parse, call one function per verb, turn user errors into exit status 2.

Commands that create a run or comparison directory print its path as the last line of stdout, so scripts
can do `run=$(bnexp train ... | tail -n 1)`.
"""

from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "bnexp":
    # Until a command installs bnexp's handlers (bnexp.engine.signals), Ctrl-C ends the program quietly, as
    # SIGTERM does, instead of with a KeyboardInterrupt traceback from whichever import it lands in.
    signal.signal(signal.SIGINT, signal.SIG_DFL)

from contextlib import contextmanager  # noqa: E402 - after the line above, on purpose
from pathlib import Path  # noqa: E402
from typing import List, Optional  # noqa: E402

import typer  # noqa: E402

try:  # recent typer vendors its own click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - typer releases that depend on click
    from click import exceptions as click_exc

import bnexp
from bnexp.errors import RunFailed, UserError


class _Flags:
    """typer's help shows a boolean flag as `--quiet <bool>`, as if it took a value (and `--help <bool>`):
    a flag gets no value column."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_Flags, typer.core.TyperCommand):
    pass


class _Group(_Flags, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Experiments on batch normalization (Ioffe & Szegedy 2015): train, compare, check, bench.",
)

ConfigOpt = typer.Option(..., "--config", "-c", help="YAML experiment config.", show_default=False)
SetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE",
                      help="Override a config key, e.g. --set model.norm=none (repeatable; value parsed as YAML).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar.")
# compare's keys are those of a comparison config (its base run config sits under base.), and its quiet
# mode hides more than a progress bar.
CompareSetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE",
                             help="Override a comparison config key, e.g. --set base.train.steps=200 or "
                                  "--set seeds=[0,1] (repeatable; value parsed as YAML). On run directories: "
                                  "only name, target_accuracy, baseline and out_dir.")
CompareQuietOpt = typer.Option(False, "--quiet", "-q",
                               help="Print only the comparison directory: no per-run lines, no table.")


def _check_paths(out: Optional[Path], resume: Optional[Path], what: str) -> None:
    """Say plainly what is wrong with a path whose OS error would only read "File exists" or "not found",
    or would come out of a deeper call as a traceback (a name too long, a NUL byte)."""
    from bnexp.errors import shown_path

    for flag, path in (("--out", out), ("--resume", resume)):
        try:
            if path is not None:
                os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except (OSError, ValueError) as err:
            raise UserError(f"{flag} {shown_path(path)}: {getattr(err, 'strerror', None) or err}") from None
    if resume is not None and resume.exists() and not resume.is_dir():
        raise UserError(f"--resume {shown_path(resume)}: is a file, not a {what} directory")
    if out is not None:
        for parent in out.parents:
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    raise UserError(f"cannot create a {what} directory at {shown_path(out)}: its parent "
                                    f"{shown_path(parent)} is a file, not a directory")
                break


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnexp {bnexp.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


@app.command(cls=_Command)
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML experiment config.",
                                          show_default=False),
    set_: Optional[List[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to create (must not exist). "
                                       "Default: <out_dir>/<name>/<timestamp>-s<seed>/."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run in RUN_DIR.",
                                          metavar="RUN_DIR"),
    quiet: bool = QuietOpt,
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Data-parallel processes on this machine "
                                        "(sets dist.nproc; the global batch data.batch_size is split among them)."),
) -> None:
    """Train one network from a config; write a run directory and print its path."""
    from bnexp.engine.signals import catch_signals

    if resume is not None and (config is not None or set_ or out is not None or nproc is not None):
        raise UserError("--resume takes the run's own config.yaml: do not combine it with "
                        "--config/--set/--out/--nproc")
    if nproc is not None:
        set_ = [*(set_ or []), f"dist.nproc={nproc}"]
    if resume is None and config is None:
        raise UserError("missing option --config (or --resume RUN_DIR)")
    _check_paths(out, resume, "run")
    _check_progress_interval(quiet)
    # Installed before torch is imported: a signal during start-up ends the command cleanly (see
    # bnexp.engine.signals), one during training checkpoints and marks the run interrupted.
    with catch_signals(note=_startup_note(resume)), _interruptible(resume):
        from bnexp import config as cfgmod
        from bnexp.engine import session

        if resume is not None:
            notify = lambda line: typer.echo(line, err=True)  # noqa: E731
            summary, run_dir = session.resume(resume, quiet=quiet, notify=notify), resume
        else:
            cfg = cfgmod.load(config, set_ or [])
            if out is not None:
                # Before any data is loaded: a refused run must not even write the mnist1d cache.
                from bnexp.engine.rundir import refuse_existing

                refuse_existing(out)
            run_dir, summary = session.start(cfg, out, quiet=quiet)
    _report(summary, run_dir)


def _startup_note(resume: Optional[Path], what: str = "run") -> str:
    """What a signal before anything is written means ("{signal}" is filled in)."""
    if resume is not None:
        return f"interrupted by {{signal}} before {resume} resumed; nothing in it changed"
    return f"interrupted by {{signal}} during start-up; no {what} directory was created"


@contextmanager
def _interruptible(resume: Optional[Path]):
    from bnexp.engine.signals import Interrupted

    try:
        yield
    except Interrupted as sig:
        if sig.run_dir is not None:
            typer.echo(f"interrupted by {sig}: checkpoint written; continue with "
                       f"bnexp train --resume {sig.run_dir}", err=True)
            typer.echo(str(sig.run_dir))
        else:
            typer.echo(_startup_note(resume).format(signal=sig), err=True)
        raise typer.Exit(sig.exit_code)


def _report(summary: dict, run_dir: Path) -> None:
    from bnexp.dist import env_rank

    if env_rank() != 0:  # under torchrun every rank returns here; the run and its summary are rank 0's
        return
    acc, loss = summary.get("test_accuracy"), summary.get("test_loss")
    line = f"{summary['status']} after {summary['steps']} steps"
    if acc is not None:
        line += f", test accuracy {acc:.4f}"
    elif loss is not None:  # a regression task has no accuracy
        line += f", test loss {loss:.4g}"
    typer.echo(line, err=True)
    typer.echo(str(run_dir))


@app.command(cls=_Command)
def validate(config: Path = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Print the resolved config (file + overrides + defaults), exactly what `train` would run."""
    from bnexp import config as cfgmod

    typer.echo(cfgmod.to_yaml(cfgmod.load(config, set_ or [])), nl=False)


@app.command(cls=_Command)
def compare(
    run_dirs: Optional[List[Path]] = typer.Argument(None, help="Existing run directories to report on "
                                                    "(instead of --config)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Comparison config (YAML).",
                                          show_default=False),
    set_: Optional[List[str]] = CompareSetOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Comparison directory to create."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Runs trained in parallel worker processes."),
    resume: Optional[Path] = typer.Option(None, "--resume", metavar="COMPARISON_DIR",
                                          help="Finish the runs of a comparison that did not complete."),
    quiet: bool = CompareQuietOpt,
    yes: bool = typer.Option(False, "--yes", "-y", help="Start a comparison of more runs than its max_runs."),
) -> None:
    """Run arms x seeds (x a grid) and write a report (table, CSV, plots); or report on existing runs."""
    from bnexp.engine.progress import RunsProgress, stderr_console
    from bnexp.engine.signals import Interrupted, catch_signals

    _check_paths(out, resume, "comparison")
    _check_progress_interval(quiet)
    note = _startup_note(resume, "comparison")
    console = stderr_console()
    display = RunsProgress(console, quiet)
    try:
        # As for train: a signal before the comparison directory exists ends the command cleanly; after,
        # the runs in progress checkpoint and the comparison can be finished with --resume.
        with catch_signals(note=note):
            from bnexp.experiments import compare as comparemod, report

            outcome = comparemod.main(config=config, overrides=set_ or [], out=out, jobs=jobs, resume=resume,
                                      run_dirs=run_dirs or [], yes=yes,
                                      log=None if quiet else lambda line: console.print(line, soft_wrap=True),
                                      progress=lambda st: display.update(st.done, st.total, st.running))
    except Interrupted as sig:
        display.close()
        _say_what_stopped(sig, note, console)
        raise typer.Exit(sig.exit_code)
    finally:
        display.close()
    if not quiet:
        if not console.is_terminal:  # a log file or pipe: the table's own 100 columns
            console = stderr_console(width=100)
        console.print(report.table(outcome.rows, outcome.title))
        for note in outcome.notes:
            if "wall time" in note:
                console.print(note, soft_wrap=True)
    typer.echo(str(outcome.path))


# How an interrupted comparison's runs are listed, in this order (other statuses follow under their own name).
_STOPPED_AS = {"interrupted": "stopped at a checkpoint, resumable",
               "running": "left running by a process that was killed, resumable",
               "completed": "completed", "diverged": "diverged", "failed": "failed (--resume tries again)",
               "damaged": "with a damaged summary.json", "not started": "not started"}


def _say_what_stopped(sig, note: str, console) -> None:
    """What a signal left of a comparison: where each run stands and how to finish; or, when it came before
    any run started (the comparison directory is then removed), the start-up note."""
    from bnexp.engine.progress import WIDTH, fit, wrapped

    comp_dir = sig.run_dir
    if comp_dir is None or not comp_dir.is_dir():
        typer.echo(note.format(signal=sig), err=True)
        return
    if getattr(sig, "report_written", False):  # every run had ended: nothing for --resume to finish
        typer.echo(f"interrupted by {sig} after the runs ended; the report was written in full first", err=True)
        typer.echo(str(comp_dir))
        return
    runs = getattr(sig, "runs", [])
    width = min(WIDTH, console.width) if console.is_terminal else WIDTH
    if runs:
        typer.echo(f"interrupted by {sig}; of the comparison's {len(runs)} runs:", err=True)
        groups: dict[str, list[str]] = {}
        for name, status, steps in runs:
            shown = f"{name} at step {steps}" if status == "interrupted" and steps is not None else name
            groups.setdefault(status, []).append(shown)
        for status in sorted(groups, key=lambda s: list(_STOPPED_AS).index(s) if s in _STOPPED_AS else 99):
            head = f"  {_STOPPED_AS.get(status, status)} ({len(groups[status])}): "
            if status in ("interrupted", "running"):  # what --resume continues: every one named
                for line in wrapped(head, groups[status], width):
                    typer.echo(line, err=True)
            else:
                typer.echo(fit(head, groups[status], width), err=True)
    else:
        typer.echo(f"interrupted by {sig}: checkpoints written", err=True)
    typer.echo(f"finish with: bnexp compare --resume {comp_dir}", err=True)
    typer.echo(str(comp_dir))


def _check_progress_interval(quiet: bool) -> None:
    """A bad BNEXP_PROGRESS_SECONDS is a user error before anything is created."""
    if not quiet:
        from bnexp.engine.progress import seconds

        seconds()


@app.command(cls=_Command)
def check(seed: int = typer.Option(0, help="Seed of the random cases.")) -> None:
    """Compare bnexp's BN layer with torch.nn.BatchNorm*d on random cases; exit 1 if any case fails."""
    from rich.console import Console

    from bnexp.check import run_check

    ok, shown = run_check(seed=seed)
    console = Console()
    for item in shown:
        console.print(item)
    if not ok:
        raise typer.Exit(1)


@app.command(cls=_Command)
def bench(
    quick: bool = typer.Option(False, "--quick", help="Few repeats: a smoke test of the benchmark."),
    only: Optional[List[str]] = typer.Option(None, "--only", help="Sections to run: layer, resnet, loop, "
                                             "memory, probes (repeatable; default all)."),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda: the layer section on the GPU, ours "
                               "against cuDNN's."),
) -> None:
    """Measure speed and memory as ratios against references run side by side in this process."""
    from rich.console import Console

    from bnexp import bench as benchmod

    console = Console()
    if not console.is_terminal and console.width < 160:
        console = Console(width=160)  # piped or captured: keep each table row on one line
    for item in benchmod.run(quick=quick, only=only or [], device=device):
        console.print(item)


def main(argv: list[str] | None = None) -> int:
    """Entry point: every user error is one line on stderr and exit status 2, never a traceback."""
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv if argv is not None else sys.argv[1:], prog_name="bnexp",
                          standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except RunFailed as err:
        typer.echo(f"error: {err}", err=True)
        return 1
    except typer.Exit as e:
        return e.exit_code
    except click_exc.NoArgsIsHelpError as e:
        # With rich installed, typer prints the help while building this error and leaves the message
        # empty; without rich the message is the help text. Print it once either way.
        if e.format_message().strip():
            typer.echo(e.format_message())
        return 0
    except click_exc.UsageError as err:
        msg = err.format_message().replace("\n", " ")
        hint = f" (see: {err.ctx.command_path if err.ctx else 'bnexp'} --help)"
        typer.echo(f"error: {msg}{hint}", err=True)
        return 2
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
