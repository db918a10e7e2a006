"""The networks bnexp trains, each with or without normalization: `build_model(cfg.model, ...)`.

Every hidden layer is a `Block` named h1, h2, ... whose `act` submodule is the nonlinearity, so the probes
can hook "the input to the nonlinearity" (the paper's Figure 1b/c) and name BN layers by their block.
"""

from __future__ import annotations

from torch import nn

from bnexp.config import ModelConfig
from bnexp.models.blocks import Block, bn_layers, hidden_blocks
from bnexp.models.cnn import build_cnn
from bnexp.models.mlp import build_mlp

__all__ = ["Block", "bn_layers", "build_model", "hidden_blocks"]

_BUILDERS = {"mlp": build_mlp, "cnn": build_cnn}


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return _BUILDERS[cfg.kind](cfg, tuple(input_shape), num_classes)
