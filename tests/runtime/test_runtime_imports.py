"""The runtime is torch-free: importing it and everything a deployed artifact needs must not
import torch (or transformers)."""

from __future__ import annotations

import subprocess
import sys


def test_runtime_does_not_import_torch():
    code = (
        "import sys\n"
        "import mllmc.runtime\n"
        "from mllmc.runtime import load, engine, golden, preprocess, manifest\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
