"""The norm of each layer's weight gradient (`grad_norm/<l>`: h1, h2, ..., out; every convolution of a
resnet by its block, h1.conv1, ...), taken between backward and the optimizer step of a probe step."""

from __future__ import annotations

import torch
from torch import nn

from bnexp.models import weight_layers


@torch.no_grad()
def grad_norms(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Device tensors, read back with the rest of the probe step."""
    named = weight_layers(model)
    return {name: named[name].grad.norm() for name in names if named[name].grad is not None}


def layout(names: list[str]) -> dict[str, list]:
    """A chart per layer (one line per run)."""
    return {name: ["Multiline", [f"grad_norm/{name}"]] for name in names}
