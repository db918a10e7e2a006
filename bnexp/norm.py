"""Batch normalization written from general tensor operations (Ioffe & Szegedy 2015, Algorithms 1 and 2).

Drop-in for ``torch.nn.BatchNorm1d/2d/3d``: same constructor, parameter and buffer names, state-dict
format (``_version = 2``) and errors, but no call into torch's batch-norm kernels, and a hand-written
backward (the paper's Section 3 gradients) in explicit ``torch.autograd.Function`` s.

Conventions are those of DESIGN.md section 1: normalize with the biased batch variance, update
``running_var`` with the unbiased one, ``momentum`` is the weight of the new batch (PyTorch's), and
``momentum=None`` is the cumulative average over ``num_batches_tracked``.

Performance notes (see bnexp/bench_layer.py for the measurements): every full-size tensor we allocate
costs more than a pass over one that exists (fresh pages fault in), so forward allocates only ``y`` and
backward only ``dx``. The centred input ``x - mean`` is written straight into that buffer, reduced there
(two-pass variance: no cancellation for inputs with a large mean), and then turned into the result in
place with per-channel coefficients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable
from torch.nn import init

__all__ = [
    "BatchNormBase",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormTrainFunction",
    "BatchNormEvalFunction",
]


def _channel_view(x: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against ``x`` (channels on dim 1)."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _sum_of_products(a: Tensor, b: Tensor, dims: list[int]) -> Tensor:
    """Per-channel sum of a*b without materialising the full-size product."""
    if a.dim() == 2:
        # (N, C): reduce over rows. vecdot along dim 0 is one strided pass with no temporary.
        return torch.linalg.vecdot(a, b, dim=0)
    n, c = a.shape[0], a.shape[1]
    if a.is_contiguous() and b.is_contiguous():
        # Contiguous NC*: each (n, c) plane is a contiguous row, so the inner dot is a fast
        # vectorised reduction and only an (N, C) partial result is left to sum.
        return torch.linalg.vecdot(a.view(n, c, -1), b.view(n, c, -1), dim=2).sum(0)
    return torch.linalg.vecdot(a.movedim(1, 0).reshape(c, -1), b.movedim(1, 0).reshape(c, -1), dim=1)


def _batch_stats(x: Tensor, centred_out: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean, biased variance and count m of a batch; leaves ``x - mean`` in ``centred_out``.

    This is the single place the forward statistics come from, so synchronized BN can later all-reduce
    (count, sum) and then (sum of squared deviations) here, as two-pass statistics across processes.
    """
    dims = _reduce_dims(x)
    m = x.numel() // x.shape[1]
    mean = x.sum(dims) / m
    torch.sub(x, mean.view(_channel_view(x)), out=centred_out)
    var = _sum_of_products(centred_out, centred_out, dims) / m
    return mean, var, m


def _grad_reductions(g: Tensor, x_centred: Tensor) -> tuple[Tensor, Tensor]:
    """The backward's two per-channel reductions: Σg and Σg·(x−μ).

    One place, so that synchronized BN can all-reduce both (and the count) together later.
    """
    dims = _reduce_dims(g)
    return g.sum(dims), _sum_of_products(g, x_centred, dims)


