"""`bnexp check` passes on the real layer and catches a broken one."""

from __future__ import annotations

import io
import time

import pytest
import torch

from rich.console import Console

from bnexp import norm
from bnexp.check import run_check


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=250, color_system=None), buf


def test_check_passes_on_real_layer():
    console, buf = _console()
    t0 = time.process_time()  # CPU time: other jobs on a shared machine do not inflate it
    assert run_check(seed=0, console=console) is True
    assert time.process_time() - t0 < 20
    out = buf.getvalue()
    assert "PASS" in out and "FAIL" not in out
    assert run_check(seed=3, console=_console()[0]) is True


def test_check_fails_when_backward_scale_is_wrong(monkeypatch):
    real = norm._grad_reductions

    def wrong(*args):
        sum_g, sum_gx = real(*args)
        return sum_g, sum_gx * 1.01  # a 1% error in the Σg·x̂ term of the backward

    monkeypatch.setattr(norm, "_grad_reductions", wrong)
    console, buf = _console()
    assert run_check(seed=0, console=console) is False
    assert "FAIL" in buf.getvalue()
    assert "Error" not in buf.getvalue()  # caught as a numerical difference, not as a crash of the patch


def test_check_covers_both_paths_and_fails_when_the_kernel_backward_is_wrong(monkeypatch):
    console, buf = _console()
    assert run_check(seed=1, console=console) is True
    rows = [line for line in buf.getvalue().splitlines() if "PASS" in line]
    assert sum("· kernel" in r for r in rows) == 11 and sum("· ops" in r for r in rows) == 12

    real = norm._kernel_backward

    def wrong(ctx, g):
        dx, gw, gb = real(ctx, g)
        return dx * 1.01, gw, gb  # a 1% error in ∂ℓ/∂x, on the kernel path only

    monkeypatch.setattr(norm, "_kernel_backward", wrong)
    console, buf = _console()
    assert run_check(seed=0, console=console) is False
    failed = [line for line in buf.getvalue().splitlines() if "FAIL" in line and "cases" not in line]
    assert failed and all("· kernel" in line for line in failed)


def test_check_fails_when_running_var_is_biased(monkeypatch):
    def biased_update(running_mean, running_var, mean, var, m, factor):
        torch._foreach_lerp_([running_mean, running_var], [mean, var], factor)  # forgot m/(m-1)

    monkeypatch.setattr(norm, "_update_running", biased_update)
    console, buf = _console()
    assert run_check(seed=0, console=console) is False
    assert "FAIL" in buf.getvalue()
    assert "Error" not in buf.getvalue()


@pytest.mark.parametrize("path,title", [("kernel", "compiled kernel"), ("ops", "tensor ops")])
def test_bench_layer_quick_rows_and_table(monkeypatch, path, title):
    from bnexp import kernel
    from bnexp.bench_layer import measure_layer, render_table, summary_lines

    taken = []
    real = norm._kernel_for
    monkeypatch.setattr(norm, "_kernel_for", lambda *a: taken.append(real(*a) is not None) or real(*a))
    t0 = time.perf_counter()
    rows = measure_layer(quick=True, path=path)
    assert time.perf_counter() - t0 < 30
    assert {r["path"] for r in rows} == {path} and set(taken) == {path == "kernel"}
    assert kernel.load() is not None  # the setting is restored afterwards
    assert {r["mode"] for r in rows} == {"train fwd+bwd", "eval fwd"}
    assert {r["dtype"] for r in rows} == {"float32", "float64"}
    for r in rows:
        assert r["ours_ms"] > 0 and r["torch_ms"] > 0 and abs(r["ratio"] - r["ours_ms"] / r["torch_ms"]) < 1e-9
    conv_train = [r for r in rows if len(r["shape"]) > 2 and r["mode"] == "train fwd+bwd"]
    assert conv_train and all(r["bound_ms"] > 0 and r["bandwidth_gbs"] > 0 and r["ours_over_bound"] > 0
                              for r in conv_train)
    console, buf = _console()
    console.print(render_table(rows))
    assert "ours/torch" in buf.getvalue() and title in buf.getvalue() and summary_lines(rows)
