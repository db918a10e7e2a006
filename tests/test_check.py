"""`bnexp check` passes on the real layer and catches a broken one."""

from __future__ import annotations

import io

import pytest
import torch

from rich.console import Console

from bnexp.nn import batchnorm as norm
from bnexp.check import run_check


def _check(seed: int) -> tuple[bool, str]:
    """run_check's verdict and what `bnexp check` prints."""
    ok, shown = run_check(seed=seed)
    buf = io.StringIO()
    console = Console(file=buf, width=250, color_system=None)
    for item in shown:
        console.print(item)
    return ok, buf.getvalue()


def test_check_passes_on_real_layer():
    ok, out = _check(0)
    assert ok is True
    assert "PASS" in out and "FAIL" not in out
    assert _check(3)[0] is True


def test_check_fails_when_backward_scale_is_wrong(monkeypatch):
    real = norm._grad_reductions

    def wrong(*args):
        sum_g, sum_gx = real(*args)
        return sum_g, sum_gx * 1.01  # a 1% error in the Σg·x̂ term of the backward

    monkeypatch.setattr(norm, "_grad_reductions", wrong)
    ok, out = _check(0)
    assert ok is False
    assert "FAIL" in out
    assert "Error" not in out  # caught as a numerical difference, not as a crash of the patch


def test_check_covers_both_paths_and_fails_when_the_kernel_backward_is_wrong(monkeypatch):
    ok, out = _check(1)
    assert ok is True
    rows = [line for line in out.splitlines() if "PASS" in line]
    assert sum("· kernel" in r for r in rows) == 11 and sum("· ops" in r for r in rows) == 12

    real = norm._kernel_backward

    def wrong(ctx, g):
        dx, gw, gb = real(ctx, g)
        return dx * 1.01, gw, gb  # a 1% error in ∂ℓ/∂x, on the kernel path only

    monkeypatch.setattr(norm, "_kernel_backward", wrong)
    ok, out = _check(0)
    assert ok is False
    failed = [line for line in out.splitlines() if "FAIL" in line and "cases" not in line]
    assert failed and all("· kernel" in line for line in failed)


def test_check_fails_when_running_var_is_biased(monkeypatch):
    def biased_update(running_mean, running_var, mean, var, m, factor):
        torch._foreach_lerp_([running_mean, running_var], [mean, var], factor)  # forgot m/(m-1)

    monkeypatch.setattr(norm, "_update_running", biased_update)
    ok, out = _check(0)
    assert ok is False
    assert "FAIL" in out
    assert "Error" not in out


@pytest.mark.parametrize("path,title", [("kernel", "compiled kernel"), ("ops", "tensor ops")])
def test_bench_layer_quick_rows_and_table(monkeypatch, path, title):
    from bnexp.nn import kernel
    from bnexp.bench.layer import measure_layer, render_table, summary_lines

    taken = []
    real = norm._kernel_for
    monkeypatch.setattr(norm, "_kernel_for", lambda *a: taken.append(real(*a) is not None) or real(*a))
    rows = measure_layer(quick=True, path=path)
    assert {r["path"] for r in rows} == {path} and set(taken) == {path == "kernel"}
    assert kernel.load() is not None  # the setting is restored afterwards
    assert {r["mode"] for r in rows} == {"train fwd+bwd", "eval fwd"}
    assert {r["dtype"] for r in rows} == {"float32", "float64"}
    for r in rows:
        assert r["ours_ms"] > 0 and r["torch_ms"] > 0 and abs(r["ratio"] - r["ours_ms"] / r["torch_ms"]) < 1e-9
    conv_train = [r for r in rows if len(r["shape"]) > 2 and r["mode"] == "train fwd+bwd"]
    assert conv_train and all(r["bound_ms"] > 0 and r["bandwidth_gbs"] > 0 and r["ours_over_bound"] > 0
                              for r in conv_train)
    buf = io.StringIO()
    Console(file=buf, width=250, color_system=None).print(render_table(rows))
    out = buf.getvalue()
    assert "ours/torch" in out and title in out and summary_lines(rows)
