"""The training loop: steps, evaluation, probes, logging, checkpoint/resume, divergence and signals.

Step s means "after s optimizer updates"; step 0 is the network at initialisation, evaluated and probed
so curves start where training does. The hot path does no host-device synchronisation: per-step losses
and logits stay on the device and are read back every READ_ROWS (10) log intervals, and always before an
evaluation, a probe or a checkpoint, and on a signal. That is also when divergence is detected, so a
diverged run trains past the step it records up to the next read (at most READ_ROWS * log_every - 1
steps, 99 by default), and no evaluation or probe ever sees a diverged network. The reads are scheduled by
step number (plus one at a signal, which checks the losses but not the weights), so an interrupted and
resumed run reads, detects and stops exactly where an uninterrupted one does.

Every torch call costs a few microseconds of dispatch here, against a ~1 ms step of the paper's network, so
the loop's own bookkeeping is kept to references per step (no op beyond two detaches) and a handful of
batched ops per read; `bnexp bench --only loop` measures what is left against a bare loop.

Reliability: checkpoints hold everything that determines the rest of the run (model, optimizer,
scheduler, the torch RNG, the data order, the probes, the pending loss interval), so an interrupted run
resumed from one is bit-identical to an uninterrupted run on CPU. A resumed run rewrites everything after
its checkpoint: TensorBoard purges those steps and metrics.jsonl drops those rows.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from bnexp import checkpoint, distributed, interrupt, kernel
from bnexp.config import Config, ConfigError, OptimConfig, to_yaml
from bnexp.errors import first_line
from bnexp.data import BatchSampler, Dataset, load_dataset
from bnexp.interrupt import Interrupted  # noqa: F401 - re-exported: callers catch bnexp.train.Interrupted
from bnexp.models import build_model
from bnexp.runs import (CONFIG, FINISHED, MetricsLog, RunDirError, create_run_dir, locked, read_status,
                        refuse_existing, versions, write_atomic, write_summary)


# Steps are read back every READ_ROWS log intervals, by step number, and at every evaluation, probe,
# checkpoint and signal. A read costs ~100 µs of cold code on the bench workload whether it covers 1 row
# or 10.
READ_ROWS = 10


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is available")
    return torch.device(name)


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    momentum = cfg.momentum if cfg.name == "momentum" else 0.0
    return torch.optim.SGD(params, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay)


def lr_factor(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr after `step` updates: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            span = max(1, total_steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
        if cfg.schedule == "step":
            return cfg.step_gamma ** (step // cfg.step_every)
        return 1.0

    return factor


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096,
             logits: torch.Tensor | None = None) -> tuple[float, float]:
    """Test loss and accuracy in eval mode (running statistics), the way the network is deployed.

    `logits`: the model's eval-mode outputs for x, when the caller has them already (the probes' eval
    pass makes the same forwards, over the same chunks): the figures are then the same without a forward.
    """
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for i in range(0, len(y), chunk):
        out = model(x[i:i + chunk]) if logits is None else logits[i:i + chunk]
        loss += F.cross_entropy(out, y[i:i + chunk], reduction="sum").double()
        correct += (out.argmax(1) == y[i:i + chunk]).sum()
    model.train(was_training)
    n = len(y)
    return loss.item() / n, correct.item() / n


class _Progress:
    """A rich progress bar on stderr (stdout is kept for the run directory's path)."""

    def __init__(self, total: int, start: int, quiet: bool):
        self.bar = None
        if quiet:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=False)
        self.task = self.bar.add_task("train", total=total, completed=start, info="")
        self.bar.start()

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _tb_writer(run_dir: Path, purge_step: int | None):
    from bnexp.events import EventWriter

    if purge_step is not None:
        _wait_for_a_later_event_file_name(run_dir)
    return EventWriter(run_dir, purge_step=purge_step)


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


