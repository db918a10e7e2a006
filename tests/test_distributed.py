"""Distributed training (bnexp.dist, bnexp.engine.parallel, bnexp.nn.sync): synchronized vs local BN
statistics across gloo processes.

The layer test runs two real gloo processes and checks `stats: global` against one process on the
concatenated batch (our layer and torch's), `stats: local` against each shard alone. The end-to-end
tests train real runs with `--nproc 2` and compare them with single-process runs of the same global
batch, and kill a rank mid-run to check the error and the resume.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnexp.data import BatchSampler
from bnexp.engine.parallel import FAIL_ENV, shard


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# --- the layer, in two gloo processes ------------------------------------------------------------------------

# (layer class name, shape of the global batch, shard sizes, momentum, unbiased_normalize)
CASES = [
    ("BatchNorm1d", (8, 5), (4, 4), 0.1, False),
    ("BatchNorm1d", (9, 5), (6, 3), 0.1, False),      # unequal shards
    ("BatchNorm1d", (7, 3, 4), (2, 5), None, False),  # (N, C, L), cumulative running average
    ("BatchNorm2d", (5, 3, 4, 3), (3, 2), 0.3, True),  # unbiased normalization, unequal shards
    ("BatchNorm3d", (4, 2, 3, 2, 2), (1, 3), 0.1, False),  # one example on rank 0: only the global batch has m > 1
]
TOL = dict(rtol=0, atol=1e-10)


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def _layer_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from bnexp.nn import batchnorm as norm

    try:
        for i, (cls_name, shape, sizes, momentum, unbiased) in enumerate(CASES):
            cls = getattr(norm, cls_name)
            gen = torch.Generator().manual_seed(100 + i)
            c = shape[1]
            # Every rank builds the same global data; the layer sees only this rank's shard.
            batches = [torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1 for _ in range(2)]
            upstream = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2)]
            gamma = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
            beta = torch.randn(c, generator=gen, dtype=torch.float64)
            lo = sum(sizes[:rank])
            mine = slice(lo, lo + sizes[rank])

            def make(stats: str):
                layer = cls(c, momentum=momentum, unbiased_normalize=unbiased, dtype=torch.float64, stats=stats)
                with torch.no_grad():
                    layer.weight.copy_(gamma)
                    layer.bias.copy_(beta)
                return layer

            sync, local = make("global"), make("local")
            ref_ours = make("local")  # one process, the whole batch
            ref_torch = getattr(torch.nn, cls_name)(c, momentum=momentum, dtype=torch.float64)
            with torch.no_grad():
                ref_torch.weight.copy_(gamma)
                ref_torch.bias.copy_(beta)
            for step, (xg, gg) in enumerate(zip(batches, upstream)):
                what = f"case {i} ({cls_name} {shape}, shards {sizes}) step {step} rank {rank}"
                # Global statistics: each rank's slice of the one-process result.
                x = xg[mine].clone().requires_grad_()
                y = sync(x)
                (y * gg[mine]).sum().backward()
                # Weight gradients are this shard's share; DDP sums them over ranks.
                dw = torch.stack([sync.weight.grad, sync.bias.grad])
                dist.all_reduce(dw)
                sync.weight.grad = sync.bias.grad = None
                # torch's layer has no unbiased normalization: only ours is the reference then.
                for ref in (ref_ours,) if unbiased else (ref_ours, ref_torch):
                    xr = xg.clone().requires_grad_()
                    yr = ref(xr)
                    (yr * gg).sum().backward()
                    name = f"{what} vs {'ours' if ref is ref_ours else 'torch'} on the whole batch"
                    _close(y, yr[mine], f"{name}: output")
                    _close(x.grad, xr.grad[mine], f"{name}: input gradient")
                    _close(dw[0], ref.weight.grad, f"{name}: weight gradient")
                    _close(dw[1], ref.bias.grad, f"{name}: bias gradient")
                    _close(sync.running_mean, ref.running_mean, f"{name}: running_mean")
                    _close(sync.running_var, ref.running_var, f"{name}: running_var")
                    ref.weight.grad = ref.bias.grad = None
                assert int(sync.num_batches_tracked) == step + 1
                # Local statistics: exactly the layer on this shard alone (where the shard has m > 1).
                if xg[mine].numel() // c > 1:
                    alone = make("local")
                    alone.load_state_dict(local.state_dict())
                    xl = xg[mine].clone().requires_grad_()
                    xa = xg[mine].clone().requires_grad_()
                    yl, ya = local(xl), alone(xa)
                    (yl * gg[mine]).sum().backward()
                    (ya * gg[mine]).sum().backward()
                    _close(yl, ya, f"{what} local: output")
                    _close(xl.grad, xa.grad, f"{what} local: input gradient")
                    _close(local.weight.grad, alone.weight.grad, f"{what} local: weight gradient")
                    _close(local.running_var, alone.running_var, f"{what} local: running_var")
                    local.weight.grad = local.bias.grad = None
                    # Shard statistics differ from the global batch's: local really is local.
                    if step == 0 and sizes[0] != sizes[1]:
                        assert not torch.allclose(yl, y.detach()), f"{what}: local equals global"
            # Running statistics agree across ranks; evaluation needs no communication.
            both = torch.stack([sync.running_mean, sync.running_var])
            gathered = [torch.empty_like(both) for _ in range(2)]
            dist.all_gather(gathered, both)
            _close(gathered[0], gathered[1], f"case {i}: running stats across ranks")
            sync.eval()
            ref_ours.eval()
            _close(sync(batches[0][mine]), ref_ours(batches[0][mine]), f"case {i}: eval output")
    finally:
        dist.destroy_process_group()


def test_sync_bn_equals_one_process_on_the_whole_batch_and_local_equals_each_shard():
    mp.spawn(_layer_worker, args=(free_port(),), nprocs=2, join=True)


def test_global_stats_in_one_process_is_local():
    from bnexp.nn.batchnorm import BatchNorm1d

    x = torch.randn(6, 4, dtype=torch.float64)
    a = BatchNorm1d(4, dtype=torch.float64, stats="global")
    b = BatchNorm1d(4, dtype=torch.float64)
    _close(a(x), b(x), "output")
    _close(a.running_var, b.running_var, "running_var")


# --- sharding the global batch -------------------------------------------------------------------------------

def test_ranks_draw_the_same_global_batches_and_split_them():
    world, steps = 3, 7
    single = BatchSampler(50, 12, seed=4)
    ranks = [BatchSampler(50, 12, seed=4) for _ in range(world)]
    for _ in range(steps):
        want = single.next()
        got = [shard(s.next(), r, world) for r, s in enumerate(ranks)]
        assert [len(g) for g in got] == [4, 4, 4]
        assert torch.equal(torch.cat(got), want)
    assert [len(shard(torch.arange(7), r, 2)) for r in range(2)] == [4, 3]


@pytest.mark.parametrize("stats, expected", [("local", 12), ("global", 24)])
def test_probes_and_precise_bn_estimate_with_the_batch_bn_normalizes_over(tmp_path, stats, expected):
    from bnexp.config import Config, validate
    from bnexp.engine.session import prepare
    from bnexp.engine.trainer import Trainer

    raw = Config().model_dump(mode="json")
    raw.update(device="cpu", dist={"nproc": 2})
    raw["data"]["batch_size"] = 24
    raw["model"]["bn"].update(stats=stats, precise={"when": "eval"})
    cfg = validate(raw)
    # The plain Trainer is what each rank builds on; it needs no process group to be constructed.
    trainer = Trainer(cfg, tmp_path, prepare(cfg))
    assert cfg.bn_batch_size == trainer.probes.m == trainer.precise.m == expected
    assert trainer.probes.population_idx.shape[1] == trainer.precise.batches(0).shape[1] == expected
    assert trainer.sampler.batch_size == 24  # training still draws the global batch


# --- user errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, key", [
    (["--nproc", "7"], "data.batch_size"),                                     # 60 does not split over 7
    (["--nproc", "2", "--set", "model.norm=torch", "--set", "model.bn.stats=global"], "model.bn.stats"),
    (["--nproc", "2", "--set", "data.batch_size=2"], "data.batch_size"),       # one example per process
    (["--nproc", "2", "--set", "dist.backend=nccl"], "dist.backend"),
    # 20 divides the global 60 but not the 30 each process normalizes over in ghost batches.
    (["--nproc", "2", "--set", "model.bn.variant=ghost", "--set", "model.bn.ghost_batch_size=20"],
     "model.bn.ghost_batch_size"),
])
def test_bad_distributed_configs_are_user_errors(cli, write_config, tmp_path, args, key):
    cfg = write_config({"device": "cpu"})
    r = cli("train", "--config", cfg, "--out", "run", *args)
    assert r.code == 2
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], r.err
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_ghost_batches_must_divide_each_process_batch():
    from bnexp.config import Config, ConfigError, validate

    raw = Config().model_dump(mode="json")
    raw["data"]["batch_size"] = 24
    raw["model"]["bn"].update(variant="ghost", ghost_batch_size=8)
    assert validate(raw).dist.nproc == 1  # 8 divides 24: fine in one process
    raw["dist"]["nproc"] = 2
    with pytest.raises(ConfigError) as err:
        validate(raw)
    msg = str(err.value)
    assert "model.bn.ghost_batch_size" in msg and "per-process batch of 12" in msg and "\n" not in msg
    raw["model"]["bn"]["ghost_batch_size"] = 6
    assert validate(raw).dist.nproc == 2


def test_resume_does_not_take_nproc(cli, tmp_path):
    r = cli("train", "--resume", tmp_path, "--nproc", "2")
    assert r.code == 2 and "--nproc" in r.err and len(r.err.strip().splitlines()) == 1


# --- end to end -----------------------------------------------------------------------------------------------

RUN = {
    "name": "dist", "device": "cpu",
    "data": {"dataset": "digits", "batch_size": 32},
    "model": {"hidden": [32, 32], "bn": {"stats": "global"}},
    "optim": {"lr": 0.5},
    "train": {"steps": 40, "eval_every": 20, "log_every": 10, "checkpoint_every": 10},
    "probes": {"every": 20, "population_batches": 4},
}
# Keys that are the same number whoever trained the run.
COMPARED = ("steps", "test_accuracy", "test_loss", "best_test_accuracy", "gap_accuracy", "gap_logits", "gap_kl",
            "running_mean_err", "running_var_err")


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def _assert_same_run(a, b):
    sa, sb = _summary(a), _summary(b)
    assert sa["status"] == sb["status"] == "completed"
    for key in COMPARED:
        assert sa[key] == pytest.approx(sb[key], rel=1e-4, abs=1e-5), key
    rows_a = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), (ra["step"], k)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """One single-process run and one `--nproc 2` run of the same config (global statistics)."""
    from bnexp.cli import main

    root = tmp_path_factory.mktemp("dist-runs")
    (root / "c.yaml").write_text(json.dumps(RUN))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", "-c", "c.yaml", "--out", "single", "-q"]) == 0
        assert main(["train", "-c", "c.yaml", "--out", "two", "--nproc", "2", "-q"]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.mark.slow
def test_two_processes_with_global_stats_train_like_one_process(reference_runs):
    single, two = reference_runs / "single", reference_runs / "two"
    _assert_same_run(two, single)
    assert "nproc: 2" in (two / "config.yaml").read_text()
    # Only rank 0 wrote: one event file, one metrics file, nothing of another rank.
    assert len(list(two.glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-00000030.pt", "step-00000040.pt"]
    # The checkpoint is an ordinary single-module state dict (no DDP "module." prefix).
    state = torch.load(two / "checkpoints" / "step-00000040.pt", weights_only=True)
    assert all(not k.startswith("module.") for k in state["model"])


@pytest.mark.slow
def test_a_dead_rank_ends_the_run_with_one_line_and_the_run_resumes(reference_runs, cli, write_config, tmp_path):
    cfg = write_config(RUN)
    # A real process, so stderr holds what the ranks write too (a traceback from a rank's logging thread
    # goes to the inherited file descriptor, which an in-process capture does not see).
    r = subprocess.run([sys.executable, "-c", "import sys; from bnexp.cli import main; sys.exit(main(sys.argv[1:]))",
                        "train", "--config", str(cfg), "--out", "run", "--nproc", "2", "-q"],
                       cwd=tmp_path, env={**os.environ, FAIL_ENV: "1:25"}, capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: rank 1 ") and "injected failure at step 25" in lines[0]
    assert "--resume" in lines[0] and "Traceback" not in r.stderr
    run = tmp_path / "run"
    # What --resume continues from: an interrupted run at its last checkpoint (not a "running" one).
    summary = _summary(run)
    assert summary["status"] == "interrupted" and summary["steps"] == 20
    assert summary["test_accuracy"] is not None and "gap_accuracy" in summary
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step-00000020.pt"
    r = cli("train", "--resume", run, "-q")
    assert r.code == 0, r.err
    assert r.path == run
    # The resumed run is the uninterrupted one.
    _assert_same_run(run, reference_runs / "two")


@pytest.mark.slow
def test_a_signal_to_the_launcher_checkpoints_every_rank_and_the_run_resumes(tmp_path):
    """SIGTERM to `bnexp train --nproc 2` (not to its ranks): torch's launcher passes it on, the ranks agree
    on it, checkpoint at the same step and stop; the command says so in one line and exits 143."""
    import signal
    import time

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({**RUN, "model": {"hidden": [32, 32]}, "probes": {"enabled": False},
                               "train": {**RUN["train"], "steps": 1500, "checkpoint_every": 500}}))
    proc = subprocess.Popen([sys.executable, "-m", "bnexp.cli", "train", "--config", str(cfg), "--out", "run",
                             "--nproc", "2", "-q"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [f"interrupted by SIGTERM: checkpoint written; continue with "
                                        f"bnexp train --resume run"]
    summary = _summary(tmp_path / "run")
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < 1500
    newest = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert newest.name == f"step-{summary['steps']:08d}.pt"
    r = subprocess.run([sys.executable, "-m", "bnexp.cli", "train", "--resume", "run", "-q"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _summary(tmp_path / "run")["status"] == "completed"


@pytest.mark.slow
def test_local_stats_differ_from_global_and_log_global_batch_metrics(reference_runs, cli, write_config):
    cfg = write_config({**RUN, "model": {"hidden": [32, 32], "bn": {"stats": "local"}}})
    r = cli("train", "--config", cfg, "--out", "local", "--nproc", "2", "-q")
    assert r.code == 0, r.err
    local, single = _summary(r.path), _summary(reference_runs / "single")
    assert local["status"] == "completed"
    assert local["test_loss"] != pytest.approx(single["test_loss"], rel=1e-4)
    rows = [json.loads(line) for line in (r.path / "metrics.jsonl").read_text().splitlines()]
    # train/accuracy counts the whole global batch (a shard-only count would cap it at 1/2).
    assert max(row.get("train/accuracy", 0) for row in rows) > 0.6
