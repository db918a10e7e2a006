"""bnexp: an experiment runner for studying batch normalization."""

__version__ = "0.1.0"