def _base_layout() -> dict[str, dict[str, list]]:
    return {"train vs test": {"loss": ["Multiline", ["train/loss", "test/loss"]],
                              "accuracy": ["Multiline", ["train/accuracy", "test/accuracy"]]}}


def _merge_layouts(*layouts: dict) -> dict:
    merged: dict[str, dict] = {}
    for layout in layouts:
        for category, charts in layout.items():
            merged.setdefault(category, {}).update(charts)
    return merged


def _write_hparams(writer, cfg: Config, summary: dict[str, Any]) -> None:
    from torch.utils.tensorboard.summary import hparams

    hp = {"model.kind": cfg.model.kind, "model.norm": cfg.model.norm, "model.activation": cfg.model.activation,
          "data.dataset": cfg.data.dataset, "data.batch_size": cfg.data.batch_size, "optim.name": cfg.optim.name,
          "optim.lr": cfg.optim.lr, "seed": cfg.seed, "train.steps": cfg.train.steps}
    keys = ("test_accuracy", "best_test_accuracy", "gap_accuracy", "running_mean_err", "running_var_err")
    metrics = {f"hparam/{k}": float(summary[k]) for k in keys
               if isinstance(summary.get(k), (int, float)) and math.isfinite(summary[k])}
    # Written into this run's own event file (SummaryWriter.add_hparams would start a sub-run per call).
    for s in hparams(hp, metrics):
        writer.add_summary(s)
    for k, v in metrics.items():
        writer.add_scalar(k, v, summary["steps"])


