"""The normalizer factory: the layer `model.norm` and `model.bn` ask for, at a given width and rank."""

from __future__ import annotations

from torch import nn

from bnexp.config import ConfigError, ModelConfig
from bnexp.nn import batchnorm, variants


def make_norm(cfg: ModelConfig, num_features: int, dims: int) -> nn.Module | None:
    """A BN layer for `dims`-D features (1: (N, C) or (N, C, L); 2: images), or None for norm: none."""
    if cfg.norm == "none":
        return None
    bn = cfg.bn
    if bn.variant != "bn" and cfg.norm != "bnexp":
        raise ConfigError(f"model.bn.variant: {bn.variant} needs model.norm: bnexp (got {cfg.norm})")
    if cfg.norm == "torch":
        cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        return cls(num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
    kwargs = dict(eps=bn.eps, momentum=bn.momentum, affine=bn.affine, running_var_init=bn.running_var_init,
                  unbiased_normalize=bn.unbiased_normalize)
    if bn.variant == "renorm":
        r = bn.renorm
        return variants.RENORM[dims](num_features, **kwargs, r_max=r.r_max, d_max=r.d_max,
                                     warmup_steps=r.warmup_steps, r_max_steps=r.r_max_steps,
                                     d_max_steps=r.d_max_steps)
    if bn.variant == "ghost":
        return variants.GHOST[dims](num_features, **kwargs, ghost_batch_size=bn.ghost_batch_size)
    cls = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}[dims]
    return cls(num_features, **kwargs)


def is_batchnorm(module: nn.Module) -> bool:
    """Ours (variants included) or torch's: the probes treat both alike."""
    return isinstance(module, (batchnorm.BatchNormBase, nn.modules.batchnorm._BatchNorm))
