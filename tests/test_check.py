"""`bnexp check` passes on the real layer and catches a broken one."""

from __future__ import annotations

import io

import pytest
import torch

from rich.console import Console

from bnexp.nn import batchnorm as norm
from bnexp.check import run_check


def _check(seed: int, classes=None, width: int = 250) -> tuple[bool, str]:
    """run_check's verdict and what `bnexp check` prints on a terminal `width` columns wide."""
    ok, shown = run_check(seed=seed, classes=classes)
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None)
    for item in shown:
        console.print(item)
    return ok, buf.getvalue()


def _path(row: str) -> str:
    """The path column of a table row: the word before the numbers."""
    return next(word for word in row.split() if word in ("kernel", "ops"))


def _broken(make_error, only_kernel: bool = False) -> dict[int, type]:
    """Our classes with an error added after their forward (on the kernel path alone if asked)."""

    def subclass(base):
        class Broken(base):
            def forward(self, x):
                y = super().forward(x)
                on_kernel = norm.kernel_for(x, self.weight, self.bias) is not None
                if self.training and (on_kernel or not only_kernel):
                    make_error(self, x)
                return y

        return Broken

    return {rank: subclass(cls) for rank, cls in
            {2: norm.BatchNorm1d, 3: norm.BatchNorm1d, 4: norm.BatchNorm2d, 5: norm.BatchNorm3d}.items()}


def _scale_input_grad(layer, x):
    if x.requires_grad:
        x.register_hook(lambda g: g * 1.01)  # a 1% error in ∂ℓ/∂x


def _bias_running_var(layer, x):
    if layer.running_var is not None:
        with torch.no_grad():
            layer.running_var.mul_(1.01)  # as if the m/(m−1) correction were slightly off


def test_check_passes_on_real_layer():
    ok, out = _check(0)
    assert ok is True
    assert "PASS" in out and "FAIL" not in out
    assert _check(3)[0] is True


def test_check_fails_when_backward_scale_is_wrong():
    ok, out = _check(0, _broken(_scale_input_grad))
    assert ok is False
    assert "FAIL" in out
    assert "Error" not in out  # caught as a numerical difference, not as a crash of the change


def test_check_covers_both_paths_and_fails_when_the_kernel_backward_is_wrong():
    ok, out = _check(1)
    assert ok is True
    rows = [line for line in out.splitlines() if "PASS" in line]
    assert [_path(r) for r in rows].count("kernel") == 11 and [_path(r) for r in rows].count("ops") == 12

    ok, out = _check(0, _broken(_scale_input_grad, only_kernel=True))
    assert ok is False
    failed = [line for line in out.splitlines() if "FAIL" in line and "cases" not in line]
    assert failed and all(_path(line) == "kernel" for line in failed)


def test_check_fails_when_running_var_is_biased():
    ok, out = _check(0, _broken(_bias_running_var))
    assert ok is False
    assert "FAIL" in out
    assert "Error" not in out


@pytest.mark.parametrize("path,title", [("kernel", "compiled kernel"), ("ops", "tensor ops")])
def test_bench_layer_quick_rows_and_table(path, title):
    from bnexp.nn import kernel
    from bnexp.bench.layer import measure_layer, render_table, summary_lines

    rows = measure_layer(quick=True, path=path)
    assert {r["path"] for r in rows} == {path}
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
    assert "ratio: ours ÷ torch" in out and title in out and summary_lines(rows)


@pytest.mark.parametrize("width", [80, 100])
def test_the_table_fits_80_and_100_columns_without_breaking_a_case(width):
    """Each case on one line: its layer and input on the kernel row, its options on the ops row."""
    from bnexp.check import _cases

    ok, out = _check(0, width=width)
    assert ok and max(len(line) for line in out.splitlines()) <= min(width, 79)
    lines = out.splitlines()
    rows = [line for line in lines if line.rstrip().endswith("PASS")]
    assert len(rows) == 23
    for case in _cases(torch.Generator().manual_seed(0)):
        layer, options = case.label
        mine = [i for i, line in enumerate(lines) if line.startswith(layer + " ")]
        assert len(mine) == 1, (layer, out)
        if case.channels_last:  # one row, the tensor ops': the whole name on it
            assert lines[mine[0]].startswith(case.name + " ") and _path(lines[mine[0]]) == "ops"
        else:
            assert _path(lines[mine[0]]) == "kernel" and _path(lines[mine[0] + 1]) == "ops"
            assert lines[mine[0] + 1].split("ops")[0].strip() == options


def test_a_case_that_raises_fails_in_its_row_and_says_why_below_the_table():
    class Raises(norm.BatchNorm2d):
        def forward(self, x):
            raise RuntimeError("boom " + "x" * 200)

    ok, out = _check(0, {4: Raises}, width=80)
    assert ok is False and max(len(line) for line in out.splitlines()) <= 80
    failed = [line for line in out.splitlines() if line.rstrip().endswith("FAIL")]
    assert failed and all(" error " in line for line in failed)
    assert "2d (4,3,7,4) f32 · kernel: RuntimeError: boom xxx" in " ".join(out.split())
