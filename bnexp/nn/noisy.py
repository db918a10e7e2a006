"""Noisy BN (Santurkar et al. 2018, "How does batch normalization help optimization?", Algorithm 1): our
BN followed, in training, by a random per-unit shift and scale that changes every step and example:

    per step and unit c:           μ_c ~ U(−a, a)          σ_c ~ U(1, 1 + b)
    per example n (and position):  m ~ U(μ_c − c, μ_c + c)  s ~ N(σ_c, d)
    y → s · y + m

A layer's output distribution then moves at every step by far more than BN removes: Santurkar et al.
found such a network trains about as well as plain BN, so BN's benefit cannot be the stability of those
distributions. The noise is a constant of the backward (it does not depend on the parameters). Eval mode
is plain BN. The draws come from a generator of the layer's own (seeded from torch's RNG when the layer is
built, so a run's seed fixes them), saved in its state dict: runs are deterministic and resume exactly.
`paused_noise(model)` stops the draws for a block, so that measurements (bnexp's probes) neither add
noise nor move the generator.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from bnexp.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase


class NoisyBatchNorm(BatchNormBase):
    """BN, then Santurkar et al.'s noise in training (see the module docstring). Keyword-only `a`, `b`,
    `c`, `d` beyond BatchNormBase's options."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 running_var_init: float = 1.0, unbiased_normalize: bool = False, a: float = 0.5, b: float = 0.25,
                 c: float = 0.1, d: float = 0.1) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         running_var_init=running_var_init, unbiased_normalize=unbiased_normalize)
        if min(a, b, c, d) < 0:
            raise ValueError(f"noise parameters must be >= 0, got a={a}, b={b}, c={c}, d={d}")
        self.a, self.b, self.c, self.d = float(a), float(b), float(c), float(d)
        self.generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,))))
        self.paused = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, a={self.a}, b={self.b}, c={self.c}, d={self.d}"

    def noise(self, shape: torch.Size) -> tuple[Tensor, Tensor]:
        """(s, m) for output of `shape`: per channel μ, σ; per example and position m, s (CPU, float64)."""
        n, ch, rest = shape[0], shape[1], tuple(shape[2:])
        g = self.generator
        mu = (torch.rand(ch, generator=g, dtype=torch.float64) * 2 - 1) * self.a
        sigma = 1 + torch.rand(ch, generator=g, dtype=torch.float64) * self.b
        view = (1, ch) + (1,) * len(rest)
        m = mu.view(view) + (torch.rand((n, ch, *rest), generator=g, dtype=torch.float64) * 2 - 1) * self.c
        s = sigma.view(view) + torch.randn((n, ch, *rest), generator=g, dtype=torch.float64) * self.d
        return s, m

    def forward(self, input: Tensor) -> Tensor:
        y = super().forward(input)
        if not self.training or self.paused or input.numel() == 0:
            return y
        s, m = self.noise(y.shape)
        return y * s.to(y) + m.to(y)

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"])


@contextmanager
def paused_noise(model: nn.Module) -> Iterator[None]:
    """No noise from the model's noisy BN layers for the duration (and no draw from their generators)."""
    layers = [m for m in model.modules() if isinstance(m, NoisyBatchNorm)]
    saved = [m.paused for m in layers]
    try:
        for m in layers:
            m.paused = True
        yield
    finally:
        for m, p in zip(layers, saved):
            m.paused = p


class NoisyBatchNorm1d(NoisyBatchNorm, BatchNorm1d):
    """Over (N, C) or (N, C, L) input."""


class NoisyBatchNorm2d(NoisyBatchNorm, BatchNorm2d):
    """Over (N, C, H, W) input."""


class NoisyBatchNorm3d(NoisyBatchNorm, BatchNorm3d):
    """Over (N, C, D, H, W) input."""


NOISY = {1: NoisyBatchNorm1d, 2: NoisyBatchNorm2d, 3: NoisyBatchNorm3d}
