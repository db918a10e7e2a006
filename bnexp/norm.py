"""The layer under the import path of the project's original contract: `from bnexp.norm import
BatchNorm1d, BatchNorm2d, BatchNorm3d`. The code is bnexp.nn.batchnorm."""

from bnexp.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormBase"]
