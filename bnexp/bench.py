"""`bnexp bench`: speed and memory as ratios against a reference run side by side in this process.

Sections:
  layer   bnexp.norm against torch.nn.BatchNorm*d (bnexp/bench_layer.py, the layer engineer's).
  loop    `bnexp train`'s own loop (bnexp.train.Trainer) against a bare hand-written loop with the same
          model, optimizer and in-memory data, with probes off and at their default interval.
  memory  peak RSS over a long run: growth from after warm-up to the end, for the Trainer and the bare loop.

Absolute times depend on the machine and on whatever else it runs; a ratio of two contenders measured in
alternation in one process does not (much), so every figure is a ratio and the absolute times are context.
The benchmark configuration is the paper's MNIST network (784-100-100-100-10, sigmoid, BN before the
nonlinearity, batch 60, SGD lr 0.5) on `data.dataset: synthetic` with 784 features and 10 classes and the
default dataset's sizes (1,440 train / 360 test points): MNIST's per-step work, generated in memory.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from bnexp.bench_layer import torch_threads
from bnexp.config import Config, validate
from bnexp.data import Dataset, load_dataset
from bnexp.errors import UserError

SECTIONS = ("layer", "loop", "memory")

# Targets of issue 8: bnexp's steps/s as a fraction of the bare loop's.
LOOP_TARGETS = {"probes off": 0.95, "probes on": 0.90}

# --quick: smoke-test sizes of the loop and memory sections (bnexp bench and the benchmarks/ scripts).
QUICK_LOOP = {"chunks": 2, "chunk": 50, "warmup": 10}
QUICK_MEMORY = {"steps": 300, "warmup": 50, "sample_every": 50}


class BenchError(UserError):
    """An unknown section name or a section whose code is not there: one line, exit status 2."""


# --- configuration -------------------------------------------------------------------------------------

def paper_mlp_config(*, probes: bool = False, steps: int = 2000, norm: str | None = None) -> Config:
    """The paper's MNIST MLP on 784-feature synthetic data; every interval at its default."""
    return validate({
        "name": "bench",
        "device": "cpu",
        "data": {"dataset": "synthetic", "batch_size": 60,
                 # The default dataset's sizes (digits: 1,797 images, 20 % test) at MNIST's width: 1,440
                 # train and 360 test points. The cost of each evaluation and probe grows with the test
                 # set, so this is the figure for the default data; MNIST's 10,000 test points every 100
                 # steps would take up to a third of the run whatever the loop does.
                 "synthetic": {"num_samples": 1800, "num_features": 784, "num_classes": 10}},
        "model": {"kind": "mlp", "hidden": [100, 100, 100], "activation": "sigmoid",
                  "norm": norm or "bnexp"},
        "train": {"steps": steps},
        "probes": {"enabled": probes},
    })




