"""`bnexp bench`: speed and memory as ratios against a reference run side by side in this process.

Sections:
  layer   bnexp.nn's BatchNorm against torch.nn.BatchNorm*d (bnexp.bench.layer), at one thread and at
          torch's default thread count (or on the GPU with device="cuda": ours against cuDNN).
  resnet  a ResNet-20 training step with our BN against the same with torch's (bnexp.bench.resnet).
  loop    `bnexp train`'s own loop against a bare hand-written loop (bnexp.bench.loop).
  memory  peak RSS over a long run, for the Trainer and the bare loop (bnexp.bench.memory).
  probes  each probe family's overhead at its default interval, against probes off (bnexp.bench.probes).

Absolute times depend on the machine and on whatever else it runs; a ratio of two contenders measured in
alternation in one process does not (much), so every figure is a ratio and the absolute times are context.
The loop and memory workload is bnexp.bench.workload's.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from bnexp.errors import UserError

SECTIONS = ("layer", "resnet", "loop", "memory", "probes")


class BenchError(UserError):
    """An unknown section name: one line, exit status 2."""


def check_sections(only: Iterable[str]) -> list[str]:
    chosen = [s.strip().lower() for s in only if s.strip()]
    for s in chosen:
        if s not in SECTIONS:
            raise BenchError(f"--only {s}: unknown section (choose from {', '.join(SECTIONS)})")
    return [s for s in SECTIONS if s in chosen] if chosen else list(SECTIONS)


def run(quick: bool = False, only: list[str] | None = None, device: str = "cpu") -> Iterator[Any]:
    """The chosen sections (all by default), each as rich renderables once measured; --quick is a smoke
    test with few repeats and steps. ``device="cuda"`` runs the layer section on the GPU (the others
    are CPU workloads)."""
    import torch

    if device != "cpu" and not device.startswith("cuda"):
        raise BenchError(f"--device {device}: choose cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device {device}: no CUDA device is available")
    # The layer and ResNet sections run at one thread and at torch's default count (2 on a 2-core
    # machine). On a busy machine OpenMP workers spin-waiting for a descheduled peer can time either
    # layer at many times its cost with two threads: the per-repeat spread in the tables shows it.
    thread_counts = [1] if torch.get_num_threads() == 1 else [1, torch.get_num_threads()]
    for section in check_sections(only or []):
        if section == "layer":
            from bnexp.bench import layer

            for threads in ([None] if device != "cpu" else thread_counts):
                rows = layer.measure_layer(repeats=3 if quick else 15, quick=quick, threads=threads,
                                           device=device)
                yield layer.render_table(rows)
                yield from layer.summary_lines(rows)
        elif section == "resnet":
            from bnexp.bench.resnet import measure_resnet, resnet_table

            yield resnet_table([measure_resnet(steps=2 if quick else 30, warmup=1 if quick else 3,
                                               batch=16 if quick else 128, threads=t) for t in thread_counts])
        elif section == "loop":
            from bnexp.bench.loop import QUICK_LOOP, loop_table, measure_loop

            yield loop_table(*measure_loop(**(QUICK_LOOP if quick else {})))
        elif section == "memory":
            from bnexp.bench.memory import QUICK_MEMORY, measure_memory, memory_table

            yield memory_table(*measure_memory(**(QUICK_MEMORY if quick else {})))
        elif section == "probes":
            from bnexp.bench.probes import QUICK_PROBES, measure_probes, probes_table

            yield probes_table(*measure_probes(**(QUICK_PROBES if quick else {})))
