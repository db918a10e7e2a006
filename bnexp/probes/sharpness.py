"""Sharpness: the largest eigenvalue of the Hessian of the loss on the fixed probe batch (Ghorbani et al.
2019 report that BN removes the large outlier eigenvalues), by power iteration on Hessian-vector products
(double backward through the network, BN included), probes.sharpness_iters iterations from a fixed random
start:

    v ← Hv / ‖Hv‖      sharpness/top_eig = vᵀ H v  (the eigenvalue of largest magnitude: the top one in
                                                   practice; a negative value says the top is negative)
"""

from __future__ import annotations

import torch

from bnexp.probes.functional import ProbeLoss, flat


def top_eigenvalue(loss: ProbeLoss, iters: int, seed: int) -> torch.Tensor:
    params = loss.params()
    names = list(params)
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    with torch.enable_grad():
        grads = torch.autograd.grad(loss(leaves), [leaves[n] for n in names], create_graph=True)
        g = flat(list(grads))
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(g.numel(), generator=gen, dtype=torch.float64).to(g)
        v = v / torch.linalg.vector_norm(v)
        eig = torch.zeros((), dtype=g.dtype, device=g.device)
        for _ in range(iters):
            hv = flat(list(_hvp(g, leaves, names, v)))
            eig = torch.dot(v, hv)
            norm = torch.linalg.vector_norm(hv)
            if norm == 0:
                break
            v = hv / norm
    return eig.detach()


def _hvp(g: torch.Tensor, leaves: dict, names: list[str], v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """H v, the gradient of g·v (v held constant)."""
    return torch.autograd.grad(g, [leaves[n] for n in names], grad_outputs=v, retain_graph=True)


def layout() -> dict[str, list]:
    return {"top Hessian eigenvalue": ["Multiline", ["sharpness/top_eig"]]}
