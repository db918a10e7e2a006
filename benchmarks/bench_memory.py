"""Peak RSS over a long `bnexp train` run stays flat: `python benchmarks/bench_memory.py [--quick]`.

The same code as `bnexp bench --only memory` (bnexp.bench), with its knobs exposed.
"""

import argparse

from rich.console import Console

from bnexp.bench.memory import QUICK_MEMORY, measure_memory, memory_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 steps: a smoke test")
    ap.add_argument("--steps", type=int, default=12000, help="steps measured after the warm-up")
    ap.add_argument("--warmup", type=int, default=1000, help="steps before the first RSS sample")
    ap.add_argument("--sample-every", type=int, default=500, help="steps between RSS samples")
    ap.add_argument("--norm", choices=["bnexp", "torch", "none"], default=None,
                    help="model.norm (default: bnexp, our layer)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    if args.quick:
        vars(args).update(QUICK_MEMORY)
    results, info = measure_memory(steps=args.steps, warmup=args.warmup, sample_every=args.sample_every,
                                   norm=args.norm, threads=args.threads)
    Console(width=160).print(memory_table(results, info))


if __name__ == "__main__":
    main()
