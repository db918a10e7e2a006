"""Benchmark bnexp.norm against torch.nn.BatchNorm*d: `python benchmarks/bench_layer.py [--quick]`.

On a shared machine, `--threads 1 --cpu-clock` gives the figures least disturbed by other processes.
"""

import argparse

from rich.console import Console

from bnexp.bench.layer import measure_layer, render_table, summary_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two small shapes, a few repeats")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: as is)")
    parser.add_argument("--cpu-clock", action="store_true", help="time thread CPU time (needs --threads 1)")
    parser.add_argument("--path", choices=["kernel", "ops"], default="kernel",
                        help="the layer's compiled kernel (its default) or its tensor-op path")
    args = parser.parse_args()
    rows = measure_layer(repeats=args.repeats, quick=args.quick, threads=args.threads,
                         clock="cpu" if args.cpu_clock else "wall", path=args.path)
    console = Console() if Console().is_terminal else Console(width=160)  # a file: rows on one line
    console.print(render_table(rows))
    for line in summary_lines(rows):
        console.print(line)


if __name__ == "__main__":
    main()
