"""`bnexp bench`: speed and memory as ratios against a reference run side by side in this process.

Sections:
  layer   bnexp.nn's BatchNorm against torch.nn.BatchNorm*d (bnexp.bench.layer).
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

SECTIONS = ("layer", "loop", "memory", "probes")


class BenchError(UserError):
    """An unknown section name: one line, exit status 2."""


def check_sections(only: Iterable[str]) -> list[str]:
    chosen = [s.strip().lower() for s in only if s.strip()]
    for s in chosen:
        if s not in SECTIONS:
            raise BenchError(f"--only {s}: unknown section (choose from {', '.join(SECTIONS)})")
    return [s for s in SECTIONS if s in chosen] if chosen else list(SECTIONS)


def run(quick: bool = False, only: list[str] | None = None) -> Iterator[Any]:
    """The chosen sections (all by default), each as rich renderables once measured; --quick is a smoke
    test with few repeats and steps."""
    for section in check_sections(only or []):
        if section == "layer":
            from bnexp.bench import layer

            # One thread, as in the other sections: two OpenMP threads on a busy 2-core machine timed
            # torch's BN kernel at 100x its real cost in a quick run, which is noise, not a ratio.
            rows = layer.measure_layer(repeats=3 if quick else 15, quick=quick, threads=1)
            yield layer.render_table(rows)
            yield from layer.summary_lines(rows)
        elif section == "loop":
            from bnexp.bench.loop import QUICK_LOOP, loop_table, measure_loop

            yield loop_table(*measure_loop(**(QUICK_LOOP if quick else {})))
        elif section == "memory":
            from bnexp.bench.memory import QUICK_MEMORY, measure_memory, memory_table

            yield memory_table(*measure_memory(**(QUICK_MEMORY if quick else {})))
        elif section == "probes":
            from bnexp.bench.probes import QUICK_PROBES, measure_probes, probes_table

            yield probes_table(*measure_probes(**(QUICK_PROBES if quick else {})))
