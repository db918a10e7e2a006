"""Property: whatever a config file and --set flags say, `bnexp train` either trains a complete run (exit 0)
or prints one line `error: ...` and exits 2 with nothing created: never a traceback, never a half-made run
directory. Hypothesis mutates a valid tiny config at random (values of every type, unknown and missing
keys, sections replaced by scalars, YAML text edited character by character, --set overrides).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bnexp.engine import rundir as runs
from bnexp.cli import main

BASE = {
    "name": "fuzz",
    "seed": 0,
    "device": "cpu",
    "out_dir": "runs",
    "data": {"dataset": "synthetic", "batch_size": 8, "root": "@ROOT@",
             "synthetic": {"num_samples": 48, "num_features": 4, "num_classes": 2, "separation": 2.0}},
    "model": {"kind": "mlp", "hidden": [6], "channels": [4], "activation": "relu", "norm": "bnexp",
              "bn": {"eps": 1e-5, "momentum": 0.1}},
    "optim": {"name": "sgd", "lr": 0.1, "schedule": "constant"},
    "train": {"steps": 3, "eval_every": 2, "log_every": 1, "checkpoint_every": 2},
    "probes": {"enabled": True, "every": 2, "population_batches": 1, "histogram_every": 2},
}


def _paths(node, prefix=()):
    for key, value in node.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _paths(value, prefix + (key,))


PATHS = list(_paths(BASE)) + [("model", "hidden", 0), ("data", "root"), ("data", "train_size"),
                              ("optim", "warmup_steps"), ("model", "bn", "affine"), ("train", "divergence_factor"),
                              ("model", "bn_position"), ("probes", "units_per_layer")]
UNKNOWN = [("nmae",), ("model", "nrom"), ("train", "stpes"), ("data", "synthetic", "extra"), ("probes", "x", "y")]
# Keys whose value sets how much work a run does: kept small so that 60 examples take seconds.
WORK = {("train", "steps"), ("data", "synthetic", "num_samples"), ("data", "synthetic", "num_features"),
        ("data", "synthetic", "num_classes"), ("model", "hidden", 0), ("data", "batch_size"),
        ("probes", "population_batches"), ("probes", "units_per_layer"), ("data", "train_size")}
WORDS = ["none", "bnexp", "torch", "cnn", "mlp", "digits", "mnist1d", "synthetic", "mnist", "cifar10", "sgd",
         "adam", "momentum", "cosine", "step", "sigmoid", "tanh", "gelu", "after_activation", "cpu", "cuda",
         "auto", "1e-3", "0x10", "yes", "~", "", " ", "a/b", "..", "é", "\x00"]

small_ints = st.integers(-3, 40)
big_ints = st.sampled_from([2**31, 2**32, 2**63 - 1, 2**64 + 1, 10**30])
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                   st.sampled_from([0.0, -0.0, 1e-300, 1e300, 0.5, 2.5, 1.0]))
scalars = st.one_of(small_ints, floats, st.booleans(), st.none(), st.sampled_from(WORDS),
                    st.text(max_size=6))


def values(path):
    leaf = st.one_of(scalars, st.lists(small_ints, max_size=3), st.dictionaries(st.sampled_from(["a", "kind"]),
                                                                                 scalars, max_size=2))
    return leaf if path in WORK else st.one_of(leaf, big_ints)


def _set(node, path, value):
    for i, key in enumerate(path[:-1]):
        if isinstance(node, dict):
            node = node.setdefault(key, {}) if not isinstance(node.get(key), (int, float, str, type(None))) \
                else node.__setitem__(key, {}) or node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value


def _delete(node, path):
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


@st.composite
def mutated(draw):
    """(config file text, --set flags): a few structural mutations, then possibly a text-level edit."""
    cfg = copy.deepcopy(BASE)
    cfg["model"]["norm"] = draw(st.sampled_from(["bnexp", "torch", "none"]))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["set", "set", "set", "delete", "unknown"]))
        path = draw(st.sampled_from(UNKNOWN if kind == "unknown" else PATHS))
        if kind == "delete":
            _delete(cfg, path)
        else:
            _set(cfg, path, draw(values(path)))
    shape = draw(st.sampled_from(["mapping"] * 12 + ["list", "scalar", "empty"]))
    doc = {"mapping": cfg, "list": [cfg], "scalar": draw(scalars), "empty": None}[shape]
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    if draw(st.integers(0, 5)) == 0:  # a character-level edit: often malformed YAML, sometimes new meaning
        i = draw(st.integers(0, max(0, len(text) - 1)))
        text = text[:i] + draw(st.sampled_from(["", ":", "- ", "\t", "{", "'", "\n  ", "#", "&a ", "*a"])) \
            + text[i + draw(st.integers(0, 3)):]
    # An empty file means every default (2000 steps on digits): keep such a run short through --set.
    flags = ["--set", "train.steps=2", "--set", "probes.enabled=false"] if shape == "empty" else []
    for _ in range(draw(st.integers(0, 2))):
        key = ".".join(str(k) for k in draw(st.sampled_from(PATHS + UNKNOWN)))
        key = draw(st.sampled_from([key] * 4 + [key + ".", "", "=" + key, key.upper()]))
        value = draw(st.sampled_from(["", "1", "-1", "0.5", "[1, 2]", "{a: 1}", "none", "null", ".nan",
                                      "'x'", "[", "2000000000000000000000"]))
        flags += ["--set", f"{key}={value}"]
    return text, flags


def _snapshot(root: Path) -> set[str]:
    # The mnist1d cache under data/ may be written by a run that is then refused; it is not a run.
    return {str(p.relative_to(root)) for p in root.rglob("*") if "data" not in p.relative_to(root).parts[:1]}


_counter = itertools.count()


@pytest.mark.slow
@settings(max_examples=50, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutated(), explicit_out=st.booleans())
def test_train_on_any_config_is_a_run_or_a_one_line_error(tmp_path, capsys, mnist1d_root, case, explicit_out):
    text, flags = case
    text = text.replace("@ROOT@", str(mnist1d_root))  # mnist1d, if a mutation picks it, is generated once
    if "download" in text or any("download" in f for f in flags):
        return  # a download attempt depends on the network, not on bnexp
    work = tmp_path / f"ex{next(_counter)}"
    work.mkdir()
    (work / "c.yaml").write_text(text)
    args = ["train", "-c", "c.yaml", *flags, "-q"] + (["--out", "out"] if explicit_out else [])
    before = _snapshot(work)
    cwd, threads = os.getcwd(), torch.get_num_threads()
    torch.set_num_threads(1)
    os.chdir(work)
    try:
        capsys.readouterr()
        code = main(args)
        out, err = capsys.readouterr()
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)

    event(f"exit {code}: {err.split(':')[1].strip()[:30] if code == 2 else 'run'}")
    assert "Traceback" not in err and "Traceback" not in out
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert out == ""
        assert _snapshot(work) == before, "a refused run left files behind"
        return
    run_dir = work / out.strip().splitlines()[-1]
    if explicit_out:
        assert run_dir == work / "out"
    summary = runs.read_summary(run_dir)
    assert summary["status"] in ("completed", "diverged")
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()
    created = {p for p in _snapshot(work) - before if not (work / p).is_relative_to(run_dir)}
    assert all(run_dir.is_relative_to(work / p) for p in created), created  # only the run dir's parents
    acc = summary["test_accuracy"]
    assert acc is None or (0 <= acc <= 1 and not math.isnan(acc))
