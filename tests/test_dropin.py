"""Our BatchNorm1d/2d/3d as a drop-in for torch's in modern PyTorch, against torch's own references.

- PyTorch's module tests (test_modules.py) replayed on the inputs of its ModuleInfo entries
  (torch.testing._internal.common_modules): forward, factory kwargs, repr, pickle, non-contiguous
  input, gradcheck and gradgradcheck (total and partial), memory formats, train/eval, meta-device
  construction and the error inputs. Every check runs on torch's class first (it must pass there) and
  then on ours, and ours is also compared with torch's output.
- The batch-norm tests of PyTorch's test_nn (statistics updates, simple average, eval, channels_last,
  mixed precision, half overflow), torch.func (vmap, grad, functional_call, per-sample gradients, model
  ensembling, replace_all_batch_norm_modules_), batched gradients, torch.compile(fullgraph=True), torch's
  BN utilities finding our layers, and CUDA when there is one.
"""

from __future__ import annotations

import copy
import io
import itertools
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
from torch.testing._internal.common_utils import gradcheck, gradgradcheck
from torch.utils._pytree import tree_flatten

from bnexp.nn import kernel
from bnexp.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

OURS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
INFOS = {info.module_cls: info for info in module_db if info.module_cls in OURS}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _inputs(info, dtype, training, requires_grad=False, device="cpu"):
    # The ModuleInfo's own inputs (generated for torch's class: error inputs pick shapes by it).
    return info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=requires_grad,
                                   training=training)


def _both(check, both_paths: bool = True):
    """Run ``check(cls, info, training)`` with torch's class (which must pass), then with ours on both of
    its paths (the compiled kernel and the tensor ops), or as it runs by default for checks of structure
    rather than arithmetic."""

    @pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
    @pytest.mark.parametrize("torch_cls", list(OURS), ids=lambda c: c.__name__)
    def test(torch_cls, training):
        info = INFOS[torch_cls]
        check(torch_cls, info, training)
        for on in ((True, False) if both_paths else (True,)):
            with kernel.enabled(on):
                check(OURS[torch_cls], info, training)

    test.__name__ = check.__name__
    test.__doc__ = check.__doc__
    return test


def _make(cls, module_input, dtype, training):
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    m = cls(*args, **kwargs).to(dtype)
    m.train(training)
    return m


def _ref_pair(torch_cls, module_input, dtype, training):
    """Torch's layer and ours from the same constructor input, in the same state."""
    theirs = _make(torch_cls, module_input, dtype, training)
    ours = _make(OURS[torch_cls], module_input, dtype, training)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


# --- test_modules.py's checks ------------------------------------------------------------------------

def check_forward(cls, info, training):
    """test_forward: forward runs; .float()/.double() move parameters and buffers; ours equals torch's."""
    for dtype in (torch.float32, torch.float64):
        for mi in _inputs(info, dtype, training):
            m = _make(cls, mi, dtype, training)
            out = m(*mi.forward_input.args)
            for method, dt in (("float", torch.float32), ("double", torch.float64)):
                getattr(m, method)()
                m(*[a.to(dt) for a in mi.forward_input.args])
                assert all(t.dtype == dt for t in itertools.chain(m.parameters(), m.buffers()) if t.is_floating_point())
            if cls in OURS.values():
                ours, theirs = _ref_pair(info.module_cls, mi, dtype, training)
                torch.testing.assert_close(ours(*mi.forward_input.args), theirs(*mi.forward_input.args))
                for a, b in zip(ours.buffers(), theirs.buffers()):
                    torch.testing.assert_close(a, b)
            assert out.dtype == dtype


def check_factory_kwargs(cls, info, training):
    """test_factory_kwargs: device and dtype reach every parameter and buffer."""
    for mi in _inputs(info, torch.float64, training):
        m = cls(*mi.constructor_input.args, **mi.constructor_input.kwargs, device="cpu", dtype=torch.float64)
        for t in itertools.chain(m.parameters(), m.buffers()):
            assert t.device.type == "cpu"
            assert not t.is_floating_point() or t.dtype == torch.float64


def check_repr_and_pickle(cls, info, training):
    """test_repr and test_pickle (a whole module through torch.save / torch.load)."""
    for mi in _inputs(info, torch.float32, training):
        m = _make(cls, mi, torch.float32, training)
        assert repr(m) and str(m)
        out = m(*mi.forward_input.args)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        copy_ = torch.load(buf, weights_only=False)
        assert type(copy_) is cls
        torch.testing.assert_close(copy_(*mi.forward_input.args), out if not training else m(*mi.forward_input.args))


