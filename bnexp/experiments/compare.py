"""`bnexp compare`: one base experiment, several named arms (override sets), several seeds, one report.

A BN claim is a comparison over seeds, so the unit of a result here is a comparison directory:

    <out_dir>/compare/<name>/<timestamp>/compare.yaml        the resolved comparison (base inlined)
                                        /<arm>/s<seed>/       ordinary run directories (bnexp.engine.session.train)
                                        /report.md, summary.csv, plots/
                                        /events.out.tfevents.*  TensorBoard's hparams view of the runs

Everything that can fail on user input (the comparison config, every arm x seed run config, the datasets)
is checked before the directory exists, so a user error leaves nothing behind. A run that fails or diverges
is recorded (its summary.json, or error.txt for an exception) and the comparison goes on.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from bnexp.config import (COMPARISON_KEYS, NAME_PATTERN, Config, ConfigError, Float, Int, apply_override,
                          flatten, format_validation_error, parse_override, read_yaml, validate)
from bnexp.data import REGRESSION
from bnexp.errors import RunFailed, UserError
from bnexp.engine import dashboard, files, session, signals
from bnexp.engine.rundir import (CHECKPOINTS, ERROR_FILE, FINISHED, METRICS, RunBusy, RunDirError, create_run_dir,
                                 find_runs, is_run_dir, locked, new_run_dir, read_status, read_summary,
                                 refuse_existing, write_atomic)
from bnexp.engine.signals import Interrupted
from bnexp.experiments import report
from bnexp.experiments.records import RunRecord, load_record

COMPARE_YAML = "compare.yaml"
# Arm and comparison names become directory names: the run name's rule (no "." or "..") applies.
_NAME = NAME_PATTERN
_SEED_DIR = re.compile(r"^s(\d+)$")
# Keys of the comparison config that still mean something when reporting on existing run directories.
_REPORT_KEYS = ("name", "target_accuracy", "baseline", "out_dir")


class CompareError(UserError):
    """A user error in a comparison config, its arms or the run directories given: one line, exit 2."""


@dataclass
class Arm:
    """One arm as it runs: a declared arm at one point of the grid (or either alone)."""

    name: str
    overrides: dict[str, Any]  # dotted config keys: the declared arm's, then the grid point's
    point: dict[str, Any]  # the grid point, {dotted key: value} ({} without a grid)
    family: str  # the declared arm it comes from ("" for a grid without declared arms)


class WorkerDied(RunFailed):
    """A worker process of `--jobs N` died without reporting (killed by the system, say): one line, exit 1."""


class CompareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("compare", min_length=1, pattern=_NAME)
    base: dict[str, Any] = Field(default_factory=dict)
    arms: dict[str, Optional[dict[str, Any]]] = Field(default_factory=dict)
    # A sweep: {dotted key: [values]}, expanded to the product of the values; every arm runs at every point.
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    # The lr of each run times (its batch size / the base's) ("linear") or the square root of that ("sqrt").
    lr_scale: Literal["none", "linear", "sqrt"] = "none"
    max_runs: Int = Field(100, ge=1)  # a comparison of more runs asks for --yes
    seeds: list[Int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    target_accuracy: Optional[Float] = Field(None, gt=0, le=1)
    baseline: Optional[str] = None
    out_dir: str = "runs"
    _expanded: list[Arm] = PrivateAttr(default_factory=list)

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, arms: dict[str, Any]) -> dict[str, Any]:
        for name in arms:
            if not re.match(_NAME, str(name)):
                raise ValueError(f"arms.{name}: an arm name must be letters, digits, '_', '.' or '-', "
                                 f"and not '.' or '..' (it names a directory)")
        return arms

    @field_validator("grid")
    @classmethod
    def _grid_axes(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if key in ("seed", "name") or not key or any(not part for part in key.split(".")):
                raise ValueError(f"grid.{key}: a dotted config key (seeds and names are the comparison's)")
            if not values:
                raise ValueError(f"grid.{key}: needs at least one value")
            if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
                raise ValueError(f"grid.{key}: each value may appear once")
        return grid

    @property
    def expanded(self) -> list[Arm]:
        return self._expanded

    @property
    def arm_names(self) -> list[str]:
        return [arm.name for arm in self._expanded]

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if any(s < 0 for s in seeds):
            raise ValueError("seeds: every seed must be >= 0")
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds: each seed may appear once")
        return seeds

    @model_validator(mode="after")
    def _arms_or_grid(self) -> "CompareConfig":
        if not self.arms and not self.grid:
            raise ValueError("arms: at least one arm (e.g. no_bn: {model.norm: none}) or a grid is needed")
        return self


@dataclass
class Job:
    arm: str
    seed: int
    cfg: Config

    @property
    def rel(self) -> Path:
        return Path(self.arm) / f"s{self.seed}"


# --- configuration ----------------------------------------------------------------------------------------

def _point_name(point: dict[str, Any]) -> str:
    """A grid point as a directory name: key-value pairs joined by "_", each key by its last part unless
    two keys share it (data.batch_size=2, model.norm=group: batch_size-2_norm-group)."""
    lasts = [key.rsplit(".", 1)[-1] for key in point]
    parts = []
    for (key, value), last in zip(point.items(), lasts):
        label = last if lasts.count(last) == 1 else key
        text = "x".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{label}-{re.sub(r'[^A-Za-z0-9_.-]', '', text)}")
    return "_".join(parts)


def expand(cmp: CompareConfig) -> list[Arm]:
    """Every declared arm at every point of the grid, in order (the grid's first key varies slowest)."""
    import itertools

    keys = list(cmp.grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*cmp.grid.values())] or [{}]
    declared = cmp.arms or {"": {}}
    arms = []
    for family, overrides in declared.items():
        for key in overrides:
            if key in cmp.grid:
                raise CompareError(f"invalid comparison config: arms.{family}.{key}: also a grid key; set it in "
                                   f"one place")
        for point in points:
            name = "_".join(part for part in (family, _point_name(point)) if part)
            arms.append(Arm(name, {**overrides, **point}, point, family))
    return arms