def read_rss_mb() -> float:
    """Current resident set size from /proc/self/status (VmRSS, in kB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


# --- the two contenders --------------------------------------------------------------------------------

class BareLoop:
    """A hand-written training loop: index a batch, forward, cross-entropy, zero_grad, backward, step.

    Nothing else. Same model and optimizer builders, seed, in-memory tensors and batch order as the
    Trainer, so both train the very same network (tests check the weights agree bit for bit). It keeps
    its place between calls, so its steps can be interleaved with a Trainer's in short chunks.
    """

    def __init__(self, cfg: Config, data: Dataset):
        from bnexp.models import build_model
        from bnexp.train import build_optimizer

        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, data.input_shape, data.num_classes)
        self.model.train()
        self.opt = build_optimizer(cfg.optim, self.model.parameters())
        self.x, self.y, self.m = data.x_train, data.y_train, cfg.data.batch_size
        # The batch order of bnexp.data.BatchSampler, written out: a seeded permutation per epoch, tail dropped.
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.perm, self.pos = torch.empty(0, dtype=torch.int64), len(self.y)

    def run(self, steps: int, on_step: Callable[[], None] | None = None) -> float:
        """Train `steps` steps; return the seconds they took. `on_step()` runs before each (untimed use)."""
        model, opt, x_all, y_all, m, n = self.model, self.opt, self.x, self.y, self.m, len(self.y)
        t0 = time.perf_counter()
        for _ in range(steps):
            if on_step is not None:
                on_step()
            if self.pos + m > n:
                self.perm, self.pos = torch.randperm(n, generator=self.gen), 0
            idx = self.perm[self.pos:self.pos + m]
            self.pos += m
            out = model(x_all[idx])
            loss = F.cross_entropy(out, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0


def run_trainer(cfg: Config, data: Dataset, steps: int, on_draw: Callable[[int], None],
                keep: dict | None = None) -> None:
    """`bnexp train`'s loop (Trainer.run in a temporary run directory) for `steps` steps.

    `on_draw(k)` is called where the loop draws the batch of step k, before the draw: the clock marks of
    the loop section and the RSS samples of the memory section are taken there, inside the run, so
    set-up and the final summary can be left out of a window while every log row, evaluation, probe and
    checkpoint inside it counts, as in a real run.
    """
    from bnexp.train import Trainer

    cfg = cfg.model_copy(deep=True)
    cfg.train.steps = steps
    with tempfile.TemporaryDirectory(prefix="bnexp-bench-") as tmp:
        trainer = Trainer(cfg, Path(tmp), data, quiet=True)
        draw = trainer.sampler.next
        count = 0

        def hooked_next() -> torch.Tensor:
            nonlocal count
            count += 1
            on_draw(count)
            return draw()

        trainer.sampler.next = hooked_next  # instance attribute: shadows the method for this run only
        trainer.run()
        on_draw(steps + 1)  # the run is over; what it holds is still alive
        if keep is not None:  # for tests: the trained model and the run's summary
            keep.update(model=trainer.model, summary=json.loads((Path(tmp) / "summary.json").read_text()))


def interleaved(cfg: Config, data: Dataset, warmup: int, chunk: int, chunks: int) -> tuple[list[float], list[float]]:
    """Seconds per chunk of `chunk` steps for the Trainer and a bare loop, alternating chunk by chunk.

    A bare chunk runs at each chunk boundary of the Trainer's run, between two clock marks, so each
    Trainer chunk has a bare chunk next to it in time: load from other processes drifts over seconds and
    hits both alike. Both first run `warmup` untimed steps.
    """
    bare = BareLoop(cfg, data)
    trainer_s: list[float] = []
    bare_s: list[float] = []
    mark = 0.0

    def on_draw(k: int) -> None:
        nonlocal mark
        j, rem = divmod(k - warmup - 1, chunk)
        if k <= warmup or rem or j > chunks:
            return
        if j > 0:
            trainer_s.append(time.perf_counter() - mark)
        if j == 0:
            bare.run(warmup)
        if j < chunks:
            bare_s.append(bare.run(chunk))
        mark = time.perf_counter()

    run_trainer(cfg, data, warmup + chunk * chunks + 1, on_draw)
    return trainer_s, bare_s


# --- loop section --------------------------------------------------------------------------------------

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


# --- memory section ------------------------------------------------------------------------------------

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


# --- layer section -------------------------------------------------------------------------------------

def run_layer(console: Console, quick: bool) -> None:
    try:
        from bnexp import bench_layer
    except ImportError as err:
        raise BenchError(f"bench section layer is not available yet (bnexp/bench_layer.py: {err})") from None
    # One thread, as in the other sections: two OpenMP threads on a busy 2-core machine timed torch's
    # BN kernel at 100x its real cost in a quick run, which is noise, not a ratio.
    rows = bench_layer.measure_layer(repeats=3 if quick else 15, quick=quick, threads=1)
    console.print(bench_layer.render_table(rows))
    for line in bench_layer.summary_lines(rows):
        console.print(line)


# --- entry point ---------------------------------------------------------------------------------------

def check_sections(only: Iterable[str]) -> list[str]:
    chosen = [s.strip().lower() for s in only if s.strip()]
    for s in chosen:
        if s not in SECTIONS:
            raise BenchError(f"--only {s}: unknown section (choose from {', '.join(SECTIONS)})")
    return [s for s in SECTIONS if s in chosen] if chosen else list(SECTIONS)


def main(quick: bool = False, only: list[str] | None = None, console: Console | None = None) -> None:
    """Run the chosen sections (all by default); --quick is a smoke test with few repeats and steps."""
    sections = check_sections(only or [])
    if console is None:
        console = Console()
        if not console.is_terminal and console.width < 160:
            console = Console(width=160)  # piped or captured: keep each table row on one line
    for section in sections:
        if section == "layer":
            run_layer(console, quick)
        elif section == "loop":
            args = QUICK_LOOP if quick else {}
            console.print(loop_table(*measure_loop(**args)))
        elif section == "memory":
            args = QUICK_MEMORY if quick else {}
            console.print(memory_table(*measure_memory(**args)))
