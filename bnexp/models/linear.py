"""A deep linear network (Santurkar et al. 2018, section 3.2): model.depth linear layers of the input's
width with no nonlinearity and no bias, the normalizer of model.norm after every layer but the last. It
computes a linear map of its input whatever its weights, so BN's effect on the optimization is seen
without a nonlinearity's.

Weights start N(0, 1/width) (variance-preserving), so that without BN the product of 25 layers neither
vanishes nor explodes at initialization (torch's default would shrink the signal threefold per layer).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from bnexp.config import ModelConfig
from bnexp.models.blocks import Block
from bnexp.nn import make_norm


def build_linear(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    width = math.prod(input_shape)
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    for i in range(1, cfg.resolved_depth):
        layers[f"h{i}"] = Block(nn.Linear(width, width, bias=False), make_norm(cfg, width, 0), nn.Identity(), True)
    layers["out"] = nn.Linear(width, num_outputs, bias=False)
    model = nn.Sequential(layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features))
    return model
