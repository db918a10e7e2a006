"""The collectives synchronized BN needs (`model.bn.stats: global`).

With `stats: global` a layer in training normalizes by the statistics of the whole global batch of its
process group: forward all-reduces the per-channel count, Σx and Σ(x − μ)², backward Σg and Σg·(x − μ)
(bnexp.nn.batchnorm calls these). An N-process run then computes what one process computes on the
whole batch, up to floating-point summation order. Only torch.distributed is used here: the layer needs
nothing of how the processes were started (bnexp.dist) or trained (bnexp.engine).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of `t` over the ranks of `group`, returned as a new tensor (the input is left untouched)."""
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_sum_and_count(s: torch.Tensor, count: int, group=None) -> tuple[torch.Tensor, int]:
    """(Σ over ranks of the per-channel sums `s`, Σ over ranks of `count`) in one all-reduce.

    The count travels in float64 next to the sums (exact up to 2^53 values per channel), so shards of
    unequal size need no second collective.
    """
    packed = torch.cat([s.to(torch.float64), s.new_tensor([count], dtype=torch.float64)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return packed[:-1].to(s.dtype), int(packed[-1].item())


def sync_group(layer: nn.Module):
    """The process group a BN layer should reduce over right now, or None for local statistics.

    Global statistics need training mode, `stats == "global"` and a group of more than one process;
    a single process with `global` is exactly `local`.
    """
    if getattr(layer, "stats", "local") != "global" or not layer.training:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(layer, "process_group", None)
    return (group or dist.group.WORLD) if dist.get_world_size(group) > 1 else None
