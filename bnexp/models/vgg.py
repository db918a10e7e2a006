"""VGG (Simonyan & Zisserman 2015) for CIFAR-sized images, as Santurkar et al. 2018 trained it with and
without BN: 3x3 convolutions of the configuration's widths (times model.width_factor), each followed by the
normalizer and the nonlinearity, 2x2 max-pooling at the configuration's "M"s, then global average pooling
and a linear classifier.

Scaled down for small inputs: a pool that would take the resolution below 2 is left out, as in bnexp's other
conv nets, so every layer sees at least 2x2 positions (instance statistics need more than one). CIFAR's
32x32 keeps four of the five pools and ends at 2x2, which the global average pooling then reduces: where
the original's fifth max-pool took the maximum of that 2x2, this takes the mean. Digits' 8x8 keeps two.
1-D signals (mnist1d) use 1-D convolutions.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from bnexp.config import ModelConfig
from bnexp.models.blocks import ACTIVATIONS, Block, conv_input, layer_bias
from bnexp.nn import make_norm

CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def build_vgg(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    input_shape, dims, (conv, pool, gpool) = conv_input(input_shape, layers)
    channels, size = input_shape[0], min(input_shape[1:])
    blocks: list[Block] = []
    for item in CONFIGS[cfg.resolved_depth]:
        if item == "M":
            if size >= 4:
                blocks[-1].pool = pool(2)
                size //= 2
            continue
        width = max(1, round(item * cfg.width_factor))
        blocks.append(Block(conv(channels, width, 3, padding=1, bias=layer_bias(cfg)), make_norm(cfg, width, dims),
                            ACTIVATIONS[cfg.activation](), cfg.bn_position == "before_activation"))
        channels = width
    layers.update((f"h{i}", block) for i, block in enumerate(blocks, start=1))
    layers["gpool"] = gpool(1)
    layers["flatten"] = nn.Flatten()
    layers["out"] = nn.Linear(channels, num_classes)
    return nn.Sequential(layers)