class BatchNormTrainFunction(Function):
    """Training-mode BN: batch statistics forward, the paper's gradients backward.

    Returns ``(y, mean, var)``; ``mean`` and ``var`` (biased) are non-differentiable and only feed the
    running-statistic update. With ``unbiased`` the layer normalizes by s² = m/(m−1)·σ²_B instead; the
    only change to the backward is that the projection term is scaled by the same m/(m−1), because
    ∂s²/∂x_i = m/(m−1) · 2(x_i − μ)/m while the mean term is unchanged.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, unbiased: bool):
        view = _channel_view(x)
        y = torch.empty_like(x)
        mean, var, m = _batch_stats(x, y)
        # y holds x - mean now.
        var_norm = var * (m / (m - 1)) if unbiased else var
        invstd = (var_norm + eps).rsqrt_()
        scale = invstd * weight if weight is not None else invstd
        if bias is not None:
            torch.addcmul(bias.view(view), y, scale.view(view), out=y)
        else:
            y.mul_(scale.view(view))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.m = m
        ctx.unbiased = unbiased
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor, _g_mean, _g_var):
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        m = ctx.m
        view = _channel_view(x)
        # dx's buffer first holds x - mean: it is the centred operand of Σg(x−μ) and then becomes dx
        # in place, so backward allocates one full-size tensor.
        dx = torch.empty_like(x)
        torch.sub(x, mean.view(view), out=dx)
        sum_g, sum_g_xmu = _grad_reductions(g, dx)
        sum_g_xhat = sum_g_xmu * invstd
        grad_x = grad_w = grad_b = None
        if need_x:
            # ∂ℓ/∂x = k·(g − Σg/m − c·x̂·Σg·x̂/m), k = γ·invstd, c = m/(m−1) if unbiased else 1,
            # rewritten as dx = (x−μ)·a + g·k + b with per-channel a, b, k.
            k = invstd * weight if weight is not None else invstd
            proj = sum_g_xhat * ((m / (m - 1) if ctx.unbiased else 1.0) / m)
            a = -(k * invstd * proj)
            b = -(k * sum_g) / m
            torch.addcmul(b.view(view), dx, a.view(view), out=dx)
            dx.addcmul_(g, k.view(view))
            grad_x = dx
        if need_w:
            grad_w = sum_g_xhat
        if need_b:
            grad_b = sum_g
        return grad_x, grad_w, grad_b, None, None


class BatchNormEvalFunction(Function):
    """Inference-mode BN: a fixed per-channel affine map, y = x·γ/sqrt(rv+ε) + (β − rm·γ/sqrt(rv+ε))."""

    @staticmethod
    def forward(ctx, x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                bias: Tensor | None, eps: float):
        view = _channel_view(x)
        invstd = (running_var + eps).rsqrt()
        scale = invstd * weight if weight is not None else invstd
        shift = -running_mean * scale
        if bias is not None:
            shift = shift + bias
        y = torch.addcmul(shift.view(view), x, scale.view(view))
        # x is only needed for ∂ℓ/∂γ; do not keep it alive otherwise.
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, running_mean, invstd, weight)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x, running_mean, invstd, weight = ctx.saved_tensors
        need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
        view = _channel_view(g)
        dims = _reduce_dims(g)
        grad_x = grad_w = grad_b = None
        if need_x:
            scale = invstd * weight if weight is not None else invstd
            grad_x = g * scale.view(view)
        if need_w:
            # Centre explicitly: Σg·x − rm·Σg cancels badly when |rm| ≫ std, and eval backward is rare.
            grad_w = _sum_of_products(g, x - running_mean.view(view), dims) * invstd
        if need_b:
            grad_b = g.sum(dims)
        return grad_x, None, None, grad_w, grad_b, None


class BatchNormBase(nn.Module):
    """Common base of our BatchNorm1d/2d/3d (training code tells ours from torch's by this class).

    Options beyond torch, keyword-only, defaulting to the paper's behaviour:
      running_var_init: value ``running_var`` starts from and ``reset_running_stats()`` restores.
      unbiased_normalize: normalize with the unbiased batch variance m/(m−1)·σ²_B (the seed note's
        ``torch.var``), instead of the paper's biased one.
    """

    _version = 2
    _accepted_ranks: tuple[int, ...] = ()
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        running_var_init: float = 1.0,
        unbiased_normalize: bool = False,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.running_var_init = float(running_var_init)
        self.unbiased_normalize = bool(unbiased_normalize)
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(self.running_var_init)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )
        if self.running_var_init != 1.0:
            s += f", running_var_init={self.running_var_init}"
        if self.unbiased_normalize:
            s += ", unbiased_normalize=True"
        return s

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # Mirrors torch's _NormBase: state dicts from before version 2 have no num_batches_tracked.
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (
                    self.num_batches_tracked
                    if self.num_batches_tracked is not None
                    and self.num_batches_tracked.device != torch.device("meta")
                    else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() not in self._accepted_ranks:
            expected = " or ".join(f"{r}D" for r in self._accepted_ranks)
            raise ValueError(f"expected {expected} input (got {x.dim()}D input of shape {tuple(x.shape)})")
        if x.shape[1] != self.num_features:
            # torch only notices this through the size of a parameter or buffer (and not at all with
            # affine=False, track_running_stats=False); we always check.
            raise RuntimeError(
                f"expected input with {self.num_features} channels on dim 1, "
                f"got input of shape {tuple(x.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        # Batch statistics in training, and in eval when there are no running estimates (as torch).
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        update_running = self.training and self.track_running_stats and self.running_mean is not None
        if use_batch_stats:
            size = input.size()
            values_per_channel = size[0]
            for d in size[2:]:
                values_per_channel *= d
            if values_per_channel == 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
            if self.eps <= 0.0:
                raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        elif self.eps < 0.0:
            raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}")

        if update_running:
            # Counted before the batch is looked at, empty batches included, as torch does.
            self.num_batches_tracked.add_(1)

        if input.numel() == 0:
            # torch returns an affine-transformed clone and leaves the statistics alone.
            out = input.clone()
            if self.weight is not None:
                out = out * self.weight.view(_channel_view(input))
            if self.bias is not None:
                out = out + self.bias.view(_channel_view(input))
            return out

        if use_batch_stats:
            y, mean, var = BatchNormTrainFunction.apply(
                input, self.weight, self.bias, self.eps, self.unbiased_normalize
            )
            if update_running:
                self._update_running_stats(mean, var, input.numel() // input.shape[1])
            return y
        return BatchNormEvalFunction.apply(input, self.running_mean, self.running_var, self.weight,
                                           self.bias, self.eps)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, m: int) -> None:
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        # Same association as ATen (momentum·new + (1 − momentum)·old), so float32 results agree.
        self.running_mean.mul_(1.0 - factor).add_(mean.detach(), alpha=factor)
        self.running_var.mul_(1.0 - factor).add_(var.detach(), alpha=factor * m / (m - 1))


class BatchNorm1d(BatchNormBase):
    """Over (N, C) or (N, C, L) input."""

    _accepted_ranks = (2, 3)


class BatchNorm2d(BatchNormBase):
    """Over (N, C, H, W) input."""

    _accepted_ranks = (4,)


class BatchNorm3d(BatchNormBase):
    """Over (N, C, D, H, W) input."""

    _accepted_ranks = (5,)