def _non_contiguous(t):
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    return out.requires_grad_(t.requires_grad)


def check_non_contiguous(cls, info, training):
    """test_non_contiguous_tensors: non-contiguous input and upstream gradient give the same results."""
    for mi in _inputs(info, torch.float64, training, requires_grad=True):
        m = _make(cls, mi, torch.float64, training)
        (x,) = mi.forward_input.args
        results = []
        grad = None
        for xi, contiguous_grad in itertools.product([x, _non_contiguous(x)], [True, False]):
            xi = xi.detach().requires_grad_()
            m.zero_grad()
            out = m(xi)
            grad = torch.randn_like(out) if grad is None else grad
            out.backward(grad if contiguous_grad else _non_contiguous(grad))
            results.append([out.detach(), xi.grad] + [p.grad for p in m.parameters()])
        for other in results[1:]:
            for a, b in zip(results[0], other):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def _gradients(cls, info, training, check):
    """test_grad / test_gradgrad: the total derivative, then each parameter's alone (float64), with
    PyTorch's testing defaults (fast mode, and batched gradients checked too)."""
    for mi in _inputs(info, torch.float64, training, requires_grad=True):
        m = _make(cls, mi, torch.float64, training)
        args = mi.forward_input.args
        params = tuple(m.parameters())
        if args[0].numel() == 0 and check is gradgradcheck:
            continue  # (torch's own gradgradcheck on an empty batch checks nothing either)

        def fn(*flat):
            return m(*flat[: len(args)])

        assert check(fn, args + params)
        saved = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        for p, old in zip(params, saved):
            p.requires_grad_(old)
            assert check(fn, args + params)
            p.requires_grad_(False)
        for p, old in zip(params, saved):
            p.requires_grad_(old)


def check_grad(cls, info, training):
    _gradients(cls, info, training, gradcheck)


def check_gradgrad(cls, info, training):
    _gradients(cls, info, training, gradgradcheck)


def check_memory_format(cls, info, training):
    """test_memory_format: channels_last input and module formats give the same outputs and gradients,
    and outputs and input gradients keep the input's format."""
    for mi in _inputs(info, torch.float32, training, requires_grad=True):
        (x,) = mi.forward_input.args
        formats = {4: torch.channels_last, 5: torch.channels_last_3d}
        fmt = formats.get(x.dim())
        if fmt is None:
            continue
        m = _make(cls, mi, torch.float32, training)
        ref = m(x)
        g = torch.rand_like(ref)
        diff_inputs = [x, *m.parameters()]
        ref_grads = torch.autograd.grad(ref, diff_inputs, g) if training else None
        for in_fmt in (torch.contiguous_format, fmt):
            xi = x.detach().clone().to(memory_format=in_fmt).requires_grad_()
            for mod_fmt in (torch.preserve_format, torch.contiguous_format, fmt):
                m.to(memory_format=mod_fmt)
                out = m(xi)
                torch.testing.assert_close(out, ref)
                assert out.is_contiguous(memory_format=in_fmt)
                if training:
                    grads = torch.autograd.grad(out, [xi, *m.parameters()], torch.empty_like(out).copy_(g))
                    torch.testing.assert_close(grads, ref_grads)
                    assert grads[0].is_contiguous(memory_format=in_fmt)


def check_train_and_eval_differ(cls, info, training):
    """test_if_train_and_eval_modes_differ: the forward reads `training` (train_and_eval_differ)."""
    if not training:
        return
    for mi in _inputs(info, torch.float32, training):
        m = _make(cls, mi, torch.float32, training)
        del m.training
        with pytest.raises(AttributeError, match="'training'"):
            m(*mi.forward_input.args)
    assert info.train_and_eval_differ


def check_device_ctx_init(cls, info, training):
    """test_device_ctx_init: built under torch.device('meta'), parameters and buffers are meta, with
    the metadata of a CPU-built module's."""
    for mi in _inputs(info, torch.float32, training):
        cpu = cls(*mi.constructor_input.args, **mi.constructor_input.kwargs)
        with torch.device("meta"):
            meta = cls(*mi.constructor_input.args, **mi.constructor_input.kwargs)
        for a, b in zip(itertools.chain(meta.parameters(), meta.buffers()),
                        itertools.chain(cpu.parameters(), cpu.buffers())):
            assert a.is_meta and a.shape == b.shape and a.dtype == b.dtype


def check_errors(cls, info, training):
    """test_errors: the ModuleInfo's error inputs (eps ≤ 0) raise the same error type and message."""
    for error in info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                               training=training):
        mi = error.module_error_input
        assert error.error_on == ModuleErrorEnum.FORWARD_ERROR
        m = cls(*mi.constructor_input.args, **mi.constructor_input.kwargs)
        with pytest.raises(error.error_type, match=error.error_regex):
            m(*mi.forward_input.args)


