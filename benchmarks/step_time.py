"""Training-step time of a comparison config's networks on this machine, to estimate how long it takes:
`python benchmarks/step_time.py configs/compare/cifar10_resnet20.yaml [--steps 10] [--threads N]
[--set base.KEY=VALUE]`.

For every arm: the network the arm builds, a forward, backward and optimizer step on a random batch of the
config's batch size and input shape (its dataset's shape, without loading the data), median seconds over
--steps steps after two warm-up steps, with the run's thread count (or --threads); and from it the time of
one run of train.steps (or train.epochs over the dataset's training-set size) and of the whole comparison
with --jobs 1, and with --jobs 2 when a run has one thread (the default), each worker on a core of its
own. Evaluation, probes and checkpoints come on top (about 5-10 % at their default intervals).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bnexp.engine.optim import build_optimizer
from bnexp.experiments.compare import load_compare, plan
from bnexp.models import build_model

# Input shape, outputs and training-set size of each dataset (the numbers its loader gives).
SHAPES = {"cifar10": ((3, 32, 32), 10, 50000), "mnist": ((1, 28, 28), 10, 60000),
          "fashion_mnist": ((1, 28, 28), 10, 60000), "digits": ((1, 8, 8), 10, 1437),
          "mnist1d": ((1, 40), 10, 4000)}


def step_seconds(cfg, steps: int, threads: int | None) -> float:
    shape, outputs, _ = SHAPES[cfg.data.dataset]
    torch.manual_seed(0)
    threads = threads or cfg.threads
    if threads is not None:
        torch.set_num_threads(threads)
    model = build_model(cfg.model, shape, outputs)
    opt = build_optimizer(cfg.optim, model.parameters())
    x, y = torch.randn(cfg.data.batch_size, *shape), torch.randint(0, outputs, (cfg.data.batch_size,))
    loss_fn = torch.nn.functional.cross_entropy
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides, as for bnexp compare")
    args = ap.parse_args()
    cmp = load_compare(args.config, args.set)
    jobs = plan(cmp)
    total = 0.0
    for arm in cmp.arm_names:
        cfg = next(j.cfg for j in jobs if j.arm == arm)
        seconds = step_seconds(cfg, args.steps, args.threads)
        n_train = SHAPES[cfg.data.dataset][2]
        steps = cfg.train.epochs * (n_train // cfg.data.batch_size) if cfg.train.epochs else cfg.train.steps
        runs = sum(j.arm == arm for j in jobs)
        total += seconds * steps * runs
        print(f"{arm}: {seconds:.3f} s a step, {steps} steps: {seconds * steps / 3600:.2f} h a run, {runs} runs")
    line = f"the comparison ({len(jobs)} runs): {total / 3600:.1f} h with --jobs 1"
    if torch.get_num_threads() == 1:  # each worker of --jobs 2 then has a core of its own
        line += f", about {total / 7200:.1f} h with --jobs 2 on 2 free cores"
    print(line + f" ({torch.get_num_threads()} torch thread(s) a run)")


if __name__ == "__main__":
    main()