class Trainer:
    """One run: owns the model, optimizer, data order and logs of a run directory."""

    def __init__(self, cfg: Config, run_dir: Path, data: Dataset, *, quiet: bool = True):
        self.cfg, self.run_dir, self.quiet = cfg, run_dir, quiet
        self.device = resolve_device(cfg.device)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.data = data.to(self.device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, data.input_shape, data.num_classes).to(self.device)
        self.model.train()
        # The module the training step calls (bnexp.distributed wraps it in DistributedDataParallel).
        self.train_model: nn.Module = self.model
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        self.scheduler = None
        if cfg.optim.schedule != "constant" or cfg.optim.warmup_steps:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                               lr_factor(cfg.optim, cfg.train.steps))
        # The data order has its own generator: probes and evaluation never draw from it.
        self.sampler = BatchSampler(len(data.y_train), cfg.data.batch_size, cfg.seed, self.device)
        # Probes and PreciseBN estimate population statistics from batches of the size BN normalizes over
        # (a process's shard under distributed local statistics), which is not always data.batch_size.
        self.bn_batch_size = distributed.bn_batch_size(cfg)
        stats_cfg = cfg if self.bn_batch_size == cfg.data.batch_size else cfg.model_copy(
            update={"data": cfg.data.model_copy(update={"batch_size": self.bn_batch_size})})
        self.probes = None
        if cfg.probes.enabled:
            from bnexp.probes import Probes

            self.probes = Probes(stats_cfg, self.model, self.data)
        self.precise = None  # PreciseBN: running statistics recomputed before evaluation (bnexp.precise)
        if cfg.model.bn.precise.when != "never":
            from bnexp.precise import PreciseStats

            self.precise = PreciseStats(stats_cfg, self.data)
        self.step = 0
        self.best_test_accuracy = float("-inf")
        self.last_eval: dict[str, float] = {}
        self.last_train_loss: float | None = None  # shown on the progress bar
        self.elapsed = 0.0  # wall time of earlier sessions of a resumed run
        # Every step not read back to the host yet, one entry per step, oldest first: the loss, and the
        # logits and batch indices whose correct predictions are counted for many steps at once (argmax,
        # compare and sum per step cost more than the rest of the loop's bookkeeping together). _correct
        # holds the counts of the steps already counted (one int64 vector), aligned with _losses; _outs and
        # _batches the steps after them. The indices are views of the sampler's permutation, where the
        # labels would be new tensors: keeping one more allocation per step alive measurably slowed the
        # allocator's reuse of the step's memory (the labels are indexed out again when counting).
        self._losses: list[torch.Tensor] = []
        self._outs: list[torch.Tensor] = []
        self._batches: list[torch.Tensor] = []
        self._correct = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._window: list[float] = []  # the last divergence_window losses, on the host
        # Steps read back and checked already whose row is not logged yet (the log interval in progress):
        # their losses and correct counts on the host.
        self._read_losses: list[float] = []
        self._read_hits: list[int] = []
        # Logged rows not written out yet, in step order, and those of them still waiting for their
        # train/loss and train/accuracy (with how many steps each averages). Code that runs once per row
        # after a step runs with cold caches, several times slower than the same code run again at once:
        # the steps are read back, checked for divergence and their rows written out ~READ_ROWS rows at a
        # time (_read_train_metrics), and always before an evaluation, a probe or a checkpoint.
        self._rows: list[tuple[int, dict[str, Any]]] = []
        self._unread: list[tuple[dict[str, Any], int]] = []
        # The weights, for the divergence check: detached aliases (no autograd on the check), fixed for the
        # run since the optimizer and load_state_dict update these very tensors in place.
        self._params = [p.detach() for p in self.model.parameters()]
        self.checkpoints = checkpoint.Writer(run_dir)

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "probes": None if self.probes is None else self.probes.state_dict(),
            "best_test_accuracy": self.best_test_accuracy,
            "last_eval": self.last_eval,
            "elapsed": self.elapsed + (time.perf_counter() - self._t0),
            "pending_losses": [t.cpu() for t in self._losses],
            "pending_correct": list(self._count_pending().cpu().unbind()),
            # float64 holds the float32 losses exactly
            "read_losses": torch.tensor(self._read_losses, dtype=torch.float64),
            "read_hits": torch.tensor(self._read_hits, dtype=torch.int64),
            "loss_window": torch.tensor(self._window, dtype=torch.float64),
        }

    def load_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        """load_state_dict for a file a user may have damaged or mixed up: a mismatch is a user error."""
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            first = first_line(err)
            raise checkpoint.CheckpointError(
                f"checkpoint {path} does not fit the run's config.yaml: {first}") from None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.probes is not None and state["probes"] is not None:
            self.probes.load_state_dict(state["probes"])
        self.best_test_accuracy = state["best_test_accuracy"]
        self.last_eval = dict(state["last_eval"])
        self.elapsed = state["elapsed"]
        self._losses = [t.to(self.device) for t in state["pending_losses"]]
        self._outs, self._batches = [], []
        self._correct = torch.tensor([int(t) for t in state["pending_correct"]], dtype=torch.int64,
                                     device=self.device)
        self._rows, self._unread = [], []
        self._read_losses = state["read_losses"].tolist() if "read_losses" in state else []
        self._read_hits = state["read_hits"].tolist() if "read_hits" in state else []
        self._window = state["loss_window"].to(torch.float64).tolist()

    # --- the loop ----------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        self._t0 = time.perf_counter()
        start = self.step
        with interrupt.catch_signals() as guard:
            # From here on the run directory is being written: a signal is recorded and acted on between
            # steps, never in the middle of a step, a checkpoint or a log row.
            guard.defer()
            # A resumed run rewrites everything after its checkpoint (all of it if it had none): TensorBoard
            # purges those steps and metrics.jsonl drops those rows, so nothing is doubled.
            self.writer = _tb_writer(self.run_dir, purge_step=(start + 1 if start else 0) if resume else None)
            self.metrics = MetricsLog(self.run_dir, resume_step=(start if start else -1) if resume else None)
            progress = _Progress(cfg.train.steps, start, self.quiet)
            status, diverged_step = "completed", None
            try:
                if start == 0:
                    # Once per run: a resumed run keeps the layout written at its step 0.
                    layout = _base_layout() if self.probes is None else _merge_layouts(_base_layout(),
                                                                                     self.probes.layout())
                    self.writer.add_custom_scalars(layout)
                    self._log_step(0, {})
                diverged_step = self._loop(start, guard.received, progress)
                if diverged_step is not None:
                    status = "diverged"
            except Interrupted:
                self._finish("interrupted", None)
                raise
            except BaseException:
                # A crash: the rows logged so far still reach the files (the error is what gets reported).
                with contextlib.suppress(Exception):
                    self._salvage_rows()
                with contextlib.suppress(Exception):
                    self.checkpoints.close()  # the last checkpoint handed over still reaches the disk
                raise
            finally:
                progress.close()
            return self._finish(status, diverged_step)

    def _loop(self, start: int, received: list[int], progress: _Progress) -> int | None:
        cfg, model, opt = self.cfg, self.model, self.optimizer
        x_all, y_all = self.data.x_train, self.data.y_train
        log_every, eval_every, ckpt_every = cfg.train.log_every, cfg.train.eval_every, cfg.train.checkpoint_every
        read_every = READ_ROWS * log_every
        for step in range(start + 1, cfg.train.steps + 1):
            if received:  # a signal after the last step's own check, or during start-up or the step-0 eval
                bad = self._read_train_metrics(weights=False)
                if bad is not None:
                    return bad
                self._interrupt(received[0])
            idx = self.sampler.next()
            x, y = x_all[idx], y_all[idx]
            out = self.train_model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            probing = self.probes is not None and self.probes.due(step)
            if probing:
                self.probes.after_backward(step, model)
            # The lr this update uses (a Python float, no sync); the scheduler moves it on after the step.
            self._step_lr = opt.param_groups[0]["lr"]
            opt.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self._losses.append(loss.detach())
            self._outs.append(out.detach())
            self._batches.append(idx)
            self.step = step

            last = step == cfg.train.steps
            row: dict[str, float] = {}
            logging = step % log_every == 0 or last
            if logging:
                # The row's train metrics are filled in when its steps are read back.
                row["train/loss"] = row["train/accuracy"] = None
                row["lr"] = self._step_lr
                # Its steps: those not read back or read but not in a row yet, less the waiting rows' own.
                steps = len(self._read_losses) + len(self._losses) - sum(k for _, k in self._unread)
                self._unread.append((row, steps))
            evaluating = step % eval_every == 0 or last
            checkpointing = step % ckpt_every == 0 or last
            # By step number, so that a resumed run reads (and checks the weights) where this one does.
            scheduled = evaluating or probing or checkpointing or step % read_every == 0
            if scheduled or received:
                bad = self._read_train_metrics(weights=scheduled)
                if bad is not None:
                    return bad
            if evaluating or probing:
                self._log_step(step, row, evaluate_now=evaluating, probe=probing)
            elif logging:
                self._write_row(step, row)
                if not self._unread:  # read at this step: every row is complete
                    self._write_rows()
            if logging or step % 50 == 0:
                progress.update(step, self._progress_info())
            if checkpointing or received:  # a signal may have arrived during this step's logging
                bad = self._read_train_metrics(weights=scheduled)
                if bad is not None:
                    return bad
                self._checkpoint()
            if received and not last:
                raise Interrupted(received[0], self.run_dir)
        return None

    def _interrupt(self, signum: int) -> None:
        self._checkpoint()
        raise Interrupted(signum, self.run_dir)

    def _checkpoint(self) -> None:
        # Every logged row up to this step must be on disk before the checkpoint is: a run resumed from it
        # rewrites only the steps after it (TensorBoard's writer would otherwise hold rows for up to 2 min).
        self._write_rows()
        self.writer.flush()
        self.checkpoints.save(self.step, self.state_dict())

    def _count_pending(self) -> torch.Tensor:
        """The pending steps' correct counts, one per step (their logits are dropped)."""
        if self._outs:
            labels = self.data.y_train[torch.stack(self._batches)]
            hits = kernel.count_hits(torch.stack(self._outs), labels)
            self._correct = torch.cat([self._correct, hits.to(self._correct.device)])
            self._outs, self._batches = [], []
        return self._correct

    def _read_train_metrics(self, weights: bool = False) -> int | None:
        """Read every step trained since the last read back to the host (one transfer), check them for
        divergence, and fill in the train/loss and train/accuracy of the rows waiting for them.

        On divergence, returns the first step that diverged, having logged its train/diverged row and
        dropped the rows from that step on: its loss was not finite or ended a window whose mean exceeds
        the limit (float32 cross-entropy via log-softmax rarely overflows; a blown-up network shows as a
        huge finite loss instead), or, with `weights`, the latest step's update made the weights
        non-finite (an earlier update's would show in a later loss). Nothing changes if the read fails.
        """
        n = len(self._losses)
        if not n and not self._unread:
            return None
        losses: list[float] = []
        hits: list[int] = []
        norms_finite = True
        if n:
            correct = self._count_pending()
            # Each weight tensor's 2-norm, in one fused op (torch.isfinite over every weight costs ~10x
            # more, the inf-norm ~15x): finite when all its weights are; read with the losses at once.
            norms = list(torch._foreach_norm(self._params, 2)) if weights and self._params else []
            host = torch.stack(self._losses + norms).tolist()
            hits = correct.tolist()
            losses, norms_finite = host[:n], all(map(math.isfinite, host[n:]))
        first_step = self.step - n + 1  # the step of losses[0]
        self._losses, self._correct = [], self._correct[:0]
        i = self._first_divergent(losses)
        if i is None and not norms_finite and not self._weights_finite():
            i = n - 1
        values, counts = self._read_losses + losses, self._read_hits + hits
        base = first_step - len(self._read_losses)  # the step of values[0]
        unread, self._unread = self._unread, []
        bad = None if i is None else first_step + i
        done = 0
        for row, k in unread:
            if bad is not None and base + done + k - 1 >= bad:
                break  # this row's interval holds the diverged step: it is dropped, as are the later ones
            self._fill(row, values[done:done + k], counts[done:done + k])
            done += k
        if bad is not None:
            self._rows = [(s, r) for s, r in self._rows if s < bad]
            self._read_losses, self._read_hits = [], []
            self._write_row(bad, {"train/diverged": 1.0, "train/loss": losses[i]})
            self._write_rows()
            return bad
        self._read_losses, self._read_hits = values[done:], counts[done:]
        if unread:
            self.last_train_loss = unread[-1][0]["train/loss"]
        return None

    def _fill(self, row: dict[str, Any], losses: list[float], hits: list[float]) -> None:
        row["train/loss"] = math.fsum(losses) / len(losses)
        row["train/accuracy"] = sum(hits) / (len(hits) * self.cfg.data.batch_size)

    def _weights_finite(self) -> bool:
        """The exact test, for when a norm is not finite: a norm overflows for huge but finite weights."""
        return all(bool(torch.isfinite(p).all()) for p in self._params)

    def _first_divergent(self, losses: list[float]) -> int | None:
        """Index of the first of `losses` (the newest steps) that is not finite or ends a full window of
        divergence_window steps whose mean loss exceeds the limit; the window moves on either way."""
        tc = self.cfg.train
        w = tc.divergence_window
        history = self._window + losses
        self._window = history[-w:]
        first = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if tc.divergence_factor is None:
            return first
        limit = tc.divergence_factor * math.log(self.data.num_classes)
        k0 = len(history) - len(losses)  # where losses start in history
        stop = len(losses) if first is None else first  # a step before the non-finite one
        # No window mean exceeds the largest loss in it: a healthy run stops at this one max().
        if stop == 0 or len(history) < w or max(history[max(0, k0 + 1 - w):k0 + stop]) <= limit:
            return first
        for i in range(stop):
            end = k0 + i + 1  # a window that would reach before step 1 is not full yet and never counts
            if end >= w and sum(history[end - w:end]) / w > limit:
                return i
        return first

    def _log_step(self, step: int, row: dict[str, float], evaluate_now: bool = True, probe: bool = True) -> None:
        if self.precise is not None and (evaluate_now or probe) and self.precise.due(step):
            self.precise.apply(self.model, step)
        probed, f_eval = {}, None
        if probe and self.probes is not None:
            # First: its eval-mode pass over the test set is the evaluation's forward too.
            from bnexp.probes import _CHUNK

            probed = self.probes.measure(step, self.model, self.writer)
            f_eval, self.probes.f_eval = self.probes.f_eval, None
        if evaluate_now:
            test_loss, test_acc = evaluate(self.model, self.data.x_test, self.data.y_test,
                                           **({} if f_eval is None else {"chunk": _CHUNK, "logits": f_eval}))
            row["test/loss"], row["test/accuracy"] = test_loss, test_acc
            self.last_eval = {"test_loss": test_loss, "test_accuracy": test_acc}
            if math.isfinite(test_loss):
                self.best_test_accuracy = max(self.best_test_accuracy, test_acc)
        row.update(probed)
        self._write_row(step, row)
        self._write_rows()

    def _salvage_rows(self) -> None:
        """After a crash: the rows logged so far still reach the files."""
        self._read_train_metrics()
        self._write_rows()
        self.writer.flush()

    def _write_row(self, step: int, row: dict[str, Any]) -> None:
        """Log a row. It reaches the files with the next batch: the next read (_read_train_metrics) and
        always before a checkpoint, so a resumed run's files are exactly as if it had not stopped."""
        self._rows.append((step, row))

    def _write_rows(self) -> None:
        """Write out the logged rows, up to the first that still waits for its train metrics."""
        waiting = {id(row) for row, _ in self._unread}
        ready = next((k for k, (_, row) in enumerate(self._rows) if id(row) in waiting), len(self._rows))
        if not ready:
            return
        rows, self._rows = self._rows[:ready], self._rows[ready:]
        for step, row in rows:
            self.writer.add_scalars(row, step)
        self.metrics.write_many([{"step": step, **row} for step, row in rows])

    def _progress_info(self) -> str:
        loss, acc = self.last_train_loss, self.last_eval.get("test_accuracy")
        parts = ([] if loss is None else [f"loss {loss:.4f}"]) + ([] if acc is None else [f"test acc {acc:.3f}"])
        return "  ".join(parts)

    def _finish(self, status: str, diverged_step: int | None) -> dict[str, Any]:
        cfg = self.cfg
        # An interrupted run's summary sends users to its checkpoint: the file must be on disk first.
        self.checkpoints.close()
        self._write_rows()
        if status != "interrupted" and (not self.last_eval or status == "diverged"):
            test_loss, test_acc = evaluate(self.model, self.data.x_test, self.data.y_test)
            self.last_eval = {"test_loss": test_loss, "test_accuracy": test_acc}
        summary: dict[str, Any] = {
            "status": status,
            "steps": diverged_step if diverged_step is not None else self.step,
            "test_accuracy": self.last_eval.get("test_accuracy"),
            "test_loss": self.last_eval.get("test_loss"),
            "best_test_accuracy": None if self.best_test_accuracy == float("-inf") else self.best_test_accuracy,
            "wall_time_s": self.elapsed + (time.perf_counter() - self._t0),
            "seed": cfg.seed,
            "name": cfg.name,
            "versions": versions(),
        }
        if diverged_step is not None:
            summary["diverged_step"] = diverged_step
        if self.probes is not None:
            summary.update(self.probes.summary())
        write_summary(self.run_dir, summary)
        if status != "interrupted":
            _write_hparams(self.writer, cfg, summary)
        self.writer.close()
        self.metrics.close()
        return summary


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
        first = first_line(err)
        raise ConfigError(f"model: this network cannot run on {cfg.data.dataset} inputs of shape "
                          f"{tuple(data.input_shape)}: {first}") from None
    return data


