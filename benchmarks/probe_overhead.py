"""Probe overhead: wall time of the same run with probes on (default interval) and off, in one process.

    python benchmarks/probe_overhead.py [--config configs/default.yaml] [--set KEY=VALUE]... [--repeats 3]

Runs alternate on/off so drifting machine load hits both alike; the figure is the ratio of the medians
(and the median of per-pair ratios), never an absolute time. Both wall time and this process's CPU time
are reported (on a shared machine the CPU-time ratio is the steadier one), and, from inside the probed
runs, the CPU time spent in the probes relative to the rest of the run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bnexp import config as cfgmod
from bnexp.probes import Probes
from bnexp.engine.session import prepare, train

_in_probes = [0.0]  # CPU seconds spent inside Probes.measure/after_backward


def _timed(method):
    def wrapper(*args, **kwargs):
        c0 = time.process_time()
        try:
            return method(*args, **kwargs)
        finally:
            _in_probes[0] += time.process_time() - c0
    return wrapper


Probes.measure = _timed(Probes.measure)
Probes.after_backward = _timed(Probes.after_backward)


def timed_run(cfg, out: Path, data) -> tuple[float, float]:
    """(wall time, CPU time of this process): on a shared machine the CPU time is the steadier figure."""
    out.mkdir()
    t0, c0 = time.perf_counter(), time.process_time()
    train(cfg, out, quiet=True, data=data)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).parents[1] / "configs" / "default.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a busy machine's noise down)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    on = cfgmod.load(args.config, args.overrides + ["probes.enabled=true"])
    off = cfgmod.load(args.config, args.overrides + ["probes.enabled=false"])
    data = prepare(on)
    times: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    shares: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        timed_run(off, Path(tmp) / "warmup", data)  # first-call costs (imports, allocator) hit neither arm
        for r in range(args.repeats):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for arm in order:
                _in_probes[0] = 0.0
                times[arm].append(timed_run(on if arm == "on" else off, Path(tmp) / f"{arm}-{r}", data))
                if arm == "on":
                    shares.append(_in_probes[0] / (times[arm][-1][1] - _in_probes[0]))
    print(f"config: {args.config} {' '.join(args.overrides)}  (probes.every={on.probes.every}, "
          f"train.steps={on.train.steps}, torch threads={args.threads}, {args.repeats} runs per arm)")
    for i, clock in enumerate(("wall", "cpu")):
        t_on, t_off = [t[i] for t in times["on"]], [t[i] for t in times["off"]]
        ratio = statistics.median(t_on) / statistics.median(t_off)
        pairs = statistics.median(a / b for a, b in zip(t_on, t_off))
        print(f"{clock:>4} time  off: {', '.join(f'{t:.2f}' for t in t_off)} s   on: "
              f"{', '.join(f'{t:.2f}' for t in t_on)} s")
        print(f"{clock:>4} overhead: ratio of medians {ratio:.4f} ({100 * (ratio - 1):+.2f} %), "
              f"median per-pair ratio {pairs:.4f}")
    # Within the probed runs: CPU time inside the probes over the CPU time of everything else. Immune to
    # run-to-run noise; leaves out train.py's writing of the probe scalars.
    print(f"in-run: CPU time in Probes.measure/after_backward / rest of the run = "
          f"{100 * statistics.median(shares):.2f} % (median; {', '.join(f'{100 * x:.2f}' for x in shares)})")

if __name__ == "__main__":
    main()
