"""`bnexp train`'s loop against a bare hand-written loop: `python benchmarks/bench_loop.py [--quick]`.

The same code as `bnexp bench --only loop` (bnexp.bench), with its knobs exposed.
"""

import argparse

from rich.console import Console

from bnexp.bench.loop import QUICK_LOOP, loop_table, measure_loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 chunk pairs of 50 steps: a smoke test")
    ap.add_argument("--chunks", type=int, default=9, help="interleaved chunk pairs per contender")
    ap.add_argument("--chunk", type=int, default=500, help="steps per chunk (default: checkpoint_every)")
    ap.add_argument("--warmup", type=int, default=100, help="untimed steps before the clock starts")
    ap.add_argument("--norm", choices=["bnexp", "torch", "none"], default=None,
                    help="model.norm (default: bnexp, our layer)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both contenders")
    args = ap.parse_args()
    if args.quick:
        vars(args).update(QUICK_LOOP)
    results, info = measure_loop(chunks=args.chunks, chunk=args.chunk, warmup=args.warmup, norm=args.norm,
                                 threads=args.threads)
    Console(width=160).print(loop_table(results, info))


if __name__ == "__main__":
    main()
