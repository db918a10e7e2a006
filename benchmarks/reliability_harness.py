"""Reliability harness: bnexp tried as an adversarial user would, counted as tried / held per category.

    python benchmarks/reliability_harness.py [--signals 60] [--seed 0] [--only CATEGORY]... [--keep]

Categories (issue 17's "keep counting"):

- bad inputs: config values, YAML files, --set flags, paths and comparison configs that are wrong. Held:
  exit status 2, one line on stderr starting "error: " and under 300 characters, no traceback, and no file
  created or changed.
- signals: SIGINT, SIGTERM or SIGKILL at a random moment of `bnexp train` (start-up included), and kills
  of `bnexp compare --jobs 2` (its parent or its process group). Held: a clean exit (the signal's status
  with at most one line, or killed by the signal before bnexp's handlers, silently) leaving no run folder
  or a complete one (config.yaml, summary.json) that `--resume` finishes bit-identical to an uninterrupted
  run (weights, buffers, optimizer state, metrics.jsonl, TensorBoard scalars); for compare, no worker
  outliving its parent, and a resume that completes every run with none counted as failed.
- damaged files: checkpoints (flipped bytes, truncation, foreign or other-format files), metrics.jsonl,
  summary.json, config.yaml, event files and compare.yaml of an interrupted run. Held: a one-line error
  naming the file with nothing changed, or (for what a kill leaves: a torn line, a half-written
  temporary) a resume bit-identical to the uninterrupted run.
- security: a kernel library planted in cache folders others can write, links planted where a run
  writes, links for a comparison's arm, a malicious pickle as checkpoint, names that would escape the output
  folder, YAML bombs and tags. Held: the planted code never runs, nothing outside is written, and a
  one-line error (or a run that writes only inside its folder).
- output folder: a full disk (a small tmpfs), a read-only one (a read-only bind mount), no permission (run
  as nobody), names too long. Held: one line naming the path, exit 2, and, once the cause is gone, a
  resume bit-identical to the uninterrupted run. Mounts need a private mount namespace (`unshare -m`) and
  permissions root (setpriv); cases that cannot run here are reported as skipped, not held.

Every case prints a line when it does not hold; the table at the end gives tried / held per category.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# The run every interrupted one is compared with: small, with our BN layer and every probe on; log_every 7
# does not divide checkpoint_every 150, so interruptions land inside a log interval.
RUN = {
    "name": "rel", "device": "cpu",
    "data": {"dataset": "synthetic", "batch_size": 20,
             "synthetic": {"num_samples": 300, "num_features": 8, "num_classes": 3}},
    "model": {"kind": "mlp", "hidden": [16, 16], "norm": "bnexp", "activation": "sigmoid"},
    "optim": {"name": "momentum", "lr": 0.3, "schedule": "cosine", "warmup_steps": 20},
    "train": {"steps": 600, "eval_every": 50, "log_every": 7, "checkpoint_every": 150},
    "probes": {"enabled": True, "every": 100, "population_batches": 2, "histogram_every": 300},
}
TINY_COMPARE = {
    "name": "tiny",
    "base": {**{k: v for k, v in RUN.items() if k not in ("name", "probes")}, "probes": {"enabled": False},
             "train": {"steps": 1500, "eval_every": 50, "log_every": 10, "checkpoint_every": 250}},
    "arms": {"no_bn": {"model.norm": "none"}, "bn": {"model.norm": "bnexp"}},
    "seeds": [0, 1],
}


@dataclass
class Tally:
    results: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # category -> [(case, verdict)]

    def add(self, category: str, case: str, held: bool | None, detail: str = "") -> None:
        verdict = "skipped" if held is None else "held" if held else "FAILED"
        self.results.setdefault(category, []).append((case, verdict))
        if verdict != "held":
            print(f"  {verdict}: [{category}] {case}{': ' + detail[:600] if detail else ''}", flush=True)

    def table(self) -> str:
        rows = ["| category | tried | held | skipped |", "| --- | --- | --- | --- |"]
        for category, cases in self.results.items():
            tried = sum(v != "skipped" for _, v in cases)
            rows.append(f"| {category} | {tried} | {sum(v == 'held' for _, v in cases)} | "
                        f"{sum(v == 'skipped' for _, v in cases)} |")
        return "\n".join(rows)


# --- running bnexp ------------------------------------------------------------------------------------------

@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(*args, cwd: Path) -> Result:
    """`bnexp ARGS` in this process, in `cwd`."""
    from bnexp.cli import main

    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except BaseException as exc:  # noqa: BLE001 - a crash is what the harness looks for
                import traceback

                err.write("Traceback (uncaught by bnexp)\n" + traceback.format_exc())
                code = -1
    finally:
        os.chdir(before)
    return Result(code, out.getvalue(), err.getvalue())


def spawn(args: list, cwd: Path, env: dict | None = None, prefix: list | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([*(prefix or []), sys.executable, "-m", "bnexp.cli", *map(str, args)], cwd=cwd,
                            env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


WORK: list[str] = []  # the harness's work folder: its (long) name does not count against a message's length


def one_line_error(r: Result, code: int = 2) -> str:
    """'' if r is the one-line user error bnexp promises, else what is wrong with it. A message may name
    paths, but quotes at most a short excerpt of a value: under 300 characters with the work folder's
    name left out."""
    lines = r.err.strip().splitlines()
    if r.code != code:
        return f"exit {r.code}: {r.err.strip()[-400:]}"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"{len(lines)} lines: {r.err.strip()[-400:]}"
    short = r.err.replace(WORK[0], "") if WORK else r.err
    if len(short) > 300:
        return f"{len(short)} characters: {short[:200]}"
    return "Traceback in stderr" if "Traceback" in r.err else ""


def refused_unchanged(r: Result, why: str, folder: Path, before: dict[str, str]) -> str:
    """'' if r is the one-line user error, says `why` (the OS's reason) and left `folder` as `before`."""
    problem = one_line_error(r)
    if not problem and why not in r.err:
        problem = f"the error does not say why: {r.err}"
    if not problem and snapshot(folder) != before:
        problem = "the folder changed"
    return problem


def snapshot(root: Path) -> dict[str, str]:
    """Every file below root (links as their target), with a digest: to prove nothing changed."""
    found = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            found[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            found[rel] = "dir"
    return found


def write_yaml(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# --- comparing runs ---------------------------------------------------------------------------------------

def run_state(run_dir: Path) -> dict:
    """What "bit-identical" compares: the final checkpoint's tensors, metrics rows, TensorBoard scalars and
    the summary's figures."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bnexp.engine import rundir

    final = torch.load(run_dir / "checkpoints" / f"step-{RUN['train']['steps']:08d}.pt", weights_only=True)
    tensors = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            tensors[prefix] = hashlib.sha256(obj.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    for key in ("model", "optimizer", "rng", "sampler"):
        walk(key, final[key])
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    summary = rundir.read_summary(run_dir)
    keys = ("status", "steps", "test_accuracy", "best_test_accuracy", "gap_accuracy", "running_mean_err")
    return {"tensors": tensors, "metrics": rundir.read_metrics(run_dir), "scalars": scalars,
            "summary": {k: summary.get(k) for k in keys}}


def same_as_reference(run_dir: Path, reference: dict) -> str:
    try:
        got = run_state(run_dir)
    except Exception as err:  # noqa: BLE001
        return f"cannot read the run: {type(err).__name__}: {err}"
    for part in ("summary", "tensors", "metrics", "scalars"):
        if got[part] != reference[part]:
            return f"{part} differ from the uninterrupted run"
    return ""


def resume_and_compare(run_dir: Path, reference: dict, cwd: Path) -> str:
    r = cli("train", "--resume", run_dir, "-q", cwd=cwd)
    if r.code != 0:
        return f"resume: exit {r.code}: {r.err.strip()[-300:]}"
    return same_as_reference(run_dir, reference)


# --- bad inputs ---------------------------------------------------------------------------------------------

def _bomb(levels: int = 7, width: int = 9) -> str:
    parts = [f"&a0 [{', '.join(['1'] * width)}]"]
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return f"[{', '.join(parts)}]"


BAD_VALUES = {
    "seed": ["-1", "2.5", "true", "'x'", "18446744073709551616", "[1]", "{a: 1}", ".nan"],
    "data.dataset": ["imagenet", "1", "null", "[digits]"],
    "data.batch_size": ["0", "-5", "1.5", "100000", "'60'", "yes"],
    "data.seed": ["-1", "4294967296", "x"],
    "data.test_fraction": ["0", "1", "-0.1", "2", ".inf", "0.0001"],
    "data.train_size": ["1", "100000000", "0"],
    "model.kind": ["rnn", "3", "[mlp]"],
    "model.hidden": ["[]", "[0]", "[-3]", "[1.5]", "100", "[[1]]", "'100'", f"[{10**12}]"],
    "model.channels": ["[]", "[0]", "x"],
    "model.activation": ["swish", "null"],
    "model.norm": ["batch", "None", "1"],
    "model.bn.eps": ["0", "-1", ".nan", "x"],
    "model.bn.momentum": ["0", "1.5", "-0.1"],
    "model.bn.variant": ["layer", "ghost"],
    "model.bn.ghost_batch_size": ["1", "7"],
    "optim.name": ["lbfgs", "0"],
    "optim.lr": ["0", "-0.1", ".inf", ".nan", "'fast'", "true"],
    "optim.momentum": ["1", "-0.5"],
    "optim.schedule": ["linear"],
    "train.steps": ["0", "-1", "1e3", "'10'"],
    "train.eval_every": ["0"],
    "train.log_every": ["0", "-7"],
    "train.checkpoint_every": ["0"],
    "train.divergence_factor": ["1", "0.5"],
    "probes.every": ["0"],
    "probes.units_per_layer": ["0"],
    "dist.nproc": ["0", "7"],
    "dist.backend": ["mpi", "nccl"],
    "device": ["tpu", "cuda"],
    "threads": ["0", "1099511627776", "-1"],
    "name": ["..", "a/b", "''", "'.'", "x" * 300],
    "out_dir": ['"a\\0b"'],
    "nmae": ["typo"],
    "model.nrom": ["none"],
}
BAD_FILES = {
    "malformed": "model:\n  norm: [torch\n",
    "duplicate key": "seed: 1\nseed: 2\n",
    "a list": "- seed: 1\n",
    "a scalar": "just text\n",
    "binary": "\x00\x01\x02",
    "tab indent": "model:\n\tnorm: none\n",
    "python tag": "seed: !!python/object/apply:os.system ['echo pwned']\n",
    "undefined alias": "seed: *x\n",
    "alias bomb": f"model: {{hidden: {_bomb()}}}\n",
    "deep brackets": "model: {hidden: " + "[" * 1000 + "]" * 1000 + "}\n",
    "recursive alias": "model: {hidden: &r [1, *r]}\n",
    "2 MB": "# padding\n" * 220_000,
    "section as scalar": "model: 3\n",
}
BAD_COMPARES = {
    "no arms": {"seeds": [0]},
    "empty arms": {"arms": {}},
    "arm escapes": {"arms": {"../x": {}}},
    "arm sets seed": {"arms": {"a": {"seed": 3}}},
    "baseline not an arm": {"arms": {"a": {}}, "baseline": "b"},
    "negative seed": {"arms": {"a": {}}, "seeds": [-1]},
    "repeated seed": {"arms": {"a": {}}, "seeds": [1, 1]},
    "bad arm key": {"arms": {"a": {"model.nrom": "none"}}},
    "bad base value": {"arms": {"a": {}}, "base": {"optim": {"lr": -1}}},
    "missing base file": {"arms": {"a": {}}, "base": "nope.yaml"},
    "base not a mapping": {"arms": {"a": {}}, "base": 3},
    "unknown key": {"arms": {"a": {}}, "armz": {}},
    "name escapes": {"arms": {"a": {}}, "name": ".."},
    "target above 1": {"arms": {"a": {}}, "target_accuracy": 2},
}


def bad_inputs(tally: Tally, work: Path) -> None:
    cat = "bad inputs"
    empty = {"device": "cpu", "train": {"steps": 5}, "probes": {"enabled": False}}

    def case(name: str, args: list, setup: Callable[[Path], None] | None = None, allowed=()) -> None:
        cwd = Path(tempfile.mkdtemp(dir=work))
        write_yaml(cwd / "c.yaml", empty)
        if setup:
            setup(cwd)
        before = snapshot(cwd)
        r = cli(*args, cwd=cwd)
        problem = one_line_error(r)
        after = snapshot(cwd)
        if not problem and {k: v for k, v in after.items() if not k.startswith(allowed)} != \
                {k: v for k, v in before.items() if not k.startswith(allowed)}:
            problem = f"files changed: {sorted(set(after.items()) ^ set(before.items()))[:4]}"
        tally.add(cat, name, not problem, problem)
        shutil.rmtree(cwd, ignore_errors=True)

    for key, values in BAD_VALUES.items():
        for value in values:
            case(f"--set {key}={value[:40]}", ["train", "-c", "c.yaml", "--set", f"{key}={value}", "-q"])
            section, _, leaf = key.rpartition(".")
            text = f"device: cpu\n{section}:\n  {leaf}: {value}\n" if section else f"device: cpu\n{leaf}: {value}\n"
            case(f"file {key}: {value[:40]}", ["train", "-c", "bad.yaml", "-q"],
                 lambda cwd, text=text: (cwd / "bad.yaml").write_text(text))
    for name, text in BAD_FILES.items():
        case(f"config file: {name}", ["train", "-c", "bad.yaml", "-q"],
             lambda cwd, text=text: (cwd / "bad.yaml").write_text(text))
        case(f"compare file: {name}", ["compare", "-c", "bad.yaml"],
             lambda cwd, text=text: (cwd / "bad.yaml").write_text(text))
    for name, value in (("alias bomb", _bomb()), ("deep", "[" * 1000 + "]" * 1000), ("recursive", "&r [*r]"),
                        ("1 MB string", "x" * (1 << 20)), ("unclosed", "[1, 2")):
        for key in ("model.hidden", "seed", "name"):
            case(f"--set {key}={name}", ["train", "-c", "c.yaml", "--set", f"{key}={value}", "-q"])
    for name, cmp in BAD_COMPARES.items():
        case(f"comparison: {name}", ["compare", "-c", "cmp.yaml"],
             lambda cwd, cmp=cmp: write_yaml(cwd / "cmp.yaml", cmp))
    flags = {
        "no --config": ["train", "-q"],
        "--set without =": ["train", "-c", "c.yaml", "--set", "seed"],
        "--set empty key": ["train", "-c", "c.yaml", "--set", "=1"],
        "--set dotted empty": ["train", "-c", "c.yaml", "--set", "model..norm=none"],
        "--set below a scalar": ["train", "-c", "c.yaml", "--set", "seed.x=1"],
        "unknown flag": ["train", "-c", "c.yaml", "--fast"],
        "--resume with --config": ["train", "--resume", "x", "-c", "c.yaml"],
        "--nproc 0": ["train", "-c", "c.yaml", "--nproc", "0"],
        "--jobs 0": ["compare", "-c", "c.yaml", "--jobs", "0"],
        "missing config": ["train", "-c", "nope.yaml"],
        "config is a folder": ["train", "-c", "."],
        "--resume missing": ["train", "--resume", "nope"],
        "--resume a file": ["train", "--resume", "c.yaml"],
        "--resume not a run": ["train", "--resume", "."],
        "--out 300 characters": ["train", "-c", "c.yaml", "--out", "x" * 300],
        "--resume 300 characters": ["train", "--resume", "x" * 300],
        "compare --out 300 characters": ["compare", "-c", "c.yaml", "--out", "x" * 300],
        "compare --resume 300 characters": ["compare", "--resume", "x" * 300],
        "--out under a file": ["train", "-c", "c.yaml", "--out", "c.yaml/run"],
        "--out exists": ["train", "-c", "c.yaml", "--out", "."],
        "--out path over 4096": ["train", "-c", "c.yaml", "--out", "/".join(["d" * 200] * 25)],
        "compare --resume not a comparison": ["compare", "--resume", "."],
        "compare nothing": ["compare"],
        "compare run dirs and --config": ["compare", ".", "-c", "c.yaml"],
        "compare a folder without runs": ["compare", "."],
        "validate bad --set": ["validate", "-c", "c.yaml", "--set", "optim.lr=-1"],
        "bench unknown section": ["bench", "--only", "nothing"],
    }
    for name, args in flags.items():
        case(name, args)
    case("data.download offline", ["train", "-c", "c.yaml", "--set", "data.dataset=mnist", "--set",
                                   "data.download=true", "--set", "data.root=data", "-q"])
    case("cifar10 missing offline", ["train", "-c", "c.yaml", "--set", "data.dataset=cifar10", "-q"])
    case("NUL in data.root", ["train", "-c", "c.yaml", "--set", "data.dataset=mnist1d", "--set",
                              'data.root="da\\0ta"', "-q"])
    case("batch larger than the data", ["train", "-c", "c.yaml", "--set", "data.train_size=10", "-q"],
         allowed=("data",))
    case("network too wide for memory", ["train", "-c", "c.yaml", "--set", f"model.hidden=[{2**40}]", "-q"])


# --- signals --------------------------------------------------------------------------------------------------

def signal_runs(tally: Tally, work: Path, n: int, rng: random.Random, reference: dict) -> None:
    cat = "signals"
    cfg = write_yaml(work / "run.yaml", RUN)
    for i in range(n):
        sig = rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
        delay = rng.choice([rng.uniform(0.0, 1.0), rng.uniform(0.0, 6.0)])
        cwd = Path(tempfile.mkdtemp(dir=work))
        run_dir = cwd / "run"
        proc = spawn(["train", "-c", cfg, "--out", run_dir, "-q"], cwd)
        time.sleep(delay)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=600)
        name = f"train, {signal.Signals(sig).name} at {delay:.2f} s"
        problem = ""
        lines = err.strip().splitlines()
        if "Traceback" in err or len(lines) > 1:
            if "<frozen site>" in err or ("<frozen runpy>" in err and "bnexp" not in err):
                name += " (in Python's own start-up, before bnexp's code runs)"
            problem = f"exit {proc.returncode}: {err.strip()[:300]} … {err.strip()[-300:]}"
        elif proc.returncode not in (0, 128 + sig, -sig):
            problem = f"exit {proc.returncode}: {err.strip()}"
        elif os.path.lexists(run_dir):
            names = set(os.listdir(run_dir))
            if not {"config.yaml", "summary.json"} <= names:
                problem = f"an incomplete run folder: {sorted(names)}"
            else:
                status = json.loads((run_dir / "summary.json").read_text())["status"]
                problem = same_as_reference(run_dir, reference) if status == "completed" else \
                    resume_and_compare(run_dir, reference, cwd)
        elif proc.returncode == 0:
            problem = "exit 0 without a run folder"
        tally.add(cat, name, not problem, problem)
        shutil.rmtree(cwd, ignore_errors=True)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def compare_kills(tally: Tally, work: Path) -> None:
    cat = "signals"
    cmp_cfg = write_yaml(work / "tiny.yaml", TINY_COMPARE)
    for target, sig in (("parent", signal.SIGTERM), ("parent", signal.SIGKILL), ("parent", signal.SIGINT),
                        ("group", signal.SIGINT), ("group", signal.SIGTERM), ("group", signal.SIGKILL)):
        cwd = Path(tempfile.mkdtemp(dir=work))
        comp = cwd / "c"
        proc = spawn(["compare", "-c", cmp_cfg, "--out", comp, "--jobs", "2"], cwd, start_new_session=True)
        name = f"compare --jobs 2, {signal.Signals(sig).name} to the {target}"
        deadline = time.monotonic() + 300
        while len(list(comp.glob("*/s*/metrics.jsonl"))) < 2 and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [p for p in _children(proc.pid)
                   if "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
        if target == "group":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=300)  # not communicate(): orphaned workers would hold its pipes open
        deadline = time.monotonic() + 60
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        problem = ""
        if any(_alive(p) for p in [proc.pid, *workers]):
            problem = "a worker outlived its comparison"
            for p in [proc.pid, *workers]:
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        if not problem and "Traceback" in err:
            problem = f"traceback: {err.strip()[-400:]}"
        if not problem:
            r = cli("compare", "--resume", comp, "--jobs", "2", "-q", cwd=cwd)
            if r.code != 0:
                problem = f"resume: exit {r.code}: {r.err.strip()[-300:]}"
            else:
                import csv

                with open(comp / "summary.csv") as f:
                    rows = list(csv.DictReader(f))
                if any(row["completed"] != "2" or row["failed"] != "0" for row in rows):
                    problem = f"after resume: {[(r['arm'], r['completed'], r['failed']) for r in rows]}"
        tally.add(cat, name, not problem, problem)
        shutil.rmtree(cwd, ignore_errors=True)


# --- damaged files ------------------------------------------------------------------------------------------

def interrupted_run(work: Path, at: int = 350) -> Path:
    """RUN interrupted by SIGTERM after step `at` (checkpoints at 300 and `at`), trained in this process."""
    from bnexp.engine import session

    class SignalAt:
        def after_step(self, trainer, step):
            if step == at:
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = write_yaml(work / "int.yaml", RUN)
    real = session.Trainer
    session.Trainer = lambda *a, callbacks=(), **k: real(*a, callbacks=[*callbacks, SignalAt()], **k)
    try:
        r = cli("train", "-c", cfg, "--out", work / "interrupted", "-q", cwd=work)
    finally:
        session.Trainer = real
    assert r.code == 143, r.err
    return work / "interrupted"


def _tensor_record(path: Path) -> tuple[int, int]:
    """(offset, size) of the largest tensor's bytes in a torch.save archive."""
    import struct

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def damaged_files(tally: Tally, work: Path, template: Path, reference: dict, rng: random.Random) -> None:
    cat = "damaged files"
    newest = "checkpoints/step-00000350.pt"
    previous = "checkpoints/step-00000300.pt"

    def flip(rel, count, where="tensor"):
        def damage(run):
            path = run / rel
            data = bytearray(path.read_bytes())
            if where == "tensor":
                start, size = _tensor_record(path)
                offsets = [start + rng.randrange(size) for _ in range(count)]
            else:
                offsets = [rng.randrange(len(data)) for _ in range(count)]
            for o in offsets:
                data[o] ^= 0xFF
            path.write_bytes(bytes(data))
        return damage

    def replace_bytes(rel, fn):
        return lambda run: (run / rel).write_bytes(fn((run / rel).read_bytes()))

    def foreign(run):
        import torch

        torch.save({"weights": torch.ones(3)}, run / newest)

    def other_format(run):
        import torch

        torch.save({**torch.load(run / newest, weights_only=True), "format": 99}, run / newest)

    def evil_pickle(run):
        import pickle

        class Evil:
            def __reduce__(self):
                return os.system, (f"touch {run}/pwned",)

        (run / newest).write_bytes(pickle.dumps(Evil()))

    def metrics_line(line: bytes, at: int = 3):
        def damage(run):
            lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
            (run / "metrics.jsonl").write_bytes(b"".join(lines[:at - 1]) + line + b"".join(lines[at:]))
        return damage

    def append(rel, data: bytes):
        def damage(run):
            with open(run / rel, "ab") as f:
                f.write(data)
        return damage

    def summary(value):
        return lambda run: (run / "summary.json").write_text(value)

    refused = {
        **{f"checkpoint: {k} byte(s) flipped in tensor data (#{i})": flip(newest, k)
           for i, k in enumerate([1, 1, 8, 64, 64, 512])},
        **{f"checkpoint: {k} byte(s) flipped anywhere (#{i})": flip(newest, k, "any") for i, k in enumerate([1, 16])},
        "checkpoint: truncated to a third": replace_bytes(newest, lambda b: b[:len(b) // 3]),
        "checkpoint: last 100 bytes cut": replace_bytes(newest, lambda b: b[:-100]),
        "checkpoint: empty": replace_bytes(newest, lambda b: b""),
        "checkpoint: garbage": replace_bytes(newest, lambda b: bytes(range(256)) * 64),
        "checkpoint: another torch file": foreign,
        "checkpoint: format 99": other_format,
        "checkpoint: both damaged": lambda run: (flip(newest, 64)(run), flip(previous, 64)(run)),
        "checkpoint: the previous step's file under the newest name": lambda run: shutil.copyfile(
            run / previous, run / newest),
        "checkpoints: removed (the summary records 350 steps)": lambda run: shutil.rmtree(run / "checkpoints"),
        "checkpoints: a file, not a folder": lambda run: (shutil.rmtree(run / "checkpoints"),
                                                          (run / "checkpoints").write_text("not a folder\n")),
        "metrics.jsonl: a garbage line": metrics_line(b"garbage\n"),
        "metrics.jsonl: a row without step": metrics_line(b'{"train/loss": 1.0}\n'),
        "metrics.jsonl: a step that is a string": metrics_line(b'{"step": "7"}\n'),
        "metrics.jsonl: bytes that are not UTF-8": metrics_line(b'{"step": 7, "x": "\xff"}\n'),
        "metrics.jsonl: a list, not an object": metrics_line(b"[1, 2]\n"),
        "summary.json: torn": summary('{"status": "inter'),
        "summary.json: not an object": summary("[1]"),
        "summary.json: status a number": summary('{"status": 3}'),
        "summary.json: completed": summary('{"status": "completed"}'),
        "config.yaml: unknown key": append("config.yaml", b"nmae: x\n"),
        "config.yaml: garbage": replace_bytes("config.yaml", lambda b: b"\x00\xff: [\n"),
        "config.yaml: a wider network": replace_bytes("config.yaml", lambda b: b.replace(b"- 16\n", b"- 24\n", 1)),
        "config.yaml: an alias bomb": replace_bytes("config.yaml", lambda b: b + f"x: {_bomb()}\n".encode()),
    }
    resumes = {
        "metrics.jsonl: torn last line": append("metrics.jsonl", b'{"step": 351, "train/lo'),
        "metrics.jsonl: torn inside a character": append("metrics.jsonl", '{"step": 351, "n": "€'.encode()[:-1]),
        "checkpoint: half-written temporary left": lambda run: (run / "checkpoints/.step-00000450.pt.tmp")
        .write_bytes((run / newest).read_bytes()[:5000]),
        "event file: torn last record": append(next(p.name for p in template.glob("events.out.tfevents.*")),
                                               b"\x10\x00\x00"),
        "summary.json: left running (SIGKILL)": lambda run: (run / "summary.json").write_text(
            (run / "summary.json").read_text().replace('"interrupted"', '"running"')),
        "summary.json temporary left": lambda run: (run / ".summary.json.tmp").write_text("{"),
    }
    for name, damage in {**refused, **resumes}.items():
        run = Path(shutil.copytree(template, Path(tempfile.mkdtemp(dir=work)) / "run"))
        damage(run)
        before = snapshot(run)
        if name in refused:
            r = cli("train", "--resume", run, "-q", cwd=run.parent)
            problem = one_line_error(r)
            if not problem and snapshot(run) != before:
                problem = "the run folder changed"
            if not problem and name.startswith("checkpoint") and "checkpoint" not in r.err:
                problem = f"the error does not name the checkpoint: {r.err.strip()}"
            if (run / "pwned").exists():
                problem = "the pickle's code ran"
        else:
            problem = resume_and_compare(run, reference, run.parent)
        tally.add(cat, name, not problem, problem)
        shutil.rmtree(run.parent, ignore_errors=True)
    # The intact previous checkpoint resumes once the damaged one is moved away (what the error says).
    run = Path(shutil.copytree(template, Path(tempfile.mkdtemp(dir=work)) / "run"))
    flip(newest, 64)(run)
    r = cli("train", "--resume", run, "-q", cwd=run.parent)
    problem = "" if "previous checkpoint step-00000300.pt is intact" in r.err else f"no fallback: {r.err}"
    if not problem:
        (run / newest).rename(run / "damaged.pt")
        problem = resume_and_compare(run, reference, run.parent)
    tally.add(cat, "checkpoint damaged, resumed from the previous one as the error says", not problem, problem)
    shutil.rmtree(run.parent, ignore_errors=True)
    # compare.yaml of a comparison
    for name, text in (("compare.yaml: garbage", "\x00: ["), ("compare.yaml: unknown key", "armz: {}\n"),
                       ("compare.yaml: alias bomb", f"arms: {{a: {{}}}}\nseeds: {_bomb()}\n")):
        cwd = Path(tempfile.mkdtemp(dir=work))
        (cwd / "c").mkdir()
        (cwd / "c" / "compare.yaml").write_text(text)
        before = snapshot(cwd)
        r = cli("compare", "--resume", cwd / "c", cwd=cwd)
        problem = one_line_error(r)
        after = {k: v for k, v in snapshot(cwd).items() if not k.endswith(".lock")}
        if not problem and after != before:
            problem = "the comparison folder changed"
        tally.add(cat, name, not problem, problem)
        shutil.rmtree(cwd, ignore_errors=True)


# --- security ---------------------------------------------------------------------------------------------

PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("PLANTED_MARKER"), "w");
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
"""
KERNEL_CHILD = """
import torch
from bnexp.nn import kernel
from bnexp.nn.batchnorm import BatchNorm1d
BatchNorm1d(3, dtype=torch.float64)(torch.randn(8, 3, dtype=torch.float64))
print("kernel", kernel.load() is not None)
"""


def security(tally: Tally, work: Path, template: Path, reference: dict) -> None:
    cat = "security"
    from bnexp.nn import kernel

    cc = kernel._compiler()
    scratch = work / "scratch-cache"
    subprocess.run([sys.executable, "-c", KERNEL_CHILD], env={**ENV, "BNEXP_CACHE_DIR": str(scratch)}, cwd=work,
                   check=True, capture_output=True)
    (built,) = scratch.glob("bn_kernel-*.so")
    (work / "planted.c").write_text(PLANTED)
    for where in ("world-writable cache", "group-writable cache", "cache owned by another user",
                  "link to another user's cache", "cache below a world-writable folder",
                  "$TMPDIR fallback made by another user", "library owned by another user"):
        if where not in ("world-writable cache", "group-writable cache") and os.getuid() != 0:
            tally.add(cat, f"planted kernel: {where}", None, "needs root to give a folder to another user")
            continue
        case = Path(tempfile.mkdtemp(dir=work))
        hostile = case / "hostile"
        hostile.mkdir()
        env = {**ENV, "PLANTED_MARKER": str(case / "marker"), "TMPDIR": str(case / "tmp"),
               "BNEXP_CACHE_DIR": str(hostile)}
        (case / "tmp").mkdir()
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(hostile / built.name), str(work / "planted.c")],
                       check=True)
        if where == "world-writable cache":
            hostile.chmod(0o777)
        elif where == "group-writable cache":
            hostile.chmod(0o775)
        elif where == "cache owned by another user":
            os.chown(hostile, 12345, 12345)
        elif where == "link to another user's cache":
            os.chown(hostile, 12345, 12345)
            (case / "link").symlink_to(hostile)
            env["BNEXP_CACHE_DIR"] = str(case / "link")
        elif where == "cache below a world-writable folder":
            (case / "open").mkdir()
            (case / "open").chmod(0o777)
            hostile = Path(shutil.move(hostile, case / "open" / "cache"))
            env["BNEXP_CACHE_DIR"] = str(hostile)
        elif where == "$TMPDIR fallback made by another user":
            (case / "file").write_text("")
            env["BNEXP_CACHE_DIR"] = str(case / "file" / "cache")
            hostile = Path(shutil.move(hostile, case / "tmp" / f"bnexp-{os.getuid()}"))
            os.chown(hostile, 12345, 12345)
        else:
            hostile.chmod(0o700)
            os.chown(hostile / built.name, 12345, 12345)
        r = subprocess.run([sys.executable, "-c", KERNEL_CHILD], env=env, cwd=case, capture_output=True, text=True)
        problem = ""
        if (case / "marker").exists():
            problem = "the planted library ran"
        elif r.returncode != 0 or r.stdout.split() != ["kernel", "True"]:
            problem = f"the kernel did not build privately: {r.stderr.strip()[-300:]}"
        tally.add(cat, f"planted kernel: {where}", not problem, problem)
        shutil.rmtree(case, ignore_errors=True)

    # Links planted where a resumed run writes.
    for name in (".summary.json.tmp", ".metrics.jsonl.tmp", "checkpoints/.step-00000450.pt.tmp",
                 "checkpoints/.step-00000600.pt.tmp", ".config.yaml.tmp"):
        case = Path(tempfile.mkdtemp(dir=work))
        run = Path(shutil.copytree(template, case / "run"))
        (case / "victim").write_text("not bnexp's")
        (run / name).symlink_to(case / "victim")
        problem = resume_and_compare(run, reference, case)
        if (case / "victim").read_text() != "not bnexp's":
            problem = "the link's target was overwritten"
        tally.add(cat, f"link planted as {name}", not problem, problem)
        shutil.rmtree(case, ignore_errors=True)
    for name in ("checkpoints", "metrics.jsonl", "summary.json", ".lock"):
        case = Path(tempfile.mkdtemp(dir=work))
        run = Path(shutil.copytree(template, case / "run"))
        shutil.move(run / name, case / "elsewhere")
        (run / name).symlink_to(case / "elsewhere")
        outside = snapshot(case / "elsewhere") if (case / "elsewhere").is_dir() else (case / "elsewhere").read_bytes()
        before = snapshot(run)
        r = cli("train", "--resume", run, "-q", cwd=case)
        problem = one_line_error(r)
        now = snapshot(case / "elsewhere") if (case / "elsewhere").is_dir() else (case / "elsewhere").read_bytes()
        if now != outside:
            problem = "files outside the run changed"
        elif not problem and snapshot(run) != before:
            problem = "the run folder changed"
        tally.add(cat, f"{name} is a link to another folder", not problem, problem)
        shutil.rmtree(case, ignore_errors=True)
    # Links planted as the newest checkpoint: to another run's intact checkpoint, to an endless device.
    for name, target in (("another run's checkpoint", template / "checkpoints" / "step-00000300.pt"),
                         ("/dev/zero", Path("/dev/zero"))):
        case = Path(tempfile.mkdtemp(dir=work))
        run = Path(shutil.copytree(template, case / "run"))
        (run / "checkpoints" / "step-00009999.pt").symlink_to(target)
        before = snapshot(run)
        r = cli("train", "--resume", run, "-q", cwd=case)
        problem = one_line_error(r)
        if not problem and "step-00009999.pt" not in r.err:
            problem = f"the error does not name the link: {r.err.strip()}"
        elif not problem and snapshot(run) != before:
            problem = "the run folder changed"
        tally.add(cat, f"a checkpoint that is a link to {name}", not problem, problem)
        shutil.rmtree(case, ignore_errors=True)
    # A comparison whose arm folder is a link.
    case = Path(tempfile.mkdtemp(dir=work))
    cmp_cfg = write_yaml(case / "tiny.yaml", {**TINY_COMPARE, "seeds": [0], "base": {
        **TINY_COMPARE["base"], "train": {"steps": 40, "eval_every": 20, "log_every": 10, "checkpoint_every": 20}}})
    r = cli("compare", "-c", cmp_cfg, "--out", case / "c", "-q", cwd=case)
    if r.code == 0:
        summary = case / "c" / "bn" / "s0" / "summary.json"
        summary.write_text(summary.read_text().replace('"completed"', '"interrupted"'))
        shutil.move(case / "c" / "bn", case / "elsewhere")
        (case / "c" / "bn").symlink_to(case / "elsewhere")
        outside = snapshot(case / "elsewhere")
        r = cli("compare", "--resume", case / "c", cwd=case)
        problem = one_line_error(r) or ("files outside changed" if snapshot(case / "elsewhere") != outside else "")
    else:
        problem = f"the comparison did not run: {r.err[-300:]}"
    tally.add(cat, "a comparison's arm folder is a link", not problem, problem)
    shutil.rmtree(case, ignore_errors=True)
    # Names that would leave the output folder, tags YAML must not execute, bombs.
    escapes = {"name ..": ["--set", "name=.."], "name ../../x": ["--set", "name=../../x"],
               "name /tmp/x": ["--set", "name=/tmp/x"], "python tag": ["--set", "seed=!!python/object/apply:os.getpid []"],
               "alias bomb under name": ["--set", f"name={_bomb()}"],
               "alias bomb under seed": ["--set", f"seed={_bomb()}"]}
    for name, flags in escapes.items():
        case = Path(tempfile.mkdtemp(dir=work))
        (case / "inside").mkdir()
        write_yaml(case / "inside" / "c.yaml", {"device": "cpu", "train": {"steps": 5}})
        r = cli("train", "-c", "c.yaml", *flags, "-q", cwd=case / "inside")
        problem = one_line_error(r)
        if set(os.listdir(case)) != {"inside"}:
            problem = f"something was written outside: {os.listdir(case)}"
        tally.add(cat, name, not problem, problem)
        shutil.rmtree(case, ignore_errors=True)
    # A 400 KB string anchored once and aliased 280 times in a comparison's arms: few values, 112 MB of text.
    case = Path(tempfile.mkdtemp(dir=work))
    arms = ", ".join(f"a{i}: {{data.root: *s}}" for i in range(280))
    (case / "c.yaml").write_text(f"base: {{data: {{root: &s {'x' * 400_000}}}}}\narms: {{{arms}}}\nseeds: [0]\n")
    r = cli("compare", "-c", "c.yaml", "-q", cwd=case)
    problem = one_line_error(r)
    if not problem and os.listdir(case) != ["c.yaml"]:
        problem = f"something was written: {os.listdir(case)}"
    tally.add(cat, "a 400 KB string aliased 280 times in a comparison", not problem, problem)
    shutil.rmtree(case, ignore_errors=True)
    case = Path(tempfile.mkdtemp(dir=work))
    run = Path(shutil.copytree(template, case / "run"))

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {case}/pwned",)

    import pickle
    import torch

    torch.save({"x": 1}, run / "checkpoints" / "step-00000350.pt")
    data = bytearray((run / "checkpoints" / "step-00000350.pt").read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        names = z.namelist()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # a torch.save archive whose pickle runs a command when loaded
        for n in names:
            z.writestr(n, pickle.dumps(Evil()) if n.endswith("data.pkl") else zipfile.ZipFile(
                io.BytesIO(bytes(data))).read(n))
    (run / "checkpoints" / "step-00000350.pt").write_bytes(buf.getvalue())
    r = cli("train", "--resume", run, "-q", cwd=case)
    problem = "the pickle's code ran" if (case / "pwned").exists() else one_line_error(r)
    tally.add(cat, "a checkpoint whose pickle runs a command", not problem, problem)
    shutil.rmtree(case, ignore_errors=True)


# --- output folder: full, read-only, no permission, names too long -----------------------------------------

FULL = """
set -u
mount -t tmpfs -o size="$SIZE" tmpfs "$MNT"
python -m bnexp.cli train -c "$CFG" --out "$MNT/run" -q > "$DEST/out1" 2> "$DEST/err1"; echo $? > "$DEST/rc1"
mount -o remount,size=64m "$MNT"
if [ -d "$MNT/run" ]; then
  python -m bnexp.cli train --resume "$MNT/run" -q > "$DEST/out2" 2> "$DEST/err2"; echo $? > "$DEST/rc2"
  cp -a "$MNT/run" "$DEST/run"
fi
ls -A "$MNT" > "$DEST/left"
"""
READ_ONLY = """
set -u
mount --bind "$DIR" "$DIR" && mount -o remount,bind,ro "$DIR"
python -m bnexp.cli $ARGS > "$DEST/out1" 2> "$DEST/err1"; echo $? > "$DEST/rc1"
"""


def _can(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def output_folder(tally: Tally, work: Path, template: Path, reference: dict) -> None:
    cat = "output folder"
    cfg = write_yaml(work / "run.yaml", RUN)
    mounts = _can(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"])
    for size in ("4k", "12k", "40k", "100k", "160k", "200k", "240k"):
        name = f"full disk: a {size} tmpfs"
        if not mounts:
            tally.add(cat, name, None, "cannot mount a tmpfs here (unshare -m)")
            continue
        case = Path(tempfile.mkdtemp(dir=work))
        (case / "mnt").mkdir()
        env = {**ENV, "SIZE": size, "CFG": str(cfg), "DEST": str(case), "MNT": str(case / "mnt")}
        subprocess.run(["unshare", "-m", "sh", "-c", FULL], env=env, cwd=case, timeout=900)
        err = (case / "err1").read_text()
        problem = one_line_error(Result(int((case / "rc1").read_text()), "", err))
        if not problem and "No space left on device" not in err:
            problem = f"the error does not say the disk is full: {err}"
        if not problem and (case / "run").exists():
            rc2 = int((case / "rc2").read_text())
            problem = f"resume: exit {rc2}: {(case / 'err2').read_text()[-300:]}" if rc2 else \
                same_as_reference(case / "run", reference)
        elif not problem and (case / "left").read_text().strip():
            problem = f"left behind: {(case / 'left').read_text().split()}"
        tally.add(cat, name, not problem, problem)
        shutil.rmtree(case, ignore_errors=True)
    # Read-only: a fresh run into it, a resume of a run in it, a comparison resumed in it.
    for name, args in (("train --out into a read-only folder", "train -c {cfg} --out {dir}/new -q"),
                       ("train --resume of a run on a read-only folder", "train --resume {dir}/run -q"),
                       ("compare --resume of a comparison on a read-only folder", "compare --resume {dir}/c")):
        if not mounts:
            tally.add(cat, name, None, "cannot bind-mount here (unshare -m)")
            continue
        case = Path(tempfile.mkdtemp(dir=work))
        (case / "ro").mkdir()
        shutil.copytree(template, case / "ro" / "run")
        (case / "ro" / "c").mkdir()
        write_yaml(case / "ro" / "c" / "compare.yaml", {**TINY_COMPARE, "seeds": [0]})
        before = snapshot(case / "ro")
        env = {**ENV, "DIR": str(case / "ro"), "DEST": str(case),
               "ARGS": args.format(cfg=cfg, dir=case / "ro")}
        subprocess.run(["unshare", "-m", "sh", "-c", READ_ONLY], env=env, cwd=case, timeout=900)
        result = Result(int((case / "rc1").read_text()), "", (case / "err1").read_text())
        problem = refused_unchanged(result, "Read-only file system", case / "ro", before)
        tally.add(cat, name, not problem, problem)
        shutil.rmtree(case, ignore_errors=True)
    # No permission: run as nobody against folders root owns.
    can_drop = os.getuid() == 0 and _can(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "true"])
    for name, args in (("train --out into a folder without write permission", ["train", "-c", cfg, "--out",
                                                                                "{dir}/run", "-q"]),
                       ("train --resume of a run without write permission", ["train", "--resume", "{dir}/run",
                                                                             "-q"])):
        if not can_drop:
            tally.add(cat, name, None, "needs root to run as another user (setpriv)")
            continue
        case = Path(tempfile.mkdtemp(dir=work))
        case.chmod(0o755)
        (case / "owned").mkdir()
        shutil.copytree(template, case / "owned" / "run")
        before = snapshot(case / "owned")
        p = spawn([a.format(dir=case / "owned") if isinstance(a, str) else a for a in args], Path("/"),
                  env={"BNEXP_KERNEL": "0"}, prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
        out, err = p.communicate(timeout=600)
        problem = refused_unchanged(Result(p.returncode, out, err), "Permission denied", case / "owned", before)
        tally.add(cat, name, not problem, problem)
        shutil.rmtree(case, ignore_errors=True)
    for name, flags in (("a run name too long for a folder", ["--set", f"name={'n' * 300}"]),
                        ("out_dir deeper than PATH_MAX", ["--set", "out_dir=" + "/".join(["d" * 250] * 20)])):
        case = Path(tempfile.mkdtemp(dir=work))
        write_yaml(case / "c.yaml", {"device": "cpu", "train": {"steps": 5}, "probes": {"enabled": False}})
        r = cli("train", "-c", "c.yaml", *flags, "-q", cwd=case)
        problem = one_line_error(r) or ("left behind: " + str(os.listdir(case)) if os.listdir(case) != ["c.yaml"]
                                        else "")
        tally.add(cat, name, not problem, problem)
        shutil.rmtree(case, ignore_errors=True)


# --- main -----------------------------------------------------------------------------------------------------

CATEGORIES = ("bad inputs", "signals", "damaged files", "security", "output folder")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--signals", type=int, default=60, help="random signals sent to `bnexp train`")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", action="append", choices=CATEGORIES, help="categories to run (default all)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    only = args.only or list(CATEGORIES)
    rng = random.Random(args.seed)
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # its notes on the purge of a resumed run
    work = Path(tempfile.mkdtemp(prefix="bnexp-harness-"))
    WORK.append(str(work))
    os.environ["BNEXP_CACHE_DIR"] = str(work / "kernel-cache")  # the subprocesses share one private cache
    ENV["BNEXP_CACHE_DIR"] = os.environ["BNEXP_CACHE_DIR"]
    tally = Tally()
    t0 = time.perf_counter()
    try:
        ref_dir = work / "reference"
        r = cli("train", "-c", write_yaml(work / "ref.yaml", RUN), "--out", ref_dir, "-q", cwd=work)
        assert r.code == 0, r.err
        reference = run_state(ref_dir)
        template = interrupted_run(work)
        steps = {"bad inputs": lambda: bad_inputs(tally, work),
                 "signals": lambda: (signal_runs(tally, work, args.signals, rng, reference),
                                     compare_kills(tally, work)),
                 "damaged files": lambda: damaged_files(tally, work, template, reference, rng),
                 "security": lambda: security(tally, work, template, reference),
                 "output folder": lambda: output_folder(tally, work, template, reference)}
        for category in CATEGORIES:
            if category in only:
                print(f"{category} ...", flush=True)
                steps[category]()
    finally:
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{tally.table()}\n\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
