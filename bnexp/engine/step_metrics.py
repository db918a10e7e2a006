"""Each training step's loss and correct-prediction count: kept on the device as the step leaves them,
read back to the host in batches (when bnexp.engine.schedule says), checked there for divergence, and
handed to the log rows that average them.

Every torch call costs a few microseconds of dispatch, against a ~1 ms step of the paper's network, so a
step only appends references (its loss, logits and batch indices) and a read does the counting, the
transfer and the checks for all the steps since the last one in a handful of ops. The batch indices are
views of the sampler's permutation, where labels would be new tensors: keeping one more allocation per
step alive measurably slowed the allocator's reuse of the step's memory.

Divergence: a step diverges when its loss is not finite, or when it ends a window of divergence_window
steps whose mean loss exceeds divergence_factor × the chance loss (ln(classes), a uniform guess's; for
regression the targets' variance, predicting their mean) for longer than BN's start-up spike lasts (a
sigmoid net at a too-high learning rate saturates in float32 rather than overflowing), or, on a read that
checks the weights, when the last step's update made a weight non-finite (an earlier update's shows in a
later loss).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from bnexp.config import TrainConfig


class Diverged(NamedTuple):
    step: int
    loss: float


class DivergenceCheck:
    """The window test over the losses read so far; its window is part of a checkpoint."""

    def __init__(self, cfg: TrainConfig, chance_loss: float):
        self.w = cfg.divergence_window
        self.limit = None if cfg.divergence_factor is None else cfg.divergence_factor * chance_loss
        self.window: list[float] = []  # the last w losses

    def first(self, losses: list[float]) -> int | None:
        """Index of the first of `losses` (the newest steps) that is not finite or ends a full window
        whose mean loss exceeds the limit; the window moves on either way."""
        w = self.w
        history = self.window + losses
        self.window = history[-w:]
        first = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if self.limit is None:
            return first
        k0 = len(history) - len(losses)  # where losses start in history
        stop = len(losses) if first is None else first  # a step before the non-finite one
        # No window mean exceeds the largest loss in it: a healthy run stops at this one max().
        if stop == 0 or len(history) < w or max(history[max(0, k0 + 1 - w):k0 + stop]) <= self.limit:
            return first
        for i in range(stop):
            end = k0 + i + 1  # a window that would reach before step 1 is not full yet and never counts
            if end >= w and sum(history[end - w:end]) / w > self.limit:
                return i
        return first


Reduce = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class StepMetrics:
    """The steps' losses and correct counts, between the step that made them and the row that logs them.

    `add` per step; `read` at the steps the schedule says; `take` per log row, for the steps it averages.
    `labels` are the training labels the logits are counted against (None for regression: nothing to
    count). `reduce` turns a process's values into the global batch's under data parallelism
    (bnexp.engine.parallel). A checkpoint holds the values read but not yet in a row (the log interval in
    progress) and the divergence window, never unread steps: the loop reads before it checkpoints.
    """

    def __init__(self, cfg: TrainConfig, labels: torch.Tensor | None, chance_loss: float, params,
                 reduce: Reduce | None = None):
        self.labels, self.reduce = labels, reduce
        self.divergence = DivergenceCheck(cfg, chance_loss)
        # The weights, for the check: detached aliases (no autograd on it), fixed for the run since the
        # optimizer and load_state_dict update these very tensors in place.
        self._params = [p.detach() for p in params]
        self._losses: list[torch.Tensor] = []  # steps not read back yet, oldest first
        self._outs: list[torch.Tensor] = []
        self._batches: list[torch.Tensor] = []
        self.losses: list[float] = []  # steps read back and not yet taken by a row, oldest first
        self.hits: list[int] = []

    def add(self, loss: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor) -> None:
        self._losses.append(loss.detach())
        if self.labels is not None:
            self._outs.append(logits.detach())
            self._batches.append(idx)

    def read(self, step: int, weights: bool) -> Diverged | None:
        """Read back every step not read yet (the newest being `step`) in one transfer and check them.

        On divergence, returns the first diverged step with its loss, and keeps only the values of the
        steps before it. Nothing changes if the read fails.
        """
        n = len(self._losses)
        if not n:
            return None
        losses = torch.stack(self._losses)
        if self.labels is not None:
            hits = (torch.stack(self._outs).argmax(-1) == self.labels[torch.stack(self._batches)]).sum(-1)
        else:
            hits = torch.zeros(n, dtype=torch.int64, device=losses.device)
        if self.reduce is not None:
            losses, hits = self.reduce(losses, hits)
        # Each weight tensor's 2-norm, in one fused op (torch.isfinite over every weight costs ~10x more,
        # the inf-norm ~15x): finite when all its weights are; read with the losses at once.
        norms = list(torch._foreach_norm(self._params, 2)) if weights and self._params else []
        host = torch.cat([losses, torch.stack(norms)]).tolist() if norms else losses.tolist()
        new_hits = hits.tolist()
        new_losses, norms_finite = host[:n], all(map(math.isfinite, host[n:]))
        self._losses, self._outs, self._batches = [], [], []
        i = self.divergence.first(new_losses)
        if i is None and not norms_finite and not self._weights_finite():
            i = n - 1
        if i is None:
            self.losses += new_losses
            self.hits += new_hits
            return None
        # The run stops at the diverged step: only the steps before it are left for their rows.
        self.losses += new_losses[:i]
        self.hits += new_hits[:i]
        return Diverged(step - n + 1 + i, new_losses[i])

    def _weights_finite(self) -> bool:
        """The exact test, for when a norm is not finite: a norm overflows for huge but finite weights."""
        return all(bool(torch.isfinite(p).all()) for p in self._params)

    def take(self, count: int) -> tuple[list[float], list[int]]:
        """The oldest `count` values read back: a row's steps."""
        losses, hits = self.losses[:count], self.hits[:count]
        del self.losses[:count], self.hits[:count]
        return losses, hits

    def state_dict(self) -> dict[str, Any]:
        if self._losses:
            raise RuntimeError("StepMetrics.state_dict with steps not read back: read first")
        # float64 holds the float32 losses exactly.
        return {"losses": torch.tensor(self.losses, dtype=torch.float64),
                "hits": torch.tensor(self.hits, dtype=torch.int64),
                "window": torch.tensor(self.divergence.window, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._losses, self._outs, self._batches = [], [], []
        self.losses = state["losses"].to(torch.float64).tolist()
        self.hits = [int(h) for h in state["hits"].tolist()]
        self.divergence.window = state["window"].to(torch.float64).tolist()
