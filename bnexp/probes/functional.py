"""The network as a function of its parameters, on a fixed probe batch: what the gradient-based probes
(ics, landscape, sharpness) and the forward-only ones (signal, rank) evaluate.

Training mode (batch statistics, the normalization training uses), through torch.func.functional_call
with every buffer copied for each call: BN's running statistics and `num_batches_tracked` update the
copies, never the model, and no parameter of the model is touched (the forward-only probes run the model
itself and put its buffers back: `outputs_now`). Noisy BN is paused by the caller
(bnexp.nn.noisy.paused_noise), so no random stream is drawn from either.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


class ProbeLoss:
    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]):
        self.model, self.x, self.y, self.loss_fn = model, x, y, loss_fn

    def params(self) -> Params:
        """The model's parameters now (detached: the model's own tensors are never in a graph here)."""
        return {name: p.detach() for name, p in self.model.named_parameters()}

    def outputs(self, params: Params) -> Tensor:
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        was_training = self.model.training
        self.model.train()
        try:
            return functional_call(self.model, (params, buffers), (self.x,))
        finally:
            self.model.train(was_training)

    def outputs_now(self) -> Tensor:
        """outputs(params()) by a plain training-mode forward of the model, its buffers put back afterwards:
        the same arithmetic on the same tensors, without functional_call swapping every parameter and
        buffer in and out, which is pure overhead at the model's own parameters (benchmarks/README.md says
        what it saves). For the probes that evaluate the network there (signal, rank)."""
        saved = [b.clone() for b in self.model.buffers()]
        was_training = self.model.training
        self.model.train()
        try:
            return self.model(self.x)
        finally:
            for b, value in zip(self.model.buffers(), saved):
                b.copy_(value)
            self.model.train(was_training)

    def __call__(self, params: Params) -> Tensor:
        return self.loss_fn(self.outputs(params), self.y)

    def grad(self, params: Params, names: list[str] | None = None, create_graph: bool = False) -> Params:
        """∂L/∂θ at `params`, for the parameters `names` (all by default)."""
        names = list(params) if names is None else names
        leaves = {n: p.detach().requires_grad_(n in names) for n, p in params.items()}
        with torch.enable_grad():
            loss = self(leaves)
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=create_graph)
        return dict(zip(names, grads))


def flat(tensors: Params | list[Tensor]) -> Tensor:
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return torch.cat([t.reshape(-1) for t in values])


def step(params: Params, direction: Params, size: float) -> Params:
    """params − size · direction (the parameters a direction leaves alone stay as they are)."""
    return {n: p - size * direction[n] if n in direction else p for n, p in params.items()}
