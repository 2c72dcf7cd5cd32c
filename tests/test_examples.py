"""The examples a user copies from must run as shipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mllmc.runtime import golden

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_compile_and_run_example(tiny_model_dir, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "compile_and_run.py"),
            str(tiny_model_dir),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "frozen layers: [" in proc.stdout and "calibration on" in proc.stdout
    assert "tokens: [" in proc.stdout and "ms/token" in proc.stdout
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_golden_regression_example(tiny_shortv_artifact, tmp_path):
    record = golden.record(
        tiny_shortv_artifact, EXAMPLES / "images" / "shapes.png", "Describe the image.", 8
    )
    good = tmp_path / "golden.json"
    good.write_text(json.dumps(record))
    test_file = str(EXAMPLES / "test_golden_regression.py")

    def run(golden_path: Path) -> subprocess.CompletedProcess:
        env = dict(
            os.environ, MLLMC_ARTIFACT=str(tiny_shortv_artifact), MLLMC_GOLDEN=str(golden_path)
        )
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )

    ok = run(good)
    assert ok.returncode == 0 and "1 passed" in ok.stdout, ok.stdout
    record["logits"][0]["top_values"][0] += 0.1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(record))
    failed = run(bad)
    assert failed.returncode == 1 and "1 failed" in failed.stdout, failed.stdout
