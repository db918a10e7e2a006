"""`bnexp check` passes on the real layer and catches a broken one."""

from __future__ import annotations

import io
import time

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
    def biased_update(self, mean, var, m):
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(var, alpha=factor)  # forgot m/(m-1)

    monkeypatch.setattr(norm.BatchNormBase, "_update_running_stats", biased_update)
    console, buf = _console()
    assert run_check(seed=0, console=console) is False
    assert "FAIL" in buf.getvalue()
