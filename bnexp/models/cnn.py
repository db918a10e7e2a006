"""A small CNN for 1-D signals (mnist1d) and images: conv blocks, global average pooling, a linear head."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from bnexp.config import ModelConfig
from bnexp.models.blocks import ACTIVATIONS, Block, conv_input, layer_bias
from bnexp.nn import make_norm


def build_cnn(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    input_shape, dims, (conv, pool, gpool) = conv_input(input_shape, layers)
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
