"""The layer's compiled kernel (bnexp/nn/kernel.py, bn_kernel.c): when it runs, what it computes, how it is built.

test_norm.py and test_variants.py already run every comparison with torch on both of the layer's paths;
this file covers what is the kernel's own: awkward loop remainders, large outputs on huge pages,
accuracy on large-mean float32 input, the rules that send an input to the tensor-op path, and the build
cache with its fallbacks.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnexp.nn import batchnorm as norm
from bnexp.nn import kernel
from bnexp.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNormTrainFunction

THEIRS = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
OURS = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: norm.BatchNorm3d}


@pytest.fixture
def kernel_on():
    with kernel.enabled(True) as k:
        assert k is not None, "the BN kernel did not build (is a C compiler installed?)"
        yield k


def _pair(rank, c, dtype, seed=0, **kwargs):
    torch.manual_seed(seed)
    ours, theirs = OURS[rank](c, dtype=dtype, **kwargs), THEIRS[rank](c, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


# N not a multiple of the 4 rows done together; planes shorter than, equal to and longer than the 16
# lanes, with remainders; one channel; many channels.
AWKWARD = [(5, 7), (2, 1), (7, 33), (4, 3, 1), (3, 2, 15), (6, 3, 16), (5, 4, 37), (2, 5, 3, 11), (3, 2, 2, 3, 5)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", AWKWARD, ids=lambda s: "x".join(map(str, s)))
def test_awkward_shapes_match_torch(kernel_on, shape, dtype):
    ours, theirs = _pair(len(shape), shape[1], dtype, momentum=0.3)
    assert norm.kernel_for(torch.empty(shape, dtype=dtype), *ours.parameters(), ours.running_mean, ours.running_var) is kernel_on
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = (torch.randn(shape, generator=gen, dtype=dtype) * 3 - 2)
        g = torch.randn(shape, generator=gen, dtype=dtype)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        y1.backward(g), y2.backward(g)
        assert _rel(y1, y2) < tol and _rel(x1.grad, x2.grad) < tol
        assert _rel(ours.weight.grad, theirs.weight.grad) < tol and _rel(ours.bias.grad, theirs.bias.grad) < tol
        ours.zero_grad(), theirs.zero_grad()
    assert _rel(ours.running_mean, theirs.running_mean) < tol and _rel(ours.running_var, theirs.running_var) < tol
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert _rel(ours(x), theirs(x)) < tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_threads_give_the_same_bits_as_one(kernel_on, dtype):
    """Each thread owns a range of channels, so every channel's sums run in the same order: the results
    with torch's threads are those of one thread, bit for bit (awkward shapes, threads forced on)."""
    if not kernel_on.parallel:
        pytest.skip("this kernel was built without OpenMP (single-threaded)")
    previous = torch.get_num_threads()
    for shape in [*AWKWARD, (64, 100), (8, 16, 8, 8, 8)]:
        ours, _ = _pair(len(shape), shape[1], dtype, momentum=0.3)
        x = torch.randn(shape, dtype=dtype) * 3 - 2
        g = torch.randn(shape, dtype=dtype)
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            layer = copy.deepcopy(ours)
            with kernel_on.parallel_min(0):
                xi = x.clone().requires_grad_()
                y = layer(xi)
                y.backward(g)
                layer.eval()
                with torch.no_grad():
                    y_eval = layer(x)
            results.append([y, xi.grad, layer.weight.grad, layer.bias.grad, layer.running_mean,
                            layer.running_var, y_eval])
        torch.set_num_threads(previous)
        for one, two in zip(*results):
            assert torch.equal(one, two), shape


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # kernel_on holds for every example
@given(shape=st.integers(2, 5).flatmap(lambda rank: st.tuples(
    st.integers(1, 9), st.integers(1, 6), *[st.integers(1, 7)] * (rank - 2))),
    affine=st.booleans(), momentum=st.sampled_from([0.1, 0.9, None]), seed=st.integers(0, 2**16))
