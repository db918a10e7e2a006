"""Experiments made of many runs: comparisons of arms over seeds, and their reports."""
