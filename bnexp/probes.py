"""The BN probes: the quantities of DESIGN.md section 2, measured while a network trains.

Everything here runs under `torch.no_grad()` on probe sets fixed once from the run's seed with a generator
of our own, so a run measures the same examples and units at every probe step and training is untouched:
weights, buffers, optimizer state and the RNG streams are the same with probes on or off.

Per probe step the work is: K train-mode forwards over the population batches (batch statistics, no
running-stat updates) for the population statistics and Batch Renorm's d and r; ceil(N_test/m) train-mode
forwards over the test set for f_train; one eval-mode forward over the test set that serves both f_eval
and the activation percentiles.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bnexp.config import Config
from bnexp.data import Dataset
from bnexp.models import Block, bn_layers, hidden_blocks

# Offsets the probe generator's seed from the BatchSampler's (which is seeded with cfg.seed itself), so
# the probe batches are not the first training batches.
_SEED_OFFSET = 0x5EED_0B5E
_QUANTILES = (0.15, 0.50, 0.85)
_EVAL_CHUNK = 4096


def _layer_width(block: Block) -> int:
    layer = block.layer
    width = getattr(layer, "out_features", None) or getattr(layer, "out_channels", None)
    if width is None:
        raise TypeError(f"cannot tell the width of {type(layer).__name__}")
    return int(width)


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean, biased variance and count of a BN input (channels on dim 1)."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, correction=0), x.numel() // x.shape[1]


def _unit_values(x: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """(units, values): a unit of a conv layer is a channel, all positions pooled."""
    x = x.index_select(1, units)
    return x.transpose(0, 1).reshape(len(units), -1)


def cover_in_batches(n: int, m: int) -> list[tuple[int, int, int]]:
    """Cover n test examples with batches of exactly m: (start, stop, first new row in the batch).

    The last batch is the final m examples, overlapping its predecessor, so every example gets a
    train-mode prediction from a batch of the training batch size and is counted once. A test set
    smaller than m is one batch.
    """
    if n <= m:
        return [(0, n, 0)]
    out = [(s, s + m, 0) for s in range(0, n - m + 1, m)]
    covered = out[-1][1]
    if covered < n:
        out.append((n - m, n, covered - (n - m)))
    return out


class Probes:
    """Measures what BN does during training; see the module docstring and DESIGN.md section 2."""

    def __init__(self, cfg: Config, model: nn.Module, data: Dataset):
        self.cfg, self.pcfg, self.data = cfg, cfg.probes, data
        self.m = cfg.data.batch_size
        self.bn_names = list(bn_layers(model))
        self.blocks = list(hidden_blocks(model))
        self.weight_layers = [name for name, _ in self._weights(model)]
        device = data.x_train.device
        gen = torch.Generator().manual_seed(cfg.seed + _SEED_OFFSET)
        self.population_idx = self._draw_batches(gen, len(data.y_train), self.pcfg.population_batches, self.m)
        self.population_idx = self.population_idx.to(device)
        self.units = {name: torch.randperm(_layer_width(block), generator=gen)[: self.pcfg.units_per_layer]
                      .sort().values.to(device)
                      for name, block in hidden_blocks(model).items()}
        self._grads: dict[str, torch.Tensor] = {}
        self._grads_step: int | None = None
        self._last: dict[str, float] = {}

    # --- choosing and naming -----------------------------------------------------------------------
    @staticmethod
    def _draw_batches(gen: torch.Generator, n: int, k: int, m: int) -> torch.Tensor:
        """K batches of m distinct indices, sampled like training batches (without replacement per epoch)."""
        rows, perm, pos = [], torch.randperm(n, generator=gen), 0
        for _ in range(k):
            if pos + m > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            rows.append(perm[pos:pos + m])
            pos += m
        return torch.stack(rows)

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
        was_training = model.training
        values: dict[str, torch.Tensor] = {}
        try:
            if self._grads_step == step:
                values.update({f"grad_norm/{name}": g for name, g in self._grads.items()})
            self._grads, self._grads_step = {}, None
            has_bn = bool(bn_layers(model))
            if has_bn and (self.pcfg.running_stats or self.pcfg.gap):
                values.update(self._running_stats_and_renorm(model))
            if has_bn and self.pcfg.gap:
                values.update(self._gap_and_activations(model, step, writer))
            elif self.pcfg.activations:
                values.update(self._gap_and_activations(model, step, writer, gap=False))
        finally:
            model.train(was_training)
        if not values:
            return {}
        # One host transfer for the whole step.
        scalars = torch.stack([v.detach().reshape(()).double().cpu() for v in values.values()]).tolist()
        out = dict(zip(values, scalars))
        self._last = dict(out)
        return out

    # --- the quantities -----------------------------------------------------------------------------
    def population_statistics(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """Per BN layer with running estimates: Algorithm 2's μ_pop and σ²_pop over the K probe batches,
        and Batch Renorm's d and r of each batch against the current running estimates, averaged."""
        tracked = {n: b for n, b in bn_layers(model).items() if getattr(b, "running_mean", None) is not None}
        per_batch: dict[str, list[tuple]] = {name: [] for name in tracked}

        def hook_for(name: str, bn: nn.Module):
            inv_run = (bn.running_var + bn.eps).rsqrt()

            def hook(_mod, inputs, _output):
                mean, var, n = _channel_stats(inputs[0])
                d = ((mean - bn.running_mean).abs() * inv_run).mean()
                r = ((var + bn.eps).sqrt() * inv_run).mean()
                per_batch[name].append((mean.double(), var.double(), n, d, r))
            return hook

        x = self.data.x_train
        with _batch_stats_mode(model), _hooks(tracked, hook_for, kind="forward"):
            for idx in self.population_idx:
                model(x[idx])
        out = {}
        for name, rows in per_batch.items():
            means, variances, counts, ds, rs = zip(*rows)
            n = counts[0]
            out[name] = {"mean": torch.stack(means).mean(0),
                         "var": torch.stack(variances).mean(0) * (n / (n - 1)),
                         "d": torch.stack(ds).mean(), "r": torch.stack(rs).mean()}
        return out

    def _running_stats_and_renorm(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        bns = bn_layers(model)
        for name, pop in self.population_statistics(model).items():
            bn = bns[name]
            rm, rv = bn.running_mean.double(), bn.running_var.double()
            if self.pcfg.running_stats:
                out[f"running_stats/{name}/mean_err"] = ((rm - pop["mean"]).abs() / (pop["var"] + bn.eps).sqrt()).mean()
                out[f"running_stats/{name}/var_err"] = torch.log((rv + bn.eps) / (pop["var"] + bn.eps)).abs().mean()
            if self.pcfg.gap:
                out[f"gap/{name}/d"], out[f"gap/{name}/r"] = pop["d"], pop["r"]
        return out

    def _gap_and_activations(self, model: nn.Module, step: int, writer, gap: bool = True) -> dict[str, torch.Tensor]:
        x, y = self.data.x_test, self.data.y_test
        out: dict[str, torch.Tensor] = {}
        acts = self.pcfg.activations
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in self.blocks}

        def hook_for(name: str, _block):
            units = self.units[name]

            def pre_hook(_mod, inputs):
                captured[name].append(_unit_values(inputs[0], units))
            return pre_hook

        # f_eval, and the activations on the same forward.
        model.eval()
        acts_modules = {name: mod.act for name, mod in hidden_blocks(model).items()} if acts else {}
        with _hooks(acts_modules, hook_for, kind="forward_pre"):
            f_eval = torch.cat([model(x[i:i + _EVAL_CHUNK]) for i in range(0, len(y), _EVAL_CHUNK)])
        if acts:
            hist = writer is not None and self._histogram_due(step)
            for name, chunks in captured.items():
                vals = torch.cat(chunks, dim=1)
                for row, unit in enumerate(self.units[name].tolist()):
                    q = torch.quantile(vals[row], torch.tensor(_QUANTILES, dtype=vals.dtype, device=vals.device))
                    for p, v in zip(("p15", "p50", "p85"), q):
                        out[f"activations/{name}/u{unit}/{p}"] = v
                    if hist:
                        finite = vals[row][torch.isfinite(vals[row])]
                        if finite.numel():
                            writer.add_histogram(f"activations/{name}/u{unit}", finite, step)
        if not gap or len(y) < 2:
            return out

        # f_train: batch statistics over test batches of the training batch size, no running-stat updates.
        f_train = torch.empty_like(f_eval)
        ratios = []
        with _batch_stats_mode(model):
            for start, stop, new in cover_in_batches(len(y), self.m):
                logits = model(x[start:stop])
                ev = f_eval[start:stop]
                ratios.append(torch.linalg.norm(logits - ev) / torch.linalg.norm(ev))
                f_train[start + new:stop] = logits[new:]
        acc_train = (f_train.argmax(1) == y).double().mean()
        acc_eval = (f_eval.argmax(1) == y).double().mean()
        log_train, log_eval = F.log_softmax(f_train.double(), 1), F.log_softmax(f_eval.double(), 1)
        kl = F.kl_div(log_eval, log_train, log_target=True, reduction="none").sum(1).mean()
        out.update({"gap/accuracy": acc_train - acc_eval, "gap/logits": torch.stack(ratios).mean(),
                    "gap/kl": kl, "gap/train_mode_accuracy": acc_train, "gap/eval_mode_accuracy": acc_eval})
        return out

    # --- outputs ------------------------------------------------------------------------------------
    def layout(self) -> dict:
        """Custom-scalar charts: several lines that belong together on one chart."""
        layout: dict[str, dict[str, list]] = {}
        if self.pcfg.activations:
            layout["probes: input to the nonlinearity"] = {
                f"{name} unit {unit}": ["Multiline", [f"activations/{name}/u{unit}/{p}" for p in ("p15", "p50", "p85")]]
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


@contextmanager
def _batch_stats_mode(model: nn.Module) -> Iterator[None]:
    """Train mode with running-statistic updates off: BN normalizes with batch statistics and leaves its
    buffers (running_mean, running_var, num_batches_tracked) alone, for torch's layer and ours."""
    bns = list(bn_layers(model).values())
    saved = [bn.track_running_stats for bn in bns]
    model.train()
    try:
        for bn in bns:
            bn.track_running_stats = False
        yield
    finally:
        for bn, flag in zip(bns, saved):
            bn.track_running_stats = flag


@contextmanager
def _hooks(modules: dict[str, nn.Module], make_hook, kind: str) -> Iterator[None]:
    handles = []
    try:
        for name, mod in modules.items():
            register = mod.register_forward_hook if kind == "forward" else mod.register_forward_pre_hook
            handles.append(register(make_hook(name, mod)))
        yield
    finally:
        for h in handles:
            h.remove()
