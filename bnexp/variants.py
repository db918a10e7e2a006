"""BN variants for BN's failure modes: Batch Renormalization and Ghost Batch Normalization.

Both are subclasses of our `BatchNormBase` (same constructor, parameters, buffers and state dict as
torch's BatchNorm*d, so probes, checkpoints and `bn_layers` treat them as BN) and differ from it only in
the training-mode forward, which each does in an explicit autograd Function with the paper's backward.
Eval mode is plain BN's: y = γ (x − running_mean) / sqrt(running_var + ε) + β.

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
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from bnexp.norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase, _update_running

__all__ = [
    "BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "BatchRenormTrainFunction",
    "GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "GhostBatchNormTrainFunction",
    "renorm_limits",
]


# --- shared pieces of the two Functions -------------------------------------------------------------------
# Both work on a (G, k, C, L) view of the input: G groups (virtual batches) of k rows, C channels, L
# positions; statistics are per (group, channel), over dims 1 and 3. Batch Renorm is the case G = 1.

_STAT_DIMS = (1, 3)


def _grouped(x: Tensor, groups: int) -> Tensor:
    return x.reshape(groups, x.shape[0] // groups, x.shape[1], -1)


def _normalize(xv: Tensor, eps: float, unbiased: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """x̂ of each group, and its per-(group, channel) mean, biased variance, 1/sqrt(var_norm + ε), count."""
    n = xv.shape[1] * xv.shape[3]
    var, mean = torch.var_mean(xv, _STAT_DIMS, correction=0, keepdim=True)
    var_norm = var * (n / (n - 1)) if unbiased else var
    invstd = (var_norm + eps).rsqrt()
    return (xv - mean) * invstd, mean, var, invstd, n


def _grad_input(g: Tensor, xhat: Tensor, scale: Tensor, n: int, unbiased: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's section-3 backward per group: scale · (g − mean g − c · x̂ · mean(g x̂)), c = n/(n−1) if the
    unbiased variance normalized, else 1. `scale` is ∂y/∂x̂ · invstd per (group, channel). Returns
    (∂ℓ/∂x, Σg, Σg·x̂), the sums per (group, channel)."""
    sum_g = g.sum(_STAT_DIMS, keepdim=True)
    sum_gx = (g * xhat).sum(_STAT_DIMS, keepdim=True)
    c = n / (n - 1) if unbiased else 1.0
    return scale * (g - sum_g / n - xhat * (sum_gx * (c / n))), sum_g, sum_gx


def _per_channel(p: Tensor | None) -> Tensor | None:
    return None if p is None else p.view(1, 1, -1, 1)


# --- Batch Renormalization ---------------------------------------------------------------------------------

