"""bnexp.nn.batchnorm against torch.nn.BatchNorm*d, the paper's identities, and the seed note's bugs."""

from __future__ import annotations

import copy
import gc
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bnexp.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormBase,
    BatchNormEvalFunction,
    BatchNormTrainFunction,
)

# Every test here runs on both of the layer's paths: the compiled kernel and the tensor ops.
pytestmark = pytest.mark.usefixtures("layer_path")

# Small shapes, channels = 3, with room for several values per channel.
SHAPES = {2: (8, 3), 3: (4, 3, 5), 4: (3, 3, 4, 5), 5: (2, 3, 3, 2, 4)}
OURS = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}
THEIRS = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_close(ours, theirs, dtype, what=""):
    """Relative to the expected tensor's scale (elementwise relative error is meaningless near 0)."""
    assert (ours is None) == (theirs is None), what
    if ours is None:
        return
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, what
    if ours.numel() == 0:
        return
    scale = max(1.0, theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max abs err {err:.3g} (scale {scale:.3g})"


def make_pair(rank, dtype=torch.float64, seed=0, **kwargs):
    """Our layer and torch's with identical (non-trivial) parameters."""
    torch.manual_seed(seed)
    ours = OURS[rank](3, dtype=dtype, **kwargs)
    theirs = THEIRS[rank](3, dtype=dtype, **{k: v for k, v in kwargs.items() if k in _TORCH_KWARGS})
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


_TORCH_KWARGS = {"eps", "momentum", "affine", "track_running_stats", "bias"}


def step_both(ours, theirs, x, g, dtype, what):
    """One forward/backward through both layers; compare output, all gradients and buffers."""
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    assert_close(y1, y2, dtype, f"{what} output")
    y1.backward(g)
    y2.backward(g)
    assert_close(x1.grad, x2.grad, dtype, f"{what} input grad")
    for name, p in ours.named_parameters():
        assert_close(p.grad, getattr(theirs, name).grad, dtype, f"{what} {name} grad")
    for name, b in ours.named_buffers():
        tb = getattr(theirs, name)
        if b.dtype == torch.long:
            assert torch.equal(b, tb), f"{what} {name}"
        else:
            assert_close(b, tb, dtype, f"{what} {name}")
    ours.zero_grad()
    theirs.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("momentum", [0.1, 0.7, None], ids=["m0.1", "m0.7", "mNone"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)],
                         ids=["affine", "affine-nobias", "noaffine"])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_matches_torch(rank, affine, bias, track, momentum, dtype):
    ours, theirs = make_pair(rank, dtype, affine=affine, bias=bias, track_running_stats=track,
                             momentum=momentum)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    gen = torch.Generator().manual_seed(1)
    shape = SHAPES[rank]
    for i in range(4):
        # Non-zero mean and non-unit scale, so the running statistics move visibly.
        x = (torch.randn(shape, generator=gen) * 2.5 + 1.5).to(dtype)
        g = torch.randn(shape, generator=gen).to(dtype)
        step_both(ours, theirs, x, g, dtype, f"train step {i}")
    ours.eval()
    theirs.eval()
    for i in range(2):
        x = (torch.randn(shape, generator=gen) * 2.5 + 1.5).to(dtype)
        g = torch.randn(shape, generator=gen).to(dtype)
        step_both(ours, theirs, x, g, dtype, f"eval step {i}")


def test_channels_last_and_noncontiguous_grad_match_torch():
    ours, theirs = make_pair(4)
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    g = torch.randn(4, 6, 5, 3, dtype=torch.float64).permute(0, 3, 2, 1)  # non-contiguous upstream grad
    step_both(ours, theirs, x, g, torch.float64, "channels_last")
    ours.eval(), theirs.eval()
    step_both(ours, theirs, x, g, torch.float64, "channels_last eval")


def test_backward_goes_through_our_functions():
    bn = BatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert type(bn(x).grad_fn).__name__ == "BatchNormTrainFunctionBackward"
    assert bn(x).grad_fn.__class__ is BatchNormTrainFunction._backward_cls
    bn.eval()
    assert bn(x).grad_fn.__class__ is BatchNormEvalFunction._backward_cls


