"""The loss landscape along the gradient (Santurkar et al. 2018, Figure 4): how much the loss and its
gradient change over the step the optimizer would take.

At a probe step t, on the fixed probe batch, g = ∇L(W^t) and, for the multipliers s of
probes.landscape_steps, W_s = W^t − s · lr_t · g:

    landscape/loss_range  = max L − min L over W^t and every W_s
    landscape/grad_pred   = max_s ‖∇L(W_s) − g‖₂                  (gradient predictiveness: smaller is better)
    landscape/beta_smooth = max_s ‖∇L(W_s) − g‖₂ / ‖W_s − W^t‖₂   (effective β-smoothness)

One gradient at W^t and one loss and gradient at each W_s.
"""

from __future__ import annotations

import torch

from bnexp.probes.functional import ProbeLoss, flat, step

TAGS = ["landscape/loss_range", "landscape/grad_pred", "landscape/beta_smooth"]


def landscape_values(loss: ProbeLoss, lr: float, steps: list[float]) -> tuple[list[str], torch.Tensor]:
    params = loss.params()
    with torch.no_grad():
        losses = [loss(params)]
    g = loss.grad(params)
    g_flat = flat(g)
    g_norm = torch.linalg.vector_norm(g_flat)
    pred, smooth = [], []
    for s in steps:
        moved = step(params, g, s * lr)
        with torch.no_grad():
            losses.append(loss(moved))
        change = torch.linalg.vector_norm(flat(loss.grad(moved)) - g_flat)
        pred.append(change)
        smooth.append(change / (s * lr * g_norm))
    losses_t = torch.stack(losses)
    return TAGS, torch.stack([losses_t.max() - losses_t.min(), torch.stack(pred).max(), torch.stack(smooth).max()])


def layout() -> dict[str, list]:
    return {"loss range along the gradient": ["Multiline", ["landscape/loss_range"]],
            "gradient predictiveness": ["Multiline", ["landscape/grad_pred"]],
            "β-smoothness": ["Multiline", ["landscape/beta_smooth"]]}
