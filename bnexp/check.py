"""`bnexp check`: our BatchNorm layer against torch.nn.BatchNorm*d, side by side, on random cases."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich import box
from rich.table import Table

from bnexp.nn import batchnorm as norm
from bnexp.nn import kernel

_OURS = {2: norm.BatchNorm1d, 3: norm.BatchNorm1d, 4: norm.BatchNorm2d, 5: norm.BatchNorm3d}
_TORCH = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}

# Errors are measured relative to the reference tensor's scale (max(1, max|ref|)). The float32 bound
# leaves room for different summation orders over a few thousand values; a wrong formula is off by
# O(1), so it cannot hide under it.
_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

_TRAIN_STEPS = 3
# output, ∂ℓ/∂x, ∂ℓ/∂γ, ∂ℓ/∂β (max over the training steps), running mean/var after them, eval output.
_COLUMNS = ("out", "dx", "dγ", "dβ", "run μ", "run σ²", "eval")


@dataclass
class _Case:
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    kwargs: dict = field(default_factory=dict)
    channels_last: bool = False

    @property
    def name(self) -> str:
        return " ".join(filter(None, self.label))

    @property
    def label(self) -> tuple[str, str]:
        """The layer and input ("2d (8,16,9,9) f32"), and the options ("m=None affine=F", or "")."""
        short = {"momentum": "m", "affine": "affine", "bias": "bias", "track_running_stats": "track"}
        opts = [f"{short[k]}={'F' if v is False else v}" for k, v in self.kwargs.items()]
        if self.channels_last:
            opts.append("chlast")
        dt = {torch.float32: "f32", torch.float64: "f64"}[self.dtype]
        rank = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}[len(self.shape)]
        return " ".join([rank, "(" + ",".join(map(str, self.shape)) + ")", dt]), " ".join(opts)


def _cases(gen: torch.Generator) -> list[_Case]:
    """A fixed spread of layouts and options; sizes drawn from the seed so reruns probe new shapes."""

    def r(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    f32, f64 = torch.float32, torch.float64
    return [
        _Case((r(2, 64), r(1, 32)), f32),
        _Case((r(2, 64), r(1, 32)), f64, {"momentum": None}),
        _Case((r(2, 16), r(1, 16), r(1, 20)), f32, {"momentum": 0.7}),
        _Case((r(2, 16), r(1, 16), r(1, 20)), f64, {"affine": False}),
        _Case((r(2, 8), r(1, 16), r(1, 9), r(1, 9)), f32),
        _Case((r(2, 8), r(1, 16), r(1, 9), r(1, 9)), f64, {"bias": False}),
        _Case((r(2, 8), r(1, 16), r(1, 9), r(1, 9)), f32, {"track_running_stats": False}),
        _Case((r(2, 8), r(1, 16), r(2, 9), r(2, 9)), f32, {}, channels_last=True),
        _Case((r(2, 8), r(1, 16), r(1, 9), r(1, 9)), f64, {"affine": False, "momentum": None}),
        _Case((r(2, 4), r(1, 8), r(1, 5), r(1, 5), r(1, 5)), f32),
        _Case((r(2, 4), r(1, 8), r(1, 5), r(1, 5), r(1, 5)), f64, {"momentum": 0.7, "bias": False}),
        _Case((64, 32, 8, 8), f32),
    ]


def _err(ours: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """Max abs error relative to max(1, max|ref|); a missing-vs-present mismatch is infinitely wrong."""
    if ours is None and ref is None:
        return 0.0
    if ours is None or ref is None or ours.shape != ref.shape:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    scale = max(1.0, ref.abs().max().item())
    return (ours.double() - ref.double()).abs().max().item() / scale


def _run_case(case: _Case, gen: torch.Generator, classes: dict[int, type]) -> dict[str, float]:
    rank = len(case.shape)
    c = case.shape[1]
    ours = classes[rank](c, dtype=case.dtype, **case.kwargs)
    ref = _TORCH[rank](c, dtype=case.dtype, **case.kwargs)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    ref.load_state_dict(ours.state_dict())

    def batch():
        # Shifted and scaled so that centring and the running statistics are exercised.
        x = torch.randn(case.shape, generator=gen, dtype=case.dtype) * 3.0 + 2.0
        g = torch.randn(case.shape, generator=gen, dtype=case.dtype)
        if case.channels_last and rank == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, g

    errs = dict.fromkeys(_COLUMNS, 0.0)

    def worst(key, value):
        errs[key] = max(errs[key], value)

    for _ in range(_TRAIN_STEPS):
        x, g = batch()
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), ref(x2)
        y1.backward(g)
        y2.backward(g)
        worst("out", _err(y1, y2))
        worst("dx", _err(x1.grad, x2.grad))
        worst("dγ", _err(ours.weight.grad if ours.weight is not None else None,
                                  ref.weight.grad if ref.weight is not None else None))
        worst("dβ", _err(ours.bias.grad if ours.bias is not None else None,
                                ref.bias.grad if ref.bias is not None else None))
        ours.zero_grad()
        ref.zero_grad()
    worst("run μ", _err(ours.running_mean, ref.running_mean))
    worst("run σ²", _err(ours.running_var, ref.running_var))
    if ours.num_batches_tracked is not None and not torch.equal(ours.num_batches_tracked, ref.num_batches_tracked):
        errs["run μ"] = float("inf")
    ours.eval()
    ref.eval()
    x, _ = batch()
    with torch.no_grad():
        worst("eval", _err(ours(x), ref(x)))
    return errs


def _fmt(e: float) -> str:
    """Compact scientific notation: 2e-7, 0, inf."""
    if e == 0.0 or e == float("inf"):
        return f"{e:g}"
    mant, exp = f"{e:.0e}".split("e")
    return f"{mant}e{int(exp)}"


def run_check(seed: int = 0, classes: dict[int, type] | None = None) -> tuple[bool, list]:
    """Compare bnexp.nn's layer with torch.nn.BatchNorm*d: (every case passes, what to show: a table and
    notes, as rich renderables).

    ``classes`` maps an input rank (2 to 5) to the layer class to check in place of ours (default:
    BatchNorm1d/1d/2d/3d), e.g. a subclass under development, or a broken one in the tests.
    """
    classes = {**_OURS, **(classes or {})}
    gen = torch.Generator().manual_seed(seed)
    # 79 columns at most: the case's layer and input on its first row, its options on the next (the other
    # path's), one space between columns. Nothing wraps on an 80-column terminal.
    table = Table(title=f"bnexp.nn vs torch.nn.BatchNorm*d (seed {seed}, {_TRAIN_STEPS} training steps)",
                  caption="max |ours − torch| / max(1, max |torch|)\npath: the compiled kernel, or the tensor ops",
                  box=box.SIMPLE_HEAD, padding=0, pad_edge=False, show_edge=False)
    table.add_column("case")
    table.add_column("path", no_wrap=True)
    for col in _COLUMNS:
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    # Both of the layer's paths on every case: the compiled kernel (bnexp.nn.kernel) takes contiguous float
    # input, the tensor ops everything else (and all input when the kernel cannot be built).
    with kernel.enabled(True) as built:
        paths = {"kernel": True, "ops": False} if built is not None else {"ops": False}
    all_ok = True
    errors = []
    for case in _cases(gen):
        # channels_last input is not contiguous: only the tensor ops take it.
        case_paths = {"ops": False} if case.channels_last else paths
        label = case.label if len(case_paths) > 1 and case.label[1] else (case.name,)
        for row, (path, on) in enumerate(case_paths.items()):
            try:
                with kernel.enabled(on):
                    errs = _run_case(case, gen, classes)
                ok = all(e <= _TOL[case.dtype] for e in errs.values())
                cells = [_fmt(e) if e <= _TOL[case.dtype] else f"[red]{_fmt(e)}[/red]" for e in errs.values()]
            except Exception as exc:  # a crash is a failed comparison, reported in its row and below the table
                ok = False
                cells = ["[red]error[/red]"] + [""] * (len(_COLUMNS) - 1)
                errors.append(f"[red]{case.name} · {path}: {type(exc).__name__}: {exc}[/red]")
            all_ok &= ok
            result = "[green]PASS[/green]" if ok else "[bold red]FAIL[/bold red]"
            name = label[row] if row < len(label) else ""
            table.add_row(f"  {name}" if row else name, path, *cells, result)
    tol = ", ".join(f"{str(k).removeprefix('torch.')} ≤ {v:g}" for k, v in _TOL.items())
    shown = [table, *errors, ("[green]all cases pass[/green]" if all_ok else "[bold red]some cases FAIL[/bold red]")
             + f" (tolerance {tol})"]
    if "kernel" not in paths:
        shown.append("[yellow]the compiled kernel could not be built (see the warning above): "
                     "only the tensor-op path was checked[/yellow]")
    return all_ok, shown
