"""Memory section: peak RSS over a long run, growth from after warm-up to the end, for the Trainer and the
bare loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rich.table import Table

from bnexp.bench.layer import torch_threads
from bnexp.bench.workload import BareLoop, paper_mlp_config, run_trainer
from bnexp.data import load_dataset

# --quick: smoke-test sizes (bnexp bench and benchmarks/bench_memory.py).
QUICK_MEMORY = {"steps": 300, "warmup": 50, "sample_every": 50}


def read_rss_mb() -> float:
    """Current resident set size from /proc/self/status (VmRSS, in kB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


@dataclass
class MemoryResult:
    contender: str
    rss_warm_mb: float  # after warm-up
    rss_end_mb: float
    rss_peak_mb: float  # highest sample from warm-up to the end

    @property
    def growth_mb(self) -> float:
        return self.rss_end_mb - self.rss_warm_mb

    @property
    def ratio(self) -> float:
        return self.rss_end_mb / self.rss_warm_mb


def measure_memory(steps: int = 12000, warmup: int = 1000, sample_every: int = 500, norm: str | None = None,
                   threads: int | None = 1) -> tuple[list[MemoryResult], dict]:
    """RSS of the process after warm-up, through and at the end of a long run, for each contender.

    A leak of a few bytes per step (a running statistic that keeps its autograd graph, a metric list
    never emptied) shows as steady growth over 10,000 steps; allocator warm-up does not, since it is over
    before the first sample.
    """
    with torch_threads(threads):
        return _measure_memory(steps, warmup, sample_every, norm)


def _measure_memory(steps: int, warmup: int, sample_every: int, norm: str | None) -> tuple[list[MemoryResult], dict]:
    cfg_on = paper_mlp_config(probes=True, norm=norm)
    cfg_off = paper_mlp_config(probes=False, norm=norm)
    data = load_dataset(cfg_on.data)
    total = warmup + steps

    def bare(on_draw: Callable[[int], None]) -> None:
        loop, count = BareLoop(cfg_off, data), 0

        def on_step() -> None:
            nonlocal count
            count += 1
            on_draw(count)

        loop.run(total, on_step)
        on_draw(total + 1)

    runs: dict[str, Callable[[Callable[[int], None]], None]] = {
        "bare loop": bare,
        "probes off": lambda on_draw: run_trainer(cfg_off, data, total, on_draw),
        "probes on": lambda on_draw: run_trainer(cfg_on, data, total, on_draw),
    }
    results = []
    for name, run in runs.items():
        samples: list[float] = []

        def sample(k: int) -> None:
            # Step warmup+1 opens the window; k = total+1 closes it after the last step, while the run and
            # everything it holds are still alive (freeing them first would hide a leak).
            if k > warmup and ((k - warmup - 1) % sample_every == 0 or k == total + 1):
                samples.append(read_rss_mb())

        run(sample)
        results.append(MemoryResult(name, samples[0], samples[-1], max(samples)))
    info = {"steps": steps, "warmup": warmup, "sample_every": sample_every, "norm": cfg_on.model.norm,
            "probes_every": cfg_on.probes.every}
    return results, info


def memory_table(results: list[MemoryResult], info: dict) -> Table:
    table = Table(title=f"memory: RSS over {info['steps']:,} steps after a {info['warmup']:,}-step warm-up, "
                        f"paper MLP, norm {info['norm']}")
    for col in ("contender", "RSS after warm-up (MB)", "RSS at end (MB)", "peak (MB)", "growth (MB)",
                "end ÷ warm-up", "growth per 1k steps (kB)"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for r in results:
        label = {"bare loop": "bare loop (reference)", "probes off": "bnexp train, probes off",
                 "probes on": f"bnexp train, probes every {info['probes_every']}"}[r.contender]
        per_k = r.growth_mb * 1024 / (info["steps"] / 1000)
        table.add_row(label, f"{r.rss_warm_mb:.1f}", f"{r.rss_end_mb:.1f}", f"{r.rss_peak_mb:.1f}",
                      f"{r.growth_mb:+.1f}", f"{r.ratio:.3f}", f"{per_k:+.0f}")
    table.caption = (f"VmRSS of this process (/proc/self/status), sampled every {info['sample_every']} steps; "
                     "contenders run one after another in this order, so a later one starts from the "
                     "earlier ones' high-water mark")
    return table