test_forward = _both(check_forward)
test_factory_kwargs = _both(check_factory_kwargs, both_paths=False)
test_repr_and_pickle = _both(check_repr_and_pickle, both_paths=False)
test_non_contiguous_tensors = _both(check_non_contiguous)
test_grad = _both(check_grad)
test_gradgrad = _both(check_gradgrad)
test_memory_format = _both(check_memory_format)
test_if_train_and_eval_modes_differ = _both(check_train_and_eval_differ, both_paths=False)
test_device_ctx_init = _both(check_device_ctx_init, both_paths=False)
test_errors = _both(check_errors, both_paths=False)


# --- test_nn's batch-norm tests -------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [BatchNorm1d, nn.BatchNorm1d])
def test_buffers_not_updated_when_stats_are_not_tracked(cls):
    bn = cls(3, track_running_stats=True)
    bn.track_running_stats = False
    before = [b.clone() for b in bn.buffers()]
    bn(torch.randn(4, 3))
    assert all(torch.equal(a, b) for a, b in zip(before, bn.buffers()))


def test_update_stats_and_simple_average(layer_path):
    """_test_batchnorm_update_stats and _test_batchnorm_simple_average: num_batches_tracked counts
    training batches only; momentum=None makes the running statistics the mean over batches."""
    torch.manual_seed(0)
    xs = [torch.randn(6, 3, 4, 4, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    bn = BatchNorm2d(3, momentum=None, dtype=torch.float64)
    for x in xs:
        bn(x)
    assert bn.num_batches_tracked.item() == 4
    means = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
    variances = torch.stack([x.transpose(0, 1).flatten(1).var(1) for x in xs]).mean(0)
    torch.testing.assert_close(bn.running_mean, means)
    torch.testing.assert_close(bn.running_var, variances)
    bn.eval()
    bn(xs[0])
    assert bn.num_batches_tracked.item() == 4


@pytest.mark.parametrize("track", [True, False])
def test_eval_mode_as_torch(track):
    """_test_batchnorm_eval: in eval mode the output does not depend on the rest of the batch (with
    running statistics) and backward twice gives the same gradient."""
    ours, theirs = BatchNorm1d(3, track_running_stats=track).eval(), nn.BatchNorm1d(3, track_running_stats=track).eval()
    x = torch.rand(4, 3, requires_grad=True)
    g = torch.rand(4, 3)
    for layer in (ours, theirs):
        x.grad = None
        layer(x).backward(g)
        first = x.grad.clone()
        x.grad = None
        layer(x).backward(g)
        torch.testing.assert_close(x.grad, first)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("shape,fmt", [((4, 8, 5, 5), torch.channels_last),
                                       ((2, 8, 3, 4, 5), torch.channels_last_3d)])
@pytest.mark.parametrize("training", [True, False])
def test_nhwc_as_torch(shape, fmt, training):
    """test_batchnorm_nhwc_cpu: channels_last input, output and input gradient stay channels_last (the
    tensor-op path: the kernel takes contiguous input only)."""
    torch.manual_seed(0)
    cls = {4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    theirs = cls(8).train(training)
    ours = OURS[cls](8).train(training)
    with torch.no_grad():
        theirs.weight.uniform_(), theirs.running_var.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape).to(memory_format=fmt)
    g = torch.randn(shape).to(memory_format=fmt)
    results = []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(g)
        assert y.is_contiguous(memory_format=fmt) and xi.grad.is_contiguous(memory_format=fmt)
        results.append((y, xi.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


# --- mixed precision ------------------------------------------------------------------------------------

@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["half", "bf16"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_mixed_precision_as_torch(low, memory_format):
    """Half/bfloat16 input to a float32 layer: output and input gradient in the input's dtype, parameter
    gradients and running statistics in the parameters' dtype, statistics computed in float32
    (torch's test_batchnorm_*_mixed; its CPU kernel refuses float64 parameters with such input)."""
    param_dtype = torch.float32
    torch.manual_seed(0)
    theirs = nn.BatchNorm2d(4, dtype=param_dtype)
    ours = BatchNorm2d(4, dtype=param_dtype)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5), theirs.bias.uniform_()
    ours.load_state_dict(theirs.state_dict())
    x = (torch.randn(3, 4, 5, 5) * 2 + 1).to(low).to(memory_format=memory_format)
    g = torch.randn(3, 4, 5, 5).to(low)
    for mode in ("train", "eval"):
        results = []
        for layer in (ours, theirs):
            getattr(layer, mode)()
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            y = layer(xi)
            y.backward(g)
            assert y.dtype == low and xi.grad.dtype == low and layer.weight.grad.dtype == param_dtype
            results.append([y.float(), xi.grad.float(), layer.weight.grad, layer.bias.grad,
                            layer.running_mean, layer.running_var])
        tol = dict(atol=2e-2, rtol=2e-2) if low == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
        for a, b in zip(*results):
            torch.testing.assert_close(a, b.to(a.dtype), **tol)


def test_half_statistics_do_not_overflow():
    """torch accumulates float16 statistics in float32: Σx² of a million values fits."""
    torch.manual_seed(0)
    bn = BatchNorm2d(2).half()
    y = bn(torch.randn(4, 2, 512, 512).half())
    assert torch.isfinite(y).all()
    assert abs(y.float().std().item() - 1) < 1e-2
    assert torch.isfinite(bn.running_var).all() and (bn.running_var - 1).abs().max() < 0.02


def test_autocast_cpu():
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNorm2d(8))
    theirs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = ours(x), theirs(x)
    assert y1.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y2)
    y1.float().sum().backward()
    assert ours[1].weight.grad.dtype == torch.float32 and ours[1].running_var.dtype == torch.float32
    torch.testing.assert_close(ours[1].running_var, theirs[1].running_var)


# --- torch.func, batched gradients, double backward ----------------------------------------------------

def _mlp(bn_cls):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), bn_cls(4), nn.Tanh(), nn.Linear(4, 2))


