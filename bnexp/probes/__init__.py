"""The probes: what BN does while a network trains, each family of measurements a module of its own.

population     the shared training-mode pass (batch statistics, no updates) and the population estimate
running_stats  how far the running estimates are from the population (and Batch Renorm's d and r)
gap            the train/inference discrepancy on the test set
activations    the input to the nonlinearity, the paper's Figure 1b/c
gradients      the norm of each layer's weight gradient
suite          `Probes`: the probe sets, the schedule, and one call per probe step that measures them all
"""

from bnexp.probes.population import population_statistics
from bnexp.probes.suite import Probes, summary_of

__all__ = ["Probes", "population_statistics", "summary_of"]