class BatchRenormTrainFunction(Function):
    """Training-mode Batch Renorm. Returns (y, mean, var, r, d); all but y are non-differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
                running_var: Tensor, eps: float, r_max: float, d_max: float, unbiased: bool):
        xv = _grouped(x, 1)
        xhat, mean, var, invstd, n = _normalize(xv, eps, unbiased)
        inv_run = (running_var + eps).rsqrt().view(1, 1, -1, 1)
        r = (invstd.reciprocal() * inv_run).clamp(1.0 / r_max, r_max)
        d = ((mean - running_mean.view(1, 1, -1, 1)) * inv_run).clamp(-d_max, d_max)
        w, b = _per_channel(weight), _per_channel(bias)
        y = xhat * r + d
        if w is not None:
            y = y * w
        if b is not None:
            y = y + b
        ctx.save_for_backward(xhat, weight, invstd, r, d)
        ctx.n, ctx.unbiased = n, unbiased
        mean, var, r, d = (t.view(-1) for t in (mean, var, r, d))
        ctx.mark_non_differentiable(mean, var, r, d)
        return y.view_as(x), mean, var, r, d

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor, *_unused):
        xhat, weight, invstd, r, d = ctx.saved_tensors
        gv = _grouped(g, 1)
        # r and d are constants: ∂y/∂x̂ = γ r, so the input gradient is plain BN's scaled by r.
        scale = invstd * r if weight is None else invstd * r * _per_channel(weight)
        grad_x, sum_g, sum_gx = _grad_input(gv, xhat, scale, ctx.n, ctx.unbiased)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_w = (sum_gx * r + sum_g * d).view(-1) if need_w else None
        grad_b = sum_g.view(-1) if need_b else None
        return (grad_x.view_as(g) if need_x else None), grad_w, grad_b, None, None, None, None, None, None


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
        y, mean, var, _r, _d = BatchRenormTrainFunction.apply(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.eps, r_max, d_max,
            self.unbiased_normalize)
        _update_running(self.running_mean, self.running_var, mean, var, input.numel() // input.shape[1],
                        self._momentum_factor())
        return y


# --- Ghost Batch Normalization -----------------------------------------------------------------------------

class GhostBatchNormTrainFunction(Function):
    """BN of each of `groups` consecutive virtual batches. Returns (y, mean, var), the statistics (groups, C)
    and non-differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float,
                unbiased: bool):
        xv = _grouped(x, groups)
        xhat, mean, var, invstd, n = _normalize(xv, eps, unbiased)
        w, b = _per_channel(weight), _per_channel(bias)
        y = xhat if w is None else xhat * w
        if b is not None:
            y = y + b
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.n, ctx.unbiased, ctx.groups = n, unbiased, groups
        mean, var = mean.view(groups, -1), var.view(groups, -1)
        ctx.mark_non_differentiable(mean, var)
        return y.reshape(x.shape), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor, _g_mean, _g_var):
        xhat, weight, invstd = ctx.saved_tensors
        gv = _grouped(g, ctx.groups)
        scale = invstd if weight is None else invstd * _per_channel(weight)
        grad_x, sum_g, sum_gx = _grad_input(gv, xhat, scale, ctx.n, ctx.unbiased)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # γ and β are shared by the virtual batches: their gradients add up over the groups.
        grad_w = sum_gx.sum(0).view(-1) if need_w else None
        grad_b = sum_g.sum(0).view(-1) if need_b else None
        return (grad_x.reshape(g.shape) if need_x else None), grad_w, grad_b, None, None, None


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
        y, mean, var = GhostBatchNormTrainFunction.apply(input, self.weight, self.bias, groups, self.eps,
                                                         self.unbiased_normalize)
        if self.training and self.track_running_stats and self.running_mean is not None:
            # As `groups` sequential BN calls: count each virtual batch, then fold its statistics in.
            for j in range(groups):
                self.num_batches_tracked.add_(1)
                _update_running(self.running_mean, self.running_var, mean[j], var[j], per_group,
                                self._momentum_factor())
        return y


class BatchRenorm1d(BatchRenorm):
    """Over (N, C) or (N, C, L) input."""

    _accepted_ranks = BatchNorm1d._accepted_ranks


class BatchRenorm2d(BatchRenorm):
    """Over (N, C, H, W) input."""

    _accepted_ranks = BatchNorm2d._accepted_ranks


class BatchRenorm3d(BatchRenorm):
    """Over (N, C, D, H, W) input."""

    _accepted_ranks = BatchNorm3d._accepted_ranks


class GhostBatchNorm1d(GhostBatchNorm):
    """Over (N, C) or (N, C, L) input."""

    _accepted_ranks = BatchNorm1d._accepted_ranks


class GhostBatchNorm2d(GhostBatchNorm):
    """Over (N, C, H, W) input."""

    _accepted_ranks = BatchNorm2d._accepted_ranks


class GhostBatchNorm3d(GhostBatchNorm):
    """Over (N, C, D, H, W) input."""

    _accepted_ranks = BatchNorm3d._accepted_ranks


RENORM = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
GHOST = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d}