def start(cfg: Config, out: str | Path | None = None, *, quiet: bool = True) -> tuple[Path, dict[str, Any]]:
    """Validate, create a fresh run directory (cfg.out_dir/... or exactly `out`), train; return both."""
    if distributed.wanted(cfg):
        return distributed.start(cfg, out, quiet=quiet)
    if out is not None:
        refuse_existing(out)  # before the data loads: a mistake here should cost no time
    data = prepare(cfg)
    # From here a signal no longer aborts at once: the loop checkpoints and marks the run interrupted, so a
    # run directory is never left half-made.
    interrupt.defer()
    run_dir = create_run_dir(cfg.out_dir, cfg.name, cfg.seed, out)
    try:
        return run_dir, train(cfg, run_dir, quiet=quiet, data=data)
    except BaseException:
        # A failure before train wrote anything leaves the directory empty: remove it rather than leave an
        # empty run behind (rmdir refuses a directory that holds anything, so a started run is kept).
        with contextlib.suppress(OSError):
            run_dir.rmdir()
        raise


def train(cfg: Config, run_dir: Path, *, quiet: bool = True, data: Dataset | None = None) -> dict[str, Any]:
    """Train a fresh run in an existing, empty run directory."""
    run_dir = Path(run_dir)
    if distributed.wanted(cfg):
        return distributed.train(cfg, run_dir, quiet=quiet)
    data = prepare(cfg) if data is None else data
    with interrupt.catch_signals() as guard:
        guard.defer()
        # Built before the first file is written (it writes none itself): a failure here leaves the
        # directory as it was, not holding a config.yaml for a run that never started.
        trainer = Trainer(cfg, run_dir, data, quiet=quiet)
        with locked(run_dir):
            write_atomic(run_dir / CONFIG, to_yaml(cfg))
            write_summary(run_dir, {"status": "running", "steps": 0, "seed": cfg.seed, "name": cfg.name,
                                    "versions": versions()})
            return trainer.run()


