"""The effective rank of each block's representation of the fixed probe batch (Daneshmand et al. 2020:
BN avoids the rank collapse of deep networks): with σ_i the singular values of the (batch × features)
matrix of the block's output (not centred: collapse is every example mapping to one vector),
p_i = σ_i / Σ σ and

    rank/<l> = exp(−Σ p_i log p_i)        (Roy & Vetterli 2007; between 1 and min(batch, features))
"""

from __future__ import annotations

import torch
from torch import Tensor


def effective_rank(x: Tensor) -> Tensor:
    x = x.reshape(x.shape[0], -1).double()
    if not bool(torch.isfinite(x).all()):  # a diverged network: NaN, as its other probe values
        return x.new_tensor(float("nan"))
    s = torch.linalg.svdvals(x)
    p = s / s.sum()
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum())


def rank_values(outputs: dict[str, Tensor]) -> tuple[list[str], Tensor]:
    tags = [f"rank/{name}" for name in outputs]
    return tags, torch.stack([effective_rank(x) for x in outputs.values()]) if tags else torch.zeros(0)


def layout(blocks: list[str]) -> dict[str, list]:
    return {f"{name} effective rank": ["Multiline", [f"rank/{name}"]] for name in blocks}
