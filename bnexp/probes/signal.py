"""Signal propagation (Brock, De & Smith 2021, "Characterizing signal propagation to close the performance
gap in unnormalized ResNets"): at the output of every block, on the fixed probe batch in training mode,

    signal/<l>/sq_mean    = mean over channels of (the channel's mean)²
    signal/<l>/var        = mean over channels of the channel's variance
    signal/<l>/branch_var = the same variance of a residual block's branch, before the addition

over the batch and positions (a unit of a fully connected layer is a channel). Logged at step 0 (the
initialization plot) and at every probe step. A block is a top-level Block or residual block (h1, h2, ...;
a resnet's stem too).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnexp.models import ResidualBlock, hidden_blocks


def top_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The hidden blocks not inside another one, in order."""
    blocks = hidden_blocks(model)
    return {name: m for name, m in blocks.items() if not any(name.startswith(other + ".") for other in blocks)}


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean over channels of (channel mean)², mean over channels of channel variance), over batch and positions."""
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    mean = per_channel.mean(1)
    return mean.square().mean(), per_channel.var(1, unbiased=False).mean()


def signal_values(outputs: dict[str, Tensor], branches: dict[str, Tensor]) -> tuple[list[str], Tensor]:
    tags, values = [], []
    for name, out in outputs.items():
        sq_mean, var = _channel_stats(out)
        tags += [f"signal/{name}/sq_mean", f"signal/{name}/var"]
        values += [sq_mean, var]
        if name in branches:
            tags.append(f"signal/{name}/branch_var")
            values.append(_channel_stats(branches[name])[1])
    return tags, torch.stack(values) if values else torch.zeros(0)


def capture(model: nn.Module, run, with_branches: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Each top-level block's output (and a residual block's branch) during `run()`."""
    outputs: dict[str, Tensor] = {}
    branches: dict[str, Tensor] = {}
    handles = []
    try:
        for name, block in top_blocks(model).items():
            handles.append(block.register_forward_hook(lambda _m, _i, out, n=name: outputs.__setitem__(n, out)))
            if with_branches and isinstance(block, ResidualBlock):
                handles.append(block.conv2.register_forward_hook(
                    lambda _m, _i, out, n=name: branches.__setitem__(n, out)))
        run()
    finally:
        for h in handles:
            h.remove()
    return outputs, branches


def layout(blocks: dict[str, nn.Module]) -> dict[str, list]:
    """Charts per top-level block (`top_blocks`): its (channel mean)², its channel variance and, for a
    residual block, its branch's variance."""
    charts = {}
    for name, block in blocks.items():
        charts[f"{name} (channel mean)²"] = ["Multiline", [f"signal/{name}/sq_mean"]]
        charts[f"{name} channel variance"] = ["Multiline", [f"signal/{name}/var"]]
        if isinstance(block, ResidualBlock):
            charts[f"{name} branch variance"] = ["Multiline", [f"signal/{name}/branch_var"]]
    return charts
