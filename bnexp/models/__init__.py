"""The networks bnexp trains, each with any normalizer or none: `build_model(cfg.model, ...)`.

mlp (the paper's MNIST network by default), cnn (a small CNN), resnet (He et al.'s CIFAR ResNet), vgg
(VGG-11/13/16/19 for CIFAR-sized input) and linear (a deep linear network), one file each, made of the
blocks of bnexp.models.blocks: every hidden layer is a Block named h1, h2, ... whose `act` is the
nonlinearity, so the probes can hook "the input to the nonlinearity" (the paper's Figure 1b/c) and name
normalizers by their block.
"""

from __future__ import annotations

from torch import nn

from bnexp.config import ModelConfig
from bnexp.models.blocks import Block, ConvNorm, ResidualBlock, bn_layers, hidden_blocks, weight_layers
from bnexp.models.cnn import build_cnn
from bnexp.models.linear import build_linear
from bnexp.models.mlp import build_mlp
from bnexp.models.resnet import build_resnet
from bnexp.models.vgg import build_vgg

__all__ = ["Block", "ConvNorm", "ResidualBlock", "bn_layers", "build_model", "hidden_blocks", "weight_layers"]

_BUILDERS = {"mlp": build_mlp, "cnn": build_cnn, "resnet": build_resnet, "vgg": build_vgg, "linear": build_linear}


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return _BUILDERS[cfg.kind](cfg, tuple(input_shape), num_classes)
