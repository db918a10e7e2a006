"""BN's rivals and the networks BN research uses: the normalizers of model.norm, the resnet, vgg and linear
models, the regression task, CIFAR-style augmentation and budgets in epochs."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnexp.config import Config, ConfigError, validate
from bnexp.data import CropFlip, load_dataset
from bnexp.engine import session
from bnexp.engine.rundir import read_metrics, read_summary
from bnexp.models import bn_layers, build_model, hidden_blocks
from bnexp.models.blocks import PadShortcut
from bnexp.nn.factory import groups_for, make_norm

NORMS = ["none", "bnexp", "torch", "group", "layer", "instance"]
CONV = ("cnn", "resnet", "vgg")


def _model_cfg(**model):
    return validate({"model": {"activation": "relu", **model}}).model


# --- the normalizers -------------------------------------------------------------------------------------

def test_group_count_is_the_largest_divisor_up_to_norm_groups():
    assert [groups_for(w, 32) for w in (16, 32, 64, 100, 7, 1)] == [16, 32, 32, 25, 7, 1]
    assert make_norm(_model_cfg(norm="group"), 100, 0).num_groups == 25
    assert make_norm(_model_cfg(norm="group", norm_groups=4), 64, 2).num_groups == 4


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 7), (6, 5, 4, 3)])
def test_each_normalizer_computes_its_definition(shape):
    """Checked against torch.nn.functional with the layers' own affine parameters (set to random values)."""
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    c, spatial = shape[1], len(shape) - 2
    cv = (1, c) + (1,) * spatial
    for norm in ("group", "layer", "instance"):
        if norm == "instance" and spatial == 0:
            continue
        layer = make_norm(_model_cfg(kind="cnn", norm=norm, norm_groups=2 if norm == "group" else 32), c,
                          spatial).double()
        with torch.no_grad():
            layer.weight.normal_()
            layer.bias.normal_()
        w, b = layer.weight, layer.bias
        if norm == "group":
            want = F.group_norm(x, groups_for(c, 2), w, b, eps=layer.eps)
        elif norm == "layer" and spatial == 0:
            want = F.layer_norm(x, (c,), w, b, eps=layer.eps)
        elif norm == "layer":  # over channels and positions together, a scale and shift per channel
            want = F.layer_norm(x, x.shape[1:], eps=layer.eps) * w.view(cv) + b.view(cv)
        else:
            want = F.instance_norm(x, weight=w, bias=b, eps=layer.eps)
        torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)


def test_instance_norm_is_refused_for_vectors():
    with pytest.raises(ConfigError, match="model.norm: instance"):
        validate({"model": {"norm": "instance", "kind": "mlp"}})
    with pytest.raises(ConfigError, match="model.norm: instance"):
        make_norm(_model_cfg(kind="cnn", norm="instance"), 8, 0)


def test_only_batch_norms_take_model_bn_options():
    for norm in ("group", "layer", "none"):
        with pytest.raises(ConfigError, match="model.bn.precise.when"):
            validate({"model": {"norm": norm, "bn": {"precise": {"when": "eval"}}}})
        with pytest.raises(ConfigError, match="model.bn.variant"):
            validate({"model": {"norm": norm, "bn": {"variant": "renorm"}}})
    # Batch statistics need two values per channel; the rivals normalize one example.
    assert validate({"model": {"norm": "layer"}, "data": {"batch_size": 1}}).data.batch_size == 1


# --- the models ------------------------------------------------------------------------------------------