def _validate_compare(raw: dict[str, Any]) -> CompareConfig:
    if "arms" not in raw and "grid" not in raw:
        raise CompareError("invalid comparison config: arms: missing (name at least one arm, "
                           "e.g. no_bn: {model.norm: none}, or give a grid)")
    if isinstance(raw.get("grid"), dict):  # nested like the arms may be ({model: {depth: [..]}}, --set grid.x.y=..)
        raw = {**raw, "grid": flatten(raw["grid"])}
    try:
        cmp = CompareConfig.model_validate(raw)
    except ValidationError as err:
        problem = format_validation_error(err, CompareConfig, under={"base": Config})
        raise CompareError(f"invalid comparison config: {problem}") from None
    cmp.arms = {arm: flatten(o or {}) for arm, o in cmp.arms.items()}
    cmp._expanded = expand(cmp)
    names = cmp.arm_names
    for arm in cmp.expanded:
        if not re.match(_NAME, arm.name) or len(arm.name) > 200:
            raise CompareError(f"invalid comparison config: grid: the arm name {arm.name[:80]!r} is not a usable "
                               f"directory name")
    if len(set(names)) != len(names):
        raise CompareError("invalid comparison config: grid: two grid points give one arm name; use values "
                           "that differ in letters or digits")
    if cmp.baseline is None:
        cmp.baseline = names[0]
    elif cmp.baseline not in names:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise CompareError(f"invalid comparison config: baseline: {cmp.baseline!r} is not an arm (arms: {shown})")
    return cmp


def load_compare(path: str | Path, overrides: list[str]) -> CompareConfig:
    """Read a comparison file, inline its base config, apply `--set` overrides, validate.

    The base is inlined before the overrides, so `--set base.train.steps=200` works whether `base:` is a
    path or a mapping; `--set base=FILE` (relative to the working directory) swaps the base file itself.
    """
    path = Path(path)
    raw = read_yaml(path)
    pairs = [parse_override(o) for o in overrides]
    run_keys = [key for key in raw if key in Config.model_fields and key not in CompareConfig.model_fields]
    if run_keys and not any(key.split(".")[0] in COMPARISON_KEYS for key in [*raw, *(k for k, _ in pairs)]):
        raise CompareError(f"{path} is a run config ({', '.join(run_keys[:3])}, ...): train it with bnexp train "
                           f"-c {path}, or name it as the base: of a comparison config")
    base_dir = path.parent
    for key, value in pairs:
        if key == "base":
            raw["base"], base_dir = value, Path.cwd()
    base = raw.get("base", {})
    if isinstance(base, str):
        try:
            raw["base"] = read_yaml(base_dir / base)
        except ConfigError as err:
            raise CompareError(f"base: {err}") from None
    elif base is not None and not isinstance(base, dict):
        raise CompareError("invalid comparison config: base: a path to a config file or a mapping of keys")
    if raw.get("base") is None:
        raw["base"] = {}
    for key, value in pairs:
        if key != "base":
            raw = apply_override(raw, key, value)
    return _validate_compare(raw)


def _config_problem(raw: dict[str, Any]) -> str | None:
    """The first problem of a run config as "<dotted key>: <what>", or None if it is valid."""
    try:
        Config.model_validate(raw)
    except ValidationError as err:
        return format_validation_error(err, Config)
    return None


def plan(cmp: CompareConfig) -> list[Job]:
    """Every arm x seed run config, validated; the first problem names the arm (or base) and dotted key."""
    jobs: list[Job] = []
    reference = _reference_batch_size(cmp)
    for expanded in cmp.expanded:
        arm, overrides = expanded.name, expanded.overrides
        for key, owner in (("seed", "seeds"), ("name", "the arm's name")):
            if key in overrides:
                raise CompareError(f"arms.{arm}.{key}: set by the comparison ({owner}), not by an arm")
        for seed in cmp.seeds:
            raw = dict(cmp.base)
            try:
                for key, value in overrides.items():
                    raw = apply_override(raw, key, value)
            except ConfigError as err:  # e.g. model.norm.x: model.norm is a value, not a section
                raise CompareError(f"arms.{arm}: {str(err).replace('bad --set ', '')}") from None
            raw["seed"], raw["name"] = seed, arm
            msg = _config_problem(raw)
            if msg is not None:
                # The same problem without the arm's overrides is the base's, not the arm's.
                where = "base" if _config_problem({**cmp.base, "seed": seed, "name": arm}) == msg else f"arms.{arm}"
                raise CompareError(f"invalid comparison config: {where}: {msg}")
            cfg = validate(raw)
            if cmp.lr_scale != "none":
                ratio = cfg.data.batch_size / reference
                factor = ratio if cmp.lr_scale == "linear" else ratio ** 0.5
                cfg = validate(apply_override(raw, "optim.lr", cfg.optim.lr * factor))
            jobs.append(Job(arm, seed, cfg))
    if cmp.target_accuracy is not None:
        _refuse_target_on_regression([(job.arm, job.cfg.data.dataset) for job in jobs])
    return jobs


