"""The BN probes: the quantities of DESIGN.md section 2, measured while a network trains.

Everything here runs under `torch.no_grad()` on probe sets fixed once from the run's seed with a generator
of our own, so a run measures the same examples and units at every probe step and training is untouched:
weights, buffers, optimizer state and the RNG streams are the same with probes on or off.

A probe step is two forward passes. One in training mode over the K population batches and the test set
in batches of m (see gap_batch_size), each batch normalized by its own statistics and no running
statistic touched: it gives the population statistics, Batch Renorm's d and r, and f_train. One in eval
mode over the test set: it gives f_eval and the activations. Running the K + N_test/m batches as one
forward instead of one forward each is what keeps the probes cheap on small networks, where a forward's
cost is mostly per call.
"""

from __future__ import annotations

import copy
import functools
import math
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bnexp.config import Config
from bnexp.data import BatchSampler, Dataset
from bnexp.models import Block, bn_layers, hidden_blocks
from bnexp.norm import grouped_train_forward

# Offsets the probe sampler's seed from the training sampler's (seeded with cfg.seed itself), so the
# probe batches are not the first training batches.
_SEED_OFFSET = 0x5EED_0B5E
_PERCENTILES = {"p15": 0.15, "p50": 0.50, "p85": 0.85}  # tag suffix -> quantile
_CHUNK = 4096  # rows per forward, as in train.evaluate: bounds the memory of large test sets
_QUANTILE_MAX = 2 ** 24  # torch.quantile's input size limit
_GATHER_KEEP_BYTES = 64 << 20  # the most memory the probes keep their gathered batches in (Probes._gathered)


def _layer_width(block: Block) -> int:
    layer = block.layer
    width = getattr(layer, "out_features", None) or getattr(layer, "out_channels", None)
    if width is None:
        raise TypeError(f"cannot tell the width of {type(layer).__name__}")
    return int(width)


