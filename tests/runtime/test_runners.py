"""Runner selection: an ONNX artifact is loaded and run without importing torch (the aoti and
trt runners import it only when their artifacts are loaded), and every runner module in
runtime/runners/ is a target the engine can pick."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mllmc.runtime.runners import known_targets


def test_onnx_artifact_runs_without_torch(tiny_base_artifact: Path, sample_image: Path):
    code = (
        "import sys\n"
        "from mllmc.runtime import load\n"
        f"r = load({str(tiny_base_artifact)!r}).generate({str(sample_image)!r}, 'Hi', 3)\n"
        "assert r.token_ids\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_known_targets():
    assert known_targets() == ["aoti", "onnx", "trt"]
