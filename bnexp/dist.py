"""Several processes: where this one stands among them, and starting N of them on this machine.

`bnexp train --nproc N` starts its ranks with torch's own launcher, `elastic_launch` (the engine torchrun
is): the same worker code runs under `torchrun --nproc_per_node N -m bnexp.cli train ...`, on one machine
or several, with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set by whichever started it. What the ranks
do is bnexp.engine's (bnexp.engine.session, bnexp.engine.parallel); this module knows nothing of training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Seconds the launcher gives the ranks to checkpoint and exit after passing a signal on to them.
SHUTDOWN_TIMEOUT_S = 60


def under_launcher() -> bool:
    """This process is one rank of several started by torchrun, elastic_launch or a like launcher."""
    return all(k in os.environ for k in _LAUNCH_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def env_rank() -> int:
    """This process's rank as the launcher set it (0 when there is no launcher)."""
    return int(os.environ.get("RANK", "0")) if under_launcher() else 0


def env_world() -> int:
    return int(os.environ["WORLD_SIZE"]) if under_launcher() else 1


def backend_for(name: str, device: torch.device) -> str:
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return name


def init_process_group(backend: str, timeout_s: float = 600.0) -> None:
    """Join the group described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))


def destroy_process_group() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # a group broken by a dead peer, on the way out
            dist.destroy_process_group()


# --- launching N ranks on this machine ------------------------------------------------------------------

class RankFailure(Exception):
    """A rank raised or died. `message` is one line; `traceback` the rank's own, when it raised."""

    def __init__(self, rank: int, message: str, traceback: str = ""):
        super().__init__(f"rank {rank}: {message}")
        self.rank, self.message, self.traceback = rank, message, traceback


class LauncherSignalled(Exception):
    """The launching process received SIGINT or SIGTERM; the ranks were sent it too and have stopped."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RanksInterrupted(Exception):
    """Every rank that stopped early exited as interrupted (128 + SIGINT/SIGTERM): a signal reached the
    ranks, not the launcher."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _launcher_quiet_and_restored() -> Iterator[None]:
    """elastic_launch logs every failure with its traceback, installs its own signal handlers and sets an
    environment variable, for the life of the process: keep all three to the launch."""
    # Each of torch's elastic modules sets its own logger's level: quieting their parent is not enough.
    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")
    loggers = [logging.getLogger(name) for name in (*prefixes, *logging.root.manager.loggerDict)
               if name.startswith(prefixes)]
    levels = [lg.level for lg in loggers]
    handlers = {s: signal.getsignal(s) for s in (*_SIGNALS, signal.SIGHUP, signal.SIGQUIT)}
    env = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE")
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for s, h in handlers.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if env is None:
            os.environ.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)
        else:
            os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = env


def launch(entrypoint: Callable[..., Any], args: tuple, nproc: int) -> dict[int, Any]:
    """Run `entrypoint(*args)` in `nproc` fresh processes joined on a free loopback port; return each
    rank's return value.

    Raises RankFailure naming the rank that failed first (a rank whose own code failed, rather than one
    that saw its peer's connection close), LauncherSignalled when this process was sent SIGINT/SIGTERM
    (passed on to the ranks, which stop), RanksInterrupted when the ranks were.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    log_dir = tempfile.mkdtemp(prefix="bnexp-launch-")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"bnexp-{uuid.uuid4().hex}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn", signals_to_handle="SIGINT,SIGTERM",
                          logs_specs=DefaultLogsSpecs(log_dir=log_dir), shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    try:
        with _launcher_quiet_and_restored():
            return elastic_launch(config, entrypoint)(*args)
    except SignalException as sig:
        raise LauncherSignalled(int(sig.sigval)) from None
    except ChildFailedError as err:
        failures = sorted(err.failures.items())
        codes = {f.exitcode for _, f in failures}
        interrupted = {c - 128 for c in codes if c > 128 and c - 128 in _SIGNALS}
        if interrupted and len(interrupted) == len(codes):
            raise RanksInterrupted(min(interrupted)) from None
        raise _root_cause(failures, Path(log_dir)) from None
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


def _root_cause(failures: list, log_dir: Path) -> RankFailure:
    """The launcher reports the first rank it saw exit; when that one only lost its peer, the rank whose
    own code failed is found in the error files every rank that raised left under log_dir."""
    raised = {}
    for path in log_dir.glob("**/attempt_*/*/error.json"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            report = json.loads(path.read_text())["message"]
            raised[int(path.parent.name)] = RankFailure(int(path.parent.name),
                                                        str(report["message"]).strip().splitlines()[0],
                                                        str(report.get("extraInfo", {}).get("py_callstack", "")))
    own = [f for _, f in sorted(raised.items()) if not _peer_error(f)]
    if own:
        return own[0]
    rank, failure = failures[0]
    if rank in raised:
        return raised[rank]
    if failure.exitcode < 0:
        with contextlib.suppress(ValueError):
            return RankFailure(rank, f"killed by {signal.Signals(-failure.exitcode).name}")
    return RankFailure(rank, f"exited with status {failure.exitcode}")


def _peer_error(failure: RankFailure) -> bool:
    """A rank that failed because another one died (its collective saw the connection close)."""
    text = failure.message + failure.traceback
    return any(s in text for s in ("DistBackendError", "Connection closed by peer", "Connection reset by peer"))