def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet_is_he_et_al_cifar_resnet():
    """He et al. 2016, Table 6: ResNet-20/32/56 have 0.27M/0.46M/0.85M parameters (option A, BN)."""
    for depth, millions in ((20, 0.27), (32, 0.46), (56, 0.85)):
        model = build_model(_model_cfg(kind="resnet", depth=depth, norm="torch"), (3, 32, 32), 10)
        assert round(_count(model) / 1e6, 2) == millions, depth
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) + 1 == depth  # the convolutions and the classifier
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    a = build_model(_model_cfg(kind="resnet", norm="torch", shortcut="A"), (3, 32, 32), 10)
    b = build_model(_model_cfg(kind="resnet", norm="torch", shortcut="B"), (3, 32, 32), 10)
    # Option B adds a 1x1 projection (and its BN) where the stage changes: 16->32 and 32->64.
    assert _count(b) - _count(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_option_a_shortcut_subsamples_and_pads_with_zeros():
    x = torch.randn(2, 3, 8, 8)
    y = PadShortcut(2, 5)(x)
    assert y.shape == (2, 8, 4, 4)
    assert torch.equal(y[:, :3], x[:, :, ::2, ::2]) and not y[:, 3:].any()


def test_resnet_stages_halve_the_resolution_while_it_stays_two_wide():
    model = build_model(_model_cfg(kind="resnet", depth=8, norm="none"), (1, 8, 8), 10)
    sizes = []
    model.get_submodule("h3").register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    model.get_submodule("h2").register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    model(torch.randn(2, 1, 8, 8))
    assert sorted(sizes, reverse=True) == [4, 2]
    signal = build_model(_model_cfg(kind="resnet", depth=8, norm="group"), (1, 40), 10)
    assert signal(torch.randn(2, 1, 40)).shape == (2, 10)


def test_vgg_layers_and_small_inputs():
    """VGG-11 and VGG-16 have 8 and 13 convolutions; every layer keeps at least 2x2 positions: 32x32 takes 4
    of the 5 pools, 8x8 digits 2."""
    for depth, convs in ((11, 8), (16, 13)):
        model = build_model(_model_cfg(kind="vgg", depth=depth, width_factor=0.125), (3, 32, 32), 10)
        assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == convs
        assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 4
    small = build_model(_model_cfg(kind="vgg", width_factor=0.125), (1, 8, 8), 10)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in small.modules()) == 2
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_deep_linear_network_is_linear_with_or_without_bn():
    without = build_model(_model_cfg(kind="linear", norm="none"), (10,), 10).double()
    assert len(hidden_blocks(without)) == 24 and not any(p.dim() == 1 for p in without.parameters())  # no bias
    x, y = torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64)
    torch.testing.assert_close(without(2 * x - 3 * y), 2 * without(x) - 3 * without(y))
    with_bn = build_model(_model_cfg(kind="linear", norm="bnexp"), (10,), 10).double().eval()
    assert len(bn_layers(with_bn)) == 24
    # In eval mode BN is an affine map per layer: the network is affine, f(x) - f(0) linear.
    zero = torch.zeros(1, 10, dtype=torch.float64)
    torch.testing.assert_close(with_bn(2 * x) - with_bn(zero), 2 * (with_bn(x) - with_bn(zero)))


# --- every normalizer and model trains, on every input shape it takes ---------------------------------------

def _write_cifar10(root, n_per_batch: int = 8):
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)


