"""Batch normalization written by us (Ioffe & Szegedy 2015, Algorithms 1 and 2): a compiled kernel and tensor ops.

Drop-in for ``torch.nn.BatchNorm1d/2d/3d``: subclasses of torch's ``_BatchNorm`` (same constructor,
parameter and buffer names, state-dict format and errors, and ``isinstance`` for torch's utilities), but
our forward, no call into torch's batch-norm kernels, and a hand-written backward (the paper's Section 3
gradients) that is itself differentiable.

Conventions are those of docs/design.md section 1: normalize with the biased batch variance, update
``running_var`` with the unbiased one, ``momentum`` is the weight of the new batch (PyTorch's), and
``momentum=None`` is the cumulative average over ``num_batches_tracked``.

Two paths compute the same thing. Contiguous float32/float64 CPU input goes to our compiled kernel
(bn_kernel.c via bnexp.nn.kernel): two passes per direction and one foreign call each, statistics
accumulated in double, channels split over torch's threads. Everything else (channels_last or strided
input, half and bfloat16 (computed in float32), other devices, synchronized BN, or no C compiler) takes
the tensor-op path below. Tests run every comparison with torch on both.

Three ways in (docs/design.md section 4): eager calls on ordinary tensors take the autograd.Functions
below, which call the arithmetic directly; torch.compile takes the registered operator
``bnexp::batch_norm_train``; torch.func transforms take that operator through _TrainOpFunction.

Notes on the tensor-op path (measured with bnexp/bench/layer.py on a 2-core CPU): a fresh full-size
tensor costs more than a pass over one that exists (its pages fault in), so forward allocates only ``y``
and backward only ``dx``, and both buffers double as scratch. Forward writes x − mean into ``y``, reduces
the squares from there (two-pass variance, no cancellation for inputs with a large mean), then makes y in
place. Backward writes g·x into ``dx`` for Σg·x, then overwrites it with dx = g·k + x·a + b.
torch.var_mean, vecdot and bmm were all measured slower than these sums (see the helpers' docstrings).
On small inputs the cost is per-op and autograd.Function overhead, not arithmetic.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd import Function
from torch.autograd.graph import increment_version
from torch.nn.modules.batchnorm import _BatchNorm

from bnexp.nn import kernel as _kernel
from bnexp.nn.sync import all_reduce_sum, all_reduce_sum_and_count, sync_group

__all__ = [
    "BatchNormBase",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormTrainFunction",
    "BatchNormEvalFunction",
    "batch_norm_train",
    "batch_norm_train_op",
    "batch_norm_eval",
    "grouped_train_forward",
    "kernel_for",
]


def _channel_view(x: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against ``x`` (channels on dim 1)."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """v (C,) viewed to broadcast against x; on (N, C) input it already does (a view costs ~1 µs)."""
    return v if x.dim() == 2 else v.view(_channel_view(x))


def _reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


# Below this many elements the elementwise loops are too short for vectorisation to matter, and the
# extra ops of _vector_shift cost more than they save.
_VECTORISE_MIN_NUMEL = 1 << 15


def _is_rows(x: Tensor) -> bool:
    """True for contiguous NC* data with more than one value per (n, c) plane: the planes are rows."""
    return x.dim() > 2 and x.is_contiguous() and x.numel() > x.shape[0] * x.shape[1]


def _vector_shift(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel shift shaped for torch's vectorised elementwise loops over x.

    Those loops vectorise only when at most one operand is a broadcast scalar in the innermost
    dimension. On NC* contiguous data a (1, C, 1, ...) view is such a scalar, so y = x·scale + shift with
    two of them runs a scalar loop, about 2x slower; materialising the shift over one sample (C·L
    values, small next to x) keeps the loop vectorised. Channels-innermost data needs nothing.
    """
    if _is_rows(x) and x.numel() >= _VECTORISE_MIN_NUMEL:
        return v.view(_channel_view(x)).expand((1, *x.shape[1:])).contiguous()
    return _per_channel(v, x)


