"""How the training loop runs in one process or as one rank of several: the strategy objects it calls.

The loop (bnexp.engine.trainer) asks its strategy five things; `SingleProcess` answers them trivially,
`DataParallel` with torch.distributed:

- `wrap(model)`: the module the training step calls (DistributedDataParallel around the model);
- `shard(idx)`: this process's part of the global batch;
- `stop_signal(step, received)`: whether to stop for a signal, agreed by all ranks (one all-reduce per
  step), so that they checkpoint and stop at the same step;
- `reduce(losses, hits)`: per-step losses and correct counts of the global batch;
- `measuring(model)`: the context evaluation and probes run in (BN forced to local statistics, so they
  issue no collective and measure what one process would).

Data parallelism: every rank loads the whole (small) dataset and draws the SAME global batch indices from
the same seeded sampler, then keeps its contiguous shard, so an N-process run sees exactly the batches a
one-process run sees. Every rank runs the same loop, so every collective is issued in the same order;
evaluation and probes run on every rank in lockstep on the unwrapped module. DDP broadcasts rank 0's
buffers before each forward, so all ranks hold rank 0's model, the state its checkpoints save. With
`model.bn.stats: global` our BN layers normalize by the global batch (synchronized BN, bnexp.nn.sync).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from bnexp.nn import BatchNormBase

# Test-only fault injection: "RANK:STEP" makes that rank raise just before that training step.
FAIL_ENV = "BNEXP_DIST_FAIL_AT"


class SingleProcess:
    rank, world = 0, 1
    # After a crash the loop may still read its last steps back (a collective would wait for dead peers).
    reads_after_failure = True
    reduce = None

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        return idx

    def stop_signal(self, step: int, received: list[int]) -> int | None:
        return received[0] if received else None

    def measuring(self, model: nn.Module):
        return nullcontext()


def set_stats(model: nn.Module, stats: str, group=None) -> None:
    """Choose local or global batch statistics for every bnexp BN layer of `model`."""
    for m in model.modules():
        if isinstance(m, BatchNormBase):
            m.stats = stats
            m.process_group = group


@contextmanager
def local_stats(model: nn.Module) -> Iterator[None]:
    """Force every bnexp BN layer to local statistics for the duration."""
    saved = [(m, m.stats) for m in model.modules() if isinstance(m, BatchNormBase)]
    try:
        for m, _ in saved:
            m.stats = "local"
        yield
    finally:
        for m, s in saved:
            m.stats = s


def shard(idx: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch (the first len % world ranks get one extra)."""
    return torch.tensor_split(idx, world)[rank]


class DataParallel:
    """One rank of a process group that torch.distributed has initialised."""

    reads_after_failure = False

    def __init__(self, stats: str, device: torch.device):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.stats, self.device = stats, device
        fail = os.environ.get(FAIL_ENV, "")
        rank, _, at = fail.partition(":")
        self.fail_at = int(at) if fail and int(rank) == self.rank else None

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        set_stats(model, self.stats)
        ids = None
        if self.device.type == "cuda":
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        return DistributedDataParallel(model, device_ids=ids)

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        return shard(idx, self.rank, self.world)

    def stop_signal(self, step: int, received: list[int]) -> int | None:
        if self.fail_at is not None and step + 1 == self.fail_at:
            raise RuntimeError(f"injected failure at step {self.fail_at} ({FAIL_ENV})")
        flag = torch.tensor([max(received, default=0)], device=self.device, dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def reduce(self, losses: torch.Tensor, hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The config makes shards equal (data.batch_size % dist.nproc == 0): the global batch's mean loss is
        # the mean of the shards' means.
        n = len(losses)
        packed = torch.cat([losses.double(), hits.double()])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        return (packed[:n] / self.world).to(losses.dtype), packed[n:].round().to(torch.int64)

    def measuring(self, model: nn.Module):
        return local_stats(model)
