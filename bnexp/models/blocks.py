"""What the networks are made of, and how the probes find their parts.

A `Block` is a layer, its normalizer and a nonlinearity (`act`), named h1, h2, ... in the network, so the
probes can hook "the input to the nonlinearity" (the paper's Figure 1b/c) and name normalizers by their
block. Residual networks add `ConvNorm` (a layer and its normalizer, no nonlinearity) and `ResidualBlock`,
whose `act` follows the addition.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from bnexp.config import ModelConfig
from bnexp.nn import is_batchnorm

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
# Normalizers that subtract a per-channel mean of their input: a bias of the layer before them cancels.
_CANCEL_BIAS = ("bnexp", "torch", "instance")


class ConvOps(NamedTuple):
    conv: type[nn.Module]
    pool: type[nn.Module]
    gpool: type[nn.Module]


_CONV_OPS = {1: ConvOps(nn.Conv1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d),
             2: ConvOps(nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)}


def conv_input(input_shape: tuple[int, ...], layers: dict[str, nn.Module]) -> tuple[tuple[int, ...], int, ConvOps]:
    """The (channels, *positions) shape a conv net sees, its number of spatial dims and the layer classes
    for them. Tabular features are read as a one-channel signal (an Unflatten added to `layers`)."""
    if len(input_shape) == 1:
        input_shape = (1, input_shape[0])
        layers["signal"] = nn.Unflatten(1, input_shape)
    dims = len(input_shape) - 1
    return input_shape, dims, _CONV_OPS[dims]


def out_width(layer: nn.Module) -> int:
    width = getattr(layer, "out_features", None) or getattr(layer, "out_channels", None)
    if width is None:
        raise TypeError(f"cannot tell the width of {type(layer).__name__}")
    return int(width)


class Block(nn.Module):
    """layer -> norm -> act (the paper's placement) or layer -> act -> norm; then an optional pool."""

    def __init__(self, layer: nn.Module, norm: nn.Module | None, act: nn.Module, bn_first: bool,
                 pool: nn.Module | None = None):
        super().__init__()
        self.layer, self.norm, self.act, self.pool = layer, norm, act, pool
        self.bn_first = bn_first

    @property
    def width(self) -> int:
        return out_width(self.layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer(x)
        if self.norm is not None and self.bn_first:
            x = self.norm(x)
        x = self.act(x)
        if self.norm is not None and not self.bn_first:
            x = self.norm(x)
        if self.pool is not None:
            x = self.pool(x)
        return x


class ConvNorm(nn.Module):
    """A layer and its normalizer with no nonlinearity: a residual branch's last layer, a projection."""

    def __init__(self, layer: nn.Module, norm: nn.Module | None):
        super().__init__()
        self.layer, self.norm = layer, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer(x)
        return x if self.norm is None else self.norm(x)


class ResidualBlock(nn.Module):
    """He et al. 2016's basic block: act(conv2(conv1(x)) + shortcut(x)), conv1 a Block (layer, norm, act),
    conv2 a ConvNorm; `act` (the input to it is the probes' "input to the nonlinearity") after the sum."""

    def __init__(self, conv1: Block, conv2: ConvNorm, shortcut: nn.Module, act: nn.Module):
        super().__init__()
        self.conv1, self.conv2, self.shortcut, self.act = conv1, conv2, shortcut, act

    @property
    def width(self) -> int:
        return out_width(self.conv2.layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class PadShortcut(nn.Module):
    """He et al.'s option A: the identity, subsampled by `stride` and zero-padded to `extra` more channels
    (no parameters)."""

    def __init__(self, stride: int, extra: int):
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[(slice(None), slice(None)) + (slice(None, None, self.stride),) * (x.dim() - 2)]
        if self.extra:
            pad = x.new_zeros((x.shape[0], self.extra, *x.shape[2:]))
            x = torch.cat([x, pad], 1)
        return x


def layer_bias(cfg: ModelConfig, norm_right_after: bool | None = None) -> bool:
    """Whether a layer gets a bias: a normalizer right after it that subtracts each channel's mean cancels
    one (the paper drops it; β takes its role). `norm_right_after` defaults to what bn_position says."""
    right_after = cfg.bn_position == "before_activation" if norm_right_after is None else norm_right_after
    return not (cfg.norm in _CANCEL_BIAS and right_after)


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    """BN layers keyed by the name of the block they sit in (h1, h2, ...; h1.conv1, ... in a resnet)."""
    return {name.rsplit(".norm", 1)[0]: m for name, m in model.named_modules() if is_batchnorm(m)}


def hidden_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The modules with a nonlinearity `act` and a `width`, by name: Blocks and residual blocks."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (Block, ResidualBlock))}


def weight_layers(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of every linear and convolutional layer, by the name of its block (h1, h2, ..., out)."""
    return {name.removesuffix(".layer"): m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