DATASETS = {  # dataset -> (data config, input shape)
    "synthetic": ({"dataset": "synthetic", "synthetic": {"num_samples": 80, "num_features": 12}}, (12,)),
    "digits": ({"dataset": "digits", "train_size": 64, "test_size": 24}, (1, 8, 8)),
    "mnist1d": ({"dataset": "mnist1d", "train_size": 64, "test_size": 24}, (1, 40)),
    "cifar10": ({"dataset": "cifar10", "augment": "crop_flip"}, (3, 32, 32)),
    "linear_regression": ({"dataset": "linear_regression", "linear_regression": {"num_samples": 64, "num_test": 16}},
                          (10,)),
}
TAKES = {  # model -> the datasets of the shapes it accepts
    "mlp": ("synthetic", "digits", "mnist1d", "linear_regression"),
    "linear": ("synthetic", "digits", "linear_regression"),
    "cnn": ("digits", "mnist1d", "cifar10"),
    "resnet": ("digits", "mnist1d", "cifar10"),
    "vgg": ("digits", "mnist1d", "cifar10"),
}
SMALL = {"mlp": {"hidden": [8, 8]}, "linear": {"depth": 4}, "cnn": {"channels": [4, 8]},
         "resnet": {"depth": 8, "width_factor": 0.25}, "vgg": {"width_factor": 0.0625}}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory, mnist1d_root):
    import torchvision.datasets.cifar as tv_cifar

    root = tmp_path_factory.mktemp("data")
    _write_cifar10(root)
    os.symlink(mnist1d_root / "mnist1d", root / "mnist1d", target_is_directory=True) if (
        mnist1d_root / "mnist1d").exists() else None
    real = tv_cifar.check_integrity
    # torchvision checks the md5 of the real files; these are small files in the real format.
    tv_cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
    yield root
    tv_cifar.check_integrity = real


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(TAKES))
def test_every_normalizer_and_model_trains_on_each_shape_it_takes(kind, cifar_root, tmp_path):
    for dataset in TAKES[kind]:
        data_cfg, shape = DATASETS[dataset]
        for norm in NORMS:
            if norm == "instance" and kind not in CONV:
                continue
            cfg = validate({"name": f"{kind}-{norm}", "device": "cpu",
                            "data": {**data_cfg, "root": str(cifar_root), "batch_size": 8},
                            "model": {"kind": kind, "norm": norm, "activation": "relu", **SMALL[kind]},
                            "optim": {"lr": 0.01},
                            "train": {"steps": 4, "eval_every": 2, "log_every": 2, "checkpoint_every": 4},
                            "probes": {"every": 2, "population_batches": 2, "units_per_layer": 1}})
            run_dir = tmp_path / f"{kind}-{dataset}-{norm}"
            run_dir.mkdir()
            summary = session.train(cfg, run_dir)
            what = f"{kind} {norm} on {dataset}"
            assert summary["status"] == "completed" and summary["steps"] == 4, what
            rows = read_metrics(run_dir)
            last = rows[-1]
            assert math.isfinite(last["train/loss"]) and math.isfinite(last["test/loss"]), what
            regression = dataset == "linear_regression"
            assert ("test/accuracy" in last) != regression and ("train/accuracy" in last) != regression, what
            # The activation and gradient probes work for all; the BN ones only where there is BN.
            assert any(k.startswith("activations/") for k in last) and any(k.startswith("grad_norm/") for k in last)
            bn = any(k.startswith("running_stats/") for k in last)
            assert bn == (norm in ("bnexp", "torch")), what
            assert all(v is None or math.isfinite(v) for v in last.values()), what
            if kind in CONV:
                assert tuple(load_dataset(cfg.data).input_shape) == shape


# --- the regression task ---------------------------------------------------------------------------------

def test_linear_regression_data_is_an_exact_linear_map():
    cfg = validate({"data": {"dataset": "linear_regression"}}).data
    data = load_dataset(cfg)
    assert data.regression and data.num_classes == 10
    assert data.x_train.shape == (1000, 10) and data.x_test.shape == (1000, 10)
    x, y = data.x_train.double(), data.y_train.double()
    a, residual, *_ = torch.linalg.lstsq(x, y)
    assert float(((x @ a - y) ** 2).mean()) < 1e-9  # y = A x exactly (float32 rounding aside)
    assert torch.equal(load_dataset(cfg).y_test, data.y_test)  # drawn from data.seed
    assert not torch.equal(load_dataset(cfg.model_copy(update={"seed": 1})).y_train, data.y_train)