def _batch_stats(x: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor, int, bool]:
    """Per-channel mean, biased variance and count m of a batch, two-pass (no cancellation).

    ``scratch`` (shaped like x) receives x − mean. Returns (mean, var, m, centred): when ``centred`` the
    scratch still holds x − mean, otherwise it was used up squaring. The scratch is the output buffer,
    so that forward allocates nothing full-size but y (_synced_batch_stats keeps the same contract).

    torch.var_mean would be the obvious single fused pass, but on CPU over dims (0, 2, ...) it measures
    10-70x slower than sum (its Welford loop does not vectorise), so this is sum, subtract, and a
    squared reduction.
    """
    m = x.numel() // x.shape[1]
    if _is_rows(x):
        # Row sums over the contiguous last dim are accurate (cascade summation) and as fast as one
        # multi-dim sum; adding the (N, C) partials in float64 keeps the mean of large-mean inputs to
        # about an ulp (a plain sum over (0, 2, ...) was measured ~7x further off at mean/std = 1000).
        mean = x.view(x.shape[0], x.shape[1], -1).sum(2).sum(0, dtype=torch.float64).div_(m).to(x.dtype)
    else:
        mean = x.sum(_reduce_dims(x)).div_(m)  # x.mean costs more per call on small inputs, same arithmetic
    torch.sub(x, _per_channel(mean, x), out=scratch)
    if _is_rows(x):
        # vector_norm over a contiguous last dim is a fused, vectorised square-and-sum (over several
        # dims at once it is ~10x slower than sum), and it leaves x − mean intact for the output.
        rows = scratch.view(x.shape[0], x.shape[1], -1)
        var = torch.linalg.vector_norm(rows, dim=2).square_().sum(0).div_(m)
        return mean, var, m, True
    # Channels innermost ((N, C) or channels_last): square in place, then a fast sum.
    return mean, scratch.mul_(scratch).sum(_reduce_dims(x)).div_(m), m, False


