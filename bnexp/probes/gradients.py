"""The norm of each layer's weight gradient (`grad_norm/<l>`: h1, h2, ..., out), taken between backward and
the optimizer step of a probe step."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from bnexp.models import Block


def layer_weights(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The weight of every layer: h1.layer, h2.layer, ..., out."""
    for name, child in model.named_children():
        if isinstance(child, Block):
            yield name, child.layer.weight
        elif isinstance(getattr(child, "weight", None), nn.Parameter):
            yield name, child.weight


@torch.no_grad()
def grad_norms(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Device tensors, read back with the rest of the probe step."""
    named = dict(layer_weights(model))
    return {name: named[name].grad.norm() for name in names if named[name].grad is not None}


def layout() -> dict[str, list]:
    return {"weight gradient norm": ["Multiline", [r"grad_norm/.*"]]}