def test_train_function_returns_the_batch_statistics_outside_autograd():
    # The variants build on these: running updates per virtual batch, Batch Renorm's r and d.
    x = (torch.randn(6, 3, 4, dtype=torch.float64) * 2 + 5).requires_grad_()
    y, mean, var = BatchNormTrainFunction.apply(x, None, None, 1e-5, True, None, None)
    ref_var, ref_mean = torch.var_mean(x.detach(), (0, 2), correction=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12)  # biased, even when normalizing by s²
    assert y.requires_grad and not mean.requires_grad and not var.requires_grad


def test_gradcheck_train_eval_unbiased():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    for unbiased in (False, True):
        bn = BatchNorm1d(3, dtype=torch.float64, unbiased_normalize=unbiased)
        with torch.no_grad():
            bn.weight.normal_()
            bn.bias.normal_()
        assert torch.autograd.gradcheck(lambda x, w, b: _functional(bn, x, w, b), (x, bn.weight, bn.bias))
        bn.eval()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        assert torch.autograd.gradcheck(lambda x, w, b: _functional(bn, x, w, b), (x, bn.weight, bn.bias))
    # 2D input and no affine parameters.
    x2 = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    bn = BatchNorm1d(3, affine=False, dtype=torch.float64, unbiased_normalize=True)
    assert torch.autograd.gradcheck(bn, (x2,))


def _functional(bn, x, w, b):
    # Route gradcheck's perturbed weight/bias through the module.
    saved = bn.weight, bn.bias
    try:
        del bn.weight, bn.bias
        bn.weight, bn.bias = w, b
        return bn(x)
    finally:
        del bn.weight, bn.bias
        bn.weight, bn.bias = saved


def test_unbiased_normalize_forward():
    x = torch.randn(5, 3, 4, dtype=torch.float64) * 2 + 1
    bn = BatchNorm1d(3, dtype=torch.float64, unbiased_normalize=True)
    var = torch.var(x, dim=(0, 2), keepdim=True)  # unbiased, as the seed note
    expected = (x - x.mean(dim=(0, 2), keepdim=True)) / torch.sqrt(var + bn.eps)
    assert_close(bn(x), expected, torch.float64)
    # Running statistics are still the paper's, whichever variance normalizes.
    ref = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    ref(x)
    assert_close(bn.running_var, ref.running_var, torch.float64)


def test_scale_invariance():
    """Section 3.3: BN((aW)u) = BN(Wu) and ∂ℓ/∂(aW) = (1/a)·∂ℓ/∂W."""
    torch.manual_seed(0)
    a = 7.5
    u = torch.randn(16, 5, dtype=torch.float64)
    w = torch.randn(4, 5, dtype=torch.float64)
    g = torch.randn(16, 4, dtype=torch.float64)
    bn = BatchNorm1d(4, dtype=torch.float64, eps=0.0 + 1e-300)  # ε breaks exact invariance; make it tiny
    outs, grads = [], []
    for scale in (1.0, a):
        W = (scale * w).requires_grad_()
        y = bn(u @ W.T)
        y.backward(g)
        outs.append(y.detach())
        grads.append(W.grad)
    assert_close(outs[1], outs[0], torch.float64)
    assert_close(grads[1], grads[0] / a, torch.float64)


def test_buffers_hold_no_graph_and_memory_is_flat():
    bn = BatchNorm1d(3)
    x = torch.randn(4, 3, requires_grad=True)

    def step():
        bn(x).sum().backward()

    step()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        buf = getattr(bn, name)
        assert not buf.requires_grad and buf.grad_fn is None, name
    assert set(dict(bn.named_buffers())) == {"running_mean", "running_var", "num_batches_tracked"}

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():  # isinstance on some gc'd module proxies warns about deprecation
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for _ in range(100):
        step()
    before = live_tensors()
    for _ in range(10_000):
        step()
    assert live_tensors() <= before
    assert bn.num_batches_tracked.item() == 10_101


def _tweak(module):
    with torch.no_grad():
        for t in itertools.chain(module.parameters(), module.buffers()):
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
            else:
                t.fill_(17)


@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"bias": False}, {"track_running_stats": False}])
@pytest.mark.parametrize("rank", [2, 4, 5])
def test_state_dict_round_trips(rank, kwargs):
    ours = OURS[rank](3, **kwargs)
    theirs = THEIRS[rank](3, **kwargs)
    _tweak(ours)
    sd = ours.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sd._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"]
    theirs.load_state_dict(sd)  # strict
    for k, v in theirs.state_dict().items():
        assert torch.equal(v, sd[k]), k
    fresh = OURS[rank](3, **kwargs)
    _tweak(theirs)
    fresh.load_state_dict(theirs.state_dict())
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k]), k