def _refuse_target_on_regression(arms: list[tuple[str, str]]) -> None:
    """A target accuracy is meaningless for a regression (an MSE loss, no accuracy): a CompareError naming
    the first (arm, dataset) that is one."""
    for arm, dataset in arms:
        if dataset in REGRESSION:
            raise CompareError(f"invalid comparison config: target_accuracy: arm `{arm}` is a regression "
                               f"(data.dataset {dataset}, an MSE loss), which has no accuracy to reach; remove "
                               f"target_accuracy")


def _reference_batch_size(cmp: CompareConfig) -> int:
    """The batch size lr_scale scales from: the base config's."""
    try:
        return Config.model_validate({**cmp.base, "name": "base"}).data.batch_size
    except ValidationError:  # the base is completed by every arm: its own value, or the default
        data = cmp.base.get("data")
        value = data.get("batch_size") if isinstance(data, dict) else None
        return value if isinstance(value, int) and value > 0 else Config().data.batch_size


def _data_key(cfg: Config) -> str:
    return json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)


def _prepare_all(jobs: list[Job]) -> dict[str, Any]:
    """Load each distinct dataset once (and surface missing data/devices before anything is created)."""
    datasets: dict[str, Any] = {}
    for job in jobs:
        key = _data_key(job.cfg)
        if key not in datasets:
            datasets[key] = session.prepare(job.cfg)
    return datasets


def _resolved_yaml(cmp: CompareConfig) -> str:
    import yaml

    head = ("# The resolved comparison (base inlined, --set applied): `bnexp compare --resume` reads it.\n")
    return head + yaml.safe_dump(cmp.model_dump(mode="json"), sort_keys=False)


def _create_dir(cmp: CompareConfig, explicit: Path | None, files_: dict[str, str] | None = None):
    """<out_dir>/compare/<name>/<timestamp>, or --out: made the way run directories are (never reused, complete
    when it appears, its lock held while the block runs)."""
    return new_run_dir(Path(cmp.out_dir) / "compare", cmp.name, None, explicit, template="{stamp}",
                       what="comparison", files=files_)


# --- running ----------------------------------------------------------------------------------------------

_WORKER_DATA: dict[str, Any] = {}
_STOP: Any = None  # in a worker process: the comparison's "start no more runs" event
_STEPS: Any = None  # in a worker process: the array shared with the comparison that _StepCounter writes
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _init_worker(parent: int, stop, steps) -> None:
    """A worker of `--jobs N`. Torch threads are the run's own (config `threads`, set by the Trainer).

    A worker is born with SIGINT and SIGTERM blocked (the parent starts it inside signals.held()), so that a
    Ctrl-C while it starts up does not kill it mid-import with a traceback; here it ignores them, and lets
    them through. An idle worker ignores them; from the moment it takes a run it records them (run_one). A
    Ctrl-C or `kill` of the process group reaches the parent, which stops handing out runs and passes the
    signal on to the workers that are training (they checkpoint and stop); a worker whose run a signal
    stopped sets `stop` itself before it takes the next run, so no queued run starts whichever process
    heard the signal first. Idle workers leave when the pool shuts down. A worker must not outlive its
    parent, which would leave it training queued runs behind a comparison that was killed: the kernel sends
    it SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG; every file of a run is written so that a kill
    at any moment resumes).
    """
    global _STOP, _STEPS
    _STOP, _STEPS = stop, steps
    for sig in signals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # which drops one that arrived while it started
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.SIGNALS)
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no prctl (nor this guarantee)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _inside(comp_dir: Path, run_dir: Path, create: bool) -> Path:
    """run_dir (<arm>/s<seed> below comp_dir) as real directories, not links that lead elsewhere."""
    folder = comp_dir
    for part in run_dir.relative_to(comp_dir).parts:
        folder = files.real_dir(folder / part, create=create)
    return run_dir


class _StepCounter:
    """A Trainer callback that keeps where run number `slot` of a comparison stands, for its progress display:
    values[2 slot] its step (-1 before it starts), values[2 slot + 1] its number of steps. `values` is a list
    in this process, or an array shared with the comparison's process when a worker trains the run;
    `on_step` (in this process) is called after every step."""

    def __init__(self, values, slot: int, on_step: Callable[[], None] | None = None):
        self.values, self.slot, self.on_step = values, slot, on_step

    def start(self, steps: int) -> None:
        self.values[2 * self.slot], self.values[2 * self.slot + 1] = 0, steps

    def after_step(self, trainer, step: int) -> None:
        self.values[2 * self.slot], self.values[2 * self.slot + 1] = step, trainer.cfg.train.steps
        if self.on_step is not None:
            self.on_step()


