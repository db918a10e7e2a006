"""What every network is made of (a `Block` per hidden layer), and how the probes find its parts."""

from __future__ import annotations

import torch
from torch import nn

from bnexp.config import ModelConfig
from bnexp.nn import is_batchnorm

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class Block(nn.Module):
    """layer -> BN -> act (the paper's placement) or layer -> act -> BN."""

    def __init__(self, layer: nn.Module, norm: nn.Module | None, act: nn.Module, bn_first: bool,
                 pool: nn.Module | None = None):
        super().__init__()
        self.layer, self.norm, self.act, self.pool = layer, norm, act, pool
        self.bn_first = bn_first

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


def layer_bias(cfg: ModelConfig) -> bool:
    """Whether a block's layer gets a bias: BN right after it subtracts the mean, which cancels a bias
    (the paper drops it; β takes its role)."""
    return cfg.norm == "none" or cfg.bn_position != "before_activation"


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    """BN layers keyed by the name of the block they sit in (h1, h2, ...)."""
    return {name.rsplit(".norm", 1)[0]: m for name, m in model.named_modules() if is_batchnorm(m)}


def hidden_blocks(model: nn.Module) -> dict[str, Block]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Block)}
