"""Data-parallel training on torch.distributed, with BN over each process's shard or the global batch.

When a batch is split across processes, BN can normalize each shard with its own statistics (what plain
DistributedDataParallel gives: `model.bn.stats: local`) or with the statistics of the whole global batch
(synchronized BN: `model.bn.stats: global`). With `global`, an N-process run computes what a one-process
run of the same global batch computes, up to floating-point summation order.

How a run is laid out:

- `dist.nproc: N` (or `bnexp train --nproc N`) spawns N worker processes on this machine, joined over a
  free loopback port (gloo on CPU, nccl on GPU); under `torchrun` every process it starts is a rank
  instead (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which scales to several machines.
- Every rank loads the whole (small) dataset and draws the SAME global batch indices from the same
  seeded sampler, then keeps its contiguous shard: an N-process run sees exactly the batches a
  one-process run sees.
- Every rank runs the same training loop (so every collective is issued in the same order on all of
  them); only rank 0 writes the run directory. The others write into a private scratch directory that
  is deleted when they exit. DDP broadcasts rank 0's buffers before each forward, so all ranks hold rank
  0's model, the state its checkpoints save.
- Evaluation and probes run on every rank in lockstep on the unwrapped module with BN forced to local
  statistics: they issue no collective, cannot deadlock, and measure what a single process would. With
  `stats: local` the probes use the per-process batch (data.batch_size / N) as m, because that is the
  batch BN normalizes over in training; with `global` they use the global batch.
- Signals are agreed on: each step all ranks all-reduce "has a signal arrived", so they checkpoint and
  stop at the same step. A rank that dies takes the group down; the launcher reports it as one line
  naming the rank, and the run resumes from rank 0's last checkpoint (`bnexp train --resume RUN_DIR`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import tempfile
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from bnexp.errors import RunFailed, UserError
from bnexp.runs import ERROR_FILE

# Test-only fault injection: "RANK:STEP" makes that rank raise just before that training step.
FAIL_ENV = "BNEXP_DIST_FAIL_AT"
# Seconds the launcher gives the other ranks to notice a dead peer before it terminates them.
_GRACE_S = 10.0
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class WorkerFailed(RunFailed):
    """A worker process of a distributed run raised or died: one line naming the rank, exit status 1."""


# --- where am I --------------------------------------------------------------------------------------------

def under_launcher() -> bool:
    """This process is one rank of several started by torchrun (or a like launcher)."""
    return all(k in os.environ for k in _LAUNCH_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def wanted(cfg) -> bool:
    """Does this config (or the launcher) ask for a distributed run?"""
    return cfg.dist.nproc > 1 or under_launcher()


def env_rank() -> int:
    """This process's rank as the launcher set it (0 when there is no launcher)."""
    return int(os.environ.get("RANK", "0")) if under_launcher() else 0


def bn_batch_size(cfg) -> int:
    """The batch BN normalizes over in training: each process's shard with local statistics, else the
    global batch. Population estimates (probes, PreciseBN) must use batches of this size to estimate what
    training normalizes with."""
    m = cfg.data.batch_size
    return m // cfg.dist.nproc if cfg.model.bn.stats == "local" else m


def backend_for(name: str, device: torch.device) -> str:
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return name


def free_port() -> int:
    """A free TCP port on the loopback interface (the OS picks it; a race with another binder is possible
    but then init_process_group fails loudly rather than joining the wrong group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(backend: str, timeout_s: float = 600.0) -> None:
    """Join the group described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    if dist.is_initialized():
        return
    dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))


# --- the collectives the BN layer and the loop need ---------------------------------------------------------

def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of `t` over the ranks of `group`, returned as a new tensor (the input is left untouched)."""
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_sum_and_count(s: torch.Tensor, count: int, group=None) -> tuple[torch.Tensor, int]:
    """(Σ over ranks of the per-channel sums `s`, Σ over ranks of `count`) in one all-reduce.

    The count travels in float64 next to the sums (exact up to 2^53 values per channel), so shards of
    unequal size need no second collective.
    """
    packed = torch.cat([s.to(torch.float64), s.new_tensor([count], dtype=torch.float64)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return packed[:-1].to(s.dtype), int(packed[-1].item())


def sync_group(layer: nn.Module):
    """The process group a BN layer should reduce over right now, or None for local statistics.

    Global statistics need training mode, `stats == "global"` and a group of more than one process;
    a single process with `global` is exactly `local`.
    """
    if getattr(layer, "stats", "local") != "global" or not layer.training:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(layer, "process_group", None)
    return (group or dist.group.WORLD) if dist.get_world_size(group) > 1 else None


def set_stats(model: nn.Module, stats: str, group=None) -> None:
    """Choose local or global batch statistics for every bnexp BN layer of `model`."""
    from bnexp.norm import BatchNormBase

    for m in model.modules():
        if isinstance(m, BatchNormBase):
            m.stats = stats
            m.process_group = group


@contextmanager
def local_stats(model: nn.Module) -> Iterator[None]:
    """Force every BN layer to local statistics for the duration (evaluation and probes)."""
    from bnexp.norm import BatchNormBase

    saved = [(m, m.stats) for m in model.modules() if isinstance(m, BatchNormBase)]
    try:
        for m, _ in saved:
            m.stats = "local"
        yield
    finally:
        for m, s in saved:
            m.stats = s


def shard(idx: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch (the first len % world ranks get one extra)."""
    return torch.tensor_split(idx, world)[rank]