def resume(run_dir: Path, *, quiet: bool = True) -> dict[str, Any]:
    """Continue an interrupted (or killed) run in its own directory, from its newest complete checkpoint.

    Nothing in the directory changes until every check has passed: a corrupted checkpoint or config is a
    one-line user error and no file is deleted.
    """
    from bnexp.config import load as load_config
    from bnexp.runs import is_run_dir

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory not found: {run_dir}")
    if not is_run_dir(run_dir):
        raise RunDirError(f"not a bnexp run directory (no config.yaml and summary.json): {run_dir}")
    # Under torchrun every rank runs this; rank 0 alone holds the lock (and writes the directory).
    with locked(run_dir) if distributed.env_rank() == 0 else contextlib.nullcontext():
        status = read_status(run_dir)
        if status in FINISHED:
            raise RunDirError(f"run {run_dir} already ended ({status}); nothing to resume")
        try:
            cfg = load_config(run_dir / CONFIG)
        except ConfigError as err:  # edited by hand, or written by a bnexp with other keys
            raise ConfigError(f"{run_dir / CONFIG}: {err}") from None
        found = checkpoint.list_checkpoints(run_dir)
        state = checkpoint.load(found[-1]) if found else None
        data = prepare(cfg)
        if distributed.wanted(cfg):
            return distributed.resume(cfg, run_dir, found[-1] if found else None, quiet=quiet)
        trainer = Trainer(cfg, run_dir, data, quiet=quiet)
        if state is not None:
            trainer.load_checkpoint(state, found[-1])
        # else: killed before its first checkpoint; the run starts over in place.
        return trainer.run(resume=True)
