"""The input to each hidden layer's nonlinearity (the paper's Figure 1b/c; docs/design.md section 2): for a
few fixed units of every hidden layer, the same in every run (`fixed_units`), its 15th, 50th and 85th
percentiles over the test set in eval mode (`activations/<l>/u<unit>/p15|p50|p85`), and histograms less
often. A unit of a conv layer is a channel, all positions pooled.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from bnexp.probes.population import CHUNK, cat

PERCENTILES = {"p15": 0.15, "p50": 0.50, "p85": 0.85}  # tag suffix -> quantile
_QUANTILE_MAX = 2 ** 24  # torch.quantile's input size limit


def _unit_values(x: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """(units, values): a unit of a conv layer is a channel, all positions pooled."""
    x = x.index_select(1, units)
    return x.transpose(0, 1).reshape(len(units), -1)


@functools.lru_cache(maxsize=8)
def _quantile_points(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(list(PERCENTILES.values()), dtype=dtype, device=device)


def quantiles(vals: torch.Tensor) -> torch.Tensor:
    """(3, units): the 15th, 50th and 85th percentiles of each row (torch.quantile, linear interpolation)."""
    q = _quantile_points(vals.dtype, vals.device)
    if vals.numel() <= _QUANTILE_MAX:
        return torch.quantile(vals, q, dim=1)
    # Past torch's limit (a big conv layer over a big test set): row by row, and a row too large for it
    # is thinned evenly, which moves a percentile by about one rank per stride.
    rows = [r[:: math.ceil(r.numel() / _QUANTILE_MAX)] for r in vals]
    return torch.stack([torch.quantile(r, q) for r in rows], dim=1)


def quantiles_of(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """quantiles of each tensor, in one call for tensors of the same shape and dtype (each row's
    percentiles do not depend on the other rows; a probe step costs torch.quantile's fixed cost per call)."""
    groups: dict[tuple, list[str]] = {}
    for name, vals in named.items():
        groups.setdefault((vals.shape, vals.dtype), []).append(name)
    out = {}
    for (shape, _), names in groups.items():
        if len(names) == 1 or len(names) * named[names[0]].numel() > _QUANTILE_MAX:
            out.update({name: quantiles(named[name]) for name in names})
            continue
        q = quantiles(torch.cat([named[name] for name in names]))
        out.update(zip(names, q.split(shape[0], dim=1)))
    return out


@torch.no_grad()
def eval_pass(model: nn.Module, x: torch.Tensor,
              units: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One eval-mode forward over x: the logits, and the input to the nonlinearity of each block named in
    `units` for those units, as (units, values)."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in units}

    def hook_for(name: str):
        chosen = units[name]
        return lambda _mod, inputs: captured[name].append(_unit_values(inputs[0], chosen))

    model.eval()
    handles = []
    try:
        for name in units:
            handles.append(model.get_submodule(name).act.register_forward_pre_hook(hook_for(name)))
        logits = cat([model(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)])
    finally:
        for h in handles:
            h.remove()
    return logits, {name: cat(chunks, dim=1) for name, chunks in captured.items() if chunks}


def activation_values(acts: dict[str, torch.Tensor], units: dict[str, torch.Tensor], step: int,
                      writer=None) -> list[tuple[list[str], torch.Tensor]]:
    """The percentile tags of every unit; with a `writer`, its histograms too."""
    out = []
    q_of = quantiles_of(acts)
    for name, vals in acts.items():
        q = q_of[name]  # (percentile, unit); the tags go unit by unit
        unit_ids = units[name].tolist()
        out.append(([f"activations/{name}/u{unit}/{p}" for unit in unit_ids for p in PERCENTILES], q.t()))
        for row, unit in enumerate(unit_ids if writer is not None else ()):
            finite = vals[row][torch.isfinite(vals[row])]
            if finite.numel():  # a diverged run still gets its scalars (NaN), not a crash
                writer.add_histogram(f"activations/{name}/u{unit}", finite, step)
    return out


def fixed_units(width: int, k: int) -> torch.Tensor:
    """k units of a layer of `width`, spread evenly: the middle of each of k equal slices. The same for every
    seed and arm of an architecture, so runs can be laid side by side (the units of a layer are exchangeable
    at initialization: a fixed choice is as good a sample as a random one)."""
    k = min(k, width)
    return torch.tensor([(2 * i + 1) * width // (2 * k) for i in range(k)])


def layout(units: dict[str, torch.Tensor]) -> dict[str, list]:
    """A chart per unit: the median, with the band from the 15th to the 85th percentile, per run."""
    return {f"{name} unit {unit}": ["Margin", [f"activations/{name}/u{unit}/{p}" for p in ("p50", "p15", "p85")]]
            for name, chosen in units.items() for unit in chosen.tolist()}
