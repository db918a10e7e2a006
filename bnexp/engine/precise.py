"""Precise population statistics (PreciseBN, Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm").

The moving average of batch statistics lags: it mixes statistics of weights the network no longer has.
PreciseBN replaces it, at evaluation time, by the population estimate of the current network: K training
batches of the training batch size m through the network in training mode (no running statistic touched),
then Algorithm 2's

    running_mean ← mean_B μ_B          running_var ← m/(m−1) · mean_B σ²_B

for every BN layer at once. This is exactly the probes' population statistics (bnexp.probes.
population_statistics, the same code), only on batches of its own.

The K batches are drawn like training batches (bnexp.data.BatchSampler) by a generator seeded from the
run's seed and the step, never from the training data order or the torch RNG: recomputing changes no
random stream, and a resumed run draws the same batches. (Plain and Ghost BN never read the running
statistics in training, so their training is unchanged; Batch Renorm does, so with it PreciseBN also
changes what r and d are measured against, as it should.) `num_batches_tracked` is left alone (Batch
Renorm's schedule reads it). With `when: eval` the estimate overwrites the moving average before every
evaluation and probe measurement, and the moving average carries on from it (as pycls's precise BN
does); with `when: end` once, after the last step, before the final evaluation and checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from bnexp.config import Config
from bnexp.data import BatchSampler, Dataset
from bnexp.models import bn_layers
from bnexp.nn.noisy import paused_noise
from bnexp.probes import population_statistics

# Keeps these batches apart from the training order (seeded with cfg.seed) and the probes' sets.
_SEED_OFFSET = 0x9EC15E


@torch.no_grad()
def recompute(model: nn.Module, x: torch.Tensor, batches: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Set every BN layer's running statistics to the population estimate from the (K, m) index `batches`
    of `x`; return the estimates (float64) by layer name."""
    pop = population_statistics(model, x, batches)
    for name, bn in bn_layers(model).items():
        if getattr(bn, "running_mean", None) is None or name not in pop:
            continue  # no running estimates to replace (track_running_stats=False)
        bn.running_mean.copy_(pop[name]["mean"])
        bn.running_var.copy_(pop[name]["var"])
    return pop


class PreciseStats:
    """The training loop's PreciseBN: `due(step)` says when, `apply(model, step)` recomputes."""

    def __init__(self, cfg: Config, data: Dataset):
        precise = cfg.model.bn.precise
        # The batch BN normalizes over in training (a process's shard under distributed local statistics).
        self.when, self.k, self.m = precise.when, precise.batches, cfg.bn_batch_size
        self.seed, self.last_step = cfg.seed, cfg.train.steps
        self.x = data.x_train

    def due(self, step: int) -> bool:
        return self.when == "eval" or (self.when == "end" and step == self.last_step)

    def batches(self, step: int) -> torch.Tensor:
        """(K, m) training indices for `step`: a function of (seed, step) alone, so nothing to checkpoint."""
        seed = ((self.seed + _SEED_OFFSET) * 1_000_003 + step) % (2 ** 63)
        sampler = BatchSampler(len(self.x), self.m, seed, self.x.device)
        return torch.stack([sampler.next() for _ in range(self.k)])

    def apply(self, model: nn.Module, step: int) -> dict[str, dict[str, torch.Tensor]]:
        with paused_noise(model):  # no draw from noisy BN's generator: training's noise is unchanged
            return recompute(model, self.x, self.batches(step))
