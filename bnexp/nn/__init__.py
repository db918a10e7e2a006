"""Batch normalization written by us: the layer, its compiled kernel, its variants, and the factory that
builds the normalizer a config asks for.

`from bnexp.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d` is a drop-in for torch.nn's
(`bnexp.norm` is the same classes under the project's original import path).
"""

from bnexp.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from bnexp.nn.factory import is_batchnorm, make_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormBase", "is_batchnorm", "make_norm"]
