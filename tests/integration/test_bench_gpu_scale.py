"""bench/gpu_scale.py at its CPU smoke size: the figures it writes, and the grid it runs through the engine.

The grid's report comes from the benchmark's on-device synthetic block source (a skeleton Dataset
of lazy zeros that is never computed): every cell must be finite and the planted drift visible --
a check that the source, the skeleton and the engine are wired right, not a speed claim.
"""
from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_scale():
    spec = importlib.util.spec_from_file_location("bench_gpu_scale", ROOT / "bench" / "gpu_scale.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def small_run(gpu_scale, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_scale")
    out, report = tmp / "gpu_scale.md", tmp / "report.nc"
    # one torch thread: on a shared 2-core machine two threads that wait on each other are several
    # times slower (main restores the process's thread count)
    code = gpu_scale.main(["--device", "cpu", "--small", "--out", str(out), "--report", str(report),
                           "--threads", "1"])
    assert code == 0
    return out.read_text(), report


def _rows(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", text, re.M))


def _number(value: str) -> float:
    m = re.match(r"\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)", value)
    assert m, f"no number at the start of {value!r}"
    return float(m.group(1))


def test_markdown_rows_and_timings(small_run, gpu_scale):
    text, _ = small_run
    rows = _rows(text)
    expected = ["device", "torch", "drift matmul precision", "matmul float32 TFLOP/s", "matmul TF32 TFLOP/s",
                "mmd tokens per side", "mmd feature size d", "mmd clusters", "mmd FLOPs (8 n^2 d)",
                "mmd test time (s)", "mmd test TFLOP/s", "mmd test fraction of matmul rate",
                "grid layers", "grid checkpoints", "grid tokens", "grid metrics", "grid make_plan time (s)",
                "grid run_grid time (s)", "grid assemble time (s)", "grid total time (s)",
                "grid block generation time (s)", "grid every report cell finite"]
    missing = [r for r in expected if r not in rows]
    assert not missing, f"rows missing from the markdown: {missing}\n{text}"
    assert rows["device"].startswith("CPU: ")
    assert rows["matmul TF32 TFLOP/s"].startswith("n/a")
    assert rows["mmd tokens per side"] == "512" and rows["mmd feature size d"] == "64"
    assert rows["grid layers"] == "4" and rows["grid feature size d"] == "64"
    assert rows["grid metrics"] == "mmd + paired_shift + gap"
    for name in ("matmul float32 TFLOP/s", "mmd test time (s)", "mmd test TFLOP/s", "grid make_plan time (s)",
                 "grid run_grid time (s)", "grid assemble time (s)", "grid total time (s)",
                 "grid block generation time (s)", "grid mmd TFLOP/s over run_grid"):
        assert _number(rows[name]) > 0, f"{name}: {rows[name]}"
    frac = _number(rows["mmd test fraction of matmul rate"])
    assert math.isfinite(frac) and frac > 0
    assert _number(rows["mmd FLOPs (8 n^2 d)"]) == pytest.approx(gpu_scale.mmd_flops(512, 64), rel=1e-3)
    tiles = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| nan \|$", text, re.M)
    assert [int(t[0]) for t in tiles] == [128, 512]
    assert all(float(t[1]) > 0 for t in tiles)
    assert rows["grid every report cell finite"] == "yes"


def test_grid_report_finite_with_the_planted_drift(small_run):
    from driftlens.report import load_report

    _, path = small_run
    rep = load_report(path)
    labels = [str(c) for c in rep.checkpoint.values]
    assert len(labels) == 3 and rep.attrs["reference"] == labels[0]
    assert list(rep.layer.values) == [0, 1, 2, 3]
    for name, var in rep.data_vars.items():
        v = var
        if name.endswith(("_p", "_q")):          # untested at the reference (NaN by design)
            v = var.sel(checkpoint=labels[1:])
        assert np.isfinite(v.values).all(), f"{name} has non-finite cells"
    mmd = rep["mmd"].sel(site="hidden", modality="visual").values           # [checkpoint, layer]
    planted, others = mmd[:, 1], np.delete(mmd, 1, axis=1)
    assert planted[0] == 0.0
    assert planted[2] > planted[1] > 0, planted                           # grows with the checkpoint
    assert planted[1] > 100 * np.abs(others).max(), (planted, others)
    assert float(rep["mmd_p"].sel(site="hidden", modality="visual", layer=1)[2]) < 0.01
    shift = rep["paired_shift"].sel(site="hidden", modality="visual").values
    assert shift[2, 1] > shift[1, 1] > shift[2, 0] > 0                      # noise everywhere, drift at layer 1
    assert (rep["gap"].values > 0).all()