def run_one(cfg: Config | dict, run_dir: str | Path, action: str, data: Any = None,
            counter: _StepCounter | None = None) -> dict[str, Any]:
    """Train (action "fresh") or resume one run; an exception is written to error.txt, never raised. A run
    another process is training is "busy": nothing is written for it.

    A signal is recorded from the moment the run is taken: until the run's directory is made (or a resumed
    one is opened) it cancels the run ("cancelled": nothing written), after that the run checkpoints and
    stops ("interrupted"). Either way the worker's `stop` event is set, so no process starts another run.
    """
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    with signals.catch_signals() as guard:
        guard.defer()

        def stopping() -> bool:
            return bool(guard.received) or (_STOP is not None and _STOP.is_set())

        def cancelled() -> dict[str, Any]:  # the signal, if this worker got one, tells the parent why
            return {"status": "cancelled", "signum": guard.received[0] if guard.received else None}

        try:
            if stopping():
                return cancelled()
            if isinstance(cfg, dict):
                cfg = validate(cfg)
            callbacks = [] if counter is None else [counter]
            if action == "resume":  # shown once it trains: its first step is the one after its checkpoint
                summary = session.resume(run_dir, quiet=True, callbacks=callbacks)
            else:
                if data is None:  # a worker process: one load per distinct dataset
                    key = _data_key(cfg)
                    if key not in _WORKER_DATA:
                        _WORKER_DATA[key] = session.prepare(cfg)
                    data = _WORKER_DATA[key]
                if stopping():  # the last moment before the run's directory exists
                    return cancelled()
                if counter is not None:
                    counter.start(cfg.train.steps)
                _inside(run_dir.parent.parent, run_dir, create=True)
                files.unlink(run_dir / ERROR_FILE)
                summary = session.train(cfg, run_dir, quiet=True, data=data, callbacks=callbacks)
            return {"status": summary["status"], "test_accuracy": summary.get("test_accuracy"),
                    "diverged_step": summary.get("diverged_step"), "wall_time_s": summary.get("wall_time_s")}
        except Interrupted as sig:
            return {"status": "interrupted", "signum": sig.signum}
        except RunBusy as err:
            return {"status": "busy", "error": str(err)}
        except Exception as err:  # noqa: BLE001 - one broken run must not end the comparison
            with contextlib.suppress(UserError):  # best effort: the outcome line reports the error anyway
                _inside(run_dir.parent.parent, run_dir, create=True)
                write_atomic(run_dir / ERROR_FILE, traceback.format_exc())
            return {"status": "failed", "error": f"{type(err).__name__}: {err}".splitlines()[0][:300],
                    "wall_time_s": time.perf_counter() - t0}
        finally:
            if guard.received and _STOP is not None:
                _STOP.set()


def _run_in_worker(cfg: dict, run_dir: str, action: str, slot: int) -> dict[str, Any]:
    return run_one(cfg, run_dir, action, counter=None if _STEPS is None else _StepCounter(_STEPS, slot))


Log = Callable[[str], None]  # where progress lines go (the CLI prints them on stderr, unless quiet)


@dataclass
class Status:
    """Where the runs of a `compare` (or `compare --resume`) stand, as its progress display shows them."""

    done: int  # runs that ended (completed, diverged, failed or interrupted)
    total: int  # runs this command trains
    running: list[tuple[str, int, int]]  # (arm/s<seed>, step, steps) of each run in progress


Progress = Callable[[Status], None]
# How often the progress display is told: it draws a terminal's live bars from this; a pipe's lines are
# fewer (bnexp.engine.progress).
TICK_SECONDS = 0.2


def _status(todo: list[tuple[Job, str]], values, ended: set[int], done: int) -> Status:
    running = [(f"{job.arm}/s{job.seed}", values[2 * i], values[2 * i + 1]) for i, (job, _) in enumerate(todo)
               if values[2 * i] >= 0 and i not in ended]
    return Status(done, len(todo), running)


def _finished_line(done: int, total: int, job: Job, outcome: dict[str, Any]) -> str:
    status = outcome["status"]
    detail = ""
    if status == "diverged" and outcome.get("diverged_step") is not None:
        # Not the stopped network's accuracy: the report takes a diverged run's from before it diverged.
        detail = f" at step {outcome['diverged_step']}"
    elif outcome.get("test_accuracy") is not None:
        detail = f", test accuracy {outcome['test_accuracy']:.4f}"
    if outcome.get("error"):
        detail = f": {outcome['error']}"
    if outcome.get("wall_time_s") is not None:
        detail += f" ({outcome['wall_time_s']:.1f} s)"
    return f"[{done}/{total}] {job.arm} seed {job.seed}: {status}{detail}"