def _unit_values(x: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """(units, values): a unit of a conv layer is a channel, all positions pooled."""
    x = x.index_select(1, units)
    return x.transpose(0, 1).reshape(len(units), -1)


@functools.lru_cache(maxsize=8)
def _quantile_points(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(list(_PERCENTILES.values()), dtype=dtype, device=device)


def _quantiles(vals: torch.Tensor) -> torch.Tensor:
    """(3, units): the 15th, 50th and 85th percentiles of each row (torch.quantile, linear interpolation)."""
    q = _quantile_points(vals.dtype, vals.device)
    if vals.numel() <= _QUANTILE_MAX:
        return torch.quantile(vals, q, dim=1)
    # Past torch's limit (a big conv layer over a big test set): row by row, and a row too large for it
    # is thinned evenly, which moves a percentile by about one rank per stride.
    rows = [r[:: math.ceil(r.numel() / _QUANTILE_MAX)] for r in vals]
    return torch.stack([torch.quantile(r, q) for r in rows], dim=1)


def _quantiles_of(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """_quantiles of each tensor, in one call for tensors of the same shape and dtype (each row's
    percentiles do not depend on the other rows; a probe step costs torch.quantile's fixed cost per call)."""
    groups: dict[tuple, list[str]] = {}
    for name, vals in named.items():
        groups.setdefault((vals.shape, vals.dtype), []).append(name)
    out = {}
    for (shape, _), names in groups.items():
        if len(names) == 1 or len(names) * named[names[0]].numel() > _QUANTILE_MAX:
            out.update({name: _quantiles(named[name]) for name in names})
            continue
        q = _quantiles(torch.cat([named[name] for name in names]))
        out.update(zip(names, q.split(shape[0], dim=1)))
    return out


def _population(s: dict, dim: int = 0) -> dict[str, torch.Tensor]:
    """Algorithm 2: μ_pop = mean_B μ_B, σ²_pop = n/(n−1) · mean_B σ²_B (n values per channel per batch);
    the batches along `dim`."""
    n = s["n"]
    return {"mean": s["mean"].mean(dim), "var": s["var"].mean(dim) * (n / (n - 1))}


def gap_batch_size(n: int, m: int, ghost_batch_size: int | None = None) -> int:
    """The size of the training-mode test batches of the gap, for n test examples and training batch size m.

    The training batch size m; a test set smaller than m is one batch of n. Ghost BN normalizes a batch as
    virtual batches of k and accepts a batch larger than k only as a multiple of k (a training batch always
    is one): a smaller test set is then covered by batches of the largest multiple of k it holds, so each
    test example is normalized within a virtual batch of k, as a training example is.
    """
    s = min(n, m)
    k = ghost_batch_size
    return s - s % k if k is not None and s > k else s


def cover_in_batches(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cover n test examples with batches of exactly m: indices (G, m) and a mask of the rows that count.

    The last batch is the final m examples, overlapping its predecessor, so every example gets a
    train-mode prediction from a batch of the training batch size and is counted once; the kept rows, in
    order, are examples 0..n-1. A test set smaller than m is one batch of n.
    """
    if n <= m:
        return torch.arange(n).view(1, n), torch.ones(n, dtype=torch.bool)
    starts = list(range(0, n - m + 1, m))
    covered = starts[-1] + m
    if covered < n:
        starts.append(n - m)
    idx = torch.stack([torch.arange(s, s + m) for s in starts])
    keep = torch.ones_like(idx, dtype=torch.bool)
    if covered < n:
        keep[-1, : covered - (n - m)] = False  # already predicted by the batch before
    return idx, keep.flatten()


_SITES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# BN layer -> {G: its twin for G stacked batches} (_GroupedBN), shared by every caller: the probes and
# PreciseBN measure the same layers, and a twin costs a deepcopy to build.
_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bn_sites(model: nn.Module) -> list[tuple[str, str, str, nn.Module]]:
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


def _cat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
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
        for layer, parent_name, attr, bn in _bn_sites(model):
            parent = model.get_submodule(parent_name)
            wrapper = _GroupedBN(bn, s, _TWINS.setdefault(bn, {}))
            setattr(parent, attr, wrapper)
            swapped.append((parent, attr, bn, layer, wrapper))
        yield {layer: wrapper for _, _, _, layer, wrapper in swapped}
    finally:
        for parent, attr, bn, _, _ in swapped:
            setattr(parent, attr, bn)


def _gather(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The rows of (source tensor, (G, s) indices) parts, batch after batch: _grouped_forward's input."""
    return _cat([src[idx.flatten()] for src, idx in parts])


def _grouped_forward(model: nn.Module, parts: list[tuple[torch.Tensor, torch.Tensor]], record: int,
                     gathered: torch.Tensor | None = None):
    """Training-mode forward of batches given as (source tensor, (G, s) indices) parts, all of size s.

    `gathered`, when the caller keeps it, is _gather(parts): the rows are then sliced from it instead of
    indexed out of the sources again. Returns the outputs (ΣG, s, classes) and, per BN layer, the float64
    batch statistics of its input for the first `record` batches: {"mean": (record, C), "var": (record,
    C), "n": values per channel}.
    """
    s = parts[0][1].shape[1]
    offsets, total = [], 0
    for _, idx in parts:
        offsets.append(total)
        total += len(idx)
    per_chunk = max(1, _CHUNK // s)
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
            outs.append(model(_cat(pieces)))
    logits = _cat(outs)
    logits = logits.view(total, s, *logits.shape[1:])
    stats = {}
    for layer, w in wrappers.items():
        if w.stats:
            stats[layer] = {"mean": _cat([m for m, _, _ in w.stats]),
                            "var": _cat([v for _, v, _ in w.stats]), "n": w.stats[0][2]}
    return logits, stats


@torch.no_grad()
def population_statistics(model: nn.Module, x: torch.Tensor,
                          batches: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Algorithm 2's estimate per BN layer, {"mean", "var"} in float64, from training-mode forwards of the
    (K, m) index `batches` of `x`, no running statistic touched: the probes' target, and PreciseBN's
    (bnexp.precise). The model's mode is restored."""
    was_training = model.training
    try:
        _, stats = _grouped_forward(model, [(x, batches)], len(batches))
    finally:
        model.train(was_training)
    return {name: _population(s) for name, s in stats.items()}


class Probes:
    """Measures what BN does during training; see the module docstring and DESIGN.md section 2."""

    def __init__(self, cfg: Config, model: nn.Module, data: Dataset):
        self.cfg, self.pcfg, self.data = cfg, cfg.probes, data
        self.m = cfg.data.batch_size
        self.bn_names = list(bn_layers(model))
        self.blocks = list(hidden_blocks(model))
        self.weight_layers = [name for name, _ in self._weights(model)]
        device = data.x_train.device
        # Drawn like training batches, by a sampler of their own: the training order is never drawn from.
        sampler = BatchSampler(len(data.y_train), self.m, cfg.seed + _SEED_OFFSET, device)
        self.population_idx = torch.stack([sampler.next() for _ in range(self.pcfg.population_batches)])
        ghost = cfg.model.bn.ghost_batch_size if cfg.model.bn.variant == "ghost" else None
        n_test = len(data.y_test)
        self.test_idx, self.test_keep = (t.to(device) for t in
                                         cover_in_batches(n_test, gap_batch_size(n_test, self.m, ghost)))
        # The units continue the sampler's stream, so runs keep the probe sets they had before it was used.
        gen = sampler.generator
        self.units = {name: torch.randperm(_layer_width(block), generator=gen)[: self.pcfg.units_per_layer]
                      .sort().values.to(device)
                      for name, block in hidden_blocks(model).items()}
        self._grads: dict[str, torch.Tensor] = {}
        self._grads_step: int | None = None
        self._last: dict[str, float] = {}
        self.f_eval: torch.Tensor | None = None  # the last measure()'s eval-mode logits of the test set
        self._gather_cache: dict[int, torch.Tensor | None] = {}

    # --- choosing and naming -----------------------------------------------------------------------
    @staticmethod
    def _weights(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """The weight of every layer: h1.layer, h2.layer, ..., out."""
        for name, child in model.named_children():
            if isinstance(child, Block):
                yield name, child.layer.weight
            elif isinstance(getattr(child, "weight", None), nn.Parameter):
                yield name, child.weight

    @property
    def has_bn(self) -> bool:
        return bool(self.bn_names)

    def due(self, step: int) -> bool:
        return step % self.pcfg.every == 0 or step == self.cfg.train.steps

    def _histogram_due(self, step: int) -> bool:
        # The first probe step at or after each multiple of histogram_every (and the last step), so
        # histograms appear even when histogram_every is not a multiple of every.
        if step == 0 or step == self.cfg.train.steps:
            return True
        every, hist = self.pcfg.every, self.pcfg.histogram_every
        previous = ((step - 1) // every) * every
        return step // hist > previous // hist

    # --- the training-loop interface ---------------------------------------------------------------
    @torch.no_grad()
    def after_backward(self, step: int, model: nn.Module) -> None:
        """Between backward and the optimizer step: the gradient of each layer's weights."""
        if not self.pcfg.grad_norms:
            return
        # Kept as device tensors: read once in measure() with everything else.
        named = dict(self._weights(model))
        self._grads = {name: named[name].grad.norm() for name in self.weight_layers
                       if named[name].grad is not None}
        self._grads_step = step

    @torch.no_grad()
    def measure(self, step: int, model: nn.Module, writer=None) -> dict[str, float]:
        """All scalar probe values of this step, keyed by TensorBoard tag; histograms go to `writer`."""
        was_training = model.training
        # Values are gathered as a few vectors with their tags, not one 0-d tensor per tag: every torch op
        # costs microseconds here, and a probe step has ~50 values.
        tags: list[str] = []
        parts: list[torch.Tensor] = []

        def add(values: tuple[list[str], torch.Tensor | None]) -> None:
            if values[0]:
                tags.extend(values[0])
                parts.append(values[1].reshape(-1))

        self.f_eval = None
        try:
            if self._grads_step == step and self._grads:
                add(([f"grad_norm/{name}" for name in self._grads], torch.stack(list(self._grads.values()))))
            self._grads, self._grads_step = {}, None
            # Batch statistics need two values per channel: a one-example test set has no f_train.
            gap = self.has_bn and self.pcfg.gap and len(self.data.y_test) >= 2
            stats, test_logits = {}, None
            if self.has_bn and (self.pcfg.running_stats or gap):
                stats, test_logits = self.train_mode_pass(model, with_test=gap)
                for values in self._running_stat_values(model, stats):
                    add(values)
            if gap or self.pcfg.activations:
                f_eval, acts = self.eval_pass(model)
                self.f_eval = f_eval  # the evaluation of this step reuses it (bnexp.train.evaluate)
                if self.pcfg.activations:
                    for values in self._activation_values(acts, step, writer):
                        add(values)
                if test_logits is not None:
                    add(self._gap_values(test_logits, f_eval))
        finally:
            model.train(was_training)
        if not tags:
            return {}
        # One host transfer for the whole step (cat promotes float32 parts to float64, exactly).
        out = dict(zip(tags, torch.cat(parts).tolist()))
        self._last = dict(out)
        return out

    # --- the two forward passes ---------------------------------------------------------------------
    @torch.no_grad()
    def train_mode_pass(self, model: nn.Module, with_test: bool = True):
        """Training-mode forwards with batch statistics and no running-statistic updates.

        Returns ({layer: {"mean", "var": (K, C) float64 batch statistics of the BN input over the K probe
        batches, "n": values per channel}}, the logits of the test batches (G, m, classes) or None). Every batch is normalized
        by its own statistics, but all batches go through the network in one forward (see _GroupedBN).
        """
        x_tr, x_te = self.data.x_train, self.data.x_test
        parts = [(x_tr, self.population_idx)]
        test_apart = with_test and self.test_idx.shape[1] != self.m  # see gap_batch_size
        if with_test and not test_apart:
            parts.append((x_te, self.test_idx))
        logits, stats = _grouped_forward(model, parts, len(self.population_idx), self._gathered(parts))
        test_logits = None
        if test_apart:
            test_logits, _ = _grouped_forward(model, [(x_te, self.test_idx)], 0)
        elif with_test:
            test_logits = logits[len(self.population_idx):]
        return stats, test_logits

    def _gathered(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        """The probe batches' rows, gathered once per run: the probe sets are fixed, and indexing them out
        of the data again was ~10 % of a probe step on the default network. Not kept above
        _GATHER_KEEP_BYTES (a large test set is then indexed per chunk, as before)."""
        key = len(parts)
        if key not in self._gather_cache:
            rows = sum(idx.numel() for _, idx in parts)
            src = parts[0][0]
            nbytes = rows * src[0].numel() * src.element_size()
            self._gather_cache[key] = _gather(parts) if nbytes <= _GATHER_KEEP_BYTES else None
        return self._gather_cache[key]

    @torch.no_grad()
    def eval_pass(self, model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One eval-mode forward over the test set: f_eval, and each hidden layer's input to the
        nonlinearity for the fixed units, as (units, values) (conv: a channel, all positions pooled)."""
        x = self.data.x_test
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in self.units}

        def hook_for(name: str):
            units = self.units[name]
            return lambda _mod, inputs: captured[name].append(_unit_values(inputs[0], units))

        model.eval()
        handles = []
        try:
            for name in self.blocks if self.pcfg.activations else ():
                handles.append(model.get_submodule(name).act.register_forward_pre_hook(hook_for(name)))
            f_eval = _cat([model(x[i:i + _CHUNK]) for i in range(0, len(x), _CHUNK)])
        finally:
            for h in handles:
                h.remove()
        return f_eval, {name: _cat(chunks, dim=1) for name, chunks in captured.items() if chunks}

    # --- the quantities -----------------------------------------------------------------------------
    @torch.no_grad()
    def population_statistics(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """Algorithm 2's estimate per BN layer: μ_pop = mean_B μ_B, σ²_pop = n/(n−1)·mean_B σ²_B."""
        return population_statistics(model, self.data.x_train, self.population_idx)

    def _running_stat_values(self, model: nn.Module, stats: dict) -> list[tuple[list[str], torch.Tensor]]:
        bns = {layer: bn for layer, _, _, bn in _bn_sites(model)}
        # Layers with running estimates (a layer without has nothing to converge), grouped so that layers
        # of one width, ε and batch shape are computed together, as rows of stacked tensors: a probe step
        # pays a few µs per op, and the arithmetic is per channel either way.
        groups: dict[tuple, list[str]] = {}
        for name, s in stats.items():
            bn = bns[name]
            if getattr(bn, "running_mean", None) is not None:
                groups.setdefault((tuple(s["mean"].shape), s["n"], bn.eps), []).append(name)
        per_layer = {}
        for (_, n, eps), names in groups.items():
            rm = torch.stack([bns[name].running_mean for name in names]).double()  # (layers, C)
            rv = torch.stack([bns[name].running_var for name in names]).double()
            mean_b = torch.stack([stats[name]["mean"] for name in names])  # (layers, K, C)
            var_b = torch.stack([stats[name]["var"] for name in names])
            pop = _population({"mean": mean_b, "var": var_b, "n": n}, dim=1)
            columns = []
            if self.pcfg.running_stats:
                columns += [((rm - pop["mean"]).abs() / (pop["var"] + eps).sqrt()).mean(1),
                            torch.log((rv + eps) / (pop["var"] + eps)).abs().mean(1)]
            if self.pcfg.gap:
                # Batch Renorm's d and r per probe batch, channel-averaged, then averaged over the batches.
                inv_run = (rv + eps).rsqrt().unsqueeze(1)
                columns += [((mean_b - rm.unsqueeze(1)).abs() * inv_run).mean((1, 2)),
                            ((var_b + eps).sqrt() * inv_run).mean((1, 2))]
            if columns:
                values = torch.stack(columns, 1)  # (layers, values)
                for j, name in enumerate(names):
                    per_layer[name] = (([f"running_stats/{name}/mean_err", f"running_stats/{name}/var_err"]
                                        if self.pcfg.running_stats else [])
                                       + ([f"gap/{name}/d", f"gap/{name}/r"] if self.pcfg.gap else []), values[j])
        return [per_layer[name] for name in stats if name in per_layer]  # the layers' order, whatever the groups

    def _gap_values(self, test_logits: torch.Tensor, f_eval: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        y = self.data.y_test
        # ‖f_train − f_eval‖_F / ‖f_eval‖_F per test batch as it was run, then the mean over batches.
        tr = test_logits
        ev = f_eval[self.test_idx.flatten()].view_as(tr)
        f_train = tr.reshape(-1, tr.shape[-1])[self.test_keep]  # each test example once, in order
        ratio = torch.linalg.vector_norm(tr - ev, dim=(1, 2)) / torch.linalg.vector_norm(ev, dim=(1, 2))
        acc_train = (f_train.argmax(1) == y).double().mean()
        acc_eval = (f_eval.argmax(1) == y).double().mean()
        log_train, log_eval = F.log_softmax(f_train.double(), 1), F.log_softmax(f_eval.double(), 1)
        kl = F.kl_div(log_eval, log_train, log_target=True, reduction="none").sum(1).mean()
        return (["gap/accuracy", "gap/logits", "gap/kl", "gap/train_mode_accuracy", "gap/eval_mode_accuracy"],
                torch.stack([acc_train - acc_eval, ratio.mean(), kl, acc_train, acc_eval]))

    def _activation_values(self, acts: dict[str, torch.Tensor], step: int,
                           writer) -> list[tuple[list[str], torch.Tensor]]:
        out = []
        hist = writer is not None and self._histogram_due(step)
        quantiles = _quantiles_of(acts)
        for name, vals in acts.items():
            q = quantiles[name]  # (percentile, unit); the tags go unit by unit
            units = self.units[name].tolist()
            out.append(([f"activations/{name}/u{unit}/{p}" for unit in units for p in _PERCENTILES], q.t()))
            for row, unit in enumerate(units if hist else ()):
                finite = vals[row][torch.isfinite(vals[row])]
                if finite.numel():  # a diverged run still gets its scalars (NaN), not a crash
                    writer.add_histogram(f"activations/{name}/u{unit}", finite, step)
        return out

    # --- outputs ------------------------------------------------------------------------------------
    def layout(self) -> dict:
        """Custom-scalar charts: several lines that belong together on one chart."""
        layout: dict[str, dict[str, list]] = {}
        if self.pcfg.activations:
            layout["probes: input to the nonlinearity"] = {
                f"{name} unit {unit}": ["Multiline", [f"activations/{name}/u{unit}/{p}" for p in _PERCENTILES]]
                for name in self.blocks for unit in self.units[name].tolist()}
        if self.has_bn and self.pcfg.gap:
            charts = {"accuracy: train mode vs eval mode": ["Multiline", ["gap/train_mode_accuracy",
                                                                          "gap/eval_mode_accuracy"]],
                      "gap (logits, KL)": ["Multiline", ["gap/logits", "gap/kl"]]}
            charts.update({f"{name} d and r": ["Multiline", [f"gap/{name}/d", f"gap/{name}/r"]]
                           for name in self.bn_names})
            layout["probes: train/inference gap"] = charts
        if self.has_bn and self.pcfg.running_stats:
            layout["probes: running statistics"] = {
                f"{name} error": ["Multiline", [f"running_stats/{name}/mean_err", f"running_stats/{name}/var_err"]]
                for name in self.bn_names}
        if self.pcfg.grad_norms:
            layout["probes: gradients"] = {"weight gradient norm": ["Multiline", [r"grad_norm/.*"]]}
        return layout

    def summary(self) -> dict[str, float]:
        last, out = self._last, {}
        for key in ("accuracy", "logits", "kl"):
            if f"gap/{key}" in last:
                out[f"gap_{key}"] = last[f"gap/{key}"]
        for key in ("mean_err", "var_err"):
            errs = [last[f"running_stats/{name}/{key}"] for name in self.bn_names
                    if f"running_stats/{name}/{key}" in last]
            if errs:
                out[f"running_{key}"] = math.fsum(errs) / len(errs)
        return out

    def state_dict(self) -> dict[str, Any]:
        # The probe sets are drawn again from the seed on resume; they are saved too so a resumed run
        # measures the very same examples and units even if the generator's algorithm changed.
        return {"population_idx": self.population_idx.cpu(),
                "units": {name: u.cpu() for name, u in self.units.items()},
                "last": dict(self._last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.data.x_train.device
        self.population_idx = state["population_idx"].to(device)
        self.units = {name: u.to(device) for name, u in state["units"].items()}
        self._last = dict(state["last"])
