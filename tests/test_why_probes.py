"""The probes of why BN helps (bnexp.probes: signal, rank, ics, landscape, sharpness) and noisy BN, each
against an independent computation, and the guarantee that probing never changes training."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnexp.config import apply_overrides, validate
from bnexp.data import load_dataset
from bnexp.engine import session
from bnexp.engine.rundir import read_metrics
from bnexp.models import build_model
from bnexp.nn.batchnorm import BatchNorm1d, BatchNorm2d
from bnexp.nn.noisy import NoisyBatchNorm1d, NoisyBatchNorm2d, paused_noise
from bnexp.probes import Probes

WHY = {"probes.signal": True, "probes.rank": True, "probes.ics": True, "probes.landscape": True,
       "probes.sharpness": True, "probes.sharpness_iters": 200}


def make(norm: str = "torch", kind: str = "mlp", **overrides):
    raw = {"seed": 5, "device": "cpu",
           "data": {"dataset": "synthetic", "batch_size": 12,
                    "synthetic": {"num_samples": 200, "num_features": 6, "num_classes": 3}},
           "model": {"kind": kind, "hidden": [7, 5], "channels": [3, 4], "norm": norm, "activation": "tanh"},
           "optim": {"lr": 0.3}, "train": {"steps": 30, "eval_every": 10, "log_every": 5, "checkpoint_every": 30},
           "probes": {"every": 10, "population_batches": 2, "units_per_layer": 2}}
    cfg = validate(apply_overrides(raw, overrides))
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    # Away from initialization: some training steps (which also move BN's running statistics).
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for i in range(5):
        idx = torch.arange(i * 12, i * 12 + 12)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cfg, data, model


def measured(cfg, data, model, lr: float = 0.1, **families) -> dict[str, float]:
    pcfg = cfg.probes.model_copy(update={"running_stats": False, "gap": False, "activations": False,
                                         "grad_norms": False, "signal": False, "rank": False, **families})
    probes = Probes(cfg.model_copy(update={"probes": pcfg}), model, data)
    return probes.measure(7, model, lr=lr), probes


def reference_loss(model, x, y):
    """A deep copy of the model in training mode: its loss and the gradients of all its parameters, by
    plain autograd (the copy's running statistics move; the model's do not)."""
    ref = copy.deepcopy(model).train()
    loss = F.cross_entropy(ref(x), y)
    ref.zero_grad()
    loss.backward()
    return ref, loss.item(), {n: p.grad.clone() for n, p in ref.named_parameters()}


def set_params(model, params):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])


@pytest.mark.parametrize("norm", ["none", "torch", "bnexp"])
def test_ics_is_santurkars_definition_by_plain_autograd(norm):
    cfg, data, model = make(norm)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    values, probes = measured(cfg, data, model, lr=0.1, ics=True)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())  # nothing moved
    x, y = data.x_train[probes.probe_idx], data.y_train[probes.probe_idx]
    _, _, g = reference_loss(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    weights = {"h2": "h2.layer.weight", "out": "out.weight"}
    assert sorted({t.split("/")[1] for t in values}) == sorted(weights)  # h1: nothing before it
    for layer, w in weights.items():
        ref = copy.deepcopy(model)
        current = dict(model.named_parameters())
        moved = {n: current[n] - 0.1 * g[n] if names.index(n) < names.index(w) else current[n] for n in names}
        set_params(ref, moved)
        _, _, g2 = reference_loss(ref, x, y)
        g_l, g_l2 = g[w].flatten(), g2[w].flatten()
        assert values[f"ics/{layer}/l2"] == pytest.approx((g_l - g_l2).norm().item(), rel=1e-4, abs=1e-7)
        cos = (g_l @ g_l2 / (g_l.norm() * g_l2.norm())).item()
        assert values[f"ics/{layer}/cos"] == pytest.approx(cos, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("norm", ["none", "bnexp"])
def test_landscape_is_santurkars_figure_4_by_plain_autograd(norm):
    cfg, data, model = make(norm, **{"probes.landscape_steps": [0.5, 2.0]})
    values, probes = measured(cfg, data, model, lr=0.2, landscape=True)
    x, y = data.x_train[probes.probe_idx], data.y_train[probes.probe_idx]
    _, loss0, g = reference_loss(model, x, y)
    g_flat = torch.cat([t.flatten() for t in g.values()])
    losses, changes, smooth = [loss0], [], []
    for s in (0.5, 2.0):
        ref = copy.deepcopy(model)
        set_params(ref, {n: p - s * 0.2 * g[n] for n, p in model.named_parameters()})
        _, loss_s, g_s = reference_loss(ref, x, y)
        losses.append(loss_s)
        change = (torch.cat([t.flatten() for t in g_s.values()]) - g_flat).norm().item()
        changes.append(change)
        smooth.append(change / (s * 0.2 * g_flat.norm().item()))
    assert values["landscape/loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-4)
    assert values["landscape/grad_pred"] == pytest.approx(max(changes), rel=1e-4)
    assert values["landscape/beta_smooth"] == pytest.approx(max(smooth), rel=1e-4)


@pytest.mark.parametrize("norm", ["none", "torch", "bnexp"])
def test_sharpness_is_the_top_eigenvalue_of_the_dense_hessian(norm):
    cfg, data, model = make(norm, **{"probes.sharpness_iters": 100})
    model = model.double()
    data.x_train, data.y_train = data.x_train.double(), data.y_train
    values, probes = measured(cfg, data, model, sharpness=True)
    x, y = data.x_train[probes.probe_idx], data.y_train[probes.probe_idx]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss_of(flat):
        params, i = {}, 0
        for n, shape in zip(names, shapes):
            params[n] = flat[i:i + shape.numel()].view(shape)
            i += shape.numel()
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        return F.cross_entropy(torch.func.functional_call(model.train(), (params, buffers), (x,)), y)

    eigs = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat0, vectorize=True))
    top = eigs[eigs.abs().argmax()].item()
    assert values["sharpness/top_eig"] == pytest.approx(top, rel=1e-3)


def test_signal_and_rank_of_each_block_by_direct_computation():
    cfg, data, model = make("bnexp")
    values, probes = measured(cfg, data, model, signal=True, rank=True)
    x = data.x_train[probes.probe_idx]
    ref = copy.deepcopy(model).train()
    outs = {}
    for name in ("h1", "h2"):
        ref.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: outs.__setitem__(n, o.detach()))
    ref(x)
    for name, out in outs.items():
        a = out.double().numpy()
        assert values[f"signal/{name}/sq_mean"] == pytest.approx(np.mean(a.mean(0) ** 2), rel=1e-9)
        assert values[f"signal/{name}/var"] == pytest.approx(np.mean(a.var(0)), rel=1e-9)
        s = np.linalg.svd(a, compute_uv=False)
        p = s / s.sum()
        assert values[f"rank/{name}"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert 1.0 <= values["rank/h1"] <= min(x.shape[0], 7)


def test_residual_blocks_report_their_branch_variance():
    cfg, data, model = make("group", kind="resnet", **{"data.dataset": "digits", "data.train_size": 100,
                                                       "data.test_size": 20, "model.depth": 8,
                                                       "model.width_factor": 0.25})
    values, probes = measured(cfg, data, model, signal=True)
    assert {"signal/stem/var", "signal/h1/branch_var", "signal/h3/branch_var", "signal/h3/var"} <= set(values)
    ref = copy.deepcopy(model).train()
    seen = {}
    ref.h2.conv2.register_forward_hook(lambda m, i, o: seen.__setitem__("branch", o.detach()))
    ref(data.x_train[probes.probe_idx])
    b = seen["branch"].transpose(0, 1).reshape(seen["branch"].shape[1], -1).double()
    assert values["signal/h2/branch_var"] == pytest.approx(b.var(1, unbiased=False).mean().item(), rel=1e-9)


# --- noisy BN ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, shape", [(NoisyBatchNorm1d, (16, 4)), (NoisyBatchNorm2d, (8, 3, 5, 5))])
def test_noisy_bn_is_santurkars_algorithm_1(cls, shape):
    torch.manual_seed(0)
    noisy = cls(shape[1], a=0.5, b=0.25, c=0.1, d=0.1).double()
    plain = {4: BatchNorm2d, 2: BatchNorm1d}[len(shape)](shape[1]).double()
    with torch.no_grad():
        noisy.weight.normal_()
        noisy.bias.normal_()
    plain.load_state_dict({k: v for k, v in noisy.state_dict().items() if k != "_extra_state"})
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    gen = torch.Generator()
    gen.set_state(noisy.generator.get_state())
    y = noisy(x)
    # The draws, written out: per channel mu ~ U(-a, a), sigma ~ U(1, 1+b); per example and position
    # m ~ U(mu - c, mu + c), s ~ N(sigma, d).
    c = shape[1]
    mu = (torch.rand(c, generator=gen, dtype=torch.float64) * 2 - 1) * 0.5
    sigma = 1 + torch.rand(c, generator=gen, dtype=torch.float64) * 0.25
    view = (1, c) + (1,) * (len(shape) - 2)
    m = mu.view(view) + (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * 0.1
    s = sigma.view(view) + torch.randn(shape, generator=gen, dtype=torch.float64) * 0.1
    torch.testing.assert_close(y, plain(x) * s + m)
    assert torch.equal(noisy.running_var, plain.running_var)  # BN's own statistics are the plain ones
    noisy.eval()
    plain.eval()
    torch.testing.assert_close(noisy(x), plain(x))  # no noise in eval mode
    quiet = cls(shape[1], a=0, b=0, c=0, d=0).double()
    quiet.load_state_dict(noisy.state_dict())
    torch.testing.assert_close(quiet.train()(x), plain.train()(x))
    with paused_noise(torch.nn.Sequential(noisy)):
        state = noisy.generator.get_state()
        noisy.train()(x)
        assert torch.equal(noisy.generator.get_state(), state)


# --- probing never changes training ------------------------------------------------------------------------

def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("variant", [{"model.norm": "torch"}, {"model.norm": "bnexp", "model.bn.variant": "noisy"}])
def test_every_new_probe_leaves_training_bit_identical(tmp_path, variant):
    why = {**WHY, "probes.sharpness_iters": 3}
    cfg_on, _, _ = make(**{"norm": variant["model.norm"]}, **{k: v for k, v in variant.items() if k != "model.norm"},
                        **why, **{"probes.every": 3})
    cfg_off = validate({**cfg_on.model_dump(mode="json"), "probes": {"enabled": False}})
    runs = {}
    for name, cfg in (("on", cfg_on), ("off", cfg_off)):
        (tmp_path / name).mkdir()
        session.train(cfg, tmp_path / name)
        runs[name] = torch.load(tmp_path / name / "checkpoints" / "step-00000030.pt", weights_only=True)
    for key in ("model", "optimizer", "rng"):  # weights, buffers, noisy BN's generators; optimizer; torch's RNG
        assert _same(runs["on"][key], runs["off"][key]), key
    rows = read_metrics(tmp_path / "on")
    tags = {k for r in rows for k in r}
    assert {"signal/h1/var", "rank/h2", "ics/out/cos", "landscape/beta_smooth"} <= tags
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.split("/")[0] in ("ics", "landscape"))


@pytest.mark.slow
def test_a_comparison_draws_each_familys_plots(tmp_path):
    import yaml

    from bnexp.cli import main

    cmp = {"name": "why", "seeds": [0, 1],
           "base": {"device": "cpu", "data": {"dataset": "digits", "batch_size": 30, "train_size": 300, "test_size": 60},
                    "model": {"kind": "mlp", "hidden": [12], "activation": "relu"}, "optim": {"lr": 0.05},
                    "train": {"steps": 3, "eval_every": 1, "log_every": 1, "checkpoint_every": 3},
                    "probes": {"every": 1, "ics": True, "landscape": True, "activations": False}},
           "grid": {"model.norm": ["bnexp", "none"], "model.depth": [2, 4]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cmp))
    assert main(["compare", "-c", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out"), "-q"]) == 0
    plots = tmp_path / "out" / "plots"
    for name in ("ics", "landscape", "signal", "rank", "init_depth", "init_layers", "sweep_depth"):
        assert (plots / f"{name}.png").stat().st_size > 0, name
        assert f"plots/{name}.png" in (tmp_path / "out" / "report.md").read_text()
