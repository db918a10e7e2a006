"""Batch Renormalization and Ghost BN (bnexp.nn.variants): reductions to plain BN, gradients, wiring, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bnexp.nn import batchnorm as ours
from bnexp.config import ModelConfig
from bnexp.models import bn_layers, build_model
from bnexp.nn.variants import (BatchRenorm1d, BatchRenorm2d, GhostBatchNorm1d, GhostBatchNorm2d, batch_renorm_train,
                            ghost_batch_norm_train, renorm_factors, renorm_limits)

# The variants build on plain BN's Function: every test runs on its compiled kernel and its tensor ops.
pytestmark = pytest.mark.usefixtures("layer_path")

F64 = dict(rtol=1e-10, atol=1e-12)
SHAPES = [((16, 5), 1), ((8, 3, 7), 1), ((8, 3, 4, 5), 2)]
OURS = {1: ours.BatchNorm1d, 2: ours.BatchNorm2d}
TORCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
RENORM = {1: BatchRenorm1d, 2: BatchRenorm2d}
GHOST = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d}


def _randomize(*layers: nn.Module, seed: int = 0) -> None:
    """The same non-trivial γ, β and running statistics in every layer."""
    gen = torch.Generator().manual_seed(seed)
    c = layers[0].num_features
    values = {"weight": torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
              "bias": torch.randn(c, generator=gen, dtype=torch.float64),
              "running_mean": torch.randn(c, generator=gen, dtype=torch.float64),
              "running_var": torch.rand(c, generator=gen, dtype=torch.float64) + 0.5}
    with torch.no_grad():
        for layer in layers:
            for name, v in values.items():
                getattr(layer, name).copy_(v)


def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    """One training forward and backward of sum(y·g): (y, ∂/∂x, ∂/∂γ, ∂/∂β)."""
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    (y * g).sum().backward()
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


def _assert_same_buffers(a: nn.Module, b: nn.Module, **tol) -> None:
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name).to(getattr(a, name).dtype), **tol)
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked)


# --- Batch Renormalization -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, dims", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_renorm_with_rmax_1_dmax_0_is_plain_bn_and_torch(shape, dims, momentum):
    c = shape[1]
    renorm = RENORM[dims](c, momentum=momentum, r_max=1.0, d_max=0.0).double()
    plain = OURS[dims](c, momentum=momentum).double()
    ref = TORCH[dims](c, momentum=momentum).double()
    _randomize(renorm, plain, ref)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # several steps: the running statistics feed r and d of the next one
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 2
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        got = _step(renorm, x, g)
        for other in (plain, ref):
            for a, b in zip(got, _step(other, x, g)):
                torch.testing.assert_close(a, b, **F64)
            _assert_same_buffers(renorm, other, **F64)
    renorm.eval(), ref.eval()
    torch.testing.assert_close(renorm(x), ref(x), **F64)


def test_renorm_float32_matches_torch_within_float32_tolerance():
    renorm, ref = BatchRenorm1d(6, r_max=1.0, d_max=0.0), nn.BatchNorm1d(6)
    _randomize(renorm, ref)
    x, g = torch.randn(32, 6) * 2 + 1, torch.randn(32, 6)
    for a, b in zip(_step(renorm, x, g), _step(ref, x, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    _assert_same_buffers(renorm, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("unbiased", [False, True])
def test_renorm_with_running_stats_equal_to_the_batch_stats_is_plain_bn(unbiased):
    x = torch.randn(12, 4, 3, dtype=torch.float64) * 2 - 1
    g = torch.randn_like(x)
    renorm = BatchRenorm1d(4, r_max=5.0, d_max=5.0, unbiased_normalize=unbiased).double()
    plain = ours.BatchNorm1d(4, unbiased_normalize=unbiased).double()
    _randomize(renorm, plain)
    var, mean = torch.var_mean(x, (0, 2), correction=1 if unbiased else 0)
    with torch.no_grad():  # r = 1 and d = 0 exactly when the running stats are this batch's
        for layer in (renorm, plain):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
    _, mean, var = batch_renorm_train(x, renorm.weight, renorm.bias, renorm.running_mean, renorm.running_var,
                                      renorm.eps, 5.0, 5.0, unbiased)
    r, d = renorm_factors(mean, var, 12 * 3, renorm.running_mean, renorm.running_var, renorm.eps, 5.0, 5.0,
                          unbiased)
    torch.testing.assert_close(r, torch.ones_like(r), **F64)
    torch.testing.assert_close(d, torch.zeros_like(d), **F64)
    for a, b in zip(_step(renorm, x, g), _step(plain, x, g)):
        torch.testing.assert_close(a, b, **F64)
    _assert_same_buffers(renorm, plain, **F64)


def _renorm_reference(x, w, b, rm, rv, eps, r_max, d_max):
    """Ioffe 2017 Algorithm 1 in autograd ops, r and d detached (the paper's stop_gradient)."""
    var, mean = torch.var_mean(x, 0, correction=0)
    std = (var + eps).sqrt()
    run_std = (rv + eps).sqrt()
    r = (std / run_std).clamp(1 / r_max, r_max).detach()
    d = ((mean - rm) / run_std).clamp(-d_max, d_max).detach()
    return w * ((x - mean) / std * r + d) + b, r, d


def test_renorm_matches_the_papers_algorithm_with_r_and_d_as_constants():
    torch.manual_seed(0)
    c = 8
    x = (torch.randn(10, c, dtype=torch.float64) * torch.linspace(0.2, 4, c, dtype=torch.float64)
         + torch.linspace(-3, 3, c, dtype=torch.float64)).requires_grad_(True)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    y_ref, r_ref, d_ref = _renorm_reference(x, w, b, rm, rv, 1e-5, 2.0, 1.0)
    # Some channels clipped, some not: the comparison covers both cases.
    assert ((r_ref == 2.0) | (r_ref == 0.5)).any() and ((r_ref > 0.5) & (r_ref < 2.0)).any()
    assert (d_ref.abs() == 1.0).any() and (d_ref.abs() < 1.0).any()
    g = torch.randn_like(x)
    ref_grads = torch.autograd.grad((y_ref * g).sum(), (x, w, b))
    y, mean, var = batch_renorm_train(x, w, b, rm, rv, 1e-5, 2.0, 1.0, False)
    r, d = renorm_factors(mean, var, 10, rm, rv, 1e-5, 2.0, 1.0, False)
    grads = torch.autograd.grad((y * g).sum(), (x, w, b))
    torch.testing.assert_close(y, y_ref, **F64)
    torch.testing.assert_close(r, r_ref, **F64)
    torch.testing.assert_close(d, d_ref, **F64)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, **F64)