def _pair_models():
    ours, theirs = _mlp(BatchNorm1d), _mlp(nn.BatchNorm1d)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def test_replace_all_batch_norm_modules_and_vmap():
    """functorch's batch-norm recipe: replace_all_batch_norm_modules_ then vmap over a batch of batches;
    each vmapped batch is normalized by its own statistics."""
    ours, theirs = _pair_models()
    for m in (ours, theirs):
        torch.func.replace_all_batch_norm_modules_(m)
    assert ours[1].running_mean is None and not ours[1].track_running_stats
    x = torch.randn(3, 6, 5)
    torch.testing.assert_close(torch.func.vmap(ours)(x), torch.func.vmap(theirs)(x))
    torch.testing.assert_close(torch.func.vmap(ours)(x)[1], ours(x[1]))


def test_vmap_refuses_unbatched_running_statistics_as_torch():
    ours, theirs = _pair_models()
    x = torch.randn(3, 6, 5)
    with pytest.raises(RuntimeError):
        torch.func.vmap(theirs)(x)
    with pytest.raises(RuntimeError):
        torch.func.vmap(ours)(x)


@pytest.mark.parametrize("training", [True, False])
def test_grad_functional_call_and_per_sample_grads(layer_path, training):
    """torch.func.grad of functional_call, and vmap(grad) per-sample gradients (functorch's examples)."""
    ours, theirs = _pair_models()
    for m in (ours, theirs):
        m.train(training)
        if training:
            torch.func.replace_all_batch_norm_modules_(m)
    x, target = torch.randn(4, 6, 5), torch.randn(4, 6, 2)

    def loss(model, params, xb, tb):
        return F.mse_loss(torch.func.functional_call(model, params, (xb,)), tb)

    results = []
    for m in (ours, theirs):
        params = {k: v.detach() for k, v in m.named_parameters()}
        g = torch.func.grad(partial(loss, m))(params, x[0], target[0])
        per = torch.func.vmap(torch.func.grad(partial(loss, m)), in_dims=(None, 0, 0))(params, x, target)
        results.append((g, per))
    torch.testing.assert_close(results[0], results[1])


def test_model_ensembling_with_stack_module_state():
    """functorch's model-ensembling example: vmap over stacked parameters of several models."""
    models = [_mlp(BatchNorm1d) for _ in range(3)]
    refs = [_mlp(nn.BatchNorm1d) for _ in range(3)]
    for m, r in zip(models, refs):
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
        r.load_state_dict(m.state_dict())
        torch.func.replace_all_batch_norm_modules_(m)
        torch.func.replace_all_batch_norm_modules_(r)
    x = torch.randn(6, 5)
    outs = []
    for ms in (models, refs):
        params, buffers = torch.func.stack_module_state(ms)
        base = copy.deepcopy(ms[0]).to("meta")

        def run(p, b, x):
            return torch.func.functional_call(base, (p, b), (x,))

        outs.append(torch.func.vmap(run, in_dims=(0, 0, None))(params, buffers, x))
    torch.testing.assert_close(outs[0], outs[1])


