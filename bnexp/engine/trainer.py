"""The training loop: steps, evaluation, probes, logging, checkpoints, divergence and signals.

Step s means "after s optimizer updates"; step 0 is the network at initialisation, evaluated and probed
so curves start where training does. What a step does besides training is decided by its number alone
(bnexp.engine.schedule), so an interrupted and resumed run reads back, evaluates, probes, checkpoints and
detects divergence exactly where an uninterrupted one does. The hot path makes no host-device
synchronisation: each step's loss and logits stay on the device until the next read
(bnexp.engine.step_metrics), which is also when divergence is noticed, so a diverged run trains past the
step it records up to the next read (at most READ_ROWS * log_every - 1 steps, 99 by default) and no
evaluation, probe or checkpoint ever sees a diverged network. A signal is acted on between steps: the run
reads back its steps (checking losses, not weights), checkpoints and stops.

Reliability: checkpoints hold everything that determines the rest of the run (model, optimizer,
scheduler, the torch RNG, the data order, the probes, the log interval in progress and the divergence
window), so an interrupted run resumed from one is bit-identical to an uninterrupted run on CPU. A resumed
run rewrites everything after its checkpoint (bnexp.engine.logs).

One process or one rank of several: the loop calls its strategy (bnexp.engine.parallel) for the module to
train, this process's share of the batch, signal agreement, the global batch's metrics and the context
evaluation runs in.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bnexp.config import Config, ConfigError
from bnexp.data import BatchSampler, CropFlip, Dataset
from bnexp.engine import checkpoint, signals
from bnexp.engine.logs import RunLogs
from bnexp.engine.optim import build_optimizer, build_scheduler
from bnexp.engine.parallel import SingleProcess
from bnexp.engine.progress import RunProgress
from bnexp.engine.rundir import versions, write_summary
from bnexp.engine.schedule import Schedule
from bnexp.engine.signals import Interrupted
from bnexp.engine.step_metrics import StepMetrics
from bnexp.errors import first_line
from bnexp.models import build_model
from bnexp.probes.population import CHUNK


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is available")
    return torch.device(name)


@torch.no_grad()
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = CHUNK,
             logits: torch.Tensor | None = None) -> tuple[float, float | None]:
    """Test loss and accuracy in eval mode (running statistics), the way the network is deployed; float
    targets `y` are a regression: its loss, and no accuracy (None).

    `logits`: the model's eval-mode outputs for x, when the caller has them already (the probes' eval
    pass makes the same forwards, over the same chunks of CHUNK rows): the figures are then the same
    without a forward.
    """
    was_training = model.training
    model.eval()
    regression = y.is_floating_point()
    loss_fn = F.mse_loss if regression else F.cross_entropy
    loss = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for i in range(0, len(y), chunk):
        out = model(x[i:i + chunk]) if logits is None else logits[i:i + chunk]
        loss += loss_fn(out, y[i:i + chunk], reduction="sum").double()
        if not regression:
            correct += (out.argmax(1) == y[i:i + chunk]).sum()
    model.train(was_training)
    n = y.numel()  # per target value: the training loss's mean (one per example for labels)
    return loss.item() / n, None if regression else correct.item() / n


# Keeps the augmentation's draws apart from the training order (seeded with cfg.seed) and the probes'.
AUGMENT_SEED_OFFSET = 0xA06_3E17


class Trainer:
    """One run: owns the model, optimizer, data order and logs of a run directory.

    `callbacks`: objects whose `after_step(trainer, step)` runs at the end of every step, after its
    logging and before the loop looks for a signal (tests use it to act at a given step).
    """

    def __init__(self, cfg: Config, run_dir: Path, data: Dataset, *, quiet: bool = True, strategy=None,
                 callbacks=()):
        self.cfg, self.run_dir, self.quiet = cfg, Path(run_dir), quiet
        self.strategy = strategy if strategy is not None else SingleProcess()
        self.callbacks = list(callbacks)
        self.device = resolve_device(cfg.device)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.data = data.to(self.device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, data.input_shape, data.num_classes).to(self.device)
        self.model.train()
        self.train_model = self.strategy.wrap(self.model)  # the module the training step calls
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        self.scheduler = build_scheduler(cfg.optim, self.optimizer, cfg.train.steps)
        # The data order has its own generator: probes and evaluation never draw from it.
        self.sampler = BatchSampler(len(data.y_train), cfg.data.batch_size, cfg.seed, self.device)
        self.probes = None
        if cfg.probes.enabled:
            from bnexp.probes import Probes

            self.probes = Probes(cfg, self.model, self.data)
        self.precise = None  # PreciseBN: running statistics recomputed before evaluation
        if cfg.model.bn.precise.when != "never":
            from bnexp.engine.precise import PreciseStats

            self.precise = PreciseStats(cfg, self.data)
        self.schedule = Schedule(cfg.train, None if self.probes is None else cfg.probes.every)
        self.regression = data.regression
        self.loss_fn = data.loss_function
        # The loss of predicting without learning: a uniform guess's, or the targets' mean for regression.
        chance = self.data.y_train.var(0).mean().item() if self.regression else math.log(data.num_classes)
        self.steps = StepMetrics(cfg.train, None if self.regression else self.data.y_train, chance,
                                 self.model.parameters(), self.strategy.reduce)
        self.augment = None
        if cfg.data.augment == "crop_flip":
            self.augment = CropFlip(cfg.seed + AUGMENT_SEED_OFFSET)
        self.logs = RunLogs(self.run_dir)
        self.checkpoints = checkpoint.Writer(self.run_dir)
        self.step = 0
        self.best_test_accuracy = float("-inf")
        self.best_test_loss = float("inf")  # reported for regression, where there is no accuracy
        self.last_eval: dict[str, float] = {}
        self.last_train_loss: float | None = None  # shown on the progress bar
        self.elapsed = 0.0  # wall time of earlier sessions of a resumed run
        self._t0 = time.perf_counter()

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": checkpoint.FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "probes": None if self.probes is None else self.probes.state_dict(),
            "train_metrics": self.steps.state_dict(),
            "best_test_accuracy": self.best_test_accuracy,
            "best_test_loss": self.best_test_loss,
            "augment": None if self.augment is None else self.augment.state_dict(),
            "last_eval": self.last_eval,
            "elapsed": self.elapsed + (time.perf_counter() - self._t0),
        }

    def load_checkpoint(self, path: Path) -> None:
        """Resume from a checkpoint file a user may have damaged or mixed up: a mismatch is a user error."""
        state = checkpoint.load(path)
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} does not fit the run's config.yaml: {first_line(err)}") from None

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
        self.steps.load_state_dict(state["train_metrics"])
        self.best_test_accuracy = state["best_test_accuracy"]
        self.best_test_loss = state.get("best_test_loss", float("inf"))  # absent before regression existed
        if self.augment is not None:
            self.augment.load_state_dict(state["augment"])
        self.last_eval = dict(state["last_eval"])
        self.elapsed = state["elapsed"]

    # --- the run -----------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train from self.step to train.steps; return the summary (also written to summary.json)."""
        self._t0 = time.perf_counter()
        start = self.step
        with signals.catch_signals() as guard:
            # From here on the run directory is being written: a signal is recorded and acted on between
            # steps, never in the middle of a step, a checkpoint or a log row.
            guard.defer()
            self.logs.open(resume_step=start if resume else None)
            progress = RunProgress(self.cfg.train.steps, start, self.quiet)
            try:
                if start == 0:
                    # Once per run: a resumed run keeps the layout and hparams session written at its step 0.
                    self.logs.start(self.cfg, self.regression, None if self.probes is None else self.probes.layout())
                    row: dict[str, Any] = {}
                    self.logs.log(0, row)
                    self._measure(0, row, evaluating=True, probing=True)
                    self.logs.write()
                diverged = self._stop_if_signalled(start, guard.received, checkpoint_due=False, read_due=False)
                if diverged is None:
                    diverged = self._train(start, guard.received, progress)
            except Interrupted:
                self._finish("interrupted")
                raise
            except BaseException:
                # A crash: the rows logged so far still reach the files (the error is what gets reported).
                with contextlib.suppress(Exception):
                    if self.strategy.reads_after_failure:
                        self._read(check_weights=False)
                    self.logs.write()
                    self.logs.flush()
                with contextlib.suppress(Exception):
                    self.checkpoints.close()  # the last checkpoint handed over still reaches the disk
                with contextlib.suppress(Exception):
                    self.logs.close()
                raise
            finally:
                progress.close()
            return self._finish("completed" if diverged is None else "diverged", diverged)

    def _train(self, start: int, received: list[int], progress: RunProgress) -> int | None:
        """The steps; returns the step the run diverged at, or None."""
        model, opt, scheduler, strategy = self.train_model, self.optimizer, self.scheduler, self.strategy
        x_all, y_all, loss_fn, augment = self.data.x_train, self.data.y_train, self.loss_fn, self.augment
        batch = self.cfg.data.batch_size
        train_row = ("train/loss",) if self.regression else ("train/loss", "train/accuracy")
        last = self.cfg.train.steps
        for step in range(start + 1, last + 1):
            due = self.schedule.due(step)
            idx = strategy.shard(self.sampler.next())
            x = x_all[idx]
            if augment is not None:  # the global batch's draws, split like its indices
                x = augment.apply(x, strategy.shard(augment.draw(batch)))
            out = model(x)
            loss = loss_fn(out, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if due.probe:
                self.probes.after_backward(step, self.model)
            lr = opt.param_groups[0]["lr"]  # the lr this update uses; the scheduler moves it on after
            opt.step()
            if scheduler is not None:
                scheduler.step()
            self.steps.add(loss, out, idx)
            self.step = step

            row: dict[str, Any] = {}
            if due.log:
                # Its train metrics are filled in when its steps are read back.
                row.update(dict.fromkeys(train_row))
                row["lr"] = lr
            if due.log or due.evaluate or due.probe:
                self.logs.log(step, row)
            if due.read and (diverged := self._read(check_weights=True)) is not None:
                return diverged
            if due.evaluate or due.probe:
                self._measure(step, row, evaluating=due.evaluate, probing=due.probe)
            if due.read:  # rows are complete only once their steps are read
                self.logs.write()
            if progress.shown and (due.log or step % 50 == 0):
                progress.update(step, self._progress_info())
            for callback in self.callbacks:
                callback.after_step(self, step)
            diverged = self._stop_if_signalled(step, received, due.checkpoint, due.read)
            if diverged is not None:
                return diverged
        return None

    def _stop_if_signalled(self, step: int, received: list[int], checkpoint_due: bool,
                           read_due: bool) -> int | None:
        """Checkpoint when due or when a signal arrived; stop for the signal (after the last step there
        is nothing left to stop). Returns the diverged step if the read before the checkpoint finds one."""
        sig = self.strategy.stop_signal(step, received)
        if not (checkpoint_due or sig):
            return None
        # A read before every checkpoint: a signal's read checks the losses only (the weights only at
        # scheduled reads), so an interrupted and resumed run diverges where an uninterrupted one does.
        diverged = self._read(check_weights=read_due)
        if diverged is not None:
            return diverged
        self._checkpoint()
        if sig and step != self.cfg.train.steps:
            raise Interrupted(sig, self.run_dir)
        return None

    def _read(self, check_weights: bool) -> int | None:
        """Read back the steps not read yet, and give the rows waiting for them their train/loss and
        train/accuracy. On divergence, log it at its step (dropping the rows from there on) and return it."""
        diverged = self.steps.read(self.step, check_weights)
        if diverged is not None:
            self.logs.drop_from(diverged.step)
        log_every, m = self.cfg.train.log_every, self.cfg.data.batch_size
        for step, row in self.logs.waiting():
            # A row averages the steps since the previous log step.
            losses, hits = self.steps.take(step - (step - 1) // log_every * log_every)
            row["train/loss"] = math.fsum(losses) / len(losses)
            if not self.regression:
                row["train/accuracy"] = sum(hits) / (len(hits) * m)
            self.last_train_loss = row["train/loss"]
        if diverged is None:
            return None
        self.logs.log(diverged.step, {"train/diverged": 1.0, "train/loss": diverged.loss})
        self.logs.write()
        return diverged.step

    def _measure(self, step: int, row: dict[str, Any], evaluating: bool, probing: bool) -> None:
        """Evaluate and probe the network of `step` into its logged `row`."""
        with self.strategy.measuring(self.model):
            if self.precise is not None and self.precise.due(step):
                self.precise.apply(self.model, step)
            probed, f_eval = {}, None
            if probing and self.probes is not None:
                # First: its eval-mode pass over the test set is the evaluation's forward too.
                probed = self.probes.measure(step, self.model, self.logs, lr=self.optimizer.param_groups[0]["lr"])
                f_eval, self.probes.f_eval = self.probes.f_eval, None
            if evaluating:
                test_loss, test_acc = evaluate(self.model, self.data.x_test, self.data.y_test, logits=f_eval)
                row["test/loss"] = test_loss
                if test_acc is not None:
                    row["test/accuracy"] = test_acc
                self.last_eval = {"test_loss": test_loss, "test_accuracy": test_acc}
                if math.isfinite(test_loss):
                    self.best_test_loss = min(self.best_test_loss, test_loss)
                    if test_acc is not None:
                        self.best_test_accuracy = max(self.best_test_accuracy, test_acc)
        row.update(probed)

    def _checkpoint(self) -> None:
        # Every logged row up to this step must be on disk before the checkpoint is: a run resumed from it
        # rewrites only the steps after it.
        self.logs.write()
        self.logs.flush()
        self.checkpoints.save(self.step, self.state_dict())

    def _progress_info(self) -> str:
        loss, acc = self.last_train_loss, self.last_eval.get("test_accuracy")
        parts = ([] if loss is None else [f"loss {loss:.4f}"]) + ([] if acc is None else [f"test acc {acc:.3f}"])
        return "  ".join(parts)

    def _finish(self, status: str, diverged_step: int | None = None) -> dict[str, Any]:
        cfg = self.cfg
        # An interrupted run's summary sends users to its checkpoint: the file must be on disk first.
        self.checkpoints.close()
        self.logs.write()
        if status != "interrupted" and (not self.last_eval or status == "diverged"):
            test_loss, test_acc = evaluate(self.model, self.data.x_test, self.data.y_test)
            self.last_eval = {"test_loss": test_loss, "test_accuracy": test_acc}
        summary: dict[str, Any] = {
            "status": status,
            "steps": diverged_step if diverged_step is not None else self.step,
            "test_accuracy": self.last_eval.get("test_accuracy"),
            "test_loss": self.last_eval.get("test_loss"),
            "best_test_accuracy": None if self.best_test_accuracy == float("-inf") else self.best_test_accuracy,
            **({"best_test_loss": None if self.best_test_loss == float("inf") else self.best_test_loss}
               if self.regression else {}),
            "wall_time_s": self.elapsed + (time.perf_counter() - self._t0),
            "seed": cfg.seed,
            "name": cfg.name,
            "versions": versions(),
        }
        if diverged_step is not None:
            summary["diverged_step"] = diverged_step
        if self.probes is not None:
            summary.update(self.probes.summary())
        if status != "interrupted":
            self.logs.end(status, summary["steps"])
        # The summary last: a run whose summary says it ended has every other file complete (a failed
        # write before it leaves a run that --resume finishes).
        self.logs.close()
        write_summary(self.run_dir, summary)
        return summary