# --- the training side --------------------------------------------------------------------------------------

class ShardSampler:
    """The run's BatchSampler seen from one rank: the same global batch everywhere, this rank's shard.

    Its `next()` is also the loop's once-per-step hook (signal agreement, fault injection), because the
    training loop calls it exactly once per step on every rank, before the forward.
    """

    def __init__(self, inner, rank: int, world: int, on_step):
        self.inner, self.rank, self.world, self.on_step = inner, rank, world, on_step

    def next(self) -> torch.Tensor:
        self.on_step()
        return shard(self.inner.next(), self.rank, self.world)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def _make_trainer_class():
    # Defined lazily: bnexp.train imports this module.
    from torch.nn.parallel import DistributedDataParallel

    from bnexp.train import Trainer

    class DistributedTrainer(Trainer):
        """The ordinary Trainer, one per rank: DDP for the training forward/backward, everything else on
        the unwrapped module, losses averaged over the global batch before they are logged or checked."""

        def __init__(self, cfg, run_dir: Path, data, *, quiet: bool, rank: int, world: int):
            super().__init__(cfg, run_dir, data, quiet=quiet)
            self.rank, self.world = rank, world
            set_stats(self.model, cfg.model.bn.stats)
            self.sampler = ShardSampler(self.sampler, rank, world, self._each_step)
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
                if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
            self._signals: list[int] = []
            self._agreed: list[int] = []
            self._reduced = 0  # leading entries of the pending losses that are already global
            self._fail_at = _parse_fail(os.environ.get(FAIL_ENV), rank)

        # One collective per step: every rank learns whether any rank received a signal.
        def _each_step(self) -> None:
            step = self.step + 1
            if self._fail_at is not None and step == self._fail_at:
                raise RuntimeError(f"injected failure at step {step} ({FAIL_ENV})")
            flag = torch.tensor([max(self._signals, default=0)], device=self.device, dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not self._agreed:
                self._agreed.append(int(flag.item()))

        def _loop(self, start, received, progress):
            self._signals = received
            return super()._loop(start, self._agreed, progress)

        def _log_step(self, *args, **kwargs):
            with local_stats(self.model):
                return super()._log_step(*args, **kwargs)

        def _reduce_pending(self) -> None:
            """Turn this rank's pending shard losses and correct counts into global-batch ones."""
            n = len(self._losses) - self._reduced
            if n <= 0:
                return
            self._count_pending()  # per-step correct counts, aligned with the losses
            # The config makes shards equal (data.batch_size % dist.nproc == 0): the global batch's mean
            # loss is the mean of the shards' means.
            losses = torch.stack(self._losses[self._reduced:]).detach().double()
            correct = self._correct[self._reduced:].double()
            packed = torch.cat([losses, correct])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            self._losses[self._reduced:] = list((packed[:n] / self.world).to(torch.float32).unbind())
            self._correct[self._reduced:] = packed[n:].round().to(torch.int64)
            self._reduced = len(self._losses)

        def _salvage_rows(self):
            # No read: it starts with a collective, which the ranks still running would never join.
            self._write_rows()
            self.writer.flush()

        def _read_train_metrics(self, weights=False):
            self._reduce_pending()
            try:
                return super()._read_train_metrics(weights)
            finally:
                self._reduced = len(self._losses)

        def state_dict(self):
            self._reduce_pending()
            return super().state_dict()

        def load_state_dict(self, state):
            super().load_state_dict(state)
            self._reduced = len(self._losses)  # checkpoints hold global values

    return DistributedTrainer


def _parse_fail(text: str | None, rank: int) -> int | None:
    if not text:
        return None
    r, _, s = text.partition(":")
    return int(s) if int(r) == rank else None


def run_rank(cfg, run_dir: Path, rank: int, world: int, *, quiet: bool, resume_from: Path | None = None,
             resume: bool = False, data=None) -> dict[str, Any]:
    """The body of one rank, in an initialised process group: train (or resume) and return the summary.

    Rank 0 writes `run_dir`; the others a scratch directory removed on the way out.
    """
    from bnexp import checkpoint
    from bnexp.train import prepare

    from bnexp.interrupt import Interrupted

    data = prepare(cfg) if data is None else data
    own_dir = Path(run_dir) if rank == 0 else Path(tempfile.mkdtemp(prefix=f"bnexp-rank{rank}-"))
    trainer = None
    try:
        trainer = _make_trainer_class()(cfg, own_dir, data, quiet=quiet or rank != 0, rank=rank, world=world)
        if resume_from is not None:
            trainer.load_checkpoint(checkpoint.load(resume_from), resume_from)
        return trainer.run(resume=resume)
    except Interrupted:
        raise  # the trainer checkpointed, marked the run interrupted and closed its logs
    except BaseException:
        if rank == 0:
            _record_failure(trainer, run_dir)
        raise
    finally:
        if trainer is not None:
            _close_logs(trainer)
        if rank != 0:
            # Only once the logs are closed: a flush would write into the removed directory.
            shutil.rmtree(own_dir, ignore_errors=True)


def _close_logs(trainer) -> None:
    for name in ("writer", "metrics"):
        log = getattr(trainer, name, None)
        if log is not None:
            try:
                log.close()  # closing twice is harmless for both
            except Exception:  # noqa: BLE001 - a log that cannot close must not hide the run's own error
                pass


def _record_failure(trainer, run_dir: Path) -> None:
    """After a failed rank, leave summary.json as an `interrupted` run at its last checkpoint.

    That is what the run is: the state `bnexp train --resume` (which the error line suggests) continues
    from. The summary describes that checkpoint (its step, evaluation, probes), not the steps trained
    after it, which the resumed run redoes. Best effort: the original error is what gets reported.
    """
    from bnexp import checkpoint

    try:
        found = checkpoint.list_checkpoints(run_dir)
        if trainer is not None and hasattr(trainer, "writer") and found:
            trainer.load_state_dict(checkpoint.load(found[-1]))
            trainer._t0 = time.perf_counter()  # wall time up to the checkpoint (its "elapsed")
            trainer._finish("interrupted", None)
        else:
            _mark_interrupted(run_dir)
    except Exception:  # noqa: BLE001 - see above
        pass


def _mark_if_still_running(run_dir: Path) -> None:
    """The launcher's fallback when rank 0 could not record its own failure (killed, or stopped by the
    launcher after the grace period)."""
    from bnexp.runs import read_summary

    try:
        if read_summary(run_dir).get("status") == "running":
            _mark_interrupted(run_dir)
    except Exception:  # noqa: BLE001 - best effort: the failure line is what matters
        pass


def _mark_interrupted(run_dir: Path) -> None:
    """_record_failure without a trainer (rank 0 died before it had one, or was killed): the summary's
    status and the checkpoint's step, evaluation and wall time; step 0 if there is none (a resume starts
    over)."""
    from bnexp import checkpoint
    from bnexp.runs import read_summary, write_summary

    found = checkpoint.list_checkpoints(run_dir)
    state = checkpoint.load(found[-1]) if found else {}
    best = state.get("best_test_accuracy", float("-inf"))
    summary = read_summary(run_dir)
    summary.update(status="interrupted", steps=state.get("step", 0),
                   test_accuracy=state.get("last_eval", {}).get("test_accuracy"),
                   test_loss=state.get("last_eval", {}).get("test_loss"),
                   best_test_accuracy=None if best == float("-inf") else best,
                   wall_time_s=state.get("elapsed", 0.0))
    write_summary(run_dir, summary)


# --- spawning N local processes -----------------------------------------------------------------------------

@dataclasses.dataclass
class _Job:
    cfg: Any
    run_dir: str
    world: int
    port: int
    quiet: bool
    resume_from: str | None
    resume: bool
    report_dir: str


def _worker(rank: int, job: _Job) -> None:
    """Target of a spawned rank: exit 0, 128+signal when interrupted, 1 with a one-line report on error."""
    from bnexp import interrupt

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job.world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job.port))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // job.world))
    report = Path(job.report_dir) / f"rank-{rank}.txt"
    try:
        with interrupt.catch_signals() as guard:
            from bnexp.train import resolve_device

            device = resolve_device(job.cfg.device)
            if device.type == "cuda":
                torch.cuda.set_device(rank % torch.cuda.device_count())
            init_process_group(backend_for(job.cfg.dist.backend, device))
            guard.defer()
            run_rank(job.cfg, Path(job.run_dir), rank, job.world, quiet=job.quiet,
                     resume_from=Path(job.resume_from) if job.resume_from else None, resume=job.resume)
    except interrupt.Interrupted as sig:
        _destroy()
        os._exit(sig.exit_code)
    except BaseException as err:  # noqa: BLE001 - reported to the launcher, whatever it is
        first = (str(err).strip().splitlines() or [""])[0]
        peer = isinstance(err, getattr(dist, "DistBackendError", ())) or "Connection closed by peer" in str(err)
        report.write_text(f"{'peer' if peer else 'own'}\n{type(err).__name__}: {first}\n"
                          f"{traceback.format_exc()}")
        os._exit(1)
    _destroy()


