"""`bnexp bench`: the loop and memory sections run and print their tables; the bare reference loop is the
same computation as `bnexp train`. Speed is never asserted here (benchmarks report ratios, tests don't).
"""

from __future__ import annotations

import tempfile

import pytest
import torch

from bnexp import bench
from bnexp.bench import loop, memory, workload
from bnexp.data import load_dataset

@pytest.fixture
def bench_tmp(tmp_path, monkeypatch):
    """Temporary run directories of the benchmark go under tmp_path, never /tmp or the repo."""
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    return work


def _row(out: str, label: str) -> str:
    rows = [line for line in out.splitlines() if label in line]
    assert rows, f"no table row {label!r} in:\n{out}"
    return rows[0]


@pytest.mark.slow
def test_quick_loop_prints_ratio_table(cli, bench_tmp):
    r = cli("bench", "--quick", "--only", "loop")
    assert r.code == 0, r.err
    assert "ratio vs bare" in r.out and "target" in r.out
    assert "memory:" not in r.out  # --only loop runs only the loop section
    for label, target in (("bnexp train, probes off", "0.95"), ("bnexp train, probes every 100", "0.90")):
        row = _row(r.out, label)
        ms, steps_per_s, bare_ms, ratio = (float(c) for c in row.split("│")[2:6])
        assert ms > 0 and bare_ms > 0 and ratio > 0
        assert steps_per_s == pytest.approx(1000 / ms, rel=0.01, abs=1)
        assert f"≥ {target}" in row and ("meets" in row or "misses" in row)
    assert list(bench_tmp.glob("bnexp-bench-*")) == []  # the temporary run directories are gone


@pytest.mark.slow
def test_quick_memory_prints_rss_table(cli, bench_tmp):
    r = cli("bench", "--quick", "--only", "memory")
    assert r.code == 0, r.err
    assert "end ÷ warm-up" in r.out and "growth (MB)" in r.out
    assert "loop:" not in r.out
    for label in ("bare loop (reference)", "bnexp train, probes off", "bnexp train, probes every 100"):
        cells = [c.strip() for c in _row(r.out, label).split("│")[2:7]]
        warm, end, peak, growth, ratio = (float(c) for c in cells)
        assert warm > 50 and end > 50  # torch alone keeps well over 50 MB resident
        assert peak >= max(warm, end) - 1e-6
        assert growth == pytest.approx(end - warm, abs=0.11)
        assert ratio == pytest.approx(end / warm, abs=2e-3)
    assert list(bench_tmp.glob("bnexp-bench-*")) == []


@pytest.mark.slow
def test_quick_layer_prints_the_layer_table(cli):
    r = cli("bench", "--quick", "--only", "layer")
    assert r.code == 0, r.err
    assert "ratio: ours ÷ torch" in r.out and "60×100" in r.out and "train fwd+bwd" in r.out
    assert "loop:" not in r.out and "memory:" not in r.out


def test_unknown_section_is_a_user_error(cli):
    r = cli("bench", "--quick", "--only", "gpu")
    assert r.code == 2
    assert r.err.strip().splitlines() == [
        "error: --only gpu: unknown section (choose from layer, resnet, loop, memory, probes)"]
    assert "Traceback" not in r.err and r.out == ""


@pytest.mark.parametrize("device,message", [
    ("tpu", "error: --device tpu: choose cpu or cuda"),
    *([] if torch.cuda.is_available() else [("cuda", "error: --device cuda: no CUDA device is available")]),
])
def test_bad_device_is_a_user_error(cli, device, message):
    r = cli("bench", "--quick", "--only", "layer", "--device", device)
    assert r.code == 2
    assert r.err.strip().splitlines() == [message]
    assert "Traceback" not in r.err and r.out == ""


def test_sections_keep_their_own_order():
    assert bench.check_sections([]) == ["layer", "resnet", "loop", "memory", "probes"]
    assert bench.check_sections(["memory", "loop", "loop"]) == ["loop", "memory"]


def test_resnet_step_pairs_and_restores_threads():
    from bnexp.bench.resnet import measure_resnet, resnet20, resnet_table
    from bnexp.nn import BatchNorm2d

    model = resnet20("bnexp")
    assert sum(isinstance(m, BatchNorm2d) for m in model.modules()) == 19
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    threads = torch.get_num_threads()
    row = measure_resnet(steps=2, warmup=1, batch=4, threads=1)
    assert row["threads"] == 1 and row["ours_ms"] > 0 and row["torch_ms"] > 0
    assert row["ratio"] == pytest.approx(row["ours_ms"] / row["torch_ms"])
    assert row["pair_ratio_min"] <= row["pair_ratio_max"]
    assert torch.get_num_threads() == threads
    assert resnet_table([row]).row_count == 1


def test_rss_reads_proc_status():
    before = memory.read_rss_mb()
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched so the pages are resident
    after = memory.read_rss_mb()
    assert before > 10 and after - before > 48
    del block