def _run_all(todo: list[tuple[Job, str]], comp_dir: Path, jobs: int, datasets: dict[str, Any], log: Log,
             progress: Progress | None = None) -> None:
    """Train every run of `todo`; on a signal, raise Interrupted(signum, comp_dir) once runs checkpointed
    (and start no other run)."""
    progress = progress or (lambda _status: None)
    if jobs > 1 and len(todo) > 1:
        _run_parallel(todo, comp_dir, jobs, log, progress)
        return
    values, ended = [-1, 0] * len(todo), set()
    told = [0.0]

    def tell() -> None:  # after every step of the run in progress
        if time.monotonic() - told[0] >= TICK_SECONDS:
            told[0] = time.monotonic()
            progress(_status(todo, values, ended, len(ended)))

    with signals.catch_signals() as guard:
        guard.defer()  # a signal between runs is acted on before the next one starts
        for i, (job, action) in enumerate(todo):
            if guard.received:
                raise Interrupted(guard.received[0], comp_dir)
            data = datasets.get(_data_key(job.cfg))
            outcome = run_one(job.cfg, comp_dir / job.rel, action, data, _StepCounter(values, i, tell))
            if outcome["status"] == "cancelled":  # a signal before the run's directory was made
                raise Interrupted(guard.received[0], comp_dir)
            ended.add(i)
            log(_finished_line(len(ended), len(todo), job, outcome))
            progress(_status(todo, values, ended, len(ended)))
            if outcome["status"] == "interrupted":
                raise Interrupted(outcome["signum"], comp_dir)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _run_parallel(todo: list[tuple[Job, str]], comp_dir: Path, jobs: int, log: Log, progress: Progress) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, CancelledError, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    workers = min(jobs, len(todo))
    threads = sorted({"torch's default" if job.cfg.threads is None else str(job.cfg.threads)
                      for job, _ in todo})
    log(f"{len(todo)} runs on {workers} worker processes, {' or '.join(threads)} torch thread(s) each")
    # spawn, not fork: a forked child would inherit this process's torch thread pool and locks.
    ctx = multiprocessing.get_context("spawn")
    interrupted: int | None = None
    died = False
    with signals.catch_signals() as guard:
        guard.defer()  # signals are recorded, and handed on to the workers below
        with signals.held():  # the processes started here (workers, resource tracker) are born deaf to them
            stop = ctx.Event()
            values = ctx.Array("q", [-1, 0] * len(todo), lock=False)  # each run's step and steps (_StepCounter)
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                       initargs=(os.getpid(), stop, values))
        try:
            with signals.held():  # the pool starts its workers as runs are submitted
                futures = {pool.submit(_run_in_worker, job.cfg.model_dump(mode="json"), str(comp_dir / job.rel),
                                       action, i): i for i, (job, action) in enumerate(todo)}
            pending, ended, done_count, told = set(futures), set(), 0, 0.0
            while pending:
                finished, pending = wait(pending, timeout=TICK_SECONDS, return_when=FIRST_COMPLETED)
                for fut in finished:
                    ended.add(futures[fut])
                    try:
                        outcome = fut.result()
                    except CancelledError:
                        continue
                    except BrokenProcessPool:
                        died = True
                        continue
                    if outcome["status"] != "cancelled":
                        done_count += 1
                        log(_finished_line(done_count, len(todo), todo[futures[fut]][0], outcome))
                    if outcome["status"] in ("interrupted", "cancelled") and outcome["signum"] and interrupted is None:
                        interrupted = outcome["signum"]
                if interrupted is None and guard.received:
                    interrupted = guard.received[0]
                if interrupted is None and stop.is_set():
                    # A worker got a signal (as its run ended, say) and stopped the others: the comparison
                    # is interrupted, not done.
                    interrupted = signal.SIGINT
                if interrupted is None:
                    progress(_status(todo, values, ended, done_count))
                elif time.monotonic() - told > 1.0:
                    # Start no more runs, and stop those in progress (again each second: a worker that was
                    # still taking a run when told ignored it, and records it once it holds the run).
                    stop.set()
                    for fut in pending:
                        fut.cancel()
                    for child in multiprocessing.active_children():
                        with contextlib.suppress(OSError):
                            os.kill(child.pid, signal.SIGINT)
                    told = time.monotonic()
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        if interrupted is None and guard.received:
            interrupted = guard.received[0]
    if interrupted is not None:
        raise Interrupted(interrupted, comp_dir)
    if died:
        raise WorkerDied(f"a worker process died without reporting (killed from outside?); the runs it left "
                         f"resume: bnexp compare --resume {comp_dir}")


def _run_states(comp_dir: Path, jobs: list[Job]) -> list[tuple[str, str, int | None]]:
    """Each run of the comparison as its directory has it: (arm/s<seed>, status, steps). Status "not started"
    (no run directory), "failed" (an error.txt beside an unfinished run: --resume tries it again), "damaged"
    (an unreadable summary.json), or the summary's own (completed, diverged, interrupted, running)."""
    states = []
    for job in jobs:
        run, steps, status = comp_dir / job.rel, None, "not started"
        if is_run_dir(run):
            try:
                summary = read_summary(run)
                status, steps = str(summary.get("status")), summary.get("steps")
            except RunDirError:
                status = "damaged"
        if status not in FINISHED and (run / ERROR_FILE).is_file():
            status = "failed"
        states.append((f"{job.arm}/s{job.seed}", status, steps if isinstance(steps, int) else None))
    return states


class ComparisonInterrupted(Interrupted):
    """A signal stopped the comparison in `run_dir` once its runs in progress checkpointed; `runs` says
    where each of its runs was left (_run_states)."""

    def __init__(self, signum: int, run_dir: Path, runs: list[tuple[str, str, int | None]]):
        super().__init__(signum, run_dir)
        self.runs = runs


