"""The CIFAR ResNet of He et al. 2016 (section 4.2): depth 6n+2, a 3x3 stem of 16 channels, three stages
of n basic blocks with 16, 32 and 64 channels (times model.width_factor), the first block of the second
and third stages halving the resolution, global average pooling and a linear classifier.

Shortcuts: option A (`model.shortcut: A`, the paper's CIFAR choice) is the identity, subsampled and
zero-padded where the shape changes, with no parameters; option B projects with a 1x1 convolution and a
normalizer there. Images of any size (digits' 8x8, CIFAR's 32x32) use 2-D convolutions, 1-D signals
(mnist1d) 1-D ones; a stage halves the resolution only while it stays at least 2 wide. The normalizer of
model.norm follows every convolution (bn_position applies to the first of each block; the second's is
always before the addition).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from bnexp.config import ModelConfig
from bnexp.models.blocks import ACTIVATIONS, Block, ConvNorm, PadShortcut, ResidualBlock, conv_input, layer_bias
from bnexp.nn import make_norm

WIDTHS = (16, 32, 64)


def build_resnet(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    input_shape, dims, (conv, _, gpool) = conv_input(input_shape, layers)
    act = ACTIVATIONS[cfg.activation]
    bias, bn_first = layer_bias(cfg), cfg.bn_position == "before_activation"
    widths = [max(1, round(w * cfg.width_factor)) for w in WIDTHS]
    n = (cfg.resolved_depth - 2) // 6
    channels, size = widths[0], min(input_shape[1:])
    layers["stem"] = Block(conv(input_shape[0], channels, 3, padding=1, bias=bias),
                           make_norm(cfg, channels, dims), act(), bn_first)
    k = 0
    for stage, width in enumerate(widths):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 and size >= 4 else 1
            size //= stride
            k += 1
            conv1 = Block(conv(channels, width, 3, stride=stride, padding=1, bias=bias),
                          make_norm(cfg, width, dims), act(), bn_first)
            conv2 = ConvNorm(conv(width, width, 3, padding=1, bias=layer_bias(cfg, norm_right_after=True)),
                             make_norm(cfg, width, dims))
            if stride == 1 and channels == width:
                shortcut: nn.Module = nn.Identity()
            elif cfg.shortcut == "A":
                shortcut = PadShortcut(stride, width - channels)
            else:
                shortcut = ConvNorm(conv(channels, width, 1, stride=stride, bias=layer_bias(cfg, norm_right_after=True)),
                                    make_norm(cfg, width, dims))
            layers[f"h{k}"] = ResidualBlock(conv1, conv2, shortcut, act())
            channels = width
    layers["gpool"] = gpool(1)
    layers["flatten"] = nn.Flatten()
    layers["out"] = nn.Linear(channels, num_classes)
    return nn.Sequential(layers)
