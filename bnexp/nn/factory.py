"""The normalizer factory: the layer `model.norm` (and `model.bn`) asks for, at a given width and rank.

    none      no layer
    bnexp     our batch normalization (bnexp.nn.batchnorm; its variants in bnexp.nn.variants and
              bnexp.nn.noisy)
    torch     torch.nn.BatchNorm1d/2d/3d, the reference
    group     torch.nn.GroupNorm (Wu & He 2018) with the largest divisor of the width up to model.norm_groups
              groups (a width of 100 and the default 32 give 25 groups of 4)
    layer     over all features of an example: torch.nn.LayerNorm on vectors, GroupNorm with one group on
              feature maps (channels and positions together, a scale and shift per channel)
    instance  torch.nn.InstanceNorm1d/2d (affine, no running statistics): per example and channel, feature
              maps only

Only the two batch norms have running statistics: the probes that need them are absent for the others.
"""

from __future__ import annotations

from torch import nn

from bnexp.config import BATCH_NORMS, ConfigError, ModelConfig
from bnexp.nn import batchnorm, noisy, variants


def groups_for(width: int, most: int) -> int:
    """The largest number of groups, at most `most`, that divides `width`."""
    return next(g for g in range(min(most, width), 0, -1) if width % g == 0)


def make_norm(cfg: ModelConfig, num_features: int, spatial_dims: int) -> nn.Module | None:
    """The normalizer of `num_features` features or channels, for input with `spatial_dims` dimensions after
    the channels (0: vectors (N, C); 1: signals (N, C, L); 2: images (N, C, H, W)); None for norm: none."""
    norm = cfg.norm
    if norm == "none":
        return None
    if norm == "group":
        return nn.GroupNorm(groups_for(num_features, cfg.norm_groups), num_features)
    if norm == "layer":
        return nn.LayerNorm(num_features) if spatial_dims == 0 else nn.GroupNorm(1, num_features)
    if norm == "instance":
        if spatial_dims == 0:
            raise ConfigError("model.norm: instance needs feature maps (a convolutional network)")
        return {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d}[spatial_dims](num_features, affine=True)
    assert norm in BATCH_NORMS, norm
    bn = cfg.bn
    rank = max(1, spatial_dims)  # BatchNorm1d takes both (N, C) and (N, C, L)
    if bn.variant != "bn" and norm != "bnexp":
        raise ConfigError(f"model.bn.variant: {bn.variant} needs model.norm: bnexp (got {norm})")
    if norm == "torch":
        cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank]
        return cls(num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
    kwargs = dict(eps=bn.eps, momentum=bn.momentum, affine=bn.affine, running_var_init=bn.running_var_init,
                  unbiased_normalize=bn.unbiased_normalize)
    if bn.variant == "renorm":
        r = bn.renorm
        return variants.RENORM[rank](num_features, **kwargs, r_max=r.r_max, d_max=r.d_max,
                                     warmup_steps=r.warmup_steps, r_max_steps=r.r_max_steps,
                                     d_max_steps=r.d_max_steps)
    if bn.variant == "ghost":
        return variants.GHOST[rank](num_features, **kwargs, ghost_batch_size=bn.ghost_batch_size)
    if bn.variant == "noisy":
        return noisy.NOISY[rank](num_features, **kwargs, **bn.noise.model_dump())
    cls = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}[rank]
    return cls(num_features, **kwargs)


def is_batchnorm(module: nn.Module) -> bool:
    """Ours (variants included) or torch's: the probes treat both alike."""
    return isinstance(module, (batchnorm.BatchNormBase, nn.modules.batchnorm._BatchNorm))