def test_random_shapes_match_torch(kernel_on, shape, affine, momentum, seed):
    if torch.Size(shape).numel() // shape[1] < 2:
        shape = (2, *shape[1:])  # training needs two values per channel
    ours, theirs = _pair(len(shape), shape[1], torch.float64, seed, affine=affine, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 4 + 3
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        y1.backward(g), y2.backward(g)
        assert _rel(y1, y2) < 1e-10 and _rel(x1.grad, x2.grad) < 1e-10
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert _rel(p.grad, q.grad) < 1e-10
    assert _rel(ours.running_mean, theirs.running_mean) < 1e-10 and _rel(ours.running_var, theirs.running_var) < 1e-10
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert _rel(ours(x), theirs(x)) < 1e-10


def test_large_output_on_huge_pages_matches_torch(kernel_on):
    # 8.4 MB in float32: above kernel.HUGEPAGE_MIN_BYTES, so y and dx are advised onto huge pages.
    shape = (64, 32, 32, 32)
    assert torch.Size(shape).numel() * 4 >= kernel.HUGEPAGE_MIN_BYTES
    ours, theirs = _pair(4, 32, torch.float32)
    x = torch.randn(shape) * 2 + 1
    g = torch.randn(shape)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    y1.backward(g), y2.backward(g)
    assert _rel(y1, y2) < 1e-5 and _rel(x1.grad, x2.grad) < 1e-5
    assert _rel(ours.weight.grad, theirs.weight.grad) < 1e-4


def test_float32_large_mean_is_as_accurate_as_torch(kernel_on):
    """At mean/std = 1000 the kernel's float32 errors (against float64) are torch's, not worse.

    The tensor-op path forms Σg·x − μΣg in float32 and is about 7x further off in dx here; the kernel
    accumulates in double and uses x − μ.
    """
    torch.manual_seed(0)
    x64 = torch.randn(64, 8, 50, dtype=torch.float64) + 1000
    g64 = torch.randn(64, 8, 50, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(8, dtype=torch.float64)
    xr = x64.clone().requires_grad_()
    ref(xr).backward(g64)
    errors = {}
    for name, layer in [("ours", BatchNorm1d(8)), ("torch", torch.nn.BatchNorm1d(8))]:
        x = x64.float().requires_grad_()
        y = layer(x)
        y.backward(g64.float())
        errors[name] = [_rel(x.grad, xr.grad), _rel(layer.weight.grad, ref.weight.grad),
                        _rel(layer.running_var, ref.running_var)]
    for ours, theirs in zip(errors["ours"], errors["torch"]):
        assert ours <= 1.5 * theirs + 1e-7, errors


def test_unbiased_normalize_and_no_input_grad_agree_with_the_tensor_ops():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 9, dtype=torch.float64) * 2 + 3
    g = torch.randn(6, 4, 9, dtype=torch.float64)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    results = []
    for on in (True, False):
        with kernel.enabled(on) as k:
            assert (k is not None) == on
            w.grad = b.grad = None
            y, mean, var = BatchNormTrainFunction.apply(x, w, b, 1e-3, True, None, None)
            y.backward(g)  # x does not require grad: only γ and β get one
            results.append((y.detach(), mean, var, w.grad.clone(), b.grad.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_which_inputs_take_the_kernel(kernel_on, monkeypatch):
    bn = BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    params = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    assert norm.kernel_for(x, *params) is kernel_on
    for other in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3), x.half(), x.bfloat16()):
        assert norm.kernel_for(other, *params) is None
    # Parameters of another dtype than the input: the kernel must not read them as the input's type.
    assert norm.kernel_for(x, bn.weight, bn.bias, torch.zeros(3, dtype=torch.float64), bn.running_var) is None
    # With more than one torch thread, large inputs stay on the kernel when it splits them over torch's
    # threads itself, and go to ATen's parallel ops when it cannot; small ones stay either way.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert norm.kernel_for(torch.randn(4, 3, 5, 5)) is kernel_on
    large = torch.randn(64, 3, 32, 32)
    assert (norm.kernel_for(large) is kernel_on) == kernel_on.parallel
    monkeypatch.setattr(kernel_on, "parallel", False)
    assert norm.kernel_for(large) is None


def test_kernel_shares_torchs_openmp_runtime(kernel_on):
    """A -fopenmp build only where it finds torch's libgomp.so.1, and then no second one is loaded."""
    import sklearn.datasets  # noqa: F401  (brings its own, renamed OpenMP runtime: not a second libgomp.so.1)

    assert kernel_on.parallel == kernel.torch_openmp()
    assert len(kernel._gomp_libraries()) <= 1


def test_running_stats_written_by_the_kernel_bump_their_versions(kernel_on):
    bn = BatchNorm1d(4)
    before = bn.running_mean._version, bn.running_var._version
    bn(torch.randn(8, 4))
    assert bn.running_mean._version > before[0] and bn.running_var._version > before[1]
    assert bn.num_batches_tracked.item() == 1


def test_build_is_cached_and_keyed_by_the_source(tmp_path, monkeypatch):
    cc = kernel._compiler()
    assert cc is not None
    first = kernel._build(cc, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert kernel._build(cc, tmp_path) == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    edited = tmp_path / "src"
    edited.mkdir()
    for src in kernel.SOURCES:
        (edited / src.name).write_text(src.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(kernel, "SOURCE", edited / "bn_kernel.c")
    monkeypatch.setattr(kernel, "SOURCES", tuple(edited / s.name for s in kernel.SOURCES))
    second = kernel._build(cc, tmp_path)
    assert second != first and second.exists()
    assert sorted(p.name for p in tmp_path.glob("*.so")) == sorted([first.name, second.name])  # no temp left


_CHILD = textwrap.dedent("""
    import warnings, torch
    from bnexp.nn import kernel
    from bnexp.nn.batchnorm import BatchNorm1d
    warnings.simplefilter("always")
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    ours, ref = BatchNorm1d(3, dtype=torch.float64), torch.nn.BatchNorm1d(3, dtype=torch.float64)
    for _ in range(2):
        y = ours(x)
        assert torch.allclose(y, ref(x), atol=1e-12)
        y.sum().backward()
    print("kernel", kernel.load() is not None)
""")


@pytest.mark.parametrize("env,expect_kernel,expect_warning", [
    ({}, True, False),
    ({"CC": "false"}, False, True),  # a compiler that fails: one warning, then the tensor-op path
    ({"BNEXP_KERNEL": "0"}, False, False),  # turned off: no build, no warning
], ids=["builds", "no-compiler", "off"])
def test_kernel_build_in_a_fresh_process(tmp_path, env, expect_kernel, expect_warning):
    cache = tmp_path / "cache"
    full_env = {**os.environ, "BNEXP_CACHE_DIR": str(cache), **env}
    result = subprocess.run([sys.executable, "-c", _CHILD], env=full_env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["kernel", str(expect_kernel)]
    assert result.stderr.count("BN kernel not built") == (1 if expect_warning else 0), result.stderr
    built = list(cache.glob("*.so")) if cache.exists() else []
    assert len(built) == (1 if expect_kernel else 0)
    if env.get("BNEXP_KERNEL") == "0":
        assert not cache.exists()


def test_an_unwritable_cache_falls_back_to_a_temporary_directory(tmp_path):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory should be")
    env = {**os.environ, "BNEXP_CACHE_DIR": str(blocked / "cache"), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    result = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["kernel", "True"] and "not built" not in result.stderr
    assert len(list((tmp_path / "tmp").glob("bnexp-*/*.so"))) == 1


def test_grouped_forward_is_the_layer_on_each_batch(kernel_on):
    from bnexp.nn.variants import BatchRenorm2d

    torch.manual_seed(0)
    bn = BatchNorm2d(3, unbiased_normalize=True)
    with torch.no_grad():
        bn.weight.normal_(), bn.bias.normal_()
    x = torch.randn(4 * 5, 3, 2, 3) * 2 + 1
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with torch.no_grad():
        y, mean, var = norm.grouped_train_forward(bn, x, 4)
        for g in range(4):
            xb = x[g * 5:(g + 1) * 5]
            yb, mb, vb = BatchNormTrainFunction.apply(xb, bn.weight, bn.bias, bn.eps, True, None, None)
            torch.testing.assert_close(y[g * 5:(g + 1) * 5], yb, rtol=0, atol=0)
            torch.testing.assert_close(mean[g], mb, rtol=0, atol=0)
            torch.testing.assert_close(var[g], vb, rtol=0, atol=0)
    assert all(torch.equal(v, bn.state_dict()[k]) for k, v in before.items())  # running stats untouched
    # Not for what trains differently, what synchronizes, or when autograd would need a graph.
    with torch.no_grad():
        assert norm.grouped_train_forward(BatchRenorm2d(3), x, 4) is None
        assert norm.grouped_train_forward(torch.nn.BatchNorm2d(3), x, 4) is None
        assert norm.grouped_train_forward(BatchNorm2d(3, stats="global"), x, 4) is None
        assert norm.grouped_train_forward(bn, x.to(memory_format=torch.channels_last), 4) is None
    assert norm.grouped_train_forward(bn, x, 4) is None


# --- issue 17: a library planted where the kernel is cached must never be loaded ---------------------------

_PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("PLANTED_MARKER"), "w");
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory) -> str:
    """The file name bnexp gives its kernel on this machine: what an attacker would compute (from the
    public source, the compiler command and /proc/cpuinfo); here, learnt from one build in a fresh cache,
    which bnexp makes private."""
    cache = tmp_path_factory.mktemp("scratch") / "cache"
    result = subprocess.run([sys.executable, "-c", _CHILD], env={**os.environ, "BNEXP_CACHE_DIR": str(cache)},
                            cwd=cache.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert cache.stat().st_mode & 0o777 == 0o700
    (built,) = cache.glob("bn_kernel-*.so")
    assert built.stat().st_uid == os.getuid()
    return built.name


def _plant(folder, name: str, cc: str) -> None:
    source = folder.parent / "planted.c"
    source.write_text(_PLANTED)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(folder / name), str(source)], check=True)


@pytest.mark.parametrize("where", ["world-writable cache", "cache of another user", "fallback of another user"])
def test_a_planted_kernel_is_never_loaded(tmp_path, kernel_name, where):
    """The issue's attack: a library under the kernel's cache name, in a cache folder someone else can write.
    bnexp builds its own privately instead, and the planted code never runs."""
    if where != "world-writable cache" and os.getuid() != 0:
        pytest.skip("making a folder another user's takes root")
    cc = kernel._compiler()
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    _plant(hostile, kernel_name, cc)
    env = {**os.environ, "PLANTED_MARKER": str(tmp_path / "marker"), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    if where == "world-writable cache":
        hostile.chmod(0o777)
        env["BNEXP_CACHE_DIR"] = str(hostile)
    elif where == "cache of another user":
        os.chown(hostile, 12345, 12345)
        env["BNEXP_CACHE_DIR"] = str(hostile)
    else:  # the cache cannot be written, and $TMPDIR/bnexp-<uid> was made first by someone else
        (tmp_path / "a-file").write_text("")
        env["BNEXP_CACHE_DIR"] = str(tmp_path / "a-file" / "cache")
        hostile.rename(tmp_path / "tmp" / f"bnexp-{os.getuid()}")
        hostile = tmp_path / "tmp" / f"bnexp-{os.getuid()}"
        os.chown(hostile, 12345, 12345)
    before = sorted(p.name for p in hostile.iterdir())
    result = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["kernel", "True"] and "not built" not in result.stderr
    assert not (tmp_path / "marker").exists(), "the planted library ran"
    assert sorted(p.name for p in hostile.iterdir()) == before  # nothing read, built or removed there
    assert not list((tmp_path / "tmp").glob("bnexp-kernel-*"))  # the private build is cleaned up
