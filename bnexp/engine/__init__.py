"""The training engine: the loop and everything a run directory is made of (bnexp.engine.session starts runs)."""
