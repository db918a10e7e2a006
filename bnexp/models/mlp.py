"""The MLP: the paper's MNIST network (3 hidden layers of 100 sigmoid units) by default."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from bnexp.config import ModelConfig
from bnexp.models.blocks import ACTIVATIONS, Block, layer_bias
from bnexp.nn import make_norm


def build_mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = 1
    for d in input_shape:
        width *= d
    # model.depth, when set, is the number of hidden layers, each as wide as the first of model.hidden.
    widths = cfg.hidden if cfg.depth is None else [cfg.hidden[0]] * cfg.depth
    for i, h in enumerate(widths, start=1):
        layers[f"h{i}"] = Block(nn.Linear(width, h, bias=layer_bias(cfg)), make_norm(cfg, h, 0),
                                ACTIVATIONS[cfg.activation](), cfg.bn_position == "before_activation")
        width = h
    layers["out"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)
