"""Internal covariate shift as Santurkar et al. 2018 define it (Definition 2.1): how much the gradient of
a layer's weights changes when every layer before it takes one gradient step.

At a probe step t, on the fixed probe batch, G_l = ∇_{W_l} L(W^t). With one plain gradient step of the
run's current learning rate for all parameters, W^{t+1} = W^t − lr_t · ∇L(W^t) (so the measure does not
depend on the optimizer), G'_l = ∇_{W_l} L at the parameters of the layers before l moved to W^{t+1} and
the rest left at W^t:

    ics/<l>/l2  = ‖G_l − G'_l‖₂        ics/<l>/cos = ⟨G_l, G'_l⟩ / (‖G_l‖ ‖G'_l‖)

for every layer's weight but the first (h2, ..., out; the first has no layer before it, so G' = G). "The
layers before l": the parameters registered before l's weight (the network's order: its blocks, and within
a block the layer, then its normalizer). One gradient of the whole network, then one per layer.
"""

from __future__ import annotations

import torch

from bnexp.probes.functional import ProbeLoss, flat, step


def ics_values(loss: ProbeLoss, weights: dict[str, str], lr: float) -> tuple[list[str], torch.Tensor]:
    """`weights`: {layer name: its weight's parameter name}, in the network's order."""
    params = loss.params()
    order = list(params)
    g = loss.grad(params)
    moved = step(params, g, lr)
    tags, values = [], []
    for layer, weight in weights.items():
        before = set(order[:order.index(weight)])
        if not before:
            continue
        mixed = {n: moved[n] if n in before else p for n, p in params.items()}
        g_l, g_l2 = g[weight].reshape(-1), loss.grad(mixed, [weight])[weight].reshape(-1)
        cos = torch.dot(g_l, g_l2) / (torch.linalg.vector_norm(g_l) * torch.linalg.vector_norm(g_l2))
        tags += [f"ics/{layer}/l2", f"ics/{layer}/cos"]
        values += [torch.linalg.vector_norm(g_l - g_l2), cos]
    return tags, flat([v.reshape(1) for v in values]) if values else torch.zeros(0)


def layout(layers: list[str]) -> dict[str, list]:
    """`layers`: those measured (every weight layer but the first), a chart per layer and measure."""
    return {f"{layer} {title}": ["Multiline", [f"ics/{layer}/{q}"]]
            for layer in layers for q, title in (("l2", "‖G − G'‖"), ("cos", "cos(G, G')"))}
