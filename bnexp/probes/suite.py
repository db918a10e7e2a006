"""Probes: the quantities of docs/design.md section 2, measured while a network trains.

Everything here runs under `torch.no_grad()` on probe sets fixed once from the run's seed with a generator
of our own, so a run measures the same examples and units at every probe step and training is untouched:
weights, buffers, optimizer state and the RNG streams are the same with probes on or off.

A probe step is two forward passes. One in training mode over the K population batches and the test set
in batches of m (bnexp.probes.gap.gap_batch_size), each batch normalized by its own statistics and no
running statistic touched (bnexp.probes.population): it gives the population statistics, Batch Renorm's
d and r, and f_train. One in eval mode over the test set: it gives f_eval and the activations. Each family
of measurements is a module of this package; this one draws the probe sets, runs the passes and gathers
the values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bnexp.config import Config
from bnexp.data import BatchSampler, Dataset
from bnexp.models import bn_layers, hidden_blocks, weight_layers
from bnexp.nn.noisy import paused_noise
from bnexp.probes import activations, gap, gradients, ics, landscape, rank, running_stats, sharpness, signal
from bnexp.probes.functional import ProbeLoss
from bnexp.probes.population import gather, grouped_forward, population_statistics

# Offsets the probe sampler's seed from the training sampler's (seeded with cfg.seed itself), so the
# probe batches are not the first training batches; and the sharpness probe's start vector's.
_SEED_OFFSET = 0x5EED_0B5E
_SHARPNESS_SEED_OFFSET = 0x5A_A4_9E55
_GATHER_KEEP_BYTES = 64 << 20  # the most memory the probes keep their gathered batches in (Probes._gathered)


class Probes:
    """Measures what BN does during training; see the module docstring and docs/design.md section 2."""

    def __init__(self, cfg: Config, model: nn.Module, data: Dataset):
        self.cfg, self.pcfg, self.data = cfg, cfg.probes, data
        # The batch BN normalizes over in training (a process's shard under distributed local statistics).
        self.m = cfg.bn_batch_size
        self.bn_names = list(bn_layers(model))
        self.weight_layers = list(weight_layers(model))
        device = data.x_train.device
        # Drawn like training batches, by a sampler of their own: the training order is never drawn from.
        sampler = BatchSampler(len(data.y_train), self.m, cfg.seed + _SEED_OFFSET, device)
        k = self.pcfg.population_batches or math.ceil(self.pcfg.population_examples / self.m)
        self.population_idx = torch.stack([sampler.next() for _ in range(k)])
        ghost = cfg.model.bn.ghost_batch_size if cfg.model.bn.variant == "ghost" else None
        n_test = len(data.y_test)
        self.test_idx, self.test_keep = (t.to(device) for t in
                                         gap.cover_in_batches(n_test, gap.gap_batch_size(n_test, self.m, ghost)))
        self.blocks = hidden_blocks(model)
        self.top_blocks = signal.top_blocks(model)  # those whose output the signal and rank probes measure
        # Not drawn: the same units for every seed (activations.fixed_units).
        self.units = {name: activations.fixed_units(block.width, self.pcfg.units_per_layer).to(device)
                      for name, block in self.blocks.items()}
        # The batch of the signal, rank, ics, landscape and sharpness probes: drawn after the other sets.
        self.probe_idx = sampler.next()
        self.weight_params = {name.removesuffix(".layer"): f"{name}.weight" for name, m in model.named_modules()
                              if name.removesuffix(".layer") in self.weight_layers}
        self._grads: dict[str, torch.Tensor] = {}
        self._grads_step: int | None = None
        self._last: dict[str, float] = {}
        self.f_eval: torch.Tensor | None = None  # the last measure()'s eval-mode logits of the test set
        self._gather_cache: dict[int, torch.Tensor | None] = {}

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
    def after_backward(self, step: int, model: nn.Module) -> None:
        """Between backward and the optimizer step: the gradient of each layer's weights."""
        if self.pcfg.grad_norms:
            self._grads = gradients.grad_norms(model, self.weight_layers)
            self._grads_step = step

    @torch.no_grad()
    def measure(self, step: int, model: nn.Module, writer=None, lr: float | None = None) -> dict[str, float]:
        """All scalar probe values of this step, keyed by TensorBoard tag; histograms go to `writer`. `lr`:
        the learning rate the next update uses (the ics and landscape probes step with it)."""
        with paused_noise(model):
            return self._measure(step, model, writer, lr)

    def _measure(self, step: int, model: nn.Module, writer, lr: float | None) -> dict[str, float]:
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
            with_gap = self.has_bn and self.pcfg.gap and len(self.data.y_test) >= 2
            stats, test_logits = {}, None
            if self.has_bn and (self.pcfg.running_stats or with_gap):
                stats, test_logits = self.train_mode_pass(model, with_test=with_gap)
                for values in running_stats.layer_values(model, stats, self.pcfg.running_stats, with_gap):
                    add(values)
            if with_gap or self.pcfg.activations:
                units = self.units if self.pcfg.activations else {}
                f_eval, acts = activations.eval_pass(model, self.data.x_test, units)
                self.f_eval = f_eval  # the evaluation of this step reuses it (bnexp.engine.trainer.evaluate)
                if self.pcfg.activations:
                    hist_writer = writer if writer is not None and self._histogram_due(step) else None
                    for values in activations.activation_values(acts, self.units, step, hist_writer):
                        add(values)
                if test_logits is not None:
                    add(gap.gap_values(test_logits, f_eval, self.data.y_test, self.test_idx, self.test_keep))
            for values in self._why_values(model, lr):
                add(values)
        finally:
            model.train(was_training)
        if not tags:
            return {}
        # One host transfer for the whole step (cat promotes float32 parts to float64, exactly).
        out = dict(zip(tags, torch.cat(parts).tolist()))
        self._last = dict(out)
        return out

    def probe_loss(self, model: nn.Module) -> ProbeLoss:
        """The training loss on the fixed probe batch as a function of the parameters (bnexp.probes.functional)."""
        x, y = self.data.x_train[self.probe_idx], self.data.y_train[self.probe_idx]
        return ProbeLoss(model, x, y, self.data.loss_function)

    def _why_values(self, model: nn.Module, lr: float | None) -> list[tuple[list[str], torch.Tensor]]:
        """The families that test explanations of why BN helps, on the probe batch."""
        p, out = self.pcfg, []
        if not (p.signal or p.rank or p.ics or p.landscape or p.sharpness):
            return out
        loss = self.probe_loss(model)
        if p.signal or p.rank:
            outputs, branches = signal.capture(model, loss.outputs_now, with_branches=p.signal)
            if p.signal:
                out.append(signal.signal_values(outputs, branches))
            if p.rank:
                out.append(rank.rank_values(outputs))
        if (p.ics or p.landscape) and lr is None:
            raise ValueError("the ics and landscape probes step with the run's learning rate: pass lr")
        if p.ics:
            out.append(ics.ics_values(loss, self.weight_params, lr))
        if p.landscape:
            out.append(landscape.landscape_values(loss, lr, p.landscape_steps))
        if p.sharpness:
            seed = (self.cfg.seed + _SHARPNESS_SEED_OFFSET) % 2 ** 63
            out.append((["sharpness/top_eig"], sharpness.top_eigenvalue(loss, p.sharpness_iters, seed).reshape(1)))
        return out

    @torch.no_grad()
    def train_mode_pass(self, model: nn.Module, with_test: bool = True):
        """Training-mode forwards with batch statistics and no running-statistic updates.

        Returns ({layer: {"mean", "var": (K, C) float64 batch statistics of the BN input over the K probe
        batches, "n": values per channel}}, the logits of the test batches (G, m, classes) or None). Every
        batch is normalized by its own statistics, but all batches go through the network in one forward.
        """
        x_tr, x_te = self.data.x_train, self.data.x_test
        parts = [(x_tr, self.population_idx)]
        test_apart = with_test and self.test_idx.shape[1] != self.m  # see gap.gap_batch_size
        if with_test and not test_apart:
            parts.append((x_te, self.test_idx))
        logits, stats = grouped_forward(model, parts, len(self.population_idx), self._gathered(parts))
        test_logits = None
        if test_apart:
            test_logits, _ = grouped_forward(model, [(x_te, self.test_idx)], 0)
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
            self._gather_cache[key] = gather(parts) if nbytes <= _GATHER_KEEP_BYTES else None
        return self._gather_cache[key]

    @torch.no_grad()
    def population_statistics(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """Algorithm 2's estimate per BN layer: μ_pop = mean_B μ_B, σ²_pop = n/(n−1)·mean_B σ²_B."""
        return population_statistics(model, self.data.x_train, self.population_idx)

    # --- outputs ------------------------------------------------------------------------------------
    def layout(self) -> list[tuple[str, dict[str, list], bool]]:
        """Custom-scalar charts by category, in the order the dashboard shows them, each with whether it
        starts closed: what BN does, then the paper's Figure 1 (open), then the families with a chart per
        layer or block (closed until wanted). A chart holds one quantity, or two that belong together."""
        p, bn, out = self.pcfg, self.has_bn, []
        if bn and p.running_stats:
            out.append(("BN: running statistics, error against the population", running_stats.layout(self.bn_names),
                        False))
        if bn and p.gap:
            out.append(("BN: train/inference gap", gap.layout(self.data.regression), False))
        if p.activations:
            out.append(("input to the nonlinearity: median, 15th-85th percentile (Figure 1)",
                        activations.layout(self.units), False))
        if bn and p.gap:
            out.append(("BN: Batch Renorm's d and r per layer", gap.layer_layout(self.bn_names), True))
        if p.grad_norms:
            out.append(("weight gradient norm per layer", gradients.layout(self.weight_layers), True))
        if p.signal:
            out.append(("why BN helps: signal propagation per block", signal.layout(self.top_blocks), True))
        if p.rank:
            out.append(("why BN helps: effective rank per block", rank.layout(list(self.top_blocks)), True))
        if p.ics:
            out.append(("why BN helps: internal covariate shift (Santurkar)", ics.layout(list(self.weight_params)[1:]),
                        True))
        if p.landscape:
            out.append(("why BN helps: loss landscape (Santurkar)", landscape.layout(), True))
        if p.sharpness:
            out.append(("why BN helps: sharpness", sharpness.layout(), True))
        return out

    def summary(self) -> dict[str, float]:
        return summary_of(self._last)

    def state_dict(self) -> dict[str, Any]:
        # The probe sets are drawn again from the seed on resume; they are saved too so a resumed run
        # measures the very same examples and units even if the generator's algorithm changed.
        return {"population_idx": self.population_idx.cpu(),
                "units": {name: u.cpu() for name, u in self.units.items()},
                "probe_idx": self.probe_idx.cpu(),
                "last": dict(self._last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.data.x_train.device
        self.population_idx = state["population_idx"].to(device)
        self.units = {name: u.to(device) for name, u in state["units"].items()}
        if "probe_idx" in state:  # drawn from the seed alike by checkpoints older than it
            self.probe_idx = state["probe_idx"].to(device)
        self._last = dict(state["last"])


def summary_of(last: dict[str, float]) -> dict[str, float]:
    """summary.json's probe figures from a probe step's values: the gap, and the running-statistic errors
    averaged over BN layers (the state a checkpoint keeps as probes.last is enough)."""
    out = {}
    for key in ("accuracy", "loss", "logits", "kl"):
        if f"gap/{key}" in last:
            out[f"gap_{key}"] = last[f"gap/{key}"]
    for key in ("mean_err", "var_err"):
        errs = [v for tag, v in last.items() if tag.startswith("running_stats/") and tag.endswith(f"/{key}")]
        if errs:
            out[f"running_{key}"] = math.fsum(errs) / len(errs)
    return out
