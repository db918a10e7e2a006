"""The BN probes (docs/design.md section 2): each quantity against an independent computation, and the
guarantee that probing never changes training."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bnexp.engine import checkpoint, dashboard
from bnexp.probes import suite as probes_suite
from bnexp.config import apply_overrides, validate
from bnexp.data import BatchSampler, load_dataset
from bnexp.models import bn_layers, build_model, hidden_blocks
from bnexp.probes import Probes
from bnexp.probes.gap import cover_in_batches, gap_batch_size
from bnexp.engine.rundir import read_metrics, read_summary
from bnexp.engine.session import resume, train
from bnexp.engine.trainer import Trainer

NORMS = ["torch", "bnexp"]
# Our layer's variants: in the probes' training-mode pass (batch statistics, no updates) Batch Renorm is
# plain BN, and Ghost BN normalizes each ghost batch of the probe batch.
VARIANTS = {"torch": {"model.norm": "torch"}, "bnexp": {"model.norm": "bnexp"},
            "renorm": {"model.norm": "bnexp", "model.bn.variant": "renorm"},
            "ghost": {"model.norm": "bnexp", "model.bn.variant": "ghost", "model.bn.ghost_batch_size": 8}}
# Conv2d + BatchNorm2d on 8x8 images (the synthetic task is tabular).
DIGITS_CNN = {"model.kind": "cnn", "model.channels": [3, 4], "data.dataset": "digits", "data.train_size": 200,
              "data.test_size": 50}


def make_cfg(tmp_path: Path, **overrides):
    """A small synthetic task: fast enough to probe at every step."""
    base = {
        "seed": 3, "device": "cpu", "out_dir": str(tmp_path),
        "data": {"dataset": "synthetic", "batch_size": 16,
                 "synthetic": {"num_samples": 400, "num_features": 8, "num_classes": 3}},
        "model": {"kind": "mlp", "hidden": [12, 10], "norm": "torch", "activation": "sigmoid"},
        "optim": {"name": "momentum", "lr": 0.2},
        "train": {"steps": 20, "eval_every": 10, "log_every": 5, "checkpoint_every": 10},
        "probes": {"every": 5, "population_batches": 4, "units_per_layer": 3, "histogram_every": 10},
    }
    return validate(apply_overrides(base, overrides))


def setup(tmp_path: Path, **overrides):
    cfg = make_cfg(tmp_path, **overrides)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    return cfg, data, model


def train_a_little(model, data, steps: int = 5, lr: float = 0.3, m: int = 16) -> None:
    """Move the weights and running statistics away from their initial values."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(data.y_train), generator=g)[:m]
        opt.zero_grad()
        F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()


