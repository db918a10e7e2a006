"""Probes section: what each probe family costs at its default interval, on the default config.

Contenders, all the same run of configs/default.yaml's network (the paper's MLP on digits, probes every
100 steps) but its length: probes off (the reference), the default families together, and each family
alone (the three gradient-based ones are off by default). Runs alternate, repeat by repeat, so load from
other processes hits all alike; a family's overhead is the ratio of its median time to the reference's,
minus 1. The time is this process's CPU time (user + system, all its threads): with one torch thread the
run is CPU-bound, and CPU time does not count the time other processes take the core away, which on a
shared machine swamps a difference of a few percent in wall time. Wall time is shown beside it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from rich.table import Table

from bnexp.bench.layer import torch_threads
from bnexp.config import Config, ProbesConfig, validate
from bnexp.data import load_dataset
from bnexp.engine.trainer import Trainer

FAMILIES = ("running_stats", "gap", "activations", "grad_norms", "signal", "rank", "ics", "landscape", "sharpness")
DEFAULTS = tuple(f for f in FAMILIES if getattr(ProbesConfig(), f))
TARGET = 0.25  # issue 19: all default families together under 25 % of training time
QUICK_PROBES = {"steps": 200, "repeats": 1}


def _config(steps: int, families: tuple[str, ...] | None) -> Config:
    """The default config with only `families` probed (None: probes off)."""
    probes = {"enabled": families is not None, **{f: f in (families or ()) for f in FAMILIES}}
    return validate({"name": "bench", "device": "cpu", "train": {"steps": steps}, "probes": probes})


def _times(cfg: Config, data) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run."""
    with tempfile.TemporaryDirectory(prefix="bnexp-bench-") as tmp:
        trainer = Trainer(cfg, Path(tmp), data, quiet=True)
        c0, t0 = time.process_time(), time.perf_counter()
        trainer.run()
        return time.process_time() - c0, time.perf_counter() - t0


def measure_probes(steps: int = 2000, repeats: int = 5, threads: int | None = 1) -> tuple[list[dict], dict]:
    contenders = {"probes off": None, "default families": DEFAULTS, **{f: (f,) for f in FAMILIES}}
    with torch_threads(threads):
        cfgs = {name: _config(steps, fams) for name, fams in contenders.items()}
        data = load_dataset(cfgs["probes off"].data)
        _times(_config(20, DEFAULTS), data)  # imports and first-call costs hit no contender
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
        errors: dict[str, str] = {}
        for r in range(repeats):
            names = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in names:
                if name in errors:
                    continue
                try:
                    times[name].append(_times(cfgs[name], data))
                except RuntimeError as err:  # e.g. a layer without double backward, for sharpness
                    errors[name] = str(err).splitlines()[0]
    ref_cpu = statistics.median(c for c, _ in times["probes off"])
    ref_wall = statistics.median(w for _, w in times["probes off"])
    rows = []
    for name in contenders:
        if name in errors:
            rows.append({"contender": name, "error": errors[name]})
            continue
        cpu = statistics.median(c for c, _ in times[name])
        wall = statistics.median(w for _, w in times[name])
        rows.append({"contender": name, "seconds": cpu, "overhead": cpu / ref_cpu - 1,
                     "wall_overhead": wall / ref_wall - 1,
                     "default": name == "default families" or name in DEFAULTS})
    return rows, {"steps": steps, "repeats": repeats, "every": ProbesConfig().every}


def probes_table(rows: list[dict], info: dict) -> Table:
    table = Table(title=f"probes: overhead of each family at its default interval (every {info['every']} steps) "
                        f"— default config, {info['steps']} steps, median of {info['repeats']} runs each")
    for col in ("contender", "on by default", "CPU s", "overhead", "wall", ""):
        table.add_column(col, justify="left" if col in ("contender", "") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["contender"], "", "", "", f"[red]{r['error'][:80]}[/red]")
            continue
        note = ""
        if r["contender"] == "default families":
            note = "[green]meets[/green]" if r["overhead"] < TARGET else "[red]misses[/red]"
            note += f" < {TARGET:.0%}"
        table.add_row(r["contender"], "yes" if r["default"] else "no", f"{r['seconds']:.2f}",
                      f"{100 * r['overhead']:+.1f} %", f"{100 * r['wall_overhead']:+.1f} %", note)
    table.caption = ("overhead = median CPU time of the run / the run with probes off's − 1; wall: the same "
                     "with wall time")
    return table