def _synced_batch_stats(x: Tensor, scratch: Tensor, group) -> tuple[Tensor, Tensor, int, bool]:
    """_batch_stats over the global batch of a process group (synchronized BN, bnexp.nn.sync).

    Two all-reduces, still two-pass: (count, Σx) gives the global mean, then Σ(x − mean)². Shards may
    differ in size, counts included. The caller's one-value-per-channel check becomes a global one.
    """
    dims = _reduce_dims(x)
    total, m = all_reduce_sum_and_count(x.sum(dims), x.numel() // x.shape[1], group)
    if m < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got {m} over the process group")
    mean = total / m
    torch.sub(x, mean.view(_channel_view(x)), out=scratch)
    # A squared temporary: this path waits on the network anyway.
    var = all_reduce_sum(scratch.square().sum(dims), group) / m
    return mean, var, m, True


def _grad_reductions(g: Tensor, x: Tensor, mean: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """The backward's two per-channel reductions: Σg and Σg·(x−μ) (``scratch`` receives g·x).

    They are all that dx needs from the rest of the batch, which is why synchronized BN all-reduces
    exactly these two (the count m is already global from forward) and nothing full-size. Torch has
    no fused multiply-reduce for these layouts (vecdot multiplies into a temporary, bmm is slower), so
    the product goes into the dx buffer that backward allocates anyway. Σg·x − μ·Σg loses only about
    eps·|μ|/σ relatively, unlike one-pass variance's (μ/σ)².
    """
    dims = _reduce_dims(g)
    sum_g = g.sum(dims)
    sum_gx = torch.mul(g, x, out=scratch).sum(dims)
    return sum_g, sum_gx.addcmul_(mean, sum_g, value=-1)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """What statistics and the arithmetic use: float32 for half and bfloat16 input (as torch), else x's."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _update_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, m: int,
                    factor: float) -> None:
    """Algorithm 2's estimates: exponential (or cumulative) averages, the variance made unbiased.

    The buffers keep their dtype; half or bfloat16 buffers are averaged in float32 and rounded once.
    """
    var = var * (m / (m - 1))
    if running_mean.dtype == mean.dtype:
        torch._foreach_lerp_([running_mean, running_var], [mean, var], factor)
        return
    wide = torch.promote_types(running_mean.dtype, torch.float32)
    for buf, new in ((running_mean, mean), (running_var, var)):
        buf.copy_(buf.to(wide).lerp_(new.to(wide), factor))


def kernel_for(x: Tensor, *others: Tensor | None):
    """The compiled kernel (bnexp.nn.kernel) if the layer would run x and these per-channel tensors
    through it, else None (the tensor-op path).

    Runs on every call, so it reads only cheap attributes (``device.type`` makes an object: ``is_cpu``
    does not). The kernel sees raw pointers: every tensor must be contiguous, on the CPU and of x's dtype.
    """
    k = _kernel.load()
    if k is None or not _kernel.eligible(x, k):
        return None
    dtype = x.dtype
    for t in others:
        if t is not None and (t.dtype != dtype or not t.is_cpu or not t.is_contiguous()):
            return None
    return k


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _ncl(x: Tensor) -> tuple[int, int, int]:
    n, c = x.shape[0], x.shape[1]
    return n, c, x.numel() // (n * c)


def _plain(x: Tensor) -> bool:
    """True when x is an ordinary tensor with memory behind it and nothing traces the call.

    Otherwise (torch.compile, a torch.func transform, a tensor subclass such as FakeTensor, the batched
    gradients of ``autograd.grad(..., is_grads_batched=True)``) the layer goes through its registered
    operator or tensor ops, which those understand, instead of calling the kernel on raw pointers or an
    autograd.Function they cannot see into.
    """
    return ((type(x) is Tensor or type(x) is nn.Parameter) and _peek_interpreter() is None and not _compiling()
            and not _legacy_batched(x))


_peek_interpreter = torch._C._functorch.peek_interpreter_stack
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
_compiling = torch.compiler.is_compiling


# --- The arithmetic, on plain tensors -----------------------------------------------------------------

def _train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                   running_var: Tensor | None, factor: float, eps: float, unbiased: bool, group=None):
    """Training-mode forward on plain tensors: (y, stats, m, kernel or None), stats (3, C) the batch's mean,
    biased variance and invstd (one tensor: small layers notice the cost of making views of it).

    The running buffers, when given, are updated in place. Statistics are in _compute_dtype(x); y is in
    x's dtype. Half and bfloat16 input is computed in float32 (no float16 overflow of Σx²), as torch.
    """
    kern = kernel_for(x, weight, bias, running_mean, running_var) if group is None else None
    if kern is not None:
        n, c, l = _ncl(x)
        y = kern.empty_like(x)
        stats = torch.empty(3, c, dtype=x.dtype)  # mean, biased variance, invstd
        if kern.train_forward[x.dtype](x.data_ptr(), y.data_ptr(), n, c, l, _ptr(weight), _ptr(bias), eps,
                                       unbiased, stats.data_ptr(), _ptr(running_mean), _ptr(running_var),
                                       factor):
            raise MemoryError("bnexp BatchNorm kernel: out of memory")
        if running_mean is not None:
            increment_version((running_mean, running_var))  # written through pointers, unseen by autograd
        return y, stats, n * l, kern
    out_dtype, cd = x.dtype, _compute_dtype(x)
    if cd != out_dtype or (weight is not None and weight.dtype != cd):
        x, weight, bias = x.to(cd), _as(weight, cd), _as(bias, cd)
    y = torch.empty_like(x)
    mean, var, m, centred = _batch_stats(x, y) if group is None else _synced_batch_stats(x, y, group)
    invstd = (var * (m / (m - 1)) if unbiased else var).add(eps).rsqrt_()
    scale = invstd * weight if weight is not None else invstd
    if centred:
        # y holds x − mean: y = (x − mean)·scale + β in place.
        if bias is not None:
            torch.addcmul(_vector_shift(bias, y), y, _per_channel(scale, x), out=y)
        else:
            y.mul_(_per_channel(scale, x))
    else:
        # ATen's CPU form: x·scale + (β − mean·scale).
        shift = torch.addcmul(bias, mean, scale, value=-1) if bias is not None else (mean * scale).neg_()
        torch.addcmul(_vector_shift(shift, x), x, _per_channel(scale, x), out=y)
    if running_mean is not None:
        _update_running(running_mean, running_var, mean, var, m, factor)
    return y.to(out_dtype), torch.stack((mean, var, invstd)), m, None


def _train_backward(g: Tensor, x: Tensor, weight: Tensor | None, stats: Tensor, m: int,
                    unbiased: bool, need: tuple[bool, bool, bool], kern=None, group=None):
    """The paper's Section 3 gradients on plain tensors: (∂ℓ/∂x, ∂ℓ/∂γ, ∂ℓ/∂β), None where not needed."""
    need_x, need_w, need_b = need
    if kern is not None:
        g = g.contiguous()  # e.g. the expanded gradient of y.sum()
        n, c = x.shape[0], stats.shape[1]
        l = m // n
        dtype = x.dtype
        dx = kern.empty_like(x) if need_x else None
        grad_w = torch.empty(c, dtype=dtype) if need_w else None
        grad_b = torch.empty(c, dtype=dtype) if need_b else None
        mean = stats.data_ptr()
        if kern.train_backward[dtype](g.data_ptr(), x.data_ptr(), _ptr(dx), n, c, l, _ptr(weight), mean,
                                      mean + 2 * c * stats.element_size(), unbiased, _ptr(grad_w), _ptr(grad_b)):
            raise MemoryError("bnexp BatchNorm kernel: out of memory")
        return dx, grad_w, grad_b
    mean, invstd = stats[0], stats[2]
    out_dtype, w_dtype, cd = x.dtype, None if weight is None else weight.dtype, mean.dtype
    if g.dtype != cd or x.dtype != cd or (weight is not None and weight.dtype != cd):
        g, x, weight = g.to(cd), x.to(cd), _as(weight, cd)
    scale = invstd * weight if weight is not None else invstd
    # One full-size allocation: dx's buffer first takes the product for Σg·x, then becomes dx.
    dx = torch.empty_like(x)
    sum_g, sum_g_xmu = _grad_reductions(g, x, mean, dx)
    if group is not None:
        # Synchronized BN: dx needs the global batch's two sums, while γ and β keep this shard's
        # own. DDP averages gradients over the ranks, and each rank's loss is the mean over its
        # own shard, so the average of these per-shard gradients is the global batch's gradient.
        tot_g, tot_g_xmu = all_reduce_sum(torch.stack([sum_g, sum_g_xmu]), group).unbind()
    sum_g_xhat = sum_g_xmu.mul_(invstd)
    grad_w, grad_b = (sum_g_xhat if need_w else None), (sum_g if need_b else None)
    if w_dtype is not None and w_dtype != cd:
        grad_w, grad_b = _as(grad_w, w_dtype), _as(grad_b, w_dtype)
    if group is not None:
        sum_g, sum_g_xhat = tot_g, tot_g_xmu * invstd
    grad_x = None
    if need_x:
        # ∂ℓ/∂x = k·(g − Σg/m − c·x̂·Σg·x̂/m), k = γ·invstd (= scale), c = m/(m−1) if unbiased else 1,
        # as dx = g·k + x·a + b with per-channel a = −(c/m)·k·invstd·Σg·x̂, b = −k·Σg/m − a·μ.
        c = (m / (m - 1) if unbiased else 1.0) / m
        a = torch.mul(sum_g_xhat, invstd).mul_(scale).mul_(-c)
        b = torch.mul(scale, sum_g).mul_(-1.0 / m).addcmul_(a, mean, value=-1)
        torch.addcmul(_vector_shift(b, x), x, _per_channel(a, x), out=dx)
        dx.addcmul_(g, _per_channel(scale, x))
        grad_x = dx.to(out_dtype)
    return grad_x, grad_w, grad_b


def _train_backward_differentiable(g: Tensor, x: Tensor, weight: Tensor | None, eps: float, unbiased: bool,
                                   need: tuple[bool, bool, bool], xhat_only: bool = False):
    """The same gradients as out-of-place tensor ops that autograd can differentiate again.

    For double backward (``create_graph=True``: Hessian-vector products, gradient penalties) and for a
    gradient that a torch.func transform batches (``is_grads_batched``). The statistics are recomputed
    from x here, so that the second derivative sees how they depend on x.
    """
    need_x, need_w, need_b = need
    out_dtype, cd = x.dtype, _compute_dtype(x)
    xc, gc = x.to(cd), g.to(cd)
    dims = _reduce_dims(x)
    m = x.numel() // x.shape[1]
    xmu = xc - xc.mean(dims, keepdim=True)
    var = (xmu * xmu).mean(dims, keepdim=True)
    c = m / (m - 1) if unbiased else 1.0
    invstd = torch.rsqrt(var * c + eps)
    xhat = xmu * invstd
    if xhat_only:
        return xhat
    sum_g = gc.sum(dims)
    sum_g_xhat = (gc * xhat).sum(dims)
    grad_x = grad_w = grad_b = None
    if need_x:
        cv = _channel_view(x)
        k = invstd if weight is None else invstd * weight.to(cd).view(cv)
        grad_x = (k * (gc - sum_g.view(cv) / m - xhat * (sum_g_xhat.view(cv) * (c / m)))).to(out_dtype)
    if need_w:
        grad_w = sum_g_xhat.to(weight.dtype)
    if need_b:
        grad_b = sum_g.to(weight.dtype if weight is not None else cd)
    return grad_x, grad_w, grad_b


def _eval_coefficients(running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                       bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    invstd = running_var.add(eps).rsqrt_()
    scale = invstd * weight if weight is not None else invstd
    shift = torch.addcmul(bias, running_mean, scale, value=-1) if bias is not None else (running_mean * scale).neg_()
    return invstd, scale, shift


def _eval_forward(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                  bias: Tensor | None, eps: float) -> Tensor:
    """Inference forward on plain tensors, outside autograd: the kernel, or one fused multiply-add."""
    kern = kernel_for(x, running_mean, running_var, weight, bias)
    if kern is not None:
        n, c, l = _ncl(x)
        out = kern.empty_like(x)
        if kern.eval_forward[x.dtype](x.data_ptr(), out.data_ptr(), n, c, l, running_mean.data_ptr(),
                                      running_var.data_ptr(), _ptr(weight), _ptr(bias), eps):
            raise MemoryError("bnexp BatchNorm kernel: out of memory")
        return out
    cd = torch.promote_types(_compute_dtype(x), running_var.dtype)
    _, scale, shift = _eval_coefficients(running_mean.to(cd), running_var.to(cd), _as(weight, cd),
                                         _as(bias, cd), eps)
    return torch.addcmul(_vector_shift(shift, x), x.to(cd), _per_channel(scale, x)).to(x.dtype)


def _eval_composite(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                    bias: Tensor | None, eps: float) -> Tensor:
    """Inference BN as plain differentiable ops, for torch.compile and torch.func (which fuse, batch and
    differentiate it themselves: an affine map per channel needs nothing of ours)."""
    cd = torch.promote_types(_compute_dtype(x), running_var.dtype)
    scale = torch.rsqrt(running_var.to(cd) + eps)
    if weight is not None:
        scale = scale * weight.to(cd)
    shift = -running_mean.to(cd) * scale
    if bias is not None:
        shift = shift + bias.to(cd)
    cv = _channel_view(x)
    return (x.to(cd) * scale.view(cv) + shift.view(cv)).to(x.dtype)


# --- Eager autograd: autograd.Functions calling the arithmetic directly ------------------------------

class BatchNormTrainFunction(Function):
    """Training-mode BN: batch statistics forward, the paper's gradients backward.

    Returns (y, mean, var): the batch's per-channel mean and biased variance come out non-differentiable
    for callers that need them (the variants update running statistics per virtual batch, and Batch
    Renorm's r and d are made from them). ``running`` is None or (running_mean, running_var, factor):
    the buffers are updated in place here, where the count m is known even when it is the process
    group's, outside autograd (forward runs without grad recording, and they are not Function inputs).
    With ``unbiased`` the layer normalizes by s² = m/(m−1)·σ²_B instead; the only
    change to the backward is that the projection term is scaled by the same m/(m−1), because
    ∂s²/∂x_i = m/(m−1) · 2(x_i − μ)/m while the mean term is unchanged.

    This is the eager path (much cheaper per call than the registered operator, which small layers
    notice; benchmarks/README.md); ``batch_norm_train`` chooses between them. Its backward is differentiable: under
    ``create_graph=True`` or a batched gradient it switches to _train_backward_differentiable.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, unbiased: bool,
                running: tuple[Tensor, Tensor, float] | None, group=None, stats_out: bool = True):
        rm, rv, factor = running if running is not None else (None, None, 0.0)
        y, stats, m, kern = _train_forward(x, weight, bias, rm, rv, factor, eps, unbiased, group)
        # Otherwise autograd makes zero gradients for mean and var on every backward (~4 µs a call on
        # small layers); backward then has to accept an undefined g for y.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, stats)
        ctx.kernel, ctx.m, ctx.eps, ctx.unbiased, ctx.group = kern, m, eps, unbiased, group
        if not stats_out:
            return y
        mean, var = stats[0], stats[1]
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, g: Tensor, *_g_stats):
        if g is None:  # y's gradient undefined (grads are not materialized): so are the inputs'
            return None, None, None, None, None, None, None, None
        x, weight, stats = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        # (_plain(g) less its compile check: torch.compile never runs this eager Function.)
        if torch.is_grad_enabled() or _peek_interpreter() is not None or _legacy_batched(g):
            if ctx.group is not None:
                raise RuntimeError("bnexp BatchNorm: double backward of synchronized BN is not supported")
            grads = _train_backward_differentiable(g, x, weight, ctx.eps, ctx.unbiased, need)
        else:
            grads = _train_backward(g, x, weight, stats, ctx.m, ctx.unbiased, need, ctx.kernel, ctx.group)
        return (*grads, None, None, None, None, None)


class BatchNormEvalFunction(Function):
    """Inference-mode BN: a fixed per-channel affine map, y = x·γ/sqrt(rv+ε) + (β − rm·γ/sqrt(rv+ε)).

    Its backward is written out-of-place from the saved inputs, so autograd differentiates it again.
    """

    @staticmethod
    def forward(ctx, x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                bias: Tensor | None, eps: float):
        # x is only needed for ∂ℓ/∂γ; do not keep it alive otherwise.
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, running_mean, running_var, weight)
        ctx.eps = eps
        return _eval_forward(x, running_mean, running_var, weight, bias, eps)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, running_mean, running_var, weight = ctx.saved_tensors
        need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
        cv = _channel_view(g)
        dims = _reduce_dims(g)
        cd = torch.promote_types(_compute_dtype(g), running_var.dtype)
        invstd = torch.rsqrt(running_var.to(cd) + ctx.eps)
        gc = g.to(cd)
        grad_x = grad_w = grad_b = None
        if need_x:
            scale = invstd * weight.to(cd) if weight is not None else invstd
            grad_x = (gc * scale.view(cv)).to(g.dtype)
        if need_w:
            # Centred explicitly: x need not be centred on the running mean.
            grad_w = (((x.to(cd) - running_mean.to(cd).view(cv)) * gc).sum(dims) * invstd).to(weight.dtype)
        if need_b:
            grad_b = gc.sum(dims).to(weight.dtype if weight is not None else g.dtype)
        return grad_x, None, None, grad_w, grad_b, None


# --- The registered operator: what torch.compile and torch.func see ----------------------------------

@torch.library.custom_op("bnexp::batch_norm_train", mutates_args=())
def batch_norm_train_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                        unbiased: bool) -> tuple[Tensor, Tensor]:
    """``bnexp::batch_norm_train``: training-mode BN as one functional operator, (y, stats) with stats
    (3, C) the batch's mean, biased variance and invstd (in _compute_dtype(x)).

    torch.compile keeps it as one opaque node (the kernel, or the tensor ops, inside); its fake
    implementation gives shapes, its autograd formula is the paper's (differentiable again), and its
    vmap rule folds the vmapped dimension into channels, as torch does for its own batch norm. The
    running statistics are updated outside it (batch_norm_train), since torch registers autograd
    formulas for functional operators only.
    """
    y, stats, _, _ = _train_forward(x, weight, bias, None, None, 0.0, eps, unbiased)
    return y, stats


@batch_norm_train_op.register_fake
def _(x, weight, bias, eps, unbiased):
    return torch.empty_like(x), x.new_empty((3, x.shape[1]), dtype=_compute_dtype(x))


def _op_setup_context(ctx, inputs, output):
    x, weight, _, eps, unbiased = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(x, weight, stats)
    ctx.saved_for_jvp = (x, weight)
    ctx.eps, ctx.unbiased = eps, unbiased


def _op_backward(ctx, g: Tensor, _g_stats: Tensor):
    x, weight, stats = ctx.saved_tensors
    need = tuple(ctx.needs_input_grad[:3])
    if torch.is_grad_enabled() or not _plain(g) or not _plain(x):
        grads = _train_backward_differentiable(g, x, weight, ctx.eps, ctx.unbiased, need)
    else:
        grads = _train_backward(g, x, weight, stats, x.numel() // x.shape[1], ctx.unbiased, need,
                                kernel_for(x, weight, stats))
    return (*grads, None, None)


batch_norm_train_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _fold(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """A per-channel (C,) tensor, or its vmapped (…B…, C) form, as (B·C,) for the folded channels."""
    if t is None:
        return None
    return t.movedim(dim, 0).reshape(-1) if dim is not None else t.repeat(size)


@batch_norm_train_op.register_vmap
def _(info, in_dims, x, weight, bias, eps, unbiased):
    """vmap: each of the B vmapped problems is BN of its own (N, C, …) batch, i.e. BN of (N, B·C, …)."""
    x_dim, w_dim, b_dim = in_dims[:3]
    size = info.batch_size
    x = x.movedim(x_dim, 1) if x_dim is not None else x.unsqueeze(1).expand(x.shape[0], size, *x.shape[1:])
    n, c, rest = x.shape[0], x.shape[2], x.shape[3:]
    y, stats = batch_norm_train_op(x.reshape(n, size * c, *rest), _fold(weight, w_dim, size),
                                   _fold(bias, b_dim, size), eps, unbiased)
    return (y.view(n, size, c, *rest), stats.view(3, size, c)), (1, 1)


class _TrainOpFunction(Function):
    """The operator wrapped for torch.func: functorch's grad and vmap transforms take autograd.Functions
    with ``setup_context`` (which the autograd that torch.library generates for an operator lacks); vmap
    runs forward on batched tensors, so the operator's vmap rule applies, backward is tensor ops, and
    ``jvp`` gives forward mode (jacfwd). torch.compile, which cannot trace a jvp, takes the operator."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps, unbiased):
        return batch_norm_train_op(x, weight, bias, eps, unbiased)

    setup_context = staticmethod(_op_setup_context)
    backward = staticmethod(_op_backward)

    @staticmethod
    def jvp(ctx, dx, dw, db, _eps, _unbiased):
        """Forward mode (torch.func.jacfwd, forward_ad): BN's Jacobian in x is self-adjoint, so the
        tangent of y is the backward's ∂ℓ/∂x formula applied to dx, plus x̂·dγ + dβ."""
        x, weight = ctx.saved_for_jvp
        dy = None
        if dx is not None:
            dy = _train_backward_differentiable(dx, x, weight, ctx.eps, ctx.unbiased, (True, False, False))[0]
        if dw is not None or db is not None:
            cv = _channel_view(x)
            xhat = _train_backward_differentiable(torch.ones_like(x), x, None, ctx.eps, ctx.unbiased,
                                                  (False, False, False), xhat_only=True)
            extra = 0
            if dw is not None:
                extra = xhat * dw.view(cv)
            if db is not None:
                extra = extra + db.view(cv)
            dy = extra.to(x.dtype) if dy is None else dy + extra
        return dy, None


# --- Entry points: eager Function or operator ----------------------------------------------------------

def batch_norm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, unbiased: bool,
                     running: tuple[Tensor, Tensor, float] | None = None,
                     group=None) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN of x: (y, mean, var), the batch's per-channel mean and biased variance
    non-differentiable. ``running``: None or (running_mean, running_var, factor), updated in place.

    Eager calls on ordinary tensors take BatchNormTrainFunction; traced ones (torch.compile, torch.func)
    the registered operator ``bnexp::batch_norm_train``. Synchronized BN (``group``) is eager only.
    """
    if group is not None or _plain(x):
        return BatchNormTrainFunction.apply(x, weight, bias, eps, unbiased, running, group)
    if _compiling():  # Dynamo takes the operator with its registered autograd (it cannot trace a jvp)
        y, stats = batch_norm_train_op(x, weight, bias, eps, unbiased)
    else:
        y, stats = _TrainOpFunction.apply(x, weight, bias, eps, unbiased)
    mean, var = stats[0], stats[1]
    if running is not None:
        with torch.no_grad():
            _update_running(running[0], running[1], mean, var, x.numel() // x.shape[1], running[2])
    return y, mean, var


def batch_norm_eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                    bias: Tensor | None, eps: float) -> Tensor:
    """Inference-mode BN of x with the running estimates (our Function when a gradient is wanted)."""
    if not _plain(x):
        return _eval_composite(x, running_mean, running_var, weight, bias, eps)
    if torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        return BatchNormEvalFunction.apply(x, running_mean, running_var, weight, bias, eps)
    # Inference: nothing here requires grad, so no graph is recorded; skip the autograd.Function
    # machinery (~10 µs a call).
    return _eval_forward(x, running_mean, running_var, weight, bias, eps)


def grouped_train_forward(bn: nn.Module, x: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Training-mode BN of `groups` equal batches stacked along dim 0 of x, each normalized by its own
    statistics, running statistics untouched: (y, mean, var), the statistics (groups, C) and biased.

    The probes' grouped pass (bnexp.probes._GroupedBN) through the compiled kernel, one call for all
    batches: the arithmetic of bn_train_forward per batch. None when the kernel cannot take it (then the
    probes fold the batches into channels and run the layer itself); only for plain BN of this module,
    not its subclasses (the variants' training forwards differ) or synchronized BN.
    """
    if type(bn) not in (BatchNorm1d, BatchNorm2d, BatchNorm3d) or bn.stats != "local" or torch.is_grad_enabled():
        return None  # (no autograd here: the probes run without gradients)
    weight, bias = bn.weight, bn.bias
    kern = kernel_for(x, weight, bias)
    if kern is None:
        return None
    n, c, l = _ncl(x)
    y = kern.empty_like(x)
    stats = torch.empty(groups, 3, c, dtype=x.dtype)
    if kern.grouped_forward[x.dtype](x.data_ptr(), y.data_ptr(), groups, n // groups, c, l, _ptr(weight),
                                     _ptr(bias), bn.eps, bn.unbiased_normalize, stats.data_ptr()):
        raise MemoryError("bnexp BatchNorm kernel: out of memory")
    return y, stats[:, 0], stats[:, 1]


# --- The modules ------------------------------------------------------------------------------------------

class BatchNormBase(_BatchNorm):
    """Common base of our BatchNorm1d/2d/3d (training code tells ours from torch's by this class).

    A subclass of torch's ``nn.modules.batchnorm._BatchNorm``, so that torch's utilities that look for
    BN layers by that class (torch.func.replace_all_batch_norm_modules_, SyncBatchNorm conversion,
    conv-BN fusion helpers) find ours; from it we take the parameters, buffers, state-dict handling and
    repr, and replace forward: no call into torch's batch-norm kernels.

    Options beyond torch, keyword-only, defaulting to the paper's behaviour:
      running_var_init: value ``running_var`` starts from and ``reset_running_stats()`` restores.
      unbiased_normalize: normalize with the unbiased batch variance m/(m−1)·σ²_B (the seed note's
        ``torch.var``), instead of the paper's biased one.
      stats: "local" normalizes by this process's batch; "global" by the batch of all processes of
        ``process_group`` (None: the default group) while training under torch.distributed, i.e.
        synchronized BN (bnexp.nn.sync). In a single process the two are the same.
    """

    _accepted_ranks: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        running_var_init: float = 1.0,
        unbiased_normalize: bool = False,
        stats: str = "local",
        process_group=None,
    ) -> None:
        if stats not in ("local", "global"):
            raise ValueError(f"stats must be 'local' or 'global', got {stats!r}")
        # Set before torch's __init__, whose reset_parameters() reads running_var_init.
        self.running_var_init = float(running_var_init)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.unbiased_normalize = bool(unbiased_normalize)
        self.stats = stats
        self.process_group = process_group

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if self.track_running_stats:
            self.running_var.fill_(self.running_var_init)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.running_var_init != 1.0:
            s += f", running_var_init={self.running_var_init}"
        if self.unbiased_normalize:
            s += ", unbiased_normalize=True"
        if self.stats != "local":
            s += f", stats={self.stats!r}"
        return s

    def _sync_group(self):
        """The process group to reduce batch statistics over, or None for this process's batch alone."""
        if self.stats == "local":
            return None
        return sync_group(self)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self._accepted_ranks:
            expected = " or ".join(f"{r}D" for r in self._accepted_ranks)
            raise ValueError(f"expected {expected} input (got {x.dim()}D input of shape {tuple(x.shape)})")
        if x.shape[1] != self.num_features:
            # torch only notices this through the size of a parameter or buffer (and not at all with
            # affine=False, track_running_stats=False); we always check.
            raise RuntimeError(
                f"expected input with {self.num_features} channels on dim 1, "
                f"got input of shape {tuple(x.shape)}"
            )

    _check_input = _check_input_dim  # the variants' name for it

    def _check_batch(self, size: torch.Size, use_batch_stats: bool, rows: int | None = None,
                     synced: bool = False) -> None:
        """torch's refusals: one value per channel has no variance, and ε must make sqrt(σ² + ε) > 0.

        ``rows`` is the batch size the statistics are taken over when that is not ``size[0]`` (Ghost
        BN's virtual batches). With ``synced`` the count is the process group's, checked once known.
        """
        eps = self.eps
        if not use_batch_stats:
            if eps < 0.0:
                raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
            return
        if not synced:
            values_per_channel = size[0] if rows is None else rows
            for d in size[2:]:
                values_per_channel *= d
            if values_per_channel == 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")

    def _momentum_factor(self) -> float:
        """docs/design.md's α for the batch that ``num_batches_tracked`` has just counted."""
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # An nn.Module attribute read of a parameter or buffer goes through __getattr__ (~0.4 µs, and this
        # runs per layer per step); the dicts it searches are direct.
        params, buffers = self._parameters, self._buffers
        weight, bias = params["weight"], params["bias"]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        eps = self.eps
        # Batch statistics in training, and in eval when there are no running estimates (as torch).
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        update_running = self.training and self.track_running_stats and running_mean is not None
        group = None if self.stats == "local" else sync_group(self)  # (self._sync_group(), a call cheaper)
        self._check_batch(input.size(), use_batch_stats, synced=group is not None)

        if update_running:
            # Counted before the batch is looked at, empty batches included, as torch does.
            buffers["num_batches_tracked"].add_(1)

        if input.numel() == 0:
            # torch returns an affine-transformed clone and leaves the statistics alone.
            out = input.clone()
            if weight is not None:
                out = out * weight.view(_channel_view(input))
            if bias is not None:
                out = out + bias.view(_channel_view(input))
            return out.to(input.dtype)

        if use_batch_stats:
            running = (running_mean, running_var, self._momentum_factor()) if update_running else None
            if group is not None or _plain(input):
                return BatchNormTrainFunction.apply(input, weight, bias, eps, self.unbiased_normalize, running,
                                                    group, False)
            return batch_norm_train(input, weight, bias, eps, self.unbiased_normalize, running)[0]
        return batch_norm_eval(input, running_mean, running_var, weight, bias, eps)


class BatchNorm1d(BatchNormBase):
    """Over (N, C) or (N, C, L) input."""

    _accepted_ranks = (2, 3)


class BatchNorm2d(BatchNormBase):
    """Over (N, C, H, W) input."""

    _accepted_ranks = (4,)


class BatchNorm3d(BatchNormBase):
    """Over (N, C, D, H, W) input."""

    _accepted_ranks = (5,)
