"""Loop section: `bnexp train`'s own loop (bnexp.engine.trainer.Trainer) against a bare hand-written loop
with the same model, optimizer and in-memory data, with probes off and at their default interval."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from rich.table import Table

from bnexp.bench.layer import torch_threads
from bnexp.bench.workload import interleaved, paper_mlp_config
from bnexp.data import load_dataset

# Targets of issue 8: bnexp's steps/s as a fraction of the bare loop's.
LOOP_TARGETS = {"probes off": 0.95, "probes on": 0.90}
# --quick: smoke-test sizes (bnexp bench and benchmarks/bench_loop.py).
QUICK_LOOP = {"chunks": 2, "chunk": 50, "warmup": 10}


@dataclass
class LoopResult:
    contender: str
    ms_per_step: float  # median over chunks
    bare_ms_per_step: float  # median over the bare chunks interleaved with this contender's
    ratio: float  # median over chunk pairs of bare time / contender time (= contender steps/s over bare)
    pair_ratios: list[float]
    target: float

    @property
    def steps_per_s(self) -> float:
        return 1000.0 / self.ms_per_step


def measure_loop(chunks: int = 9, chunk: int = 500, warmup: int = 100, norm: str | None = None,
                 threads: int | None = 1) -> tuple[list[LoopResult], dict]:
    """Probes off, then probes on: each a Trainer run interleaved chunk by chunk with its own bare loop.

    The default chunk is train.checkpoint_every (500 steps), so every chunk holds the same work: 50 log
    rows, 5 evaluations, 5 probes (when on) and 1 checkpoint.
    """
    with torch_threads(threads):
        cfg_off = paper_mlp_config(probes=False, norm=norm)
        cfg_on = paper_mlp_config(probes=True, norm=norm)
        data = load_dataset(cfg_off.data)
        # One short untimed run first: lazy imports (tensorboard, probes, torch._dynamo through the
        # optimizer) and allocator growth hit no contender.
        interleaved(cfg_on, data, warmup=2, chunk=2, chunks=1)
        results = []
        for name, cfg in (("probes off", cfg_off), ("probes on", cfg_on)):
            trainer_s, bare_s = interleaved(cfg, data, warmup, chunk, chunks)
            pairs = [b / t for b, t in zip(bare_s, trainer_s)]
            results.append(LoopResult(name, statistics.median(trainer_s) / chunk * 1000,
                                      statistics.median(bare_s) / chunk * 1000, statistics.median(pairs),
                                      pairs, LOOP_TARGETS[name]))
        info = {"chunks": chunks, "chunk": chunk, "warmup": warmup, "norm": cfg_off.model.norm,
                "threads": torch.get_num_threads(), "probes_every": cfg_on.probes.every,
                "eval_every": cfg_on.train.eval_every, "log_every": cfg_on.train.log_every,
                "checkpoint_every": cfg_on.train.checkpoint_every}
    return results, info


def loop_table(results: list[LoopResult], info: dict) -> Table:
    table = Table(title=f"loop: bnexp train vs a bare loop — paper MLP 784-100-100-100-10, sigmoid, norm "
                        f"{info['norm']}, batch 60; {info['chunks']} interleaved chunk pairs of "
                        f"{info['chunk']} steps, medians")
    for col in ("contender", "ms/step", "steps/s", "bare ms/step", "ratio vs bare", "per-pair ratios",
                "target", ""):
        table.add_column(col, justify="left" if col in ("contender", "") else "right")
    for r in results:
        label = {"probes off": "bnexp train, probes off",
                 "probes on": f"bnexp train, probes every {info['probes_every']}"}[r.contender]
        spread = f"{min(r.pair_ratios):.3f}–{max(r.pair_ratios):.3f}"
        ok = "[green]meets[/green]" if r.ratio >= r.target else "[red]misses[/red]"
        table.add_row(label, f"{r.ms_per_step:.3f}", f"{r.steps_per_s:.0f}", f"{r.bare_ms_per_step:.3f}",
                      f"{r.ratio:.3f}", spread, f"≥ {r.target:.2f}", ok)
    table.caption = (f"ratio = bnexp steps/s ÷ bare steps/s, median over chunk pairs; eval every "
                     f"{info['eval_every']}, log every {info['log_every']}, checkpoint every "
                     f"{info['checkpoint_every']} steps; {info['warmup']} steps warm-up untimed; torch "
                     f"threads {info['threads']}")
    return table
