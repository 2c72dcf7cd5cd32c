"""Smoke runs of the benchmark scripts that need hardware this machine may lack: each runs on the
CPU at a tiny size, so that a GPU session spends its time measuring, not debugging the script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.slow
def test_shortv_gpu_runs_every_row_on_the_cpu(tiny_model_dir, tmp_path):
    """benchmarks/shortv_gpu.py with its CUDA-graph and decode rows, --device cpu: every row is
    timed, the rewrite matches its eager reference, the decode row counts the bytes it reads."""
    cmd = [
        sys.executable, str(BENCHMARKS / "shortv_gpu.py"), "--device", "cpu", "--model",
        str(tiny_model_dir), "--dtype", "float32", "--layers", "[0,2]", "--no-compile",
        "--cuda-graphs", "--decode", "--repeats", "2", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "shortv_gpu.json").read_text())
    assert set(report["rows"]) == {
        "hf_eager",
        "mllmc_torch",
        "mllmc_torch+shortv",
        "mllmc_compile_graphs",
        "mllmc_compile_graphs+shortv",
    }  # the mllmc_cuda_graphs rows (captured CUDA graphs) need CUDA
    for name, row in report["rows"].items():
        assert row["llm_prefill_s"] > 0, name
        assert row.get("kernel_s") is None, name  # kernel time is measured on CUDA only
    assert set(report["pass_speedup"]) == {"mllmc_torch+shortv", "mllmc_compile_graphs+shortv"}
    assert report["parity"]["shortv_vs_reference"]["max_abs_logit_diff"] <= 1e-4
    decode = report["decode"]
    assert set(decode["rows"]) == {"decode", "decode_static"}  # decode_cuda_graphs: CUDA
    assert all(r["same_tokens"] for r in decode["rows"].values())
    assert decode["weight_bytes"] > 0 and decode["kv_bytes"] > 0
    assert all(0 < r["fraction_of_bandwidth"] for r in decode["rows"].values())
    assert "mllmc_compile_graphs+shortv" in proc.stdout and "ms/token" in proc.stdout
