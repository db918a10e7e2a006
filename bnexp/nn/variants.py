"""BN variants for BN's failure modes: Batch Renormalization and Ghost Batch Normalization.

Both are subclasses of our `BatchNormBase` (parameters, buffers and state dict as torch's BatchNorm*d, so
probes, checkpoints and `bn_layers` treat them as BN). Their constructor is the base's without `stats` and
`process_group`, plus keyword-only options of their own: they always normalize by this process's batch
(the config refuses `stats: global` with a variant). They differ from plain BN only in the training-mode
forward, which each builds on plain BN's training forward (batchnorm.batch_norm_train) and so on its
Section-3 backward. Eval mode is plain BN's: y = γ (x − running_mean) / sqrt(running_var + ε) + β.

Batch Renormalization (Ioffe 2017, Algorithm 1):

    r = clip(sqrt(σ²_B + ε) / sqrt(running_var + ε), 1/r_max, r_max)
    d = clip((μ_B − running_mean) / sqrt(running_var + ε), −d_max, d_max)
    y = γ (x̂ r + d) + β

with r and d computed from the running statistics *before* this batch updates them, and treated as
constants in backward (the paper's stop_gradient): ∂ℓ/∂x = r · (plain BN's ∂ℓ/∂x), ∂ℓ/∂γ = Σ g (x̂ r + d).
Unclipped, x̂ r + d = (x − running_mean) / sqrt(running_var + ε): the training output is the inference
output, which is the point. The running statistics are updated as in plain BN (running_var with the
unbiased batch variance; the paper moves σ instead, we keep one convention across the project).
The schedule of r_max and d_max needs the training step: the layer reads it from its own
`num_batches_tracked` (batches seen in training mode before this one), which equals the optimizer step in
bnexp's loop, survives checkpoints and needs no change to the training code.

Ghost Batch Normalization (Hoffer et al. 2017): the batch of N is split, in order, into N/k virtual batches
of k = ghost_batch_size, and each is normalized by its own statistics; the gradient is that of BN applied to
each virtual batch. The running statistics are updated once per virtual batch, in order, exactly as
N/k sequential calls of plain BN would (so `num_batches_tracked` counts virtual batches, and momentum=None
averages over them).

With `unbiased_normalize` both normalize by s² = m/(m−1)·σ²_B, as our BN layer does (and Batch Renorm's r
uses the same s², so that x̂ r + d stays the inference-mode normalization).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnexp.nn.batchnorm import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase, _channel_view,
                                _update_running, batch_norm_train)

__all__ = [
    "BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "batch_renorm_train", "renorm_factors",
    "GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "ghost_batch_norm_train",
    "renorm_limits",
]


# --- Batch Renormalization ---------------------------------------------------------------------------------

@torch.no_grad()
def renorm_factors(mean: Tensor, var: Tensor, m: int, running_mean: Tensor, running_var: Tensor, eps: float,
                   r_max: float, d_max: float, unbiased: bool) -> tuple[Tensor, Tensor]:
    """Per-channel r and d from a batch's mean and biased variance over m values, and the running statistics.

    Outside autograd: they are the paper's stop_gradient constants.
    """
    var_norm = var * (m / (m - 1)) if unbiased else var
    inv_run = (running_var + eps).rsqrt_()
    r = (var_norm + eps).sqrt_().mul_(inv_run).clamp_(1.0 / r_max, r_max)
    d = (mean - running_mean).mul_(inv_run).clamp_(-d_max, d_max)
    return r, d


def batch_renorm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
                       running_var: Tensor, eps: float, r_max: float, d_max: float,
                       unbiased: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode Batch Renorm, running statistics left alone: (y, mean, var), the last two plain BN's.

    y = x̂·(γr) + (β + γd) with x̂ from plain BN's Function: r and d are constants, so autograd through this
    affine map gives the paper's gradients, ∂ℓ/∂x̂ = γr·g and ∂ℓ/∂γ = Σ g (x̂ r + d).
    """
    xhat, mean, var = batch_norm_train(x, None, None, eps, unbiased)
    r, d = renorm_factors(mean, var, x.numel() // x.shape[1], running_mean, running_var, eps, r_max, d_max,
                          unbiased)
    scale, shift = (r, d) if weight is None else (weight * r, weight * d)
    if bias is not None:
        shift = shift + bias
    cv = _channel_view(x)
    return torch.addcmul(shift.view(cv), xhat, scale.view(cv)), mean, var


def renorm_limits(step: int, r_max: float, d_max: float, warmup_steps: int, r_max_steps: int,
                  d_max_steps: int) -> tuple[float, float]:
    """(r_max, d_max) for the training batch that follows `step` earlier ones: (1, 0) while step <
    warmup_steps, then linear to the final values at r_max_steps and d_max_steps (Ioffe 2017, section 4)."""

    def ramp(end: int) -> float:
        if step < warmup_steps:
            return 0.0
        if end <= warmup_steps:
            return 1.0
        return min(1.0, (step - warmup_steps) / (end - warmup_steps))

    return 1.0 + (r_max - 1.0) * ramp(r_max_steps), d_max * ramp(d_max_steps)