def _destroy() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group on the way out
            pass


def _read_report(report_dir: Path, rank: int) -> tuple[str, str, str] | None:
    path = report_dir / f"rank-{rank}.txt"
    if not path.is_file():
        return None
    kind, line, tb = (path.read_text().split("\n", 2) + ["", ""])[:3]
    return kind, line, tb


def launch(cfg, run_dir: Path, *, quiet: bool, resume_from: Path | None = None, resume: bool = False) -> dict:
    """Spawn cfg.dist.nproc ranks for `run_dir`, wait, and return rank 0's summary.

    A signal to this process is passed on to the ranks (which agree on it and checkpoint); a rank that
    fails ends all of them and raises WorkerFailed naming it; an interrupted run raises Interrupted.
    """
    import multiprocessing

    from bnexp import interrupt
    from bnexp.runs import read_summary

    world = cfg.dist.nproc
    ctx = multiprocessing.get_context("spawn")
    report_dir = Path(tempfile.mkdtemp(prefix="bnexp-dist-"))
    job = _Job(cfg, str(run_dir), world, free_port(), quiet, str(resume_from) if resume_from else None,
               resume, str(report_dir))
    procs = []
    try:
        with interrupt.catch_signals() as guard:
            guard.defer()
            for r in range(world):
                p = ctx.Process(target=_worker, args=(r, job), daemon=False, name=f"bnexp-rank{r}")
                p.start()
                procs.append(p)
            culprit = _wait(procs, guard, report_dir)
        codes = [p.exitcode for p in procs]
        if culprit is not None:
            for p in procs:  # every rank stopped before this process touches the run directory
                if p.is_alive():
                    p.kill()
                p.join()
            _mark_if_still_running(Path(run_dir))
            raise WorkerFailed(_failure_line(culprit, procs[culprit].exitcode, report_dir, Path(run_dir)))
        interrupted = [c - 128 for c in codes if c and c > 128]
        if interrupted:
            raise interrupt.Interrupted(interrupted[0], Path(run_dir))
        return read_summary(run_dir)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        shutil.rmtree(report_dir, ignore_errors=True)