def test_old_state_dict_without_num_batches_tracked():
    old = torch.nn.BatchNorm2d(3).state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    ours, theirs = BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    ours.num_batches_tracked.fill_(5)
    theirs.num_batches_tracked.fill_(5)
    ours.load_state_dict(_copy_sd(old))
    theirs.load_state_dict(_copy_sd(old))
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 5
    # Without version metadata at all, as in a hand-built dict.
    ours.load_state_dict({k: v for k, v in old.items()})
    # A current (version 2) dict missing the key is an error, as in torch.
    new = BatchNorm2d(3).state_dict()
    del new["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        BatchNorm2d(3).load_state_dict(new)
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        torch.nn.BatchNorm2d(3).load_state_dict(_copy_sd(new))


def _copy_sd(sd):
    out = type(sd)((k, v.clone()) for k, v in sd.items())
    out._metadata = {k: dict(v) for k, v in sd._metadata.items()}
    return out


def test_to_moves_buffers_and_params():
    bn = BatchNorm2d(3).to(torch.float64)
    assert bn.running_mean.dtype == bn.running_var.dtype == bn.weight.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long
    bn(torch.randn(2, 3, 2, 2, dtype=torch.float64))
    assert bn.running_mean.dtype == torch.float64


def test_running_var_init_zero():
    bn = BatchNorm1d(3, running_var_init=0.0)
    assert torch.equal(bn.running_var, torch.zeros(3))
    x = torch.randn(6, 3)
    bn(x)
    assert torch.allclose(bn.running_var, 0.1 * x.var(0))
    bn.reset_running_stats()
    assert torch.equal(bn.running_var, torch.zeros(3)) and bn.num_batches_tracked.item() == 0
    bn.eval()
    assert torch.isfinite(bn(x)).all()
    assert torch.equal(BatchNorm1d(3).running_var, torch.ones(3))
    assert "running_var_init=0.0" in repr(BatchNorm1d(3, running_var_init=0.0))


def test_reset_parameters_and_constructor():
    bn = BatchNorm1d(3)
    _tweak(bn)
    bn.reset_parameters()
    assert torch.equal(bn.weight, torch.ones(3)) and torch.equal(bn.bias, torch.zeros(3))
    assert torch.equal(bn.running_mean, torch.zeros(3)) and bn.num_batches_tracked.item() == 0
    with pytest.raises(TypeError):
        BatchNorm1d(3, 1e-5, 0.1, True, True, None, None, False)  # bias is keyword-only, as in torch
    nb = BatchNorm1d(3, bias=False)
    assert nb.bias is None and "bias" not in nb.state_dict() and [n for n, _ in nb.named_parameters()] == ["weight"]
    assert repr(nb) == repr(torch.nn.BatchNorm1d(3, bias=False))
    nt = BatchNorm2d(3, track_running_stats=False)
    assert nt.running_mean is None and nt.running_var is None and nt.num_batches_tracked is None
    assert isinstance(nt, BatchNormBase) and isinstance(nt, torch.nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("rank,shape", [(2, (1, 3)), (3, (1, 3, 1)), (4, (1, 3, 1, 1)), (5, (1, 3, 1, 1, 1))])
def test_one_value_per_channel_error(rank, shape):
    x = torch.randn(shape)
    with pytest.raises(ValueError) as theirs:
        THEIRS[rank](3)(x)
    with pytest.raises(ValueError) as ours:
        OURS[rank](3)(x)
    assert str(ours.value) == str(theirs.value)
    assert str(ours.value).startswith("Expected more than 1 value per channel when training, got input size")
    # Fine in eval with running statistics, as in torch; still an error without them.
    OURS[rank](3).eval()(x)
    with pytest.raises(ValueError, match="more than 1 value"):
        OURS[rank](3, track_running_stats=False).eval()(x)


def test_wrong_rank_and_channel_errors():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input of shape \(2, 3, 4\)\)"):
        BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D"):
        BatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"expected 5D input"):
        BatchNorm3d(3)(torch.randn(2, 3, 4, 4))
    for kwargs in ({}, {"affine": False, "track_running_stats": False}):
        with pytest.raises(RuntimeError, match=r"expected input with 3 channels.*\(2, 4, 5, 5\)"):
            BatchNorm2d(3, **kwargs)(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="eps must be positive"):
        BatchNorm1d(3, eps=0.0)(torch.randn(4, 3))


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_empty_batch_as_torch(shape, mode):
    ours, theirs = make_pair(len(shape))
    getattr(ours, mode)()
    getattr(theirs, mode)()
    step_both(ours, theirs, torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64),
              torch.float64, "empty")
    # Statistics untouched but the batch counted (torch's behaviour).
    assert torch.equal(ours.running_mean, torch.zeros(3))
    assert ours.num_batches_tracked.item() == (1 if mode == "train" else 0)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def test_no_torch_batch_norm_kernel(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch batch-norm called")

    for mod, name in [(F, "batch_norm"), (torch, "batch_norm"), (torch, "native_batch_norm"),
                      (torch, "_native_batch_norm_legit"), (torch, "_native_batch_norm_legit_no_training"),
                      (torch, "batch_norm_elemt"), (torch, "batch_norm_stats")]:
        if hasattr(mod, name):
            monkeypatch.setattr(mod, name, boom)
    recorder = _RecordOps()
    with recorder:
        for rank, shape in SHAPES.items():
            for unbiased in (False, True):
                bn = OURS[rank](3, unbiased_normalize=unbiased)
                for mode in ("train", "eval"):
                    getattr(bn, mode)()
                    x = torch.randn(shape, requires_grad=True)
                    bn(x).backward(torch.randn(shape))
    assert recorder.ops, "dispatch recorder saw nothing"
    assert not [op for op in recorder.ops if "norm" in op and "vector_norm" not in op], recorder.ops


def test_no_torch_batch_norm_under_transforms_and_mixed_precision():
    """Double backward, batched gradients, half/bfloat16 input and vmap: still none of torch's BN ops."""
    recorder = _RecordOps()
    bn = BatchNorm2d(3, dtype=torch.float64)
    with recorder:
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
        (gx,) = torch.autograd.grad(bn(x).pow(3).sum(), x, create_graph=True)
        gx.sum().backward()
        torch.autograd.grad(bn(x), x, torch.randn(2, 4, 3, 2, 2, dtype=torch.float64), is_grads_batched=True)
        bn.float()
        bn(torch.randn(4, 3, 2, 2).half().requires_grad_()).float().sum().backward()
        bn.eval()
        bn(torch.randn(4, 3, 2, 2).bfloat16())
        functional = copy.deepcopy(bn).train()
        torch.func.replace_all_batch_norm_modules_(functional)
        torch.func.vmap(functional)(torch.randn(2, 4, 3, 2, 2))
    assert "bnexp.batch_norm_train.default" in recorder.ops  # (vmap goes through our operator)
    assert not [op for op in recorder.ops if "norm" in op and not op.startswith(("aten.linalg_vector_norm", "bnexp."))]


def test_eval_without_running_stats_uses_batch_statistics():
    ours, theirs = make_pair(3, track_running_stats=False)
    ours.eval(), theirs.eval()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    step_both(ours, theirs, x, torch.randn_like(x), torch.float64, "eval notrack")
    assert ours(x).grad_fn.__class__ is BatchNormTrainFunction._backward_cls


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_gradgradcheck_train_and_eval(rank, mode):
    """The backward is differentiable again (Hessian-vector products, gradient penalties), in float64."""
    ours, _ = make_pair(rank, unbiased_normalize=rank == 3)
    getattr(ours, mode)()
    with torch.no_grad():
        ours.running_mean.normal_()
        ours.running_var.uniform_(0.5, 2.0)
    x = torch.randn(SHAPES[rank], dtype=torch.float64, requires_grad=True)
    w, b = ours.weight.detach().requires_grad_(), ours.bias.detach().requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(ours, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_double_backward_matches_torch():
    ours, theirs = make_pair(4)
    x = torch.randn(SHAPES[4], dtype=torch.float64) * 2 + 1
    v = torch.randn(SHAPES[4], dtype=torch.float64)
    results = []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(layer(xi).pow(3).sum(), xi, create_graph=True)
        hv = torch.autograd.grad((gx * v).sum(), [xi, layer.weight])  # a Hessian-vector product
        results.append((gx.detach(), *hv))
    for got, want in zip(*results):
        assert_close(got, want, torch.float64, "double backward")