class BatchRenorm(BatchNormBase):
    """Batch Renormalization (Ioffe 2017); see the module docstring.

    Keyword-only options beyond BatchNormBase's: the final `r_max`, `d_max` and the schedule in training
    steps. With the defaults of 0 steps the limits are the final ones from the first batch. Without
    running statistics (track_running_stats=False) there is nothing to renormalize against: plain BN.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 running_var_init: float = 1.0, unbiased_normalize: bool = False, r_max: float = 3.0,
                 d_max: float = 5.0, warmup_steps: int = 0, r_max_steps: int = 0, d_max_steps: int = 0) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         running_var_init=running_var_init, unbiased_normalize=unbiased_normalize)
        if r_max < 1 or d_max < 0:
            raise ValueError(f"need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.r_max_steps, self.d_max_steps = warmup_steps, r_max_steps, d_max_steps

    def limits(self, step: int) -> tuple[float, float]:
        return renorm_limits(step, self.r_max, self.d_max, self.warmup_steps, self.r_max_steps, self.d_max_steps)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
                f"r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}")

    def forward(self, input: Tensor) -> Tensor:
        renorm = self.training and self.track_running_stats and self.running_mean is not None
        if not renorm or input.numel() == 0:
            return super().forward(input)  # eval mode, no running statistics, or an empty batch: plain BN
        self._check_input(input)
        self._check_batch(input.size(), True)
        r_max, d_max = self.limits(int(self.num_batches_tracked))
        self.num_batches_tracked.add_(1)
        # r and d come from the running statistics before this batch updates them.
        y, mean, var = batch_renorm_train(input, self.weight, self.bias, self.running_mean, self.running_var,
                                          self.eps, r_max, d_max, self.unbiased_normalize)
        _update_running(self.running_mean, self.running_var, mean, var, input.numel() // input.shape[1],
                        self._momentum_factor())
        return y


# --- Ghost Batch Normalization -----------------------------------------------------------------------------

def ghost_batch_norm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
                           unbiased: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Plain BN of each of `groups` consecutive virtual batches of x: (y, mean, var), the statistics (groups, C).

    The virtual batches become channels: (N, C, *) as (G, k, C, *), then as one k-row batch of G·C channels,
    so that plain BN does all of them in one call (measured 1.7-2x faster than a Function of its
    own over a grouped view). γ and β are repeated per virtual batch; repeat's backward adds their gradients
    up over the groups, as the virtual batches share them.
    """
    n, c, rest = x.shape[0], x.shape[1], x.shape[2:]
    k = n // groups
    folded = x.reshape(groups, k, c, *rest).transpose(0, 1).reshape(k, groups * c, *rest)
    weight = None if weight is None else weight.repeat(groups)
    bias = None if bias is None else bias.repeat(groups)
    y, mean, var = batch_norm_train(folded, weight, bias, eps, unbiased)
    y = y.reshape(k, groups, c, *rest).transpose(0, 1).reshape(x.shape)
    return y, mean.view(groups, c), var.view(groups, c)


class GhostBatchNorm(BatchNormBase):
    """Ghost Batch Normalization (Hoffer et al. 2017); see the module docstring.

    `ghost_batch_size` (keyword-only, required) is the virtual batch size k. A batch of N > k must be a
    multiple of k; a batch of N <= k is one virtual batch (plain BN), so eval-style passes over a small
    remainder still work. Whenever batch statistics are used (training, or eval without running
    statistics) they are the virtual batches'.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 running_var_init: float = 1.0, unbiased_normalize: bool = False,
                 ghost_batch_size: int) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         running_var_init=running_var_init, unbiased_normalize=unbiased_normalize)
        if int(ghost_batch_size) < 1:
            raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}")
        self.ghost_batch_size = int(ghost_batch_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"

    def groups(self, n: int) -> int:
        k = self.ghost_batch_size
        if n <= k:
            return 1
        if n % k:
            raise ValueError(f"GhostBatchNorm: batch size {n} is not a multiple of ghost_batch_size {k}")
        return n // k

    def forward(self, input: Tensor) -> Tensor:
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats or input.numel() == 0:
            return super().forward(input)  # eval mode with running statistics, or an empty batch
        self._check_input(input)
        groups = self.groups(input.shape[0])
        per_group = input.numel() // input.shape[1] // groups
        self._check_batch(input.size(), True, rows=input.shape[0] // groups)
        y, mean, var = ghost_batch_norm_train(input, self.weight, self.bias, groups, self.eps,
                                              self.unbiased_normalize)
        if self.training and self.track_running_stats and self.running_mean is not None:
            # As `groups` sequential BN calls: count each virtual batch, then fold its statistics in.
            for j in range(groups):
                self.num_batches_tracked.add_(1)
                _update_running(self.running_mean, self.running_var, mean[j], var[j], per_group,
                                self._momentum_factor())
        return y


# Plain BN's class second in the bases gives the accepted input ranks through the MRO, in one place.
class BatchRenorm1d(BatchRenorm, BatchNorm1d):
    """Over (N, C) or (N, C, L) input."""


class BatchRenorm2d(BatchRenorm, BatchNorm2d):
    """Over (N, C, H, W) input."""


class BatchRenorm3d(BatchRenorm, BatchNorm3d):
    """Over (N, C, D, H, W) input."""


class GhostBatchNorm1d(GhostBatchNorm, BatchNorm1d):
    """Over (N, C) or (N, C, L) input."""


class GhostBatchNorm2d(GhostBatchNorm, BatchNorm2d):
    """Over (N, C, H, W) input."""


class GhostBatchNorm3d(GhostBatchNorm, BatchNorm3d):
    """Over (N, C, D, H, W) input."""


RENORM = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
GHOST = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d}
