"""The training-mode pass the BN probes share: batches of the training batch size through the network in
training mode, each normalized by its own statistics, no running statistic touched.

It gives the population statistics (the target the running estimates should converge to; PreciseBN's
estimate too, bnexp.engine.precise) and f_train for the gap. All batches go through the network in one
forward, as G batches stacked along dim 0: a forward's cost on these small networks is mostly per call.
"""

from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from bnexp.models import bn_layers
from bnexp.nn.batchnorm import grouped_train_forward

CHUNK = 4096  # rows per forward, as in evaluation: bounds the memory of large test sets

_SITES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# BN layer -> {G: its twin for G stacked batches} (_GroupedBN), shared by every caller: the probes and
# PreciseBN measure the same layers, and a twin costs a deepcopy to build.
_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def population(s: dict, dim: int = 0) -> dict[str, torch.Tensor]:
    """Algorithm 2: μ_pop = mean_B μ_B, σ²_pop = n/(n−1) · mean_B σ²_B (n values per channel per batch);
    the batches along `dim`."""
    n = s["n"]
    return {"mean": s["mean"].mean(dim), "var": s["var"].mean(dim) * (n / (n - 1))}


def bn_sites(model: nn.Module) -> list[tuple[str, str, str, nn.Module]]:
    """(name in models.bn_layers, parent module's name, attribute, layer) of every BN layer, for swapping
    the layer out. Looked up once per model: walking the module tree at every probe step costs more than
    some of the measurements. Parents are kept by name: the model itself can be one, and a value that
    referred to it would keep the weak key alive."""
    if model not in _SITES:
        names = {id(bn): name for name, bn in bn_layers(model).items()}
        _SITES[model] = [(names[id(child)], parent_name, attr, child)
                         for parent_name, parent in model.named_modules()
                         for attr, child in parent.named_children() if id(child) in names]
    return _SITES[model]


def cat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


