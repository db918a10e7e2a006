"""A small CNN for 1-D signals (mnist1d) and images: conv blocks, global average pooling, a linear head."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from bnexp.config import ModelConfig
from bnexp.models.blocks import ACTIVATIONS, Block, layer_bias
from bnexp.nn import make_norm


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
        layers[f"h{i}"] = Block(conv(channels, c, 3, padding=1, bias=layer_bias(cfg)), make_norm(cfg, c, dims),
                                ACTIVATIONS[cfg.activation](), cfg.bn_position == "before_activation", p)
        channels = c
    layers["gpool"] = gpool(1)
    layers["flatten"] = nn.Flatten()
    layers["out"] = nn.Linear(channels, num_classes)
    return nn.Sequential(layers)
