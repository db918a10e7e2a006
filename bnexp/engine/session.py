"""Starting, training and resuming a run: the checks before anything is written, the run directory, the
lock, and one process or N ranks.

Everything that can fail on user input (the config, the data, the network against the data's shape) is
checked before a run directory exists. A run directory appears holding config.yaml and a `running`
summary.json (bnexp.engine.rundir.new_run_dir), and is written only while its lock is held (by the
launching process, or by rank 0 under torchrun), so two processes never train into it at once. An OS
error on it (a full disk, a read-only folder) is one line naming the path, and the run continues from its
last checkpoint once the cause is gone.

N ranks on this machine (`dist.nproc` > 1) are started by bnexp.dist.launch (torch's elastic_launch) with
`run_rank` as their body; under torchrun every process is already a rank. Rank 0 writes the run; the
others write into a scratch directory removed when they finish. A rank that fails ends the run with one
line naming it, and the run is left `interrupted` at its last checkpoint, which `--resume` continues.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from bnexp import dist
from bnexp.config import Config, ConfigError, apply_override, to_yaml, validate
from bnexp.data import Dataset, load_dataset
from bnexp.engine import checkpoint, files, signals
from bnexp.engine.files import refuse_links
from bnexp.engine.rundir import (CHECKPOINTS, CONFIG, ERROR_FILE, FINISHED, METRICS, SUMMARY, RunDirError,
                                 create_run_dir, is_run_dir, locked, new_run_dir, read_metrics, read_status,
                                 read_summary, refuse_existing, summary_json as _summary_json, versions,
                                 write_atomic, write_summary)
from bnexp.engine.signals import Interrupted
from bnexp.engine.trainer import Trainer, resolve_device
from bnexp.errors import RunFailed, UserError, first_line, shown_path
from bnexp.models import build_model
from bnexp.probes import summary_of


class WorkerFailed(RunFailed):
    """A rank of a distributed run raised or died: one line naming it, exit status 1."""


def distributed(cfg: Config) -> bool:
    """Does this config (or the launcher that started this process) ask for several processes?"""
    return cfg.dist.nproc > 1 or dist.under_launcher()


def prepare(cfg: Config) -> Dataset:
    """Everything that can fail on user input, done before any directory exists."""
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data)
    # Building the network and running two examples through it is the last check on user input (widths
    # against the data's shape and the machine's memory); the Trainer builds it again under the run's seed.
    try:
        model = build_model(cfg.model, data.input_shape, data.num_classes).to(device).eval()
        with torch.no_grad():
            model(data.x_train[:2].to(device))
    except (RuntimeError, MemoryError) as err:
        raise ConfigError(f"model: this network cannot run on {cfg.data.dataset} inputs of shape "
                          f"{tuple(data.input_shape)}: {first_line(err)}") from None
    return data


def resolve_budget(cfg: Config, data: Dataset) -> Config:
    """`train.epochs`, when set, as `train.steps`: epochs x the batches of one epoch (the sampler drops an
    epoch's incomplete last batch). config.yaml records both."""
    if cfg.train.epochs is None:
        return cfg
    steps = cfg.train.epochs * (len(data.y_train) // cfg.data.batch_size)
    if steps == cfg.train.steps:
        return cfg
    return validate(apply_override(cfg.model_dump(mode="json"), "train.steps", steps))


def start(cfg: Config, out: str | Path | None = None, *, quiet: bool = True,
          callbacks=()) -> tuple[Path, dict[str, Any]]:
    """Validate, create a fresh run directory (cfg.out_dir/... or exactly `out`), train; return both."""
    cfg = _for_launcher(cfg)
    if out is not None and dist.env_rank() == 0:
        refuse_existing(out)  # before the data loads: a mistake here should cost no time
    data = prepare(cfg)
    cfg = resolve_budget(cfg, data)
    if dist.under_launcher():
        return _start_in_group(cfg, out, quiet=quiet, data=data)
    # From here a signal no longer aborts at once: the loop checkpoints and marks the run interrupted. The
    # directory appears complete (config.yaml, a `running` summary.json) with its lock held, so a process
    # killed at any moment leaves no directory or one that --resume continues; a failure before training
    # wrote anything removes it again.
    signals.defer()
    with new_run_dir(cfg.out_dir, cfg.name, cfg.seed, out, files=_fresh_files(cfg)) as run_dir:
        return run_dir, train(cfg, run_dir, quiet=quiet, data=data, callbacks=callbacks)


def train(cfg: Config, run_dir: Path, *, quiet: bool = True, data: Dataset | None = None,
          callbacks=()) -> dict[str, Any]:
    """Train a fresh run in an existing run directory, empty or made by new_run_dir (one process, or N ranks)."""
    run_dir = Path(run_dir)
    data = prepare(cfg) if data is None else data
    cfg = resolve_budget(cfg, data)
    if distributed(cfg):
        if dist.under_launcher():
            return _train_in_group(cfg, run_dir, quiet=quiet, data=data)
        with locked(run_dir):
            _write_fresh(cfg, run_dir)
            return _launch(cfg, run_dir, quiet=quiet, resume=False)
    with signals.catch_signals() as guard:
        guard.defer()
        # Built before the first file is written (it writes none itself): a failure here leaves the
        # directory as it was, not holding a config.yaml for a run that never started.
        trainer = Trainer(cfg, run_dir, data, quiet=quiet, callbacks=callbacks)
        with locked(run_dir), _continuable(run_dir):
            _write_fresh(cfg, run_dir)
            return trainer.run()


def resume(run_dir: Path, *, quiet: bool = True, callbacks=(), notify=None) -> dict[str, Any]:
    """Continue an interrupted (or killed) run in its own directory, from its newest complete checkpoint.

    Nothing in the directory changes until every check has passed: a corrupted checkpoint, config or
    metrics.jsonl, or a symbolic link where the run writes, is a one-line user error and no file is
    deleted. `notify` gets one-line notices (a checkpoint resumed unverified).
    """
    from bnexp.config import load as load_config

    run_dir = Path(run_dir)
    try:
        found_dir = run_dir.is_dir()
    except (OSError, ValueError) as err:  # a name too long
        raise RunDirError(f"--resume {shown_path(run_dir)}: {getattr(err, 'strerror', None) or err}") from None
    if not found_dir:
        raise RunDirError(f"run directory not found: {shown_path(run_dir)}")
    if not is_run_dir(run_dir):
        raise RunDirError(f"not a bnexp run directory (no config.yaml and summary.json): {shown_path(run_dir)}")
    # Under torchrun every rank runs this; rank 0 alone holds the lock (and writes the directory).
    with locked(run_dir) if dist.env_rank() == 0 else contextlib.nullcontext():
        status = read_status(run_dir)
        if status in FINISHED:
            raise RunDirError(f"run {run_dir} already ended ({status}); nothing to resume")
        try:
            cfg = load_config(run_dir / CONFIG)
        except ConfigError as err:  # edited by hand, or written by a bnexp with other keys
            raise ConfigError(f"{run_dir / CONFIG}: {err}") from None
        refuse_links(run_dir, (CHECKPOINTS, METRICS, SUMMARY, ERROR_FILE))
        rows = read_metrics(run_dir)  # a damaged metrics.jsonl is reported here, before anything is written
        _refuse_checkpoints_not_a_folder(run_dir)
        newest, notice = checkpoint.check_newest(run_dir)  # so is a damaged checkpoint
        if newest is None:
            _refuse_lost_checkpoints(run_dir, cfg, rows)
        data = prepare(cfg)
        if notice and notify is not None and dist.env_rank() == 0:
            notify(notice)
        if distributed(cfg):
            if dist.env_rank() == 0:
                files.unlink(run_dir / ERROR_FILE)  # a previous failure's traceback
            if not dist.under_launcher():
                return _launch(cfg, run_dir, quiet=quiet, resume=True)
            if dist.env_world() != cfg.dist.nproc:
                raise UserError(f"{run_dir} was trained with dist.nproc: {cfg.dist.nproc} but the launcher "
                                f"started {dist.env_world()} processes")
            return run_rank(cfg.model_dump(mode="json"), str(run_dir), quiet, True, data=data)
        trainer = Trainer(cfg, run_dir, data, quiet=quiet, callbacks=callbacks)
        if newest is not None:
            trainer.load_checkpoint(newest)
        # else: killed before its first checkpoint; the run starts over in place.
        with _continuable(run_dir):
            files.unlink(run_dir / ERROR_FILE)  # a previous failure's traceback: this attempt replaces it
            return trainer.run(resume=True)


def _refuse_checkpoints_not_a_folder(run_dir: Path) -> None:
    """A file where the checkpoints folder goes: refused before resume writes anything (it would otherwise
    be taken for "no checkpoint yet" and the run restarted, truncating metrics.jsonl, until the first
    checkpoint failed)."""
    folder = run_dir / CHECKPOINTS
    with files.reporting(folder, "check"):
        present = os.path.lexists(folder)
    if present and not folder.is_dir():
        raise RunDirError(f"cannot resume {shown_path(run_dir)}: {shown_path(folder)} is not a folder "
                          f"(move it away to start over; nothing was changed)")


def _refuse_lost_checkpoints(run_dir: Path, cfg: Config, rows: list[dict[str, Any]]) -> None:
    """Starting over in place is right for a run killed before its first checkpoint, not for one whose
    checkpoints are gone: refuse when its summary records trained steps (an interrupted run's summary
    describes its last checkpoint) or metrics.jsonl has rows past the second checkpoint step (the loop
    waits for the first checkpoint's file before it hands over the second, so a run that logged beyond it
    had a checkpoint on disk)."""
    steps = read_summary(run_dir).get("steps")
    first = min(cfg.train.checkpoint_every, cfg.train.steps)
    last_row = max((row["step"] for row in rows), default=0)
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
        evidence = f"its summary.json records {steps} steps trained"
    elif last_row > 2 * first:
        evidence = f"its metrics.jsonl has rows up to step {last_row}"
    else:
        return
    raise RunDirError(f"cannot resume {shown_path(run_dir)}: no checkpoint in {shown_path(run_dir / CHECKPOINTS)} "
                      f"but {evidence}; restore the checkpoints to continue it (nothing was changed)")


@contextlib.contextmanager
def _continuable(run_dir: Path):
    """An OS error on the run's folder (a full disk, say) ends the run; it continues from its last
    checkpoint once the cause is gone: the one-line error says how."""
    try:
        yield
    except (files.OutputError, files.OutputFailed) as err:
        raise type(err)(f"{err}; once that is fixed, continue with: bnexp train --resume "
                        f"{shown_path(run_dir)}") from None


def _fresh_files(cfg: Config) -> dict[str, str]:
    """config.yaml and a `running` summary.json: what a run directory holds before it trains."""
    return {CONFIG: to_yaml(cfg), SUMMARY: _summary_json({"status": "running", "steps": 0, "seed": cfg.seed,
                                                            "name": cfg.name, "versions": versions()})}


def _write_fresh(cfg: Config, run_dir: Path) -> None:
    for name, text in _fresh_files(cfg).items():
        write_atomic(run_dir / name, text)


def mark_interrupted(run_dir: Path) -> None:
    """Leave summary.json as an `interrupted` run at its last checkpoint (step 0 without one): what
    `--resume` continues from after a rank failed. The summary describes that checkpoint (its step,
    evaluation, probes and wall time), not the steps trained after it, which the resumed run redoes."""
    found = checkpoint.list_checkpoints(run_dir)
    state = checkpoint.load(found[-1]) if found else {}
    best = state.get("best_test_accuracy", float("-inf"))
    summary = read_summary(run_dir)
    summary.update(status="interrupted", steps=state.get("step", 0),
                   test_accuracy=state.get("last_eval", {}).get("test_accuracy"),
                   test_loss=state.get("last_eval", {}).get("test_loss"),
                   best_test_accuracy=None if best == float("-inf") else best,
                   wall_time_s=state.get("elapsed", 0.0))
    summary.update(summary_of((state.get("probes") or {}).get("last", {})))
    write_summary(run_dir, summary)


# --- several processes ----------------------------------------------------------------------------------

def _launch(cfg: Config, run_dir: Path, *, quiet: bool, resume: bool) -> dict[str, Any]:
    """Start cfg.dist.nproc ranks on this machine for `run_dir` (whose lock this process holds) and wait."""
    try:
        results = dist.launch(run_rank, (cfg.model_dump(mode="json"), str(run_dir), quiet, resume), cfg.dist.nproc)
    except (dist.LauncherSignalled, dist.RanksInterrupted) as sig:
        raise Interrupted(sig.signum, run_dir) from None
    except dist.RankFailure as failure:
        if failure.traceback:
            with contextlib.suppress(UserError):  # best effort: the failure line is what matters
                write_atomic(run_dir / ERROR_FILE, f"rank {failure.rank}:\n{failure.traceback}")
        with contextlib.suppress(UserError, OSError):  # best effort: the failure line is what matters
            if read_status(run_dir) == "running":
                mark_interrupted(run_dir)
        raise WorkerFailed(f"rank {failure.rank} of the distributed run failed: {failure.message}; the other "
                           f"ranks were stopped (continue with: bnexp train --resume {run_dir})") from None
    return results[0]


def run_rank(cfg_json: dict, run_dir: str, quiet: bool, resume: bool, data: Dataset | None = None):
    """The body of one rank (started by bnexp.dist.launch, or by torchrun through the CLI): join the group,
    train or resume, return the summary (rank 0; None elsewhere). Interrupted is an exit status 128 + the
    signal, as a shell reports it."""
    from bnexp.engine.parallel import DataParallel

    cfg = validate(cfg_json)
    rank = dist.env_rank()
    if cfg.threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // dist.env_world()))
    own_dir = Path(run_dir) if rank == 0 else Path(tempfile.mkdtemp(prefix=f"bnexp-rank{rank}-"))
    trainer = None
    launched = not tdist.is_initialized()  # by bnexp.dist.launch: this function owns the group
    try:
        with signals.catch_signals() as guard:
            device = resolve_device(cfg.device)
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            dist.init_process_group(dist.backend_for(cfg.dist.backend, device))
            guard.defer()
            trainer = Trainer(cfg, own_dir, prepare(cfg) if data is None else data, quiet=quiet or rank != 0,
                              strategy=DataParallel(cfg.model.bn.stats, device))
            found = checkpoint.list_checkpoints(run_dir) if resume else []
            if found:
                trainer.load_checkpoint(found[-1])
            summary = trainer.run(resume=resume)
        return summary if rank == 0 else None
    except Interrupted as sig:
        if launched:
            raise SystemExit(sig.exit_code) from None
        raise
    except BaseException:
        if rank == 0:
            with contextlib.suppress(Exception):  # best effort: the original error is what gets reported
                mark_interrupted(Path(run_dir))
        raise
    finally:
        if trainer is not None:
            trainer.logs.close()
        if launched:
            dist.destroy_process_group()
        if rank != 0:
            # Only once the logs are closed: a flush would write into the removed directory.
            shutil.rmtree(own_dir, ignore_errors=True)


def _for_launcher(cfg: Config) -> Config:
    """Under torchrun the launcher's WORLD_SIZE is the process count; the saved config says so."""
    if not dist.under_launcher() or cfg.dist.nproc == dist.env_world():
        return cfg
    return validate(apply_override(cfg.model_dump(mode="json"), "dist.nproc", dist.env_world()))


def _start_in_group(cfg: Config, out, *, quiet: bool, data: Dataset) -> tuple[Path, dict[str, Any]]:
    """torchrun: rank 0 creates the directory and tells the others where it is (or what went wrong)."""
    device = resolve_device(cfg.device)
    dist.init_process_group(dist.backend_for(cfg.dist.backend, device))
    msg: list[Any] = [None]
    if tdist.get_rank() == 0:
        try:
            msg = [str(create_run_dir(cfg.out_dir, cfg.name, cfg.seed, out, files=_fresh_files(cfg)))]
        except UserError as err:
            msg = [err]
    tdist.broadcast_object_list(msg, src=0)
    if isinstance(msg[0], UserError):
        raise msg[0]
    run_dir = Path(msg[0])
    signals.defer()
    return run_dir, _train_in_group(cfg, run_dir, quiet=quiet, data=data)


def _train_in_group(cfg: Config, run_dir: Path, *, quiet: bool, data: Dataset | None = None) -> dict[str, Any]:
    dist.init_process_group(dist.backend_for(cfg.dist.backend, resolve_device(cfg.device)))
    if tdist.get_rank() == 0:
        with locked(run_dir):
            _write_fresh(cfg, run_dir)
            tdist.barrier()
            return run_rank(cfg.model_dump(mode="json"), str(run_dir), quiet, False, data=data)
    tdist.barrier()
    return run_rank(cfg.model_dump(mode="json"), str(run_dir), quiet, False, data=data)