@contextlib.contextmanager
def _saying_what_stopped(comp_dir: Path, jobs: list[Job]):
    try:
        yield
    except Interrupted as sig:
        raise ComparisonInterrupted(sig.signum, comp_dir, _run_states(comp_dir, jobs)) from None


class ReportInterrupted(Interrupted):
    """A signal arrived once the runs had ended, while the dashboard and report were written: they were
    finished (a report cut in half is worse than one a moment late), then the command ends with the
    signal's status. `run_dir` is the comparison directory, whose report is complete."""

    report_written = True


@contextlib.contextmanager
def _signal_after_report(comp_dir: Path):
    with signals.catch_signals() as guard:  # the command's guard: it has recorded the signal (deferred)
        yield
        if guard.received:
            raise ReportInterrupted(guard.received[0], comp_dir)


# --- collecting and reporting -----------------------------------------------------------------------------

def _records_of(comp_dir: Path, jobs: list[Job]):
    """The comparison's runs; a damaged one is recorded as failed, naming the file, and the report goes on."""
    records = []
    for job in jobs:
        try:
            records.append(load_record(job.arm, job.seed, comp_dir / job.rel))
        except UserError as err:
            records.append(RunRecord(job.arm, job.seed, comp_dir / job.rel, "failed", error=str(err)))
    return records


@dataclass
class Outcome:
    """What `bnexp compare` made: the directory, and the report's rows and notes for the CLI to show."""

    path: Path
    title: str
    rows: list[dict[str, Any]]
    notes: list[str]


def _report(out_dir: Path, records, title: str, target: float | None, baseline: str | None,
            arms: list[str], notes: list[str], points=None) -> Outcome:
    with files.reporting(out_dir):  # a full or read-only folder: one line naming the file
        rows = report.write_report(out_dir, records, title=title, target=target, baseline=baseline, arms=arms,
                                   notes=notes, points=points)
    return Outcome(out_dir, title, rows, notes)


def _describe(cmp: CompareConfig, jobs: list[Job]) -> list[str]:
    cfg = jobs[0].cfg
    # A linear network has no activation (model.activation is ignored there).
    model = cfg.model.kind if cfg.model.kind == "linear" else f"{cfg.model.kind} {cfg.model.activation}"
    # The first arm's resolved settings: the other arms differ from them only by their own overrides.
    notes = [f"settings (as arm `{jobs[0].arm}` runs them; arms differ by the overrides below): data "
             f"{cfg.data.dataset}, batch {cfg.data.batch_size}; model: {model}; optimizer: {cfg.optim.name}, "
             f"lr {cfg.optim.lr}; "
             f"{f'{cfg.train.epochs} epochs' if cfg.train.epochs else f'{cfg.train.steps} steps'}; "
             f"seeds {', '.join(map(str, cmp.seeds))}"]
    if cmp.lr_scale != "none":
        notes.append(f"lr_scale {cmp.lr_scale}: each run's lr times ({'' if cmp.lr_scale == 'linear' else 'the square root of '}"
                     f"its batch size / the base's {_reference_batch_size(cmp)})")
    lrs = {job.arm: job.cfg.optim.lr for job in jobs}
    for arm in cmp.expanded:
        shown = ", ".join(f"{k}={v}" for k, v in arm.overrides.items()) or "the base config"
        if cmp.lr_scale != "none":
            shown += f" (lr {lrs[arm.name]:.4g})"
        notes.append(f"arm `{arm.name}`: {shown}")
    return notes


def run_comparison(cmp: CompareConfig, out: Path | None, jobs: int, log: Log, yes: bool = False,
                   progress: Progress | None = None) -> Outcome:
    plan_ = plan(cmp)
    if len(plan_) > cmp.max_runs and not yes:
        raise CompareError(f"this comparison would start {len(plan_)} runs ({len(cmp.expanded)} arms x "
                           f"{len(cmp.seeds)} seeds), more than max_runs ({cmp.max_runs}): add --yes to start "
                           f"them, or raise max_runs")
    if out is not None:
        refuse_existing(out)  # before the datasets load: this mistake should cost no time
    datasets = _prepare_all(plan_)
    signals.defer()  # from here a signal stops the runs at a checkpoint; --resume finishes them
    # Held for the whole comparison: a `compare --resume` of it meanwhile is refused.
    with _create_dir(cmp, out, {COMPARE_YAML: _resolved_yaml(cmp)}) as comp_dir:
        t0 = time.perf_counter()
        with _saying_what_stopped(comp_dir, plan_):
            _run_all([(job, "fresh") for job in plan_], comp_dir, jobs, datasets, log, progress)
        _write_dashboard(comp_dir, plan_)
        notes = _describe(cmp, plan_) + [_timing(len(plan_), time.perf_counter() - t0, jobs)]
        with _signal_after_report(comp_dir):
            return _report(comp_dir, _records_of(comp_dir, plan_), cmp.name, cmp.target_accuracy,
                           cmp.baseline, cmp.arm_names, notes, _points(cmp))


