"""A ResNet-20 training step with our BN against torch's: `python benchmarks/bench_resnet.py [--threads N]`.

The same code as `bnexp bench --only resnet` (bnexp.bench.resnet), with its knobs exposed. By default it
measures at one thread and at torch's default thread count.
"""

import argparse

import torch
from rich.console import Console

from bnexp.bench.resnet import measure_resnet, resnet_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, action="append", help="torch intra-op threads (repeatable)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per contender")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole measurement (spread on a busy machine)")
    ap.add_argument("--cpu-clock", action="store_true", help="time thread CPU time (needs --threads 1)")
    args = ap.parse_args()
    threads = args.threads or sorted({1, torch.get_num_threads()})
    clock = "cpu" if args.cpu_clock else "wall"
    rows = [measure_resnet(steps=args.steps, batch=args.batch, threads=t, clock=clock)
            for _ in range(args.rounds) for t in threads]
    Console(width=160).print(resnet_table(rows))


if __name__ == "__main__":
    main()