@pytest.mark.parametrize("unbiased", [False, True])
def test_renorm_gradcheck_float64(unbiased):
    # Running statistics far from the batch's: every r and d sits on its clip, so they are locally constant
    # and the finite differences see exactly the gradient with r and d treated as constants.
    torch.manual_seed(0)
    x = (torch.randn(6, 3, 2, dtype=torch.float64) * 0.1).requires_grad_(True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm = torch.tensor([10.0, -10.0, 10.0], dtype=torch.float64)
    rv = torch.full((3,), 100.0, dtype=torch.float64)
    _, mean, var = batch_renorm_train(x, w, b, rm, rv, 1e-5, 1.5, 0.5, unbiased)
    r, d = renorm_factors(mean, var, 6 * 2, rm, rv, 1e-5, 1.5, 0.5, unbiased)
    assert torch.allclose(r, torch.full_like(r, 1 / 1.5)) and torch.allclose(d.abs(), torch.full_like(d, 0.5))
    f = lambda x, w, b: batch_renorm_train(x, w, b, rm, rv, 1e-5, 1.5, 0.5, unbiased)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_renorm_limits_follow_the_schedule():
    kw = dict(r_max=3.0, d_max=5.0, warmup_steps=10, r_max_steps=30, d_max_steps=20)
    assert renorm_limits(0, **kw) == (1.0, 0.0)
    assert renorm_limits(9, **kw) == (1.0, 0.0)
    assert renorm_limits(10, **kw) == (1.0, 0.0)
    assert renorm_limits(15, **kw) == pytest.approx((1.5, 2.5))
    assert renorm_limits(20, **kw) == pytest.approx((2.0, 5.0))
    assert renorm_limits(30, **kw) == (3.0, 5.0)
    assert renorm_limits(10_000, **kw) == (3.0, 5.0)
    # No warm-up and no ramp: the final limits from the very first batch.
    assert renorm_limits(0, 3.0, 5.0, 0, 0, 0) == (3.0, 5.0)


def test_renorm_layer_counts_its_steps_in_num_batches_tracked():
    # Running stats far off, so any relaxation of the limits changes the output: plain BN during the warm-up
    # (step 0, 1), renormalized after; the count survives a state-dict round trip.
    x, g = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    renorm = BatchRenorm1d(4, momentum=1e-9, r_max=3.0, d_max=5.0, warmup_steps=2, r_max_steps=2,
                           d_max_steps=2).double()
    plain = ours.BatchNorm1d(4, momentum=1e-9).double()
    for layer in (renorm, plain):
        with torch.no_grad():
            layer.running_mean.fill_(4.0)
            layer.running_var.fill_(25.0)
    for step in range(2):
        torch.testing.assert_close(_step(renorm, x, g)[0], _step(plain, x, g)[0], **F64)
    copy = BatchRenorm1d(4, momentum=1e-9, r_max=3.0, d_max=5.0, warmup_steps=2, r_max_steps=2,
                         d_max_steps=2).double()
    copy.load_state_dict(renorm.state_dict())
    assert int(copy.num_batches_tracked) == 2
    assert not torch.allclose(_step(copy, x, g)[0], _step(plain, x, g)[0])


def test_renorm_state_dict_is_torchs_and_eval_is_plain_bn():
    renorm, ref = BatchRenorm2d(3), nn.BatchNorm2d(3)
    _randomize(renorm, ref)
    assert renorm.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(renorm.state_dict())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(renorm.eval()(x), ref.eval()(x))


def test_renorm_without_running_stats_is_plain_bn():
    renorm = BatchRenorm1d(5, track_running_stats=False, r_max=3.0, d_max=5.0)
    plain = ours.BatchNorm1d(5, track_running_stats=False)
    x = torch.randn(7, 5)
    torch.testing.assert_close(renorm(x), plain(x))


# --- Ghost BN ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, dims", SHAPES)
def test_ghost_with_the_whole_batch_is_plain_bn(shape, dims):
    ghost = GHOST[dims](shape[1], ghost_batch_size=shape[0]).double()
    plain = OURS[dims](shape[1]).double()
    _randomize(ghost, plain)
    x = torch.randn(shape, dtype=torch.float64) + 1
    g = torch.randn_like(x)
    for a, b in zip(_step(ghost, x, g), _step(plain, x, g)):
        torch.testing.assert_close(a, b, **F64)
    _assert_same_buffers(ghost, plain, **F64)


@pytest.mark.parametrize("shape, dims", SHAPES)
@pytest.mark.parametrize("momentum, unbiased", [(0.1, False), (None, False), (0.3, True)])
def test_ghost_is_plain_bn_on_each_virtual_batch(shape, dims, momentum, unbiased):
    k = 4
    n = shape[0]
    ghost = GHOST[dims](shape[1], momentum=momentum, unbiased_normalize=unbiased, ghost_batch_size=k).double()
    plain = OURS[dims](shape[1], momentum=momentum, unbiased_normalize=unbiased).double()
    _randomize(ghost, plain)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + torch.arange(n, dtype=torch.float64).view(
        -1, *([1] * (len(shape) - 1)))  # virtual batches with different statistics
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    y, gx, gw, gb = _step(ghost, x, g)
    # Reference: plain BN called on the chunks one after the other (γ, β shared: their gradients add up).
    xs = x.clone().requires_grad_(True)
    plain.zero_grad(set_to_none=True)
    y_ref = torch.cat([plain(chunk) for chunk in xs.split(k)])
    (y_ref * g).sum().backward()
    torch.testing.assert_close(y, y_ref.detach(), **F64)
    torch.testing.assert_close(gx, xs.grad, **F64)
    torch.testing.assert_close(gw, plain.weight.grad, **F64)
    torch.testing.assert_close(gb, plain.bias.grad, **F64)
    _assert_same_buffers(ghost, plain, **F64)  # one update per virtual batch, in order
    assert int(ghost.num_batches_tracked) == n // k


@pytest.mark.parametrize("unbiased", [False, True])
def test_ghost_gradcheck_float64(unbiased):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: ghost_batch_norm_train(x, w, b, 3, 1e-5, unbiased)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_ghost_batch_sizes():
    ghost = GhostBatchNorm1d(3, ghost_batch_size=4)
    with pytest.raises(ValueError, match="not a multiple of ghost_batch_size 4"):
        ghost(torch.randn(6, 3))
    # A batch no larger than a virtual batch is one virtual batch.
    plain = ours.BatchNorm1d(3)
    x = torch.randn(3, 3)
    torch.testing.assert_close(ghost(x), plain(x))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        GhostBatchNorm1d(3, ghost_batch_size=1)(torch.randn(4, 3))


def test_ghost_eval_uses_the_running_statistics():
    ghost, ref = GhostBatchNorm1d(4, ghost_batch_size=2), nn.BatchNorm1d(4)
    _randomize(ghost, ref)
    x = torch.randn(8, 4)
    torch.testing.assert_close(ghost.eval()(x), ref.eval()(x))
    assert ghost.state_dict().keys() == ref.state_dict().keys()


# --- wiring: config, models, CLI ---------------------------------------------------------------------------

def test_make_norm_builds_the_variants():
    bn = {"variant": "renorm", "renorm": {"r_max": 2.0, "d_max": 1.0, "warmup_steps": 3, "r_max_steps": 9,
                                          "d_max_steps": 6}, "eps": 1e-3}
    layer = bn_layers(build_model(ModelConfig(bn=bn, hidden=[5]), (4,), 2))["h1"]
    assert isinstance(layer, BatchRenorm1d) and isinstance(layer, ours.BatchNormBase)
    assert (layer.r_max, layer.d_max, layer.warmup_steps, layer.r_max_steps, layer.d_max_steps) == (2.0, 1.0, 3, 9, 6)
    assert layer.eps == 1e-3
    cnn = build_model(ModelConfig(kind="cnn", channels=[4], bn={"variant": "ghost", "ghost_batch_size": 2}),
                      (1, 8, 8), 3)
    layer = bn_layers(cnn)["h1"]
    assert isinstance(layer, GhostBatchNorm2d) and layer.ghost_batch_size == 2
    assert cnn(torch.randn(4, 1, 8, 8)).shape == (4, 3)


TINY_RUN = {"device": "cpu", "data": {"batch_size": 8}, "model": {"hidden": [16, 16]},
            "train": {"steps": 12, "eval_every": 6, "log_every": 6, "checkpoint_every": 12},
            "probes": {"every": 6, "population_batches": 2}}


@pytest.mark.slow
@pytest.mark.parametrize("bn", [
    {"variant": "renorm", "renorm": {"warmup_steps": 2, "r_max_steps": 8, "d_max_steps": 6}},
    {"variant": "ghost", "ghost_batch_size": 2},
    {"precise": {"when": "eval", "batches": 3}},
    {"precise": {"when": "end", "batches": 3}},
])
def test_a_run_with_each_variant_completes(cli, write_config, bn):
    cfg = json.loads(json.dumps(TINY_RUN))
    cfg["model"]["bn"] = bn
    res = cli("train", "-c", write_config(cfg), "--out", "run", "-q")
    assert res.code == 0, res.err
    summary = json.loads((res.path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12
    assert 0 <= summary["test_accuracy"] <= 1 and "gap_accuracy" in summary
    saved = (res.path / "config.yaml").read_text()
    assert "variant: " + bn.get("variant", "bn") in saved


@pytest.mark.parametrize("overrides, key", [
    (["model.bn.variant=renorm", "model.norm=torch"], "model.bn.variant"),
    (["model.bn.variant=ghost", "model.norm=none"], "model.bn.variant"),
    (["model.bn.variant=batchrenorm"], "model.bn.variant"),
    (["model.bn.variant=ghost"], "model.bn.ghost_batch_size"),
    (["model.bn.variant=ghost", "model.bn.ghost_batch_size=7"], "data.batch_size"),
    (["model.bn.ghost_batch_size=4"], "model.bn.ghost_batch_size"),
    (["model.bn.variant=ghost", "model.bn.ghost_batch_size=1"], "model.bn.ghost_batch_size"),
    (["model.bn.variant=renorm", "model.bn.renorm.r_max=0.5"], "model.bn.renorm.r_max"),
    (["model.bn.variant=renorm", "model.bn.renorm.d_max_steps=10"], "model.bn.renorm.d_max_steps"),
    (["model.bn.renorm.rmax=3"], "model.bn.renorm.rmax"),
    (["model.bn.precise.when=always"], "model.bn.precise.when"),
    (["model.bn.precise.batches=0"], "model.bn.precise.batches"),
    (["model.bn.precise.when=eval", "model.norm=none"], "model.bn.precise.when"),
])
def test_bad_variant_configs_are_one_line_errors(cli, tiny_config, tmp_path, overrides, key):
    args = ["train", "-c", tiny_config, "--out", "run", "--set", "model.norm=bnexp"]  # tiny_config: torch's BN
    for o in overrides:
        args += ["--set", o]
    res = cli(*args)
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], res.err
    assert "Traceback" not in res.err
    assert not (tmp_path / "run").exists()


# --- presets and comparison configs ------------------------------------------------------------------------

def test_seed_note_preset_is_the_notes_choices():
    from bnexp.config import load
    from conftest import REPO

    bn = load(REPO / "configs" / "ablations" / "seed_note.yaml").model.bn
    assert (bn.momentum, bn.eps, bn.running_var_init, bn.unbiased_normalize) == (0.05, 1e-3, 0.0, True)
    layer = bn_layers(build_model(load(REPO / "configs" / "ablations" / "seed_note.yaml").model, (8,), 2))["h1"]
    assert torch.equal(layer.running_var, torch.zeros(100)) and layer.unbiased_normalize


@pytest.mark.parametrize("name, arms", [("small_batch", 16), ("running_stats", 5)])
def test_variant_comparison_configs_plan(name, arms):
    from bnexp.experiments.compare import load_compare, plan
    from conftest import REPO

    cmp = load_compare(REPO / "configs" / "compare" / f"{name}.yaml", [])
    jobs = plan(cmp)
    assert len(cmp.arm_names) == arms and len(jobs) == arms * len(cmp.seeds)
    if name == "small_batch":
        grid = {(j.cfg.data.batch_size, j.cfg.model.bn.variant, j.cfg.model.bn.precise.when) for j in jobs}
        assert grid == {(b, v, w) for b in (2, 4, 8, 32)
                        for v, w in (("bn", "never"), ("renorm", "never"), ("ghost", "never"), ("bn", "eval"))}
    else:
        assert {(j.cfg.model.bn.momentum, j.cfg.model.bn.precise.when) for j in jobs} == {
            (0.01, "never"), (0.1, "never"), (0.5, "never"), (None, "never"), (0.1, "eval")}