def test_jacrev_and_hessian_as_torch():
    torch.manual_seed(0)
    # Without running statistics: a grad transform refuses the in-place update of captured buffers, in
    # torch's layer as in ours.
    ours = BatchNorm1d(3, dtype=torch.float64, track_running_stats=False)
    theirs = nn.BatchNorm1d(3, dtype=torch.float64, track_running_stats=False)
    x = torch.randn(5, 3, dtype=torch.float64)
    for fn in (torch.func.jacrev, torch.func.jacfwd, torch.func.hessian):
        f1 = fn(lambda t: ours(t).pow(3).sum() if fn is torch.func.hessian else ours(t))
        f2 = fn(lambda t: theirs(t).pow(3).sum() if fn is torch.func.hessian else theirs(t))
        torch.testing.assert_close(f1(x), f2(x))


@pytest.mark.parametrize("training", [True, False])
def test_is_grads_batched_as_torch(layer_path, training):
    torch.manual_seed(0)
    ours, theirs = BatchNorm2d(3).train(training), nn.BatchNorm2d(3).train(training)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    gs = torch.randn(5, 4, 3, 2, 2)
    results = []
    for layer in (ours, theirs):
        y = layer(x)
        results.append(torch.autograd.grad(y, (x, layer.weight), gs, is_grads_batched=True))
    torch.testing.assert_close(results[0], results[1])


# --- torch.compile --------------------------------------------------------------------------------------

def _recording_backend(graphs):
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph_matches_eager_without_torch_batch_norm(layer_path, training):
    """torch.compile(fullgraph=True) traces the layer whole (one graph, no break): training goes through
    our operator bnexp::batch_norm_train, and no graph holds a torch batch-norm op."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNorm2d(8), nn.ReLU()).train(training)
    traced = copy.deepcopy(eager)
    graphs: list[str] = []
    compiled = torch.compile(traced, fullgraph=True, backend=_recording_backend(graphs))
    x = torch.randn(4, 3, 8, 8)
    # Compiled, the backward is the tensor-op formula of _train_backward_differentiable, fused by the
    # compiler: float32 rounding differs from the eager kernel's.
    tol = dict(atol=1e-4, rtol=1e-4)
    for _ in range(2):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        torch.testing.assert_close(yc, ye)
        ye.pow(2).sum().backward()
        yc.pow(2).sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, **tol)
    for a, b in zip(eager.parameters(), traced.parameters()):
        torch.testing.assert_close(b.grad, a.grad, **tol)
    for a, b in zip(eager.buffers(), traced.buffers()):
        torch.testing.assert_close(b, a)
    code = "\n".join(graphs)
    assert graphs and "batch_norm(" not in code.replace("bnexp.batch_norm_train", "")
    assert ("bnexp.batch_norm_train" in code) == training


def test_compile_with_inductor_runs():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), BatchNorm1d(4), nn.ReLU())
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 5)
    torch.testing.assert_close(compiled(x), ref(x))
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    assert model[1].num_batches_tracked.item() == 1


def test_operator_passes_opcheck():
    """torch.library.opcheck: schema, fake implementation, autograd registration and dispatch agree."""
    from bnexp.nn.batchnorm import batch_norm_train_op

    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(batch_norm_train_op, (x, w, b, 1e-5, False))
    torch.library.opcheck(batch_norm_train_op, (x.detach().half(), None, None, 1e-5, True))


# --- torch's utilities find our layers ------------------------------------------------------------------

def test_torch_utilities_see_our_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNorm2d(4))
    assert isinstance(model[1], nn.modules.batchnorm._BatchNorm)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert isinstance(synced[1], nn.SyncBatchNorm)
    model.train()
    model(torch.randn(8, 3, 6, 6))
    model.eval()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


# --- CUDA -----------------------------------------------------------------------------------------------

@CUDA
@pytest.mark.parametrize("training", [True, False])
def test_cuda_matches_cudnn_with_autocast(training):
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNorm2d(8)).cuda().train(training)
    theirs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).cuda().train(training)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 8, 8, device="cuda")
    for autocast in (False, True):
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            y1, y2 = ours(x), theirs(x)
        assert y1.dtype == y2.dtype
        torch.testing.assert_close(y1, y2, atol=2e-3, rtol=2e-3)
        y1.float().sum().backward(), y2.float().sum().backward()
        torch.testing.assert_close(ours[1].weight.grad, theirs[1].weight.grad, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(ours[1].running_var, theirs[1].running_var, atol=2e-3, rtol=2e-3)


@CUDA
def test_cuda_compile():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNorm2d(8)).cuda()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8, device="cuda")
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), ref(x))