@pytest.mark.parametrize("norm", ["torch", "bnexp"])
def test_bare_loop_trains_the_same_network_as_bnexp_train(norm, bench_tmp):
    """The reference does the same work: same init, batches and updates give bit-identical weights."""
    cfg = workload.paper_mlp_config(probes=False, norm=norm)
    cfg.data.synthetic.num_samples = 400  # 320 train: epochs turn over within the run
    cfg.model.hidden = [16, 16]
    data = load_dataset(cfg.data)
    kept: dict = {}
    draws: list[int] = []
    workload.run_trainer(cfg, data, 14, draws.append, keep=kept)
    assert draws == list(range(1, 16))  # every step's draw, then once after the run
    assert kept["summary"]["status"] == "completed" and kept["summary"]["steps"] == 14
    bare = workload.BareLoop(cfg, data)
    assert bare.run(9) > 0 and bare.run(5) > 0  # resumable: two calls make one 14-step run
    ours = kept["model"].state_dict()
    assert ours.keys() == bare.model.state_dict().keys()
    for key, value in bare.model.state_dict().items():
        assert torch.equal(ours[key], value), key


def test_measure_loop_pairs_chunks_and_reports_medians(bench_tmp):
    threads = torch.get_num_threads()
    results, info = loop.measure_loop(chunks=3, chunk=4, warmup=2)
    assert [r.contender for r in results] == ["probes off", "probes on"]
    for r in results:
        assert len(r.pair_ratios) == 3 and r.target == loop.LOOP_TARGETS[r.contender]
        assert r.ratio == pytest.approx(sorted(r.pair_ratios)[1])
        assert r.ms_per_step > 0 and r.bare_ms_per_step > 0
    assert info["threads"] == 1 and info["chunks"] == 3 and info["chunk"] == 4
    assert torch.get_num_threads() == threads  # the section's one thread is not left behind


@pytest.mark.slow
def test_quick_probes_section_reports_every_family(cli, bench_tmp):
    r = cli("bench", "--quick", "--only", "probes")
    assert r.code == 0, r.err
    from bnexp.bench.probes import FAMILIES

    for family in ("probes off", "default families", *FAMILIES):
        row = _row(r.out, family)
        if "Error" not in row and "double backward" not in row:
            assert "%" in row, row
    assert "< 25%" in _row(r.out, "default families")


def _bench_tables() -> list:
    """Every section's table, from rows shaped as its measure function returns them, with figures that
    must show whole."""
    from bnexp.bench.layer import render_table
    from bnexp.bench.probes import probes_table
    from bnexp.bench.resnet import resnet_table

    layer_rows = [{"threads": 1, "clock": "wall", "path": "kernel", "device": "cpu", "shape": shape,
                   "dtype": dtype, "mode": mode, "ours_ms": 133.078, "torch_ms": 154.964, "ratio": 0.86,
                   "ratio_min": 0.84, "bound_ms": 120.508, "ours_over_bound": 1.61, "bandwidth_gbs": 13.1}
                  for shape in [(60, 100), (128, 64, 32, 32), (8, 16, 8, 8, 8)] for dtype in ("float32", "float64")
                  for mode in ("train fwd+bwd", "eval fwd")]
    resnet_rows = [{"threads": 2, "clock": "wall", "batch": 128, "steps": 30, "ours_ms": 237.6, "torch_ms": 236.3,
                    "ratio": 1.005, "pair_ratio_min": 0.90, "pair_ratio_max": 1.18}]
    loop_results = [loop.LoopResult(c, 1.186, 1.125, 0.947, [0.936, 0.962], 0.95) for c in ("probes off", "probes on")]
    loop_info = {"norm": "bnexp", "chunks": 9, "chunk": 500, "probes_every": 100, "eval_every": 100,
                 "log_every": 10, "checkpoint_every": 500, "warmup": 300, "threads": 1}
    memory_results = [memory.MemoryResult(c, 321.5, 322.4, 330.2) for c in ("bare loop", "probes off", "probes on")]
    memory_info = {"steps": 12000, "warmup": 2000, "norm": "bnexp", "probes_every": 100, "sample_every": 500}
    probe_rows = [{"contender": "probes off", "seconds": 1.76, "overhead": 0.0, "wall_overhead": 0.0,
                   "default": False},
                  {"contender": "default families", "seconds": 1.87, "overhead": 0.062, "wall_overhead": 0.05,
                   "default": True}]
    return [(render_table(layer_rows), ["128×64×32×32", "8×16×8×8×8", "train fwd+bwd", "133.078", "154.964",
                                        "120.508", "13.1"]),
            (resnet_table(resnet_rows), ["237.6", "236.3", "1.005", "0.90–1.18", "≤ 1.0"]),
            (loop.loop_table(loop_results, loop_info), ["1.186", "1.125", "0.947", "0.936–0.962", "misses"]),
            (memory.memory_table(memory_results, memory_info), ["321.5", "322.4", "330.2", "1.003"]),
            (probes_table(probe_rows, {"every": 100, "steps": 2000, "repeats": 5}), ["+6.2 %", "1.87", "< 25%"])]


def test_bench_tables_fit_100_columns_without_cutting_a_figure():
    from rich.console import Console

    for table, figures in _bench_tables():
        console = Console(width=100, record=True, color_system=None)
        assert console.measure(table).maximum <= 100  # rich would otherwise squeeze or crop the columns
        console.print(table)
        text = console.export_text()
        assert "…" not in text, text
        for figure in figures:
            assert figure in text, (figure, text)
