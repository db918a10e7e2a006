"""What the probes show on the default digits experiment (configs/default.yaml: MLP 3x100, sigmoid, m=60).

    python benchmarks/probe_science.py [--seeds 0 1 2] [--steps 2000]

Three claims of the paper, each from the probes' own metrics.jsonl, over several seeds (mean ± std):
  1. running-statistic error (mean over BN layers of mean_err, var_err) falls as training proceeds;
  2. the input to the sigmoid drifts much less with BN than without. Drift of a unit = mean over p15, p50,
     p85 of |value at the end − value at step 100|, averaged over the tracked units of every layer;
  3. the train/inference gap (gap/logits, gap/kl, |gap/accuracy|) is larger at batch size 4 than at 60.
Runs go to a temporary directory; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path

import torch

from bnexp import config as cfgmod
from bnexp.engine.rundir import read_metrics
from bnexp.engine.session import prepare, train

DEFAULT = Path(__file__).parents[1] / "configs" / "default.yaml"


def run(tmp: Path, name: str, overrides: list[str]) -> dict[int, dict]:
    cfg = cfgmod.load(DEFAULT, overrides)
    out = tmp / name
    out.mkdir()
    train(cfg, out, quiet=True, data=prepare(cfg))
    return {r["step"]: r for r in read_metrics(out)}


def mean_over(row: dict, pattern: str) -> float:
    vals = [v for k, v in row.items() if re.fullmatch(pattern, k)]
    return sum(vals) / len(vals)


def drift(rows: dict[int, dict], start: int, end: int) -> float:
    keys = [k for k in rows[end] if k.startswith("activations/")]
    return sum(abs(rows[end][k] - rows[start][k]) for k in keys) / len(keys)


def fmt(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} ± {sd:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps
    checkpoints = [s for s in (0, 100, 200, 500, 1000, steps) if s <= steps]
    err = {s: ([], []) for s in checkpoints}
    drifts: dict[str, list[float]] = {"bn": [], "none": []}
    gaps: dict[int, dict[str, list[float]]] = {m: {"logits": [], "kl": [], "|accuracy|": []} for m in (60, 4)}
    acc: dict[str, list[float]] = {"bn m=60": [], "none m=60": [], "bn m=4": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in args.seeds:
            common = [f"seed={seed}", f"train.steps={steps}", "probes.histogram_every=100000"]
            bn = run(tmp, f"bn-{seed}", common)
            none = run(tmp, f"none-{seed}", common + ["model.norm=none"])
            small = run(tmp, f"bn4-{seed}", common + ["data.batch_size=4"])
            for s in checkpoints:
                err[s][0].append(mean_over(bn[s], r"running_stats/h\d+/mean_err"))
                err[s][1].append(mean_over(bn[s], r"running_stats/h\d+/var_err"))
            drifts["bn"].append(drift(bn, 100, steps))
            drifts["none"].append(drift(none, 100, steps))
            for m, rows in ((60, bn), (4, small)):
                gaps[m]["logits"].append(rows[steps]["gap/logits"])
                gaps[m]["kl"].append(rows[steps]["gap/kl"])
                gaps[m]["|accuracy|"].append(abs(rows[steps]["gap/accuracy"]))
            acc["bn m=60"].append(bn[steps]["test/accuracy"])
            acc["none m=60"].append(none[steps]["test/accuracy"])
            acc["bn m=4"].append(small[steps]["test/accuracy"])
    print(f"default digits config, {steps} steps, seeds {args.seeds}; mean ± std over seeds")
    print("\n1. running-statistic error of BN (mean over layers h1-h3)")
    print(f"   {'step':>6}  {'mean_err':>18}  {'var_err':>18}")
    for s in checkpoints:
        print(f"   {s:>6}  {fmt(err[s][0]):>18}  {fmt(err[s][1]):>18}")
    print(f"\n2. drift of the sigmoid input's p15/p50/p85 from step 100 to step {steps} (mean |change|)")
    print(f"   with BN: {fmt(drifts['bn'])}   without BN: {fmt(drifts['none'])}   "
          f"ratio none/BN: {statistics.mean(drifts['none']) / statistics.mean(drifts['bn']):.2f}")
    print(f"\n3. train/inference gap at step {steps}")
    for key in ("logits", "kl", "|accuracy|"):
        print(f"   gap {key:>10}: m=60 {fmt(gaps[60][key])}   m=4 {fmt(gaps[4][key])}")
    print("\n   final test accuracy (eval mode): " + ", ".join(f"{k} {fmt(v)}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
