"""`bnexp check` passes on the real layer and catches a broken one."""

from __future__ import annotations

import io
import time

import torch

from rich.console import Console

from bnexp import norm
from bnexp.check import run_check


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=250, color_system=None), buf


def test_check_passes_on_real_layer():
    console, buf = _console()
    t0 = time.perf_counter()
    assert run_check(seed=0, console=console) is True
    assert time.perf_counter() - t0 < 10
    out = buf.getvalue()
    assert "PASS" in out and "FAIL" not in out
    assert run_check(seed=3, console=_console()[0]) is True


def test_check_fails_when_backward_scale_is_wrong(monkeypatch):
    real = norm._grad_reductions

    def wrong(g, x_centred):
        sum_g, sum_gx = real(g, x_centred)
        return sum_g, sum_gx * 1.01  # a 1% error in the Σg·x̂ term of the backward

    monkeypatch.setattr(norm, "_grad_reductions", wrong)
    console, buf = _console()
    assert run_check(seed=0, console=console) is False
    assert "FAIL" in buf.getvalue()


def test_check_fails_when_running_var_is_biased(monkeypatch):
    def biased_update(running_mean, running_var, mean, var, m, factor):
        torch._foreach_lerp_([running_mean, running_var], [mean, var], factor)  # forgot m/(m-1)

    monkeypatch.setattr(norm, "_update_running", biased_update)
    console, buf = _console()
    assert run_check(seed=0, console=console) is False
    assert "FAIL" in buf.getvalue()
