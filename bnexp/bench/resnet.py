"""A ResNet-20 training step (He et al. 2016, CIFAR shapes) with our BN layer against the same with torch's.

The network is `model.kind: resnet` (bnexp.models.resnet): three stages of three basic blocks (16, 32, 64
channels; 3×3 convolutions, BN after each, ReLU; option A shortcuts, strided subsampling and zero-padded
channels), global average pooling and a linear classifier, 0.27 M parameters, 19 BN layers. A step is
forward, cross-entropy, backward and an SGD update (momentum 0.9) on a fixed batch of 128 random 3×32×32
images. The two contenders are the same network with the same initial weights, built with bnexp.nn's
BatchNorm2d or torch's, timed in alternation step by step; the ratio is ours ÷ torch's median.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from bnexp.bench.layer import torch_threads
from bnexp.config import ModelConfig
from bnexp.models import build_model


def resnet20(norm: str) -> nn.Module:
    """bnexp's ResNet-20 (bnexp.models.resnet, option A, ReLU) with our BN ("bnexp") or torch's ("torch")."""
    cfg = ModelConfig(kind="resnet", depth=20, norm=norm, activation="relu")
    return build_model(cfg, (3, 32, 32), 10)


def _stepper(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def measure_resnet(steps: int = 30, warmup: int = 3, batch: int = 128, threads: int | None = None,
                   seed: int = 0, clock: str = "wall") -> dict:
    """Median seconds per training step for each contender, their steps interleaved, and the ratio.

    ``clock="cpu"`` times the calling thread's CPU time (less disturbed by other processes on a busy
    machine); it needs ``threads=1``, where all the work runs on the calling thread.
    """
    if clock == "cpu" and threads != 1:
        raise ValueError("clock='cpu' measures one thread: pass threads=1")
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    with torch_threads(threads):
        torch.manual_seed(seed)
        ours = resnet20("bnexp")
        theirs = resnet20("torch")
        theirs.load_state_dict(ours.state_dict())
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        fns = {"ours": _stepper(ours, x, y), "torch": _stepper(theirs, x, y)}
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(steps):
            # Alternate which contender goes first, so neither always follows the other's cache state.
            for name in (fns if i % 2 == 0 else reversed(list(fns))):
                t0 = timer()
                fns[name]()
                samples[name].append(timer() - t0)
        ratios = [a / b for a, b in zip(samples["ours"], samples["torch"])]
        return {
            "threads": torch.get_num_threads(), "batch": batch, "steps": steps, "clock": clock,
            "ours_ms": statistics.median(samples["ours"]) * 1e3,
            "torch_ms": statistics.median(samples["torch"]) * 1e3,
            "ratio": statistics.median(samples["ours"]) / statistics.median(samples["torch"]),
            "pair_ratio_min": min(ratios), "pair_ratio_max": max(ratios),
        }


def resnet_table(rows: list[dict]) -> Table:
    table = Table(title="ResNet-20 training step (CIFAR shapes), our BN vs torch's, medians of interleaved steps")
    for col in ("threads", "clock", "batch", "steps", "ours ms", "torch ms", "ours/torch", "per-step ratios",
                "target"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(str(r["threads"]), r["clock"], str(r["batch"]), str(r["steps"]), f"{r['ours_ms']:.1f}",
                      f"{r['torch_ms']:.1f}", f"{r['ratio']:.3f}",
                      f"{r['pair_ratio_min']:.2f}–{r['pair_ratio_max']:.2f}", "≤ 1.0")
    return table