def test_regression_reports_losses_and_no_accuracy(tmp_path):
    cfg = validate({"device": "cpu", "data": {"dataset": "linear_regression", "batch_size": 1000},
                    "model": {"kind": "linear", "norm": "bnexp"}, "optim": {"lr": 0.01},
                    "train": {"steps": 30, "eval_every": 10, "log_every": 5, "checkpoint_every": 30},
                    "probes": {"every": 10}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = session.train(cfg, run_dir)
    rows = read_metrics(run_dir)
    assert summary["test_accuracy"] is None and summary["best_test_accuracy"] is None
    losses = [r["test/loss"] for r in rows if "test/loss" in r]
    assert summary["best_test_loss"] == min(losses) and summary["test_loss"] == losses[-1]
    assert losses[-1] < losses[0]  # full-batch gradient descent fits y = A x
    assert not any("accuracy" in k for r in rows for k in r)
    last = rows[-1]
    assert last["gap/loss"] == pytest.approx(last["gap/train_mode_loss"] - last["gap/eval_mode_loss"])
    assert "gap_loss" in summary and "gap_accuracy" not in summary

    # The test loss is the MSE of the network in eval mode, computed here independently.
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    state = torch.load(run_dir / "checkpoints" / "step-00000030.pt", weights_only=True)["model"]
    model.load_state_dict(state)
    with torch.no_grad():
        want = F.mse_loss(model.eval()(data.x_test), data.y_test).item()
    assert summary["test_loss"] == pytest.approx(want, rel=1e-5)


def test_regression_divergence_is_measured_against_predicting_the_mean(tmp_path):
    """The chance loss of a regression is the targets' variance (the MSE of predicting their mean): a run
    diverges at the first step whose loss is not finite or ends a window of losses averaging more than
    1.5x that. Recomputed here with a plain loop; with ln(outputs) as the chance loss it would stop at
    step 3."""
    cfg = validate({"device": "cpu", "data": {"dataset": "linear_regression", "batch_size": 1000},
                    "model": {"kind": "linear", "norm": "none", "depth": 5}, "optim": {"lr": 0.2},
                    "train": {"steps": 60, "eval_every": 1000, "log_every": 1, "checkpoint_every": 1000,
                              "divergence_window": 3}, "probes": {"enabled": False}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = session.train(cfg, run_dir)
    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(model(data.x_train), data.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    limit = 1.5 * data.y_train.var(0).mean().item()
    first = next(s for s in range(1, 61) if not math.isfinite(losses[s - 1])
                 or (s >= 3 and sum(losses[s - 3:s]) / 3 > limit))
    assert first > 3 and (summary["status"], summary["diverged_step"]) == ("diverged", first)


# --- augmentation ----------------------------------------------------------------------------------------

def test_crop_flip_is_a_padded_crop_and_a_flip():
    x = torch.randn(6, 3, 8, 8)
    aug = CropFlip(seed=3)
    draws = aug.draw(6)
    got = CropFlip.apply(x, draws)
    padded = F.pad(x, (4, 4, 4, 4))
    for i, (dy, dx, flip) in enumerate(draws.tolist()):
        assert 0 <= dy <= 8 and 0 <= dx <= 8 and flip in (0, 1)
        crop = padded[i, :, dy:dy + 8, dx:dx + 8]
        assert torch.equal(got[i], crop.flip(-1) if flip else crop)
    assert torch.equal(CropFlip(seed=3).draw(6), draws)  # deterministic by seed
    torch.manual_seed(0)
    before = torch.get_rng_state()
    CropFlip(seed=4).draw(100)
    assert torch.equal(torch.get_rng_state(), before)  # training's RNG is never drawn from


def test_augmented_run_resumes_bit_identically(tmp_path):
    import signal

    raw = {"device": "cpu", "data": {"dataset": "digits", "batch_size": 32, "augment": "crop_flip"},
           "model": {"kind": "cnn", "channels": [4, 8], "norm": "bnexp", "activation": "relu"},
           "optim": {"lr": 0.1}, "train": {"steps": 40, "eval_every": 20, "log_every": 5, "checkpoint_every": 40},
           "probes": {"enabled": False}}
    cfg = validate(raw)
    whole = tmp_path / "whole"
    whole.mkdir()
    session.train(cfg, whole)

    class Stop:
        def after_step(self, trainer, step):
            if step == 17:
                os.kill(os.getpid(), signal.SIGINT)

    cut = tmp_path / "cut"
    cut.mkdir()
    with pytest.raises(session.Interrupted):
        session.train(cfg, cut, callbacks=[Stop()])
    assert read_summary(cut)["steps"] == 17
    session.resume(cut)
    assert read_metrics(cut) == read_metrics(whole)
    a = torch.load(whole / "checkpoints" / "step-00000040.pt", weights_only=True)["model"]
    b = torch.load(cut / "checkpoints" / "step-00000040.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Augmentation changes what trains: not the run without it.
    plain = tmp_path / "plain"
    plain.mkdir()
    session.train(validate({**raw, "data": {"dataset": "digits", "batch_size": 32}}), plain)
    assert read_metrics(plain) != read_metrics(whole)


# --- budgets in epochs -----------------------------------------------------------------------------------

def test_epochs_set_the_steps_from_the_training_set(tmp_path):
    cfg = validate({"device": "cpu", "data": {"dataset": "digits", "batch_size": 100},
                    "model": {"hidden": [8]}, "train": {"epochs": 3, "eval_every": 1000, "checkpoint_every": 1000},
                    "probes": {"enabled": False}})
    n = len(load_dataset(cfg.data).y_train)
    run_dir, summary = session.start(cfg, tmp_path / "run")
    assert summary["steps"] == 3 * (n // 100) == 42
    saved = validate(__import__("yaml").safe_load((run_dir / "config.yaml").read_text()))
    assert (saved.train.epochs, saved.train.steps) == (3, 42)
    assert Config().train.epochs is None
