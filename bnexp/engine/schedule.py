"""What a training step is due for, by its number alone: so a resumed run logs, reads back, evaluates,
probes and checkpoints at exactly the steps an uninterrupted one does.

Reading back (bnexp.engine.step_metrics) is what costs a host-device synchronisation: the steps' losses
and correct counts stay on the device and are read every READ_ROWS log intervals, and always before an
evaluation, a probe or a checkpoint (and at a signal, which the loop adds), so that no evaluation, probe
or checkpoint ever sees a network that has already diverged.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from bnexp.config import TrainConfig

# A read costs ~100 µs of cold code on the bench workload whether it covers 1 row or 10.
READ_ROWS = 10


class Due(NamedTuple):
    log: bool
    evaluate: bool
    probe: bool
    checkpoint: bool
    read: bool


NOTHING = Due(log=False, evaluate=False, probe=False, checkpoint=False, read=False)


class Schedule:
    def __init__(self, cfg: TrainConfig, probe_every: int | None = None):
        self.cfg = cfg
        self.read_every = READ_ROWS * cfg.log_every
        self.probe_every = probe_every  # probes.every, or None without probes
        # Every interval is a multiple of this: a step that is not (most steps) is due for nothing, and the
        # loop learns so without building a Due of its own.
        self.quantum = math.gcd(cfg.log_every, cfg.eval_every, cfg.checkpoint_every, probe_every or 0)

    def due(self, step: int) -> Due:
        cfg, last = self.cfg, step == self.cfg.steps
        if step % self.quantum and not last:
            return NOTHING
        evaluate = step % cfg.eval_every == 0 or last
        probe = self.probe_every is not None and (step % self.probe_every == 0 or last)
        checkpoint = step % cfg.checkpoint_every == 0 or last
        return Due(log=step % cfg.log_every == 0 or last, evaluate=evaluate, probe=probe, checkpoint=checkpoint,
                   read=evaluate or probe or checkpoint or step % self.read_every == 0)