def _wait(procs, guard, report_dir: Path) -> int | None:
    """Join the ranks; return the rank that failed first (None if all exited 0 or were interrupted).

    After a failure the others get a grace period to notice the dead peer and exit by themselves, then
    SIGTERM; launch() kills whatever is still alive after that.
    """
    from multiprocessing.connection import wait

    forwarded = 0
    live = {p.sentinel: r for r, p in enumerate(procs)}
    failed: list[int] = []
    deadline, terminated = None, False
    while live:
        # Pass signals this process received on to the ranks (Ctrl-C reaches them directly too; a
        # `kill` of the launcher does not).
        for signum in guard.received[forwarded:]:
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signum)
        forwarded = len(guard.received)
        for s in wait(list(live), timeout=0.2):
            r = live.pop(s)
            procs[r].join()
            code = procs[r].exitcode
            if code != 0 and not (code > 128 and code - 128 in (signal.SIGINT, signal.SIGTERM)):
                failed.append(r)
                deadline = deadline or time.monotonic() + _GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            if terminated:
                break
            for r in live.values():
                procs[r].terminate()
            terminated, deadline = True, time.monotonic() + _GRACE_S
    if not failed:
        return None
    # A rank whose own code failed, not one that saw its peer's connection close.
    own = [r for r in failed if (_read_report(report_dir, r) or ("own",))[0] != "peer"]
    return (own or failed)[0]


