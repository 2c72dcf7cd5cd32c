"""Artifact bytes and loaded RSS against the model's weight bytes (weights once, not twice).

    python benchmarks/weights_once.py ARTIFACT MODEL_DIR [--json out.json]

Loads the artifact in fresh processes (`mllmc.runtime.load`, default and share_weights=True),
runs a few 17-token generations, and prints the weight bytes (the model's *.safetensors), the
engine files' bytes (what the manifest names), the memory the load and the generations added
(RSS, PSS, USS) as multiples of the weights, and the prefill / decode times."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from mllmc.compiler.tools.cli import OneLineParser

CHILD = """
import gc, json, sys, time, psutil
import numpy as np
proc = psutil.Process()
gc.collect()
before = proc.memory_full_info()
from mllmc.runtime import load
engine = load(sys.argv[1], share_weights=sys.argv[2] == "1")
image = np.full((64, 64, 3), 128, dtype=np.uint8)
engine.generate(image, "Describe the image.", max_new_tokens=4, stop_at_eos=False)
t = [engine.generate(image, "Describe the image.", max_new_tokens=17, stop_at_eos=False).timings
     for _ in range(3)]
after = proc.memory_full_info()
print(json.dumps({
    "rss": after.rss - before.rss, "pss": after.pss - before.pss, "uss": after.uss - before.uss,
    "prefill_ms": 1e3 * min(x["prefill_s"] for x in t),
    "decode_ms_per_token": 1e3 * min(x["decode_s_per_token"] for x in t),
}))
"""


def measure(artifact: Path, model_dir: Path) -> dict[str, Any]:
    """Bytes on disk, and memory added by load + generation with and without share_weights.

    RSS counts a file page once per mapping (the ONNX runner maps each tensor of weights.data
    into both sessions), so PSS (each physical page split among its mappings) is the measure of
    memory used; USS is what the process holds that is not file-backed."""
    from mllmc.runtime.manifest import read_manifest

    manifest = read_manifest(artifact)
    files = {f for e in manifest.segments.values() for f in e.files()}
    engine_bytes = sum((artifact / f).stat().st_size for f in files)
    weight_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    row: dict[str, Any] = {
        "target": manifest.target,
        "weight_bytes": weight_bytes,
        "engine_bytes": engine_bytes,
        "engine_bytes_x_weights": round(engine_bytes / weight_bytes, 3),
    }
    for share in (False, True):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(artifact), str(int(share))],
            capture_output=True,
            text=True,
            check=True,
        )
        child = json.loads(out.stdout.strip().splitlines()[-1])
        key = "share_weights" if share else "default"
        for k in ("rss", "pss", "uss"):
            child[k + "_x_weights"] = round(child[k] / weight_bytes, 3)
        row[key] = child
    return row


def main() -> None:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    row = measure(args.artifact, args.model_dir)
    print(json.dumps(row, indent=2))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