def _write_dashboard(comp_dir: Path, plan_: list[Job]) -> None:
    """TensorBoard's hparams view of the comparison (bnexp.engine.dashboard.write_comparison)."""
    with files.reporting(comp_dir):
        dashboard.write_comparison(comp_dir, [(comp_dir / job.rel, job.cfg) for job in plan_])


def _timing(n: int, seconds: float, jobs: int) -> str:
    return f"{n} runs trained in {seconds:.1f} s wall time (--jobs {jobs}, {_cores()} cores)"


def _refuse_to_delete_training(run_dir: Path) -> None:
    """A folder without config.yaml and summary.json is a run that never started, which resume deletes and
    trains again; but one holding checkpoints or metrics trained, and lost its run files afterwards (a run
    directory appears whole, bnexp.engine.rundir.new_run_dir): refused rather than deleted."""
    if is_run_dir(run_dir):
        return
    kept = [name for name in (CHECKPOINTS, METRICS) if os.path.lexists(run_dir / name)]
    if kept:
        raise CompareError(f"{run_dir} holds {' and '.join(kept)} but no config.yaml and summary.json: refusing "
                           f"to delete a run that trained (restore its files, or move it away to train it again)")


def _remove_run(comp_dir: Path, run_dir: Path) -> None:
    """Delete a run that never started, only ever below the comparison (no symlink may lead out of it)."""
    root, target = comp_dir.resolve(), run_dir.resolve()
    if run_dir.is_symlink() or target == root or root not in target.parents:
        raise CompareError(f"{run_dir}: not a run directory inside the comparison {comp_dir}; "
                           f"refusing to delete it")
    shutil.rmtree(target)


def resume_comparison(comp_dir: Path, jobs: int, log: Log, progress: Progress | None = None) -> Outcome:
    if not (comp_dir / COMPARE_YAML).is_file():
        raise CompareError(f"not a comparison directory (no {COMPARE_YAML}): {comp_dir}")
    # One resume at a time (nor while the comparison itself runs): the second is refused, changing nothing.
    with locked(comp_dir, what="comparison"):
        signals.defer()
        return _resume_locked(comp_dir, jobs, log, progress)


def _resume_locked(comp_dir: Path, jobs: int, log: Log, progress: Progress | None) -> Outcome:
    cmp = _validate_compare(read_yaml(comp_dir / COMPARE_YAML))
    plan_ = plan(cmp)
    for job in plan_:  # every run inside the comparison, before anything changes
        for folder in (comp_dir / job.arm, comp_dir / job.rel):
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise CompareError(f"{folder} is a symbolic link or a file, not a folder inside the comparison: "
                                   f"refusing to delete or write through it")
        _refuse_to_delete_training(comp_dir / job.rel)
    todo: list[tuple[Job, str]] = []
    damaged: list[str] = []
    for job in plan_:
        run_dir = comp_dir / job.rel
        if is_run_dir(run_dir):
            try:
                status = read_status(run_dir)
            except RunDirError as err:
                damaged.append(str(err))  # reported as a failed run; resuming it would refuse the same way
                continue
            if status in FINISHED:
                continue
            todo.append((job, "resume"))
        else:
            # Never got as far as config.yaml + summary.json: nothing of the run is worth keeping.
            if run_dir.exists() or run_dir.is_symlink():
                _remove_run(comp_dir, run_dir)
            todo.append((job, "fresh"))
    fresh = [job for job, action in todo if action == "fresh"]
    datasets = _prepare_all(fresh) if jobs <= 1 else {}
    log(f"{len(todo)} of {len(plan_)} runs to finish in {comp_dir}")
    for problem in damaged:
        log(f"skipped, recorded as failed: {problem}")
    t0 = time.perf_counter()
    with _saying_what_stopped(comp_dir, plan_):
        _run_all(todo, comp_dir, jobs, datasets, log, progress)
    _write_dashboard(comp_dir, plan_)
    notes = _describe(cmp, plan_) + [f"resumed: {_timing(len(todo), time.perf_counter() - t0, jobs)}"]
    with _signal_after_report(comp_dir):
        return _report(comp_dir, _records_of(comp_dir, plan_), cmp.name, cmp.target_accuracy, cmp.baseline,
                       cmp.arm_names, notes, _points(cmp))


def _points(cmp: CompareConfig) -> dict[str, tuple[str, dict[str, Any]]] | None:
    """For the sweep plots: each arm's declared arm and grid point (None without a grid)."""
    return {arm.name: (arm.family, arm.point) for arm in cmp.expanded} if cmp.grid else None


# Keys that differ between runs of one experiment without making them different arms.
_NOT_AN_ARM = ("seed", "name", "out_dir")


