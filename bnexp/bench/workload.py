"""The benchmark workload, and the two contenders of the loop and memory sections.

The workload is the paper's MNIST network (784-100-100-100-10, sigmoid, BN before the nonlinearity, batch
60, SGD lr 0.5) on `data.dataset: synthetic` with 784 features and 10 classes and the default dataset's
sizes (1,440 train / 360 test points): MNIST's per-step work, generated in memory.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bnexp.config import Config, validate
from bnexp.data import Dataset
from bnexp.engine.optim import build_optimizer
from bnexp.engine.trainer import Trainer
from bnexp.models import build_model


def paper_mlp_config(*, probes: bool = False, steps: int = 2000, norm: str | None = None) -> Config:
    """The paper's MNIST MLP on 784-feature synthetic data; every interval at its default."""
    return validate({
        "name": "bench",
        "device": "cpu",
        "data": {"dataset": "synthetic", "batch_size": 60,
                 # The default dataset's sizes (digits: 1,797 images, 20 % test) at MNIST's width: 1,440
                 # train and 360 test points. The cost of each evaluation and probe grows with the test
                 # set, so this is the figure for the default data; MNIST's 10,000 test points every 100
                 # steps would take up to a third of the run whatever the loop does.
                 "synthetic": {"num_samples": 1800, "num_features": 784, "num_classes": 10}},
        "model": {"kind": "mlp", "hidden": [100, 100, 100], "activation": "sigmoid",
                  "norm": norm or "bnexp"},
        "train": {"steps": steps},
        "probes": {"enabled": probes},
    })


class BareLoop:
    """A hand-written training loop: index a batch, forward, cross-entropy, zero_grad, backward, step.

    Nothing else. Same model and optimizer builders, seed, in-memory tensors and batch order as the
    Trainer, so both train the very same network (tests check the weights agree bit for bit). It keeps
    its place between calls, so its steps can be interleaved with a Trainer's in short chunks.
    """

    def __init__(self, cfg: Config, data: Dataset):
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, data.input_shape, data.num_classes)
        self.model.train()
        self.opt = build_optimizer(cfg.optim, self.model.parameters())
        self.x, self.y, self.m = data.x_train, data.y_train, cfg.data.batch_size
        # The batch order of bnexp.data.BatchSampler, written out: a seeded permutation per epoch, tail dropped.
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.perm, self.pos = torch.empty(0, dtype=torch.int64), len(self.y)

    def run(self, steps: int, on_step: Callable[[], None] | None = None) -> float:
        """Train `steps` steps; return the seconds they took. `on_step()` runs before each (untimed use)."""
        model, opt, x_all, y_all, m, n = self.model, self.opt, self.x, self.y, self.m, len(self.y)
        t0 = time.perf_counter()
        for _ in range(steps):
            if on_step is not None:
                on_step()
            if self.pos + m > n:
                self.perm, self.pos = torch.randperm(n, generator=self.gen), 0
            idx = self.perm[self.pos:self.pos + m]
            self.pos += m
            out = model(x_all[idx])
            loss = F.cross_entropy(out, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0


def run_trainer(cfg: Config, data: Dataset, steps: int, on_draw: Callable[[int], None],
                keep: dict | None = None) -> None:
    """`bnexp train`'s loop (Trainer.run in a temporary run directory) for `steps` steps.

    `on_draw(k)` is called where the loop draws the batch of step k, before the draw: the clock marks of
    the loop section and the RSS samples of the memory section are taken there, inside the run, so
    set-up and the final summary can be left out of a window while every log row, evaluation, probe and
    checkpoint inside it counts, as in a real run.
    """
    cfg = cfg.model_copy(deep=True)
    cfg.train.steps = steps
    with tempfile.TemporaryDirectory(prefix="bnexp-bench-") as tmp:
        trainer = Trainer(cfg, Path(tmp), data, quiet=True)
        draw = trainer.sampler.next
        count = 0

        def hooked_next() -> torch.Tensor:
            nonlocal count
            count += 1
            on_draw(count)
            return draw()

        trainer.sampler.next = hooked_next  # instance attribute: shadows the method for this run only
        trainer.run()
        on_draw(steps + 1)  # the run is over; what it holds is still alive
        if keep is not None:  # for tests: the trained model and the run's summary
            keep.update(model=trainer.model, summary=json.loads((Path(tmp) / "summary.json").read_text()))


def interleaved(cfg: Config, data: Dataset, warmup: int, chunk: int, chunks: int) -> tuple[list[float], list[float]]:
    """Seconds per chunk of `chunk` steps for the Trainer and a bare loop, alternating chunk by chunk.

    A bare chunk runs at each chunk boundary of the Trainer's run, between two clock marks, so each
    Trainer chunk has a bare chunk next to it in time: load from other processes drifts over seconds and
    hits both alike. Both first run `warmup` untimed steps.
    """
    bare = BareLoop(cfg, data)
    trainer_s: list[float] = []
    bare_s: list[float] = []
    mark = 0.0

    def on_draw(k: int) -> None:
        nonlocal mark
        j, rem = divmod(k - warmup - 1, chunk)
        if k <= warmup or rem or j > chunks:
            return
        if j > 0:
            trainer_s.append(time.perf_counter() - mark)
        if j == 0:
            bare.run(warmup)
        if j < chunks:
            bare_s.append(bare.run(chunk))
        mark = time.perf_counter()

    run_trainer(cfg, data, warmup + chunk * chunks + 1, on_draw)
    return trainer_s, bare_s
