"""mlp and cnn builders with norm none | bnexp | torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnexp.nn import batchnorm as ours
from bnexp.config import ModelConfig
from bnexp.models import bn_layers, build_model, hidden_blocks

TORCH_BN = nn.modules.batchnorm._BatchNorm


def test_default_mlp_is_the_papers_mnist_net():
    model = build_model(ModelConfig(), (1, 8, 8), 10)
    blocks = hidden_blocks(model)
    assert list(blocks) == ["h1", "h2", "h3"]
    widths = [(b.layer.in_features, b.layer.out_features) for b in blocks.values()]
    assert widths == [(64, 100), (100, 100), (100, 100)]
    for b in blocks.values():
        assert isinstance(b.act, nn.Sigmoid)
        assert isinstance(b.norm, ours.BatchNorm1d) and b.norm.num_features == 100
        assert b.layer.bias is None  # BN's mean subtraction cancels a bias; beta takes its role
    assert list(bn_layers(model)) == ["h1", "h2", "h3"]
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)


@pytest.mark.parametrize("norm, cls", [("none", None), ("bnexp", ours.BatchNorm1d), ("torch", nn.BatchNorm1d)])
def test_mlp_norm_choices(norm, cls):
    model = build_model(ModelConfig(norm=norm, hidden=[7, 5], activation="relu"), (12,), 3)
    blocks = hidden_blocks(model)
    if cls is None:
        assert all(b.norm is None and b.layer.bias is not None for b in blocks.values())
        assert bn_layers(model) == {}
    else:
        assert [type(b.norm) for b in blocks.values()] == [cls, cls]
        assert [b.norm.num_features for b in blocks.values()] == [7, 5]
    assert model(torch.randn(4, 12)).shape == (4, 3)


def test_bn_options_reach_our_layer():
    cfg = ModelConfig(bn={"eps": 1e-3, "momentum": None, "running_var_init": 0.0, "unbiased_normalize": True})
    bn = bn_layers(build_model(cfg, (6,), 2))["h1"]
    assert bn.eps == 1e-3 and bn.momentum is None
    assert torch.equal(bn.running_var, torch.zeros(100))


def test_bn_after_activation_keeps_the_bias():
    model = build_model(ModelConfig(bn_position="after_activation", hidden=[4]), (3,), 2)
    block = hidden_blocks(model)["h1"]
    assert block.layer.bias is not None and not block.bn_first


@pytest.mark.parametrize("input_shape, conv, bn_cls, torch_bn", [
    ((1, 8, 8), nn.Conv2d, ours.BatchNorm2d, nn.BatchNorm2d),   # digits images
    ((1, 40), nn.Conv1d, ours.BatchNorm1d, nn.BatchNorm1d),     # mnist1d signals
    ((20,), nn.Conv1d, ours.BatchNorm1d, nn.BatchNorm1d),       # synthetic features, read as a signal
])
@pytest.mark.parametrize("norm", ["bnexp", "torch"])
def test_cnn_has_bn_after_each_conv(input_shape, conv, bn_cls, torch_bn, norm):
    model = build_model(ModelConfig(kind="cnn", norm=norm, channels=[4, 6, 8]), input_shape, 10)
    blocks = hidden_blocks(model)
    assert list(blocks) == ["h1", "h2", "h3"]
    expected = bn_cls if norm == "bnexp" else torch_bn
    for block, c in zip(blocks.values(), [4, 6, 8]):
        assert type(block.layer) is conv and block.layer.out_channels == c
        assert type(block.norm) is expected and block.norm.num_features == c
    assert len(bn_layers(model)) == 3
    # BN sits between the conv and the nonlinearity: hook the nonlinearity's input and check it is
    # normalized per channel in training mode.
    seen = {}
    blocks["h2"].act.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    model.train()
    out = model(torch.randn(16, *input_shape) * 3 + 2)
    assert out.shape == (16, 10)
    dims = [0] + list(range(2, seen["x"].dim()))
    assert torch.allclose(seen["x"].mean(dims), torch.zeros(6), atol=1e-5)
    assert torch.allclose(seen["x"].var(dims, unbiased=False), torch.ones(6), atol=1e-2)  # eps shrinks it a little


def test_cnn_without_norm_has_no_bn():
    model = build_model(ModelConfig(kind="cnn", norm="none"), (1, 8, 8), 10)
    assert bn_layers(model) == {} and all(b.norm is None for b in hidden_blocks(model).values())


def test_bnexp_and_torch_models_match_at_init():
    """Same seed, same weights, same outputs: our layer draws nothing from the RNG and starts like torch's."""
    x = torch.randn(32, 1, 8, 8)
    outs = []
    for norm in ("bnexp", "torch"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(norm=norm), (1, 8, 8), 10)
        outs.append((model(x), model.eval()(x)))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)