def _loose_arms(runs: list[Path]) -> dict[Path, tuple[str, int | None]]:
    """Arm and seed of runs outside a comparison layout, grouped by their resolved config minus _NOT_AN_ARM.

    A group is named by its config's name when that name is its own; otherwise (plain `bnexp train` runs
    are all "default") by the keys whose values tell the groups apart, e.g. model.norm-none.
    """
    configs = {r: flatten(read_yaml(r / "config.yaml")) for r in runs}
    key_of = {r: json.dumps({k: v for k, v in c.items() if k not in _NOT_AN_ARM}, sort_keys=True, default=str)
              for r, c in configs.items()}
    groups: dict[str, list[Path]] = {}
    for r in runs:
        groups.setdefault(key_of[r], []).append(r)
    names = {g: {str(configs[r].get("name", "default")) for r in rs} for g, rs in groups.items()}
    label: dict[str, str] = {}
    for g, rs in groups.items():
        own = len(names[g]) == 1 and sum(names[g] <= other for other in names.values()) == 1
        if own or len(groups) == 1:
            label[g] = sorted(names[g])[0]
    rest = [g for g in groups if g not in label]
    if rest:
        flat = {g: configs[groups[g][0]] for g in groups}
        keys = sorted({k for g in groups for k in flat[g] if k not in _NOT_AN_ARM
                       and len({json.dumps(flat[h].get(k), default=str) for h in groups}) > 1})
        for g in rest:
            text = "_".join(f"{k}-{flat[g].get(k)}" for k in keys)
            label[g] = re.sub(r"[^A-Za-z0-9_.\-]", "", text.replace(" ", ""))
    if len(set(label.values())) != len(label) or not all(re.match(_NAME, v) for v in label.values()):
        where = ", ".join(str(groups[g][0]) for g in groups)
        raise CompareError(f"cannot name the arms of these runs ({where}): their configs differ, but not in a "
                           f"way that gives each a distinct name; give each config its own name: and report again")
    out = {}
    for r in runs:
        seed = configs[r].get("seed")
        out[r] = (label[key_of[r]], seed if isinstance(seed, int) and not isinstance(seed, bool) else None)
    return out


def report_runs(run_dirs: list[Path], overrides: list[str], out: Path | None) -> Outcome:
    found: list[Path] = []
    for p in run_dirs:
        runs = find_runs([p])
        if not runs:
            if not p.exists():
                raise CompareError(f"{p} does not exist")
            raise CompareError(f"{p} is not a bnexp run directory (no config.yaml and summary.json)")
        found.extend(r for r in runs if r not in found)
    if out is not None:
        refuse_existing(out)
    raw: dict[str, Any] = {"name": "report"}
    # A report on runs of one comparison keeps its target and baseline unless --set says otherwise.
    parents = {r.parent.parent / COMPARE_YAML for r in found if _SEED_DIR.match(r.name)}
    if len(parents) == 1 and (src := parents.pop()).is_file():
        try:
            src_raw = read_yaml(src)
            raw.update({k: src_raw[k] for k in ("target_accuracy", "baseline") if k in src_raw})
        except ConfigError:
            pass
    set_keys = set()
    for text in overrides:
        key, value = parse_override(text)
        if key not in _REPORT_KEYS:
            raise CompareError(f"--set {key}: only {', '.join(_REPORT_KEYS)} apply when reporting on "
                               f"run directories")
        raw[key] = value
        set_keys.add(key)
    # In a comparison layout (<arm>/s<seed>) the arm is the folder; other runs are grouped by their configs.
    loose = _loose_arms([r for r in found if not _SEED_DIR.match(r.name)])
    records = []
    for r in found:
        m = _SEED_DIR.match(r.name)
        arm, seed = (r.parent.name, int(m.group(1))) if m else loose[r]
        records.append(load_record(arm, seed, r))
    arms = list(dict.fromkeys(rec.arm for rec in records))
    raw["arms"] = {arm: {} for arm in arms}
    if "baseline" not in set_keys and raw.get("baseline") not in arms:
        raw.pop("baseline", None)  # the source comparison's baseline is not among these runs
    cmp = _validate_compare(raw)
    if cmp.target_accuracy is not None:
        _refuse_target_on_regression([(rec.arm, rec.config.get("data", {}).get("dataset")) for rec in records
                                      if rec.regression])
    with _create_dir(cmp, out) as report_dir:
        notes = [f"report on {len(found)} existing run directories"]
        return _report(report_dir, records, cmp.name, cmp.target_accuracy, cmp.baseline, arms, notes)


def main(config: Path | None = None, overrides: list[str] | None = None, out: Path | None = None,
         jobs: int = 1, resume: Path | None = None, run_dirs: list[Path] | None = None,
         log: Log | None = None, yes: bool = False, progress: Progress | None = None) -> Outcome:
    """The `bnexp compare` command's dispatch (cli.compare validates --jobs >= 1). Raises
    ComparisonInterrupted (its run_dir the comparison directory) when a signal stopped it, after the running
    runs checkpointed. `log` gets a line as each run ends; `progress` a Status every TICK_SECONDS or so
    while runs train."""
    overrides, run_dirs = overrides or [], run_dirs or []
    log = log or (lambda _line: None)
    if resume is not None:
        if config is not None or overrides or out is not None or run_dirs:
            raise CompareError("--resume takes the comparison's own compare.yaml: do not combine it with "
                               "--config/--set/--out or run directories")
        return resume_comparison(Path(resume), jobs, log, progress)
    if run_dirs:
        if config is not None:
            raise CompareError("give either --config or run directories, not both")
        return report_runs([Path(p) for p in run_dirs], overrides, out)
    if config is None:
        raise CompareError("missing option --config (or --resume COMPARISON_DIR, or run directories to report on)")
    return run_comparison(load_compare(config, overrides), out, jobs, log, yes, progress)