def bn_input_stats(model, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer, the (mean, biased variance) of its input for the batch x in training mode, computed
    the straightforward way: one module forward with running-statistic tracking switched off."""
    stats, handles = {}, []
    bns = bn_layers(model)
    for name, bn in bns.items():
        def hook(_m, inputs, _o, name=name):
            h = inputs[0].double()
            dims = [0, *range(2, h.dim())]
            stats[name] = (h.mean(dims), h.var(dims, unbiased=False))
        handles.append(bn.register_forward_hook(hook))
    was = model.training
    saved = {n: b.track_running_stats for n, b in bns.items()}
    model.train()
    for b in bns.values():
        b.track_running_stats = False
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for n, b in bns.items():
            b.track_running_stats = saved[n]
        for h in handles:
            h.remove()
        model.train(was)
    return stats, out


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- probes never change training -------------------------------------------------------------------

def _train(tmp_path: Path, name: str, **overrides) -> tuple[Trainer, torch.Tensor]:
    cfg = make_cfg(tmp_path, **overrides)
    run_dir = tmp_path / name
    run_dir.mkdir()
    trainer = Trainer(cfg, run_dir, load_dataset(cfg.data))
    trainer.run()
    return trainer, torch.get_rng_state()


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    {"model.norm": "torch"},
    {"model.norm": "bnexp"},
    {"model.norm": "none"},
    {"model.norm": "bnexp", **DIGITS_CNN},
], ids=["torch", "bnexp", "none", "bnexp-cnn"])
def test_probes_never_change_training(tmp_path, variant):
    probed, rng_probed = _train(tmp_path, "on", **variant, **{"probes.every": 1, "probes.histogram_every": 1})
    plain, rng_plain = _train(tmp_path, "off", **variant, **{"probes.enabled": False})
    assert probed.probes is not None and plain.probes is None
    rows = read_metrics(tmp_path / "on")
    assert sum(any(k.startswith("activations/") for k in r) for r in rows) == probed.cfg.train.steps + 1

    a, b = probed.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # weights and buffers: running_mean, running_var, num_batches_tracked
        assert torch.equal(a[k], b[k]), k
    sa, sb = probed.optimizer.state_dict(), plain.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for i in sa["state"]:
        assert torch.equal(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"])
    assert torch.equal(rng_probed, rng_plain)  # the global RNG was not drawn from
    assert probed.sampler.state_dict()["epoch"] == plain.sampler.state_dict()["epoch"]


def test_evaluation_at_a_probe_step_equals_one_without_probes(tmp_path):
    """At a probe step the evaluation reuses the probes' eval-mode logits instead of a forward of its own:
    test loss and accuracy are bit for bit those of a run without probes, also over a test set larger
    than one forward's chunk (4096 rows)."""
    big = {"data.synthetic.num_samples": 21000, "data.test_fraction": 0.2, "train.steps": 6,
           "train.eval_every": 3, "probes.every": 3}
    _train(tmp_path, "on", **big)
    _train(tmp_path, "off", **big, **{"probes.enabled": False})
    keys = ("test/loss", "test/accuracy")
    on = [(r["step"], *(r[k] for k in keys)) for r in read_metrics(tmp_path / "on") if "test/loss" in r]
    off = [(r["step"], *(r[k] for k in keys)) for r in read_metrics(tmp_path / "off") if "test/loss" in r]
    assert [s for s, *_ in on] == [0, 3, 6] and on == off


@pytest.mark.parametrize("norm", NORMS)
def test_measure_leaves_model_as_it_found_it(tmp_path, norm):
    cfg, data, model = setup(tmp_path, **{"model.norm": norm})
    train_a_little(model, data)
    probes = Probes(cfg, model, data)
    before = snapshot(model)
    modules = dict(model.named_modules())
    for training in (True, False):
        model.train(training)
        probes.measure(0, model)
        assert all(m.training == training for m in model.modules())
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dict(model.named_modules()) == modules  # the stand-in layers are gone again
    assert all(b.track_running_stats for b in bn_layers(model).values())


# --- each quantity against an independent computation -------------------------------------------------

@pytest.mark.usefixtures("layer_path")  # bnexp's layer: the grouped kernel call, or a twin
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_population_statistics_from_the_data(tmp_path, norm, kind):
    # One BN layer right after the first linear/conv map: its input is W x (no bias before BN),
    # so the population statistics follow from the data and W alone.
    cfg, data, model = setup(tmp_path, **{"model.norm": norm, "model.hidden": [7],
                                          **(DIGITS_CNN if kind == "cnn" else {}), "model.channels": [5]})
    train_a_little(model, data)
    probes = Probes(cfg, model, data)
    pop = probes.population_statistics(model)
    assert list(pop) == ["h1"]

    layer = model.h1.layer
    means, variances = [], []
    for idx in probes.population_idx:
        x = data.x_train[idx].double()
        if kind == "mlp":
            h = x.flatten(1) @ layer.weight.double().T
            dims = [0]
        else:
            h = F.conv2d(x, layer.weight.double(), padding=1)
            dims = [0, 2, 3]
        means.append(h.mean(dims))
        variances.append(h.var(dims, unbiased=False))
    n = h.numel() // h.shape[1]  # values per channel: m for an MLP, m·H·W for a conv layer
    assert n == cfg.data.batch_size * (1 if kind == "mlp" else 8 * 8)
    mu = torch.stack(means).mean(0)
    var = torch.stack(variances).mean(0) * n / (n - 1)
    torch.testing.assert_close(pop["h1"]["mean"], mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pop["h1"]["var"], var, rtol=1e-5, atol=1e-6)


def test_probe_batches_are_fixed_by_the_seed_and_distinct(tmp_path):
    cfg, data, model = setup(tmp_path)
    p1, p2 = Probes(cfg, model, data), Probes(cfg, model, data)
    assert torch.equal(p1.population_idx, p2.population_idx)
    assert all(p1.units[k].tolist() == p2.units[k].tolist() for k in p1.units)
    k, m = p1.population_idx.shape
    assert (k, m) == (cfg.probes.population_batches, cfg.data.batch_size)
    assert all(len(set(row.tolist())) == m for row in p1.population_idx)
    other = Probes(make_cfg(tmp_path, seed=4), model, data)
    assert not torch.equal(p1.population_idx, other.population_idx)
    training = BatchSampler(len(data.y_train), m, cfg.seed)  # as train.py seeds the training order
    assert not torch.equal(p1.population_idx, torch.stack([training.next() for _ in range(k)]))


@pytest.mark.parametrize("m, examples, k", [(16, 600, 38), (4, 600, 150), (60, 600, 10), (16, 32, 2)])
def test_the_population_reference_holds_enough_examples_whatever_the_batch(tmp_path, m, examples, k):
    """K = ceil(population_examples / m) batches of m: a batch of 4 gets as many examples as one of 60."""
    cfg, data, model = setup(tmp_path, **{"data.batch_size": m, "probes.population_batches": None,
                                         "probes.population_examples": examples})
    assert tuple(Probes(cfg, model, data).population_idx.shape) == (k, m)


@pytest.mark.parametrize("norm", NORMS)
def test_running_stat_errors(tmp_path, norm):
    cfg, data, model = setup(tmp_path, **{"model.norm": norm})
    train_a_little(model, data)
    probes = Probes(cfg, model, data)
    pop = probes.population_statistics(model)
    bns = bn_layers(model)
    # Running statistics equal to the population statistics: no error.
    for name, bn in bns.items():
        bn.running_mean.copy_(pop[name]["mean"])
        bn.running_var.copy_(pop[name]["var"])
    values = probes.measure(0, model)
    for name in bns:
        assert values[f"running_stats/{name}/mean_err"] == pytest.approx(0, abs=1e-6)
        assert values[f"running_stats/{name}/var_err"] == pytest.approx(0, abs=1e-6)
    # Off by half a population std in every mean, and by a factor e in every (var + eps): errors 1/2 and 1.
    for name, bn in bns.items():
        eps, var = bn.eps, pop[name]["var"]
        bn.running_mean.copy_(pop[name]["mean"] + 0.5 * (var + eps).sqrt())
        bn.running_var.copy_((var + eps) * math.e - eps)
    values = probes.measure(0, model)
    for name in bns:
        assert values[f"running_stats/{name}/mean_err"] == pytest.approx(0.5, rel=1e-5)
        assert values[f"running_stats/{name}/var_err"] == pytest.approx(1.0, rel=1e-5)
    summary = probes.summary()
    assert summary["running_mean_err"] == pytest.approx(0.5, rel=1e-5)
    assert summary["running_var_err"] == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("norm", ["bnexp", "torch"])
def test_running_stat_errors_of_mixed_widths_come_in_layer_order(tmp_path, norm):
    """Layers of one width are computed together: with widths 12, 10, 12 each layer still gets its own
    values, and the tags (the columns of metrics.jsonl) come in the order of the layers."""
    cfg, data, model = setup(tmp_path, **{"model.norm": norm, "model.hidden": [12, 10, 12]})
    train_a_little(model, data)
    probes = Probes(cfg, model, data)
    values = probes.measure(0, model)
    bns = bn_layers(model)
    assert len(bns) == 3
    assert [k.split("/")[1] for k in values if k.startswith("running_stats/")] == [n for n in bns for _ in "mv"]
    pop = probes.population_statistics(model)
    for name, bn in bns.items():
        rm, rv, var = bn.running_mean.double(), bn.running_var.double(), pop[name]["var"]
        mean_err = ((rm - pop[name]["mean"]).abs() / (var + bn.eps).sqrt()).mean()
        var_err = torch.log((rv + bn.eps) / (var + bn.eps)).abs().mean()
        assert values[f"running_stats/{name}/mean_err"] == pytest.approx(float(mean_err), rel=1e-12)
        assert values[f"running_stats/{name}/var_err"] == pytest.approx(float(var_err), rel=1e-12)


@pytest.mark.parametrize("norm", NORMS)
def test_gap_is_zero_when_running_stats_are_the_batch_stats(tmp_path, norm):
    # The test set is one batch of m. Its running statistics are set to that batch's statistics, layer by
    # layer. The running variance is the *biased* batch variance: training mode normalizes with the
    # biased σ²_B while eval mode uses running_var as it is, so that is what makes the two modes agree.
    cfg, data, model = setup(tmp_path, **{"model.norm": norm, "data.test_size": 16})
    train_a_little(model, data)
    assert len(data.y_test) == cfg.data.batch_size
    stats, _ = bn_input_stats(model, data.x_test)
    for name, bn in bn_layers(model).items():
        bn.running_mean.copy_(stats[name][0])
        bn.running_var.copy_(stats[name][1])
    values = Probes(cfg, model, data).measure(0, model)
    assert values["gap/accuracy"] == 0
    assert values["gap/train_mode_accuracy"] == values["gap/eval_mode_accuracy"]
    assert values["gap/logits"] == pytest.approx(0, abs=1e-5)
    assert values["gap/kl"] == pytest.approx(0, abs=1e-9)


def _assert_gap_of_batches(values, model, data, idx: torch.Tensor, keep: torch.Tensor) -> None:
    """The gap values against f_train computed the obvious way: one module forward per test batch (rows of
    idx), each example's prediction taken from the batch whose `keep` row marks it."""
    x, y = data.x_test, data.y_test
    assert idx.flatten()[keep].tolist() == list(range(len(y)))
    model.eval()
    with torch.no_grad():
        f_eval = model(x)
    f_train = torch.empty_like(f_eval)
    ratios = []
    for row, keep_row in zip(idx, keep.view(idx.shape)):
        _, out = bn_input_stats(model, x[row])
        ratios.append((torch.linalg.norm(out - f_eval[row]) / torch.linalg.norm(f_eval[row])).item())
        f_train[row[keep_row]] = out[keep_row]
    acc_train = (f_train.argmax(1) == y).double().mean().item()
    acc_eval = (f_eval.argmax(1) == y).double().mean().item()
    p = F.softmax(f_train.double(), 1)
    kl = (p * (p.log() - F.log_softmax(f_eval.double(), 1))).sum(1).mean().item()
    assert values["gap/train_mode_accuracy"] == pytest.approx(acc_train)
    assert values["gap/eval_mode_accuracy"] == pytest.approx(acc_eval)
    assert values["gap/accuracy"] == pytest.approx(acc_train - acc_eval, abs=1e-12)
    assert values["gap/logits"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-4)
    assert values["gap/kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
    assert values["gap/kl"] > 0 and values["gap/logits"] > 0


@pytest.mark.usefixtures("layer_path")  # bnexp's layer: the grouped kernel call, or a twin
@pytest.mark.parametrize("norm,test_size", [
    ("torch", 75), ("bnexp", 75), ("torch", 10), ("bnexp", 10), ("renorm", 75), ("ghost", 75),
])  # 75: the last batch overlaps its predecessor; 10 < m: one batch
def test_gap_against_per_batch_forwards(tmp_path, norm, test_size):
    cfg, data, model = setup(tmp_path, **VARIANTS[norm], **{"data.test_size": test_size})
    train_a_little(model, data, steps=8)
    probes = Probes(cfg, model, data)
    values = probes.measure(0, model)

    idx, keep = cover_in_batches(len(data.y_test), cfg.data.batch_size)
    _assert_gap_of_batches(values, model, data, idx, keep)

    # Batch Renorm's d and r over the probe batches, from per-batch forwards.
    for name, bn in bn_layers(model).items():
        rm, rv, eps = bn.running_mean.double(), bn.running_var.double(), bn.eps
        ds, rs = [], []
        for row in probes.population_idx:
            stats, _ = bn_input_stats(model, data.x_train[row])
            mean, var = stats[name]
            ds.append(((mean - rm).abs() / (rv + eps).sqrt()).mean().item())
            rs.append(((var + eps).sqrt() / (rv + eps).sqrt()).mean().item())
        assert values[f"gap/{name}/d"] == pytest.approx(sum(ds) / len(ds), rel=1e-4)
        assert values[f"gap/{name}/r"] == pytest.approx(sum(rs) / len(rs), rel=1e-4)


@pytest.mark.parametrize("test_size", [75, 10])
def test_kept_probe_batches_give_the_values_of_batches_indexed_afresh(tmp_path, monkeypatch, test_size):
    cfg, data, model = setup(tmp_path, **VARIANTS["bnexp"], **{"data.test_size": test_size})
    train_a_little(model, data, steps=8)
    kept = Probes(cfg, model, data)
    first = kept.measure(0, model)
    assert kept._gather_cache and all(t is not None for t in kept._gather_cache.values())
    assert kept.measure(0, model) == first  # from the kept rows
    monkeypatch.setattr(probes_suite, "_GATHER_KEEP_BYTES", 0)
    afresh = Probes(cfg, model, data)
    assert afresh.measure(0, model) == first
    assert list(afresh._gather_cache.values()) == [None]  # nothing kept: indexed per chunk


@pytest.mark.parametrize("test_size,batches", [
    (12, [range(0, 8), range(4, 12)]),  # 8 < 12 < m: two overlapping batches of k, no ghost batch of 4
    (6, [range(0, 6)]),  # at most k: one batch, one virtual batch
])
def test_ghost_gap_on_a_test_set_smaller_than_the_batch(tmp_path, test_size, batches):
    # m = 16, k = 8: Ghost BN refuses a batch of 12 (not a multiple of k). Each test example gets its
    # train-mode prediction from a virtual batch of k, as in training, or from the whole set if it has <= k.
    cfg, data, model = setup(tmp_path, **VARIANTS["ghost"], **{"data.test_size": test_size})
    train_a_little(model, data, steps=8)
    values = Probes(cfg, model, data).measure(0, model)
    assert all(math.isfinite(v) for v in values.values())
    idx = torch.tensor([list(b) for b in batches])
    keep = torch.ones_like(idx, dtype=torch.bool)
    if test_size == 12:
        keep[1, :4] = False  # examples 4..7 were predicted by the first batch
    _assert_gap_of_batches(values, model, data, idx, keep.flatten())


def test_gap_batch_size_is_m_or_fits_ghost_bn():
    assert [gap_batch_size(n, 16) for n in (40, 16, 12, 1)] == [16, 16, 12, 1]
    assert [gap_batch_size(n, 16, 8) for n in (40, 16, 15, 12, 8, 6)] == [16, 16, 8, 8, 8, 6]
    assert gap_batch_size(30, 32, 4) == 28


@pytest.mark.parametrize("variant", [
    {"model.norm": "bnexp"}, {"model.norm": "none"},
    {"model.norm": "bnexp", "model.bn_position": "after_activation"},
    {"model.norm": "torch", **DIGITS_CNN},
], ids=["bnexp", "none", "bn-after-act", "cnn"])
def test_activation_percentiles_against_torch_quantile(tmp_path, variant):
    cfg, data, model = setup(tmp_path, **variant)
    train_a_little(model, data)
    probes = Probes(cfg, model, data)
    values = probes.measure(0, model)

    captured, handles = {}, []
    for name, block in hidden_blocks(model).items():
        handles.append(block.act.register_forward_pre_hook(
            lambda _m, inp, name=name: captured.__setitem__(name, inp[0].detach().clone())))
    model.eval()
    with torch.no_grad():
        model(data.x_test)
    for h in handles:
        h.remove()
    assert set(probes.units) == set(captured) and len(captured) == len(hidden_blocks(model))
    q = torch.tensor([0.15, 0.5, 0.85])
    for name, act in captured.items():
        assert len(probes.units[name]) == cfg.probes.units_per_layer
        for unit in probes.units[name].tolist():
            v = act[:, unit].flatten()  # conv: one channel, every position of every test example
            assert v.numel() == len(data.y_test) * (act[0, 0].numel())
            expect = torch.quantile(v, q).tolist()
            got = [values[f"activations/{name}/u{unit}/{p}"] for p in ("p15", "p50", "p85")]
            assert got == pytest.approx(expect, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("norm", ["bnexp", "none"])
def test_grad_norms_against_the_gradients(tmp_path, norm):
    cfg, data, model = setup(tmp_path, **{"model.norm": norm})
    probes = Probes(cfg, model, data)
    model.train()
    F.cross_entropy(model(data.x_train[:16]), data.y_train[:16]).backward()
    probes.after_backward(5, model)
    values = probes.measure(5, model)
    layers = {"h1": model.h1.layer.weight, "h2": model.h2.layer.weight, "out": model.out.weight}
    assert {k for k in values if k.startswith("grad_norm/")} == {f"grad_norm/{k}" for k in layers}
    for name, w in layers.items():
        assert values[f"grad_norm/{name}"] == pytest.approx(w.grad.norm().item(), rel=1e-6)
    # Gradients belong to the step they were taken at: step 0 (no backward yet) has none.
    assert not any(k.startswith("grad_norm/") for k in probes.measure(0, model))


def test_due_steps(tmp_path):
    cfg, data, model = setup(tmp_path, **{"train.steps": 23, "probes.every": 5})
    probes = Probes(cfg, model, data)
    assert [s for s in range(24) if probes.due(s)] == [0, 5, 10, 15, 20, 23]


# --- runs on disk -----------------------------------------------------------------------------------

def _run(tmp_path: Path, name: str, **overrides) -> Path:
    cfg = make_cfg(tmp_path, **overrides)
    run_dir = tmp_path / name
    run_dir.mkdir()
    train(cfg, run_dir, data=load_dataset(cfg.data))
    return run_dir


def _no_nan(path: Path) -> None:
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and "null" not in text, path


@pytest.mark.slow
def test_run_without_bn_has_no_bn_keys(tmp_path):
    run_dir = _run(tmp_path, "plain", **{"model.norm": "none"})
    rows = read_metrics(run_dir)
    keys = set().union(*rows)
    assert not any(k.startswith(("running_stats/", "gap/")) for k in keys)
    assert {"grad_norm/h1", "grad_norm/out"} <= keys
    assert any(k.startswith("activations/h2/") and k.endswith("/p50") for k in keys)
    summary = read_summary(run_dir)
    assert not {"gap_accuracy", "gap_logits", "gap_kl", "running_mean_err", "running_var_err"} & set(summary)
    _no_nan(run_dir / "metrics.jsonl")
    _no_nan(run_dir / "summary.json")


@pytest.mark.slow
def test_run_with_bn_logs_everything_and_summarizes_the_last_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _run(tmp_path, "bn", **{"model.norm": "bnexp", "train.steps": 23})
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    probe_steps = [s for s, r in sorted(rows.items()) if "gap/accuracy" in r]
    assert probe_steps == [0, 5, 10, 15, 20, 23]
    last = rows[23]
    summary = read_summary(run_dir)
    assert summary["gap_accuracy"] == last["gap/accuracy"]
    assert summary["gap_logits"] == last["gap/logits"]
    assert summary["gap_kl"] == last["gap/kl"]
    assert summary["running_mean_err"] == pytest.approx(
        (last["running_stats/h1/mean_err"] + last["running_stats/h2/mean_err"]) / 2)
    assert summary["running_var_err"] == pytest.approx(
        (last["running_stats/h1/var_err"] + last["running_stats/h2/var_err"]) / 2)
    for key in ("gap/h1/d", "gap/h2/r", "grad_norm/out", "running_stats/h2/var_err"):
        assert key in last
    _no_nan(run_dir / "metrics.jsonl")

    acc = EventAccumulator(str(run_dir), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    hist_tags = acc.Tags()["histograms"]
    assert sorted(hist_tags) == sorted(dashboard.tag(k.rpartition("/")[0]) for k in last
                                       if k.startswith("activations/") and k.endswith("/p50"))
    # histogram_every=10 with every=5: steps 0, 10, 20 and the last.
    assert [e.step for e in acc.Histograms(hist_tags[0])] == [0, 10, 20, 23]
    assert [e.step for e in acc.Scalars(dashboard.tag("gap/eval_mode_accuracy"))] == probe_steps


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_layout_charts_what_the_probes_log(tmp_path, kind):
    arch = {"model.kind": "resnet", "model.depth": 8, "model.width_factor": 0.25, **{
        k: v for k, v in DIGITS_CNN.items() if k.startswith("data.")}} if kind == "resnet" else {}
    cfg, data, model = setup(tmp_path, **{"model.norm": "bnexp", "probes.ics": True, "probes.landscape": True,
                                          "probes.sharpness": True, "probes.sharpness_iters": 2, **arch})
    probes = Probes(cfg, model, data)
    layout = probes.layout()
    charts = {title: (kind_, keys) for _, category, _ in layout for title, (kind_, keys) in category.items()}
    model.train()
    F.cross_entropy(model(data.x_train[:16]), data.y_train[:16]).backward()
    probes.after_backward(0, model)  # gradient norms are logged for a training step's gradient
    logged = dashboard.scalars(probes.measure(0, model, lr=0.1))  # TensorBoard's view: log10 errors too
    keys = {tag.split("/", 1)[1] for tag in logged}
    # Every key of a chart is one the run logs, and every logged probe key is on a chart.
    shown = {k for _, ks in charts.values() for k in ks}
    assert shown <= keys, sorted(shown - keys)
    linear_errors = {k for k in keys if re.fullmatch(r"running_stats/.*/(mean|var)_err", k)}
    assert keys - shown == linear_errors, sorted(keys - shown)  # their log10 is charted: falls by decades
    # A chart holds one quantity, or two that belong together (train-mode vs eval-mode accuracy); a band is
    # a unit's median with its 15th and 85th percentiles.
    assert all(len(ks) <= 2 for kind_, ks in charts.values() if kind_ == "Multiline")
    assert ("Multiline", ["gap/train_mode_accuracy", "gap/eval_mode_accuracy"]) in charts.values()
    bands = [ks for kind_, ks in charts.values() if kind_ == "Margin"]
    assert sorted(bands) == sorted([f"activations/{name}/u{unit}/{p}" for p in ("p50", "p15", "p85")]
                                   for name, units in probes.units.items() for unit in units.tolist())
    # Open categories first; the families charted per layer or block after them, closed.
    closed = [c for _, _, c in layout]
    assert closed == sorted(closed) and True in closed and False in closed

    plain_cfg, plain_data, plain = setup(tmp_path, **{"model.norm": "none"})
    plain_layout = Probes(plain_cfg, plain, plain_data).layout()
    assert not any(k.startswith(("gap/", "running_stats/")) for _, c, _ in plain_layout
                   for _, ks in c.values() for k in ks)


def test_units_are_the_same_for_every_seed_and_arm(tmp_path):
    # Figure 1's charts hold every run only if every run tracks the same units.
    units = [Probes(cfg, model, data).units for cfg, data, model in
             (setup(tmp_path, **{"seed": seed, "model.norm": norm}) for seed in (0, 1, 7) for norm in NORMS + ["none"])]
    assert all({k: u.tolist() for k, u in other.items()} == {k: u.tolist() for k, u in units[0].items()}
               for other in units)
    cfg, data, model = setup(tmp_path)
    for name, block in hidden_blocks(model).items():
        chosen = units[0][name].tolist()
        # Spread over the layer: one in each of k equal slices of its units.
        k = cfg.probes.units_per_layer
        assert len(chosen) == k and [u * k // block.width for u in chosen] == list(range(k))
    wide_cfg, wide_data, wide_model = setup(tmp_path, **{"probes.units_per_layer": 50})  # wider than any layer
    wide = Probes(wide_cfg, wide_model, wide_data)
    assert {k: u.tolist() for k, u in wide.units.items()} == {
        name: list(range(block.width)) for name, block in hidden_blocks(model).items()}


@pytest.mark.slow
def test_resumed_run_has_bit_identical_probe_values(tmp_path):
    full = _run(tmp_path, "full", **{"model.norm": "bnexp", "train.steps": 20, "train.checkpoint_every": 10})
    # Make a copy that looks killed right after its step-10 checkpoint, then resume it.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for ckpt in checkpoint.list_checkpoints(cut):
        if int(ckpt.stem.split("-")[1]) > 10:
            ckpt.unlink()
    summary = json.loads((cut / "summary.json").read_text())
    (cut / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    resume(cut)
    a, b = read_metrics(full), read_metrics(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    probe_keys = [k for k in a[-1] if k.startswith(("gap/", "running_stats/", "activations/", "grad_norm/"))]
    assert probe_keys
    for ra, rb in zip(a, b):
        assert {k: ra.get(k) for k in probe_keys} == {k: rb.get(k) for k in probe_keys}
    for k in ("gap_accuracy", "gap_kl", "running_mean_err", "running_var_err"):
        assert read_summary(full)[k] == read_summary(cut)[k]


class _Writer:
    def __init__(self):
        self.histograms: list[tuple[str, int, torch.Tensor]] = []

    def add_histogram(self, tag, values, step):
        self.histograms.append((tag, step, values))


def test_a_diverged_network_is_measured_without_crashing(tmp_path):
    # train.py probes the step where a run diverges: NaN weights must give NaN values, not an exception.
    cfg, data, model = setup(tmp_path, **{"model.norm": "bnexp"})
    with torch.no_grad():
        model.h1.layer.weight[0, 0] = float("nan")
    writer = _Writer()
    values = Probes(cfg, model, data).measure(0, model, writer)
    assert math.isnan(values["gap/logits"]) and math.isnan(values["running_stats/h1/mean_err"])
    assert all(torch.isfinite(v).all() for _, _, v in writer.histograms)


@pytest.mark.slow
def test_running_stat_error_falls_on_digits(tmp_path):
    # The paper's setting (configs/default.yaml), shortened: running estimates start at (0, 1), far from
    # the population, and track it once training has run for a while.
    run_dir = _run(tmp_path, "digits", **{"data.dataset": "digits", "data.batch_size": 60, "model.hidden": [100, 100, 100],
                                          "model.norm": "bnexp", "optim.name": "sgd", "optim.lr": 0.5,
                                          "train.steps": 300, "probes.every": 100})
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    for key in ("mean_err", "var_err"):
        start = sum(rows[0][f"running_stats/h{i}/{key}"] for i in (1, 2, 3)) / 3
        end = sum(rows[300][f"running_stats/h{i}/{key}"] for i in (1, 2, 3)) / 3
        assert end < start / 5, (key, start, end)
