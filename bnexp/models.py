"""The networks: an MLP (the paper's MNIST net by default) and a small CNN, each with or without BN.

Every hidden layer is a `Block` named h1, h2, ... whose `act` submodule is the nonlinearity, so the probes
can hook "the input to the nonlinearity" (the paper's Figure 1b/c) and name BN layers by their block.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from bnexp.config import ConfigError, ModelConfig

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def make_norm(cfg: ModelConfig, num_features: int, dims: int) -> nn.Module | None:
    """A BN layer for `dims`-D features (1: (N, C) or (N, C, L); 2: images), or None for norm: none."""
    if cfg.norm == "none":
        return None
    bn = cfg.bn
    if bn.variant != "bn" and cfg.norm != "bnexp":
        raise ConfigError(f"model.bn.variant: {bn.variant} needs model.norm: bnexp (got {cfg.norm})")
    if cfg.norm == "torch":
        cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        return cls(num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
    from bnexp import norm as ours

    kwargs = dict(eps=bn.eps, momentum=bn.momentum, affine=bn.affine, running_var_init=bn.running_var_init,
                  unbiased_normalize=bn.unbiased_normalize)
    if bn.variant == "renorm":
        from bnexp.variants import RENORM

        r = bn.renorm
        return RENORM[dims](num_features, **kwargs, r_max=r.r_max, d_max=r.d_max, warmup_steps=r.warmup_steps,
                            r_max_steps=r.r_max_steps, d_max_steps=r.d_max_steps)
    if bn.variant == "ghost":
        from bnexp.variants import GHOST

        return GHOST[dims](num_features, **kwargs, ghost_batch_size=bn.ghost_batch_size)
    cls = {1: ours.BatchNorm1d, 2: ours.BatchNorm2d, 3: ours.BatchNorm3d}[dims]
    return cls(num_features, **kwargs)


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


def _bias(cfg: ModelConfig) -> bool:
    # BN right after the layer subtracts the mean, which cancels a bias (the paper drops it; β takes its role).
    return cfg.norm == "none" or cfg.bn_position != "before_activation"


def build_mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = 1
    for d in input_shape:
        width *= d
    for i, h in enumerate(cfg.hidden, start=1):
        layers[f"h{i}"] = Block(nn.Linear(width, h, bias=_bias(cfg)), make_norm(cfg, h, 1),
                                _ACTIVATIONS[cfg.activation](), cfg.bn_position == "before_activation")
        width = h
    layers["out"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


def build_cnn(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if len(input_shape) == 1:  # tabular features read as a one-channel signal
        input_shape = (1, input_shape[0])
        layers["signal"] = nn.Unflatten(1, input_shape)
    dims = len(input_shape) - 1
    conv, pool, gpool = {1: (nn.Conv1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d),
                         2: (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)}[dims]
    channels, size = input_shape[0], min(input_shape[1:])
    for i, c in enumerate(cfg.channels, start=1):
        # Halve the resolution while it stays at least 2 wide; small inputs (8x8 digits) run out fast.
        p = pool(2) if size >= 4 else None
        size = size // 2 if p is not None else size
        layers[f"h{i}"] = Block(conv(channels, c, 3, padding=1, bias=_bias(cfg)), make_norm(cfg, c, dims),
                                _ACTIVATIONS[cfg.activation](), cfg.bn_position == "before_activation", p)
        channels = c
    layers["gpool"] = gpool(1)
    layers["flatten"] = nn.Flatten()
    layers["out"] = nn.Linear(channels, num_classes)
    return nn.Sequential(layers)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    builder = {"mlp": build_mlp, "cnn": build_cnn}[cfg.kind]
    return builder(cfg, tuple(input_shape), num_classes)


def is_batchnorm(module: nn.Module) -> bool:
    """Ours or torch's: the probes treat both alike."""
    from bnexp import norm as ours

    return isinstance(module, (ours.BatchNormBase, nn.modules.batchnorm._BatchNorm))


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    """BN layers keyed by the name of the block they sit in (h1, h2, ...)."""
    return {name.rsplit(".norm", 1)[0]: m for name, m in model.named_modules() if is_batchnorm(m)}


def hidden_blocks(model: nn.Module) -> dict[str, Block]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Block)}