class _GroupedBN(nn.Module):
    """Stands in for a BN layer during the training-mode probe pass: its input is G batches of s rows
    stacked, and each batch is normalized by its own statistics.

    The G batches are folded into channels, (G·s, C, …) → (s, G·C, …), and go through a twin of the layer
    (same class and options, γ and β tiled G times, no running estimates): the layer's own code does the
    normalization, per batch, and the real layer's buffers are never touched. The statistics of the
    leading `record` batches are kept for the population estimate.
    """

    def __init__(self, bn: nn.Module, s: int, twins: dict[int, nn.Module]):
        super().__init__()
        self.s, self.record, self.twins = s, 0, twins
        self.stats: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        object.__setattr__(self, "bn", bn)  # not a submodule: the real layer stays out of this one's tree

    def _twin(self, groups: int) -> nn.Module:
        bn, twin = self.bn, self.twins.get(groups)
        if twin is None:
            # Built once per layer and batch count (deepcopy keeps every option of ours or torch's layer).
            twin = copy.deepcopy(bn)
            twin.num_features = groups * bn.num_features
            twin.track_running_stats = False
            twin.running_mean = twin.running_var = twin.num_batches_tracked = None
            for name in ("weight", "bias"):
                p = getattr(bn, name)
                if p is not None:
                    setattr(twin, name, nn.Parameter(p.detach().repeat(groups), requires_grad=False))
            self.twins[groups] = twin.train()
        for name in ("weight", "bias"):  # this step's γ and β, tiled by a broadcast copy (no temporary)
            p = getattr(bn, name)
            if p is not None:
                getattr(twin, name).view(groups, -1).copy_(p.detach())
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, shape = self.s, x.shape[1:]
        g = x.shape[0] // s
        c = shape[0]
        # Our plain layer does all G batches in one kernel call, statistics included, with no folding.
        direct = grouped_train_forward(self.bn, x, g)
        if direct is not None:
            y, mean, var = direct
            if self.record:
                n = s * (x.numel() // (x.shape[0] * c))  # values per channel in one batch
                self.stats.append((mean[: self.record].double(), var[: self.record].double(), n))
            return y
        folded = x.view(g, s, *shape).transpose(0, 1).reshape(s, g * c, *shape[1:])
        if self.record:
            # Reduced in the folded layout: over dim 0 (and positions), which is contiguous and fast.
            # Two passes by hand: torch.var_mean's reduction over a leading dim is ~15x slower here.
            xr = folded[:, : self.record * c]
            dims = [0, *range(2, xr.dim())]
            mean = xr.mean(dims, keepdim=True)
            var = (xr - mean).square_().mean(dims)
            self.stats.append((mean.reshape(self.record, c).double(), var.view(self.record, c).double(),
                               xr.numel() // xr.shape[1]))
        y = self._twin(g)(folded)
        return y.view(s, g, *shape).transpose(0, 1).reshape(x.shape)


@contextmanager
def _grouped_bn(model: nn.Module, s: int) -> Iterator[dict[str, _GroupedBN]]:
    swapped = []
    try:
        for layer, parent_name, attr, bn in bn_sites(model):
            parent = model.get_submodule(parent_name)
            wrapper = _GroupedBN(bn, s, _TWINS.setdefault(bn, {}))
            setattr(parent, attr, wrapper)
            swapped.append((parent, attr, bn, layer, wrapper))
        yield {layer: wrapper for _, _, _, layer, wrapper in swapped}
    finally:
        for parent, attr, bn, _, _ in swapped:
            setattr(parent, attr, bn)


def gather(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The rows of (source tensor, (G, s) indices) parts, batch after batch: grouped_forward's input."""
    return cat([src[idx.flatten()] for src, idx in parts])


def grouped_forward(model: nn.Module, parts: list[tuple[torch.Tensor, torch.Tensor]], record: int,
                    gathered: torch.Tensor | None = None):
    """Training-mode forward of batches given as (source tensor, (G, s) indices) parts, all of size s.

    `gathered`, when the caller keeps it, is gather(parts): the rows are then sliced from it instead of
    indexed out of the sources again. Returns the outputs (ΣG, s, classes) and, per BN layer, the float64
    batch statistics of its input for the first `record` batches: {"mean": (record, C), "var": (record,
    C), "n": values per channel}.
    """
    s = parts[0][1].shape[1]
    offsets, total = [], 0
    for _, idx in parts:
        offsets.append(total)
        total += len(idx)
    per_chunk = max(1, CHUNK // s)
    outs = []
    model.train()
    with _grouped_bn(model, s) as wrappers:
        for c0 in range(0, total, per_chunk):
            c1 = min(total, c0 + per_chunk)
            if gathered is not None:
                pieces = [gathered[c0 * s:c1 * s]]
            else:
                pieces = [src[idx[max(c0, off) - off:min(c1, off + len(idx)) - off].flatten()]
                          for (src, idx), off in zip(parts, offsets) if max(c0, off) < min(c1, off + len(idx))]
            for w in wrappers.values():
                w.record = max(0, min(record, c1) - c0)
            outs.append(model(cat(pieces)))
    logits = cat(outs)
    logits = logits.view(total, s, *logits.shape[1:])
    stats = {}
    for layer, w in wrappers.items():
        if w.stats:
            stats[layer] = {"mean": cat([m for m, _, _ in w.stats]),
                            "var": cat([v for _, v, _ in w.stats]), "n": w.stats[0][2]}
    return logits, stats


@torch.no_grad()
def population_statistics(model: nn.Module, x: torch.Tensor,
                          batches: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Algorithm 2's estimate per BN layer, {"mean", "var"} in float64, from training-mode forwards of the
    (K, m) index `batches` of `x`, no running statistic touched: the probes' target, and PreciseBN's
    (bnexp.engine.precise). The model's mode is restored."""
    was_training = model.training
    try:
        _, stats = grouped_forward(model, [(x, batches)], len(batches))
    finally:
        model.train(was_training)
    return {name: population(s) for name, s in stats.items()}
