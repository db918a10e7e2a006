"""Speed of bnexp.norm against torch.nn.BatchNorm*d, side by side in one process.

Timings alternate ours/torch per repeat (so load from other processes hits both alike) and report
medians. Training is forward + backward with a random upstream gradient; eval is an inference forward
under ``torch.no_grad()``. For the conv shapes we also estimate a memory-traffic bound (see
``memory_bound``) from the bandwidth of a large copy measured in the same process.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from rich.table import Table

from bnexp.nn import batchnorm as norm
from bnexp.nn import kernel

SHAPES: list[tuple[int, ...]] = [
    (60, 100),
    (256, 1024),
    (1024, 1024),
    (128, 64, 32, 32),
    (32, 256, 14, 14),
    (8, 16, 8, 8, 8),
]
QUICK_SHAPES: list[tuple[int, ...]] = [(60, 100), (4, 8, 6, 6)]
DTYPES = (torch.float32, torch.float64)
MODES = ("train fwd+bwd", "eval fwd")

_OURS = {2: norm.BatchNorm1d, 3: norm.BatchNorm1d, 4: norm.BatchNorm2d, 5: norm.BatchNorm3d}
_TORCH = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}

# Full-size tensor transfers a two-pass BN must make when the tensor does not fit in cache:
# forward reads x for the statistics, then reads x and writes y; backward reads g and x for the two
# reductions, then reads g and x and writes dx. (A single-pass ideal would be 5: x, y, g, x, dx.)
TRAFFIC_PASSES = 8
TRAFFIC_PASSES_IDEAL = 5


@contextmanager
def torch_threads(n: int | None):
    """Run with n intra-op threads (None: leave torch's setting), restoring the previous count.

    Every bench section uses one thread by default: on a machine that other work keeps busy,
    OpenMP workers spin-waiting for a descheduled peer made a step of this small network 20-50x slower
    with two threads on two cores (measured with a load average of 13), and that noise swamps any ratio.
    Both contenders always run with the same count.
    """
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _time_pair(fns: dict[str, Callable[[], None]], repeats: int, min_sample_s: float,
               clock: Callable[[], float] = time.perf_counter, budget_s: float = 4.0) -> dict[str, dict[str, float]]:
    """Median and min seconds per call for each function, interleaving them repeat by repeat.

    Stops early (after at least 3 repeats) once ``budget_s`` of wall time is spent, so a loaded
    machine does not stretch the run without bound.
    """
    inner = {}
    for name, fn in fns.items():
        fn()  # warm up (first calls allocate, import lazily, fault pages in)
        t0 = clock()
        fn()
        dt = max(clock() - t0, 1e-7)
        inner[name] = max(1, int(min_sample_s / dt))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(repeats):
        for name, fn in fns.items():
            n = inner[name]
            t0 = clock()
            for _ in range(n):
                fn()
            samples[name].append((clock() - t0) / n)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: {"median": statistics.median(s), "min": min(s)} for name, s in samples.items()}


def _make(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    ours = _OURS[len(shape)](c, dtype=dtype)
    ref = _TORCH[len(shape)](c, dtype=dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    ref.load_state_dict(ours.state_dict())
    x = (torch.randn(shape, generator=gen, dtype=dtype) * 2 + 1).to(device).requires_grad_()
    g = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    return ours.to(device), ref.to(device), x, g


def _sync(device: str) -> Callable[[], None]:
    """What makes a step's time include its device work: CUDA runs asynchronously."""
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def _train_step(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    sync = _sync(x.device.type)

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(g)
        sync()

    return step


def _eval_step(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    sync = _sync(x.device.type)

    def step():
        with torch.no_grad():
            layer(x)
        sync()

    return step


def copy_bandwidth_gbs(nbytes: int = 256 * 2**20, repeats: int = 7,
                       clock: Callable[[], float] = time.perf_counter) -> float:
    """Read+write bandwidth of a large copy into preallocated memory (STREAM-style: 2 bytes per byte).

    Timed with the same clock as the layers, so the bound and the timings are comparable.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = []
    for _ in range(repeats):
        t0 = clock()
        dst.copy_(src)
        ts.append(clock() - t0)
    return 2 * nbytes / statistics.median(ts) / 1e9


def memory_bound(shape: tuple[int, ...], dtype: torch.dtype, bandwidth_gbs: float) -> dict[str, float]:
    """Lower bound on training fwd+bwd time from memory traffic alone (TRAFFIC_PASSES full tensors)."""
    tensor_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return {
        "traffic_mb": TRAFFIC_PASSES * tensor_bytes / 1e6,
        "bound_ms": TRAFFIC_PASSES * tensor_bytes / (bandwidth_gbs * 1e9) * 1e3,
        "ideal_bound_ms": TRAFFIC_PASSES_IDEAL * tensor_bytes / (bandwidth_gbs * 1e9) * 1e3,
        "bandwidth_gbs": bandwidth_gbs,
    }


def measure_layer(repeats: int = 15, quick: bool = False,
                  shapes: list[tuple[int, ...]] | None = None,
                  dtypes: tuple[torch.dtype, ...] = DTYPES,
                  threads: int | None = None, clock: str = "wall", path: str = "kernel",
                  device: str = "cpu") -> list[dict]:
    """One row per (shape, dtype, mode): ours_ms, torch_ms (medians), ratio (ours/torch); bound on conv.

    ``path`` is the layer's path to time: "kernel" (the compiled kernel, as the layer runs by default;
    the tensor ops if it cannot be built, and the rows say so) or "ops" (its tensor-op path).

    ``clock="wall"`` times with perf_counter (what a user waits for). ``clock="cpu"`` times the calling
    thread's CPU time, which leaves out time the scheduler gives to other processes; it needs
    ``threads=1`` (other intra-op threads' work would not be counted). ``threads`` sets torch's
    intra-op thread count for the run and restores it afterwards.

    ``device="cuda"`` times both layers on the GPU (ours runs its tensor ops there, torch's cuDNN),
    each step synchronized; there is no memory-traffic bound then.
    """
    if path not in ("kernel", "ops"):
        raise ValueError(f"path must be 'kernel' or 'ops', got {path!r}")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if clock == "cpu" and threads != 1:
        raise ValueError("clock='cpu' measures one thread: pass threads=1")
    if shapes is None:
        shapes = QUICK_SHAPES if quick else SHAPES
    if quick:
        repeats = min(repeats, 3)
    timer = time.perf_counter if clock == "wall" else time.thread_time
    min_sample_s = 0.002 if quick else 0.01
    budget_s = 0.5 if quick else 4.0
    cuda = device.startswith("cuda")
    if cuda and clock == "cpu":
        raise ValueError("clock='cpu' does not see GPU work: use the wall clock with device='cuda'")
    with torch_threads(threads), kernel.enabled(path == "kernel") as kern:
        path_used = "kernel" if kern is not None and not cuda else "ops"
        bandwidth = None if cuda else copy_bandwidth_gbs(32 * 2**20 if quick else 256 * 2**20, 3 if quick else 7,
                                                         timer)
        rows = []
        for shape in shapes:
            for dtype in dtypes:
                ours, ref, x, g = _make(shape, dtype, device=device)
                for mode in MODES:
                    if mode == "train fwd+bwd":
                        ours.train(), ref.train()
                        fns = {"ours": _train_step(ours, x, g), "torch": _train_step(ref, x, g)}
                    else:
                        ours.eval(), ref.eval()
                        fns = {"ours": _eval_step(ours, x), "torch": _eval_step(ref, x)}
                    t = _time_pair(fns, repeats, min_sample_s, timer, budget_s)
                    row = {
                        "shape": shape,
                        "dtype": str(dtype).removeprefix("torch."),
                        "mode": mode,
                        "threads": torch.get_num_threads(),
                        "device": device,
                        "clock": clock,
                        "path": path_used,
                        "ours_ms": t["ours"]["median"] * 1e3,
                        "torch_ms": t["torch"]["median"] * 1e3,
                        "ratio": t["ours"]["median"] / t["torch"]["median"],
                        "ours_min_ms": t["ours"]["min"] * 1e3,
                        "torch_min_ms": t["torch"]["min"] * 1e3,
                        "ratio_min": t["ours"]["min"] / t["torch"]["min"],
                    }
                    if len(shape) > 2 and mode == "train fwd+bwd" and bandwidth is not None:
                        row.update(memory_bound(shape, dtype, bandwidth))
                        row["ours_over_bound"] = row["ours_ms"] / row["bound_ms"]
                        row["torch_over_bound"] = row["torch_ms"] / row["bound_ms"]
                    rows.append(row)
    return rows


def geomean_ratio(rows: list[dict], mode: str = "train fwd+bwd", dtype: str | None = "float32") -> float:
    ratios = [r["ratio"] for r in rows if r["mode"] == mode and (dtype is None or r["dtype"] == dtype)]
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else float("nan")


def render_table(rows: list[dict]) -> Table:
    threads = rows[0]["threads"] if rows else torch.get_num_threads()
    clock = rows[0]["clock"] if rows else "wall"
    path = {"kernel": "compiled kernel", "ops": "tensor ops"}[rows[0]["path"]] if rows else "?"
    device = rows[0].get("device", "cpu") if rows else "cpu"
    where = f"{threads} thread(s)" if device == "cpu" else f"{device}, torch's cuDNN"
    # Short headers, padding between columns collapsed: the table fits a terminal of 100 columns.
    table = Table(title=f"bnexp.nn ({path}) vs torch.nn.BatchNorm*d ({where}, {clock} clock, medians)",
                  caption=f"ratio: ours ÷ torch; min ratio: the same of the fastest repeats; bound: "
                          f"{TRAFFIC_PASSES} full-tensor transfers at the measured copy bandwidth",
                  collapse_padding=True, pad_edge=False)
    for col, just in [("shape", "left"), ("dtype", "left"), ("mode", "left"), ("ours ms", "right"),
                      ("torch ms", "right"), ("ratio", "right"), ("min ratio", "right"),
                      ("bound ms", "right"), ("÷ bound", "right"), ("GB/s", "right")]:
        table.add_column(col, justify=just, no_wrap=True)
    for r in rows:
        limit = 1.2 if r["mode"] == "eval fwd" else 2.0
        ratio = f"{r['ratio']:.2f}"
        if r["ratio"] > limit:
            ratio = f"[red]{ratio}[/red]"
        table.add_row(
            "×".join(map(str, r["shape"])), r["dtype"].replace("float", "f"),
            r["mode"], f"{r['ours_ms']:.3f}", f"{r['torch_ms']:.3f}", ratio, f"{r['ratio_min']:.2f}",
            f"{r['bound_ms']:.3f}" if "bound_ms" in r else "",
            f"{r['ours_over_bound']:.2f}" if "ours_over_bound" in r else "",
            f"{r['bandwidth_gbs']:.1f}" if "bandwidth_gbs" in r else "",
        )
    return table


def summary_lines(rows: list[dict]) -> list[str]:
    lines = []
    for dtype in sorted({r["dtype"] for r in rows}):
        train = [r for r in rows if r["dtype"] == dtype and r["mode"] == "train fwd+bwd"]
        evals = [r for r in rows if r["dtype"] == dtype and r["mode"] == "eval fwd"]
        lines.append(
            f"{dtype}: train geomean ours/torch {geomean_ratio(rows, 'train fwd+bwd', dtype):.2f} "
            f"(max {max(r['ratio'] for r in train):.2f}), eval geomean {geomean_ratio(rows, 'eval fwd', dtype):.2f} "
            f"(max {max(r['ratio'] for r in evals):.2f})"
        )
    return lines