def _failure_line(rank: int, code: int | None, report_dir: Path, run_dir: Path) -> str:
    rep = _read_report(report_dir, rank)
    if rep is not None:
        what = rep[1]
        if rep[2].strip():
            (run_dir / ERROR_FILE).write_text(f"rank {rank}:\n{rep[2]}")
    elif code is not None and code < 0:
        what = f"killed by {signal.Signals(-code).name}"
    else:
        what = f"exited with status {code}"
    return (f"rank {rank} of the distributed run failed: {what}; the other ranks were stopped "
            f"(continue with: bnexp train --resume {run_dir})")


# --- entry points used by bnexp.train ----------------------------------------------------------------------

def _write_fresh(cfg, run_dir: Path) -> None:
    from bnexp.config import to_yaml
    from bnexp.runs import CONFIG, versions, write_atomic, write_summary

    write_atomic(run_dir / CONFIG, to_yaml(cfg))
    write_summary(run_dir, {"status": "running", "steps": 0, "seed": cfg.seed, "name": cfg.name,
                            "versions": versions()})


def train(cfg, run_dir: Path, *, quiet: bool = True) -> dict[str, Any]:
    """A fresh distributed run in an existing, empty run directory (bnexp.train.train's distributed half)."""
    from bnexp.runs import locked

    run_dir = Path(run_dir)
    if under_launcher():
        return _train_in_group(cfg, run_dir, quiet=quiet)
    with locked(run_dir):
        _write_fresh(cfg, run_dir)
        return launch(cfg, run_dir, quiet=quiet)


def start(cfg, out=None, *, quiet: bool = True) -> tuple[Path, dict[str, Any]]:
    """bnexp.train.start's distributed half: check, create the run directory once, train."""
    from bnexp import interrupt
    from bnexp.runs import create_run_dir
    from bnexp.train import prepare, refuse_existing

    cfg = _for_launcher(cfg)
    if out is not None and env_rank() == 0:
        refuse_existing(out)  # before the data loads, as bnexp.train.start does
    data = prepare(cfg)
    if not under_launcher():
        interrupt.defer()
        run_dir = create_run_dir(cfg.out_dir, cfg.name, cfg.seed, out)
        return run_dir, train(cfg, run_dir, quiet=quiet)
    # torchrun: rank 0 creates the directory and tells the others where it is (or what went wrong).
    device = _device(cfg)
    init_process_group(backend_for(cfg.dist.backend, device))
    msg: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            msg = [str(create_run_dir(cfg.out_dir, cfg.name, cfg.seed, out))]
        except UserError as err:
            msg = [err]
    dist.broadcast_object_list(msg, src=0)
    if isinstance(msg[0], UserError):
        raise msg[0]
    run_dir = Path(msg[0])
    interrupt.defer()
    return run_dir, _train_in_group(cfg, run_dir, quiet=quiet, data=data)


def _device(cfg) -> torch.device:
    from bnexp.train import resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return device


def _for_launcher(cfg):
    """Under torchrun the launcher's WORLD_SIZE is the process count; the saved config says so."""
    if not under_launcher() or cfg.dist.nproc == int(os.environ["WORLD_SIZE"]):
        return cfg
    from bnexp.config import apply_override, validate

    return validate(apply_override(cfg.model_dump(mode="json"), "dist.nproc", int(os.environ["WORLD_SIZE"])))


def _train_in_group(cfg, run_dir: Path, *, quiet: bool, data=None) -> dict[str, Any]:
    from bnexp.runs import locked

    init_process_group(backend_for(cfg.dist.backend, _device(cfg)))
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        with locked(run_dir):
            _write_fresh(cfg, run_dir)
            dist.barrier()
            return run_rank(cfg, run_dir, rank, world, quiet=quiet, data=data)
    dist.barrier()
    return run_rank(cfg, run_dir, rank, world, quiet=quiet, data=data)


def resume(cfg, run_dir: Path, checkpoint_path: Path | None, *, quiet: bool = True) -> dict[str, Any]:
    """bnexp.train.resume's distributed half, called once its checks have passed (and, without a
    launcher, while it holds the run directory's lock)."""
    run_dir = Path(run_dir)
    if env_rank() == 0:
        (run_dir / ERROR_FILE).unlink(missing_ok=True)  # a previous failure's traceback
    if not under_launcher():
        return launch(cfg, run_dir, quiet=quiet, resume_from=checkpoint_path, resume=True)
    world = int(os.environ["WORLD_SIZE"])
    if world != cfg.dist.nproc:
        raise UserError(f"{run_dir} was trained with dist.nproc: {cfg.dist.nproc} but the launcher started "
                        f"{world} processes")
    init_process_group(backend_for(cfg.dist.backend, _device(cfg)))
    return run_rank(cfg, run_dir, dist.get_rank(), world, quiet=quiet, resume_from=checkpoint_path, resume=True)
