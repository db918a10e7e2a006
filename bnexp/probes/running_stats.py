"""How far each BN layer's running estimates are from the batches it sees (docs/design.md section 2).

Per layer, against the population statistics of the K probe batches (bnexp.probes.population):

    running_stats/<l>/mean_err = mean_c |running_mean − μ_pop| / sqrt(σ²_pop + ε)
    running_stats/<l>/var_err  = mean_c |log((running_var + ε) / (σ²_pop + ε))|

and Batch Renorm's view of the train/inference gap, averaged over the probe batches:

    gap/<l>/d = mean_c |μ_B − running_mean| / sqrt(running_var + ε)
    gap/<l>/r = mean_c sqrt(σ²_B + ε) / sqrt(running_var + ε)

Layers without running estimates (track_running_stats=False) have nothing to converge: no values.
"""

from __future__ import annotations

import torch
from torch import nn

from bnexp.probes.population import bn_sites, population


def layer_values(model: nn.Module, stats: dict, errors: bool, renorm: bool) -> list[tuple[list[str], torch.Tensor]]:
    """(tags, values) per BN layer in the layers' order; `stats` are grouped_forward's batch statistics."""
    bns = {layer: bn for layer, _, _, bn in bn_sites(model)}
    # Layers grouped so that layers of one width, ε and batch shape are computed together, as rows of
    # stacked tensors: a probe step pays a few µs per op, and the arithmetic is per channel either way.
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
        pop = population({"mean": mean_b, "var": var_b, "n": n}, dim=1)
        columns = []
        if errors:
            columns += [((rm - pop["mean"]).abs() / (pop["var"] + eps).sqrt()).mean(1),
                        torch.log((rv + eps) / (pop["var"] + eps)).abs().mean(1)]
        if renorm:
            # d and r per probe batch, channel-averaged, then averaged over the batches.
            inv_run = (rv + eps).rsqrt().unsqueeze(1)
            columns += [((mean_b - rm.unsqueeze(1)).abs() * inv_run).mean((1, 2)),
                        ((var_b + eps).sqrt() * inv_run).mean((1, 2))]
        if columns:
            values = torch.stack(columns, 1)  # (layers, values)
            for j, name in enumerate(names):
                per_layer[name] = (([f"running_stats/{name}/mean_err", f"running_stats/{name}/var_err"]
                                    if errors else [])
                                   + ([f"gap/{name}/d", f"gap/{name}/r"] if renorm else []), values[j])
    return [per_layer[name] for name in stats if name in per_layer]  # the layers' order, whatever the groups


def layout(bn_names: list[str]) -> dict[str, list]:
    """A chart per layer and error, of its log10 (the TensorBoard tags bnexp.engine.dashboard adds): the errors
    fall by orders of magnitude early in training, which a linear axis flattens."""
    return {f"{name} {error}, log10": ["Multiline", [f"running_stats/{name}/log10_{error}"]]
            for name in bn_names for error in ("mean_err", "var_err")}
