"""Compile a LLaVA model with ShortV and run it, through the Python API only (no CLI).

    python examples/compile_and_run.py [MODEL_DIR] [OUT_DIR]

With no MODEL_DIR, a tiny random-init preset is written first (a real LLaVA-1.5 directory, e.g.
llava-hf/llava-1.5-7b-hf downloaded beforehand, works the same way).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from mllmc.compiler.data.presets import write_preset
from mllmc.compiler.pipeline import compile_model
from mllmc.runtime import load

HERE = Path(__file__).parent


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="mllmc-example-"))
    model_dir = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else write_preset("tiny-llava", work / "tiny-llava")
    )
    out_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else work / "tiny-shortv"

    # Freeze visual tokens in 60% of the layers (ShortV). The layer order comes from the paper's
    # published list for LLaVA-1.5-7B/13B, or from a built-in calibration run for other models.
    result = compile_model(model_dir, out_dir, passes=["shortv:ratio=0.6"], force=True)
    shortv = result.manifest.passes[0]
    print(f"frozen layers: {shortv.stats['frozen_layers']} ({shortv.config['order_from']})")
    flops = result.manifest.flops
    print(
        f"prefill GFLOP: {flops['before']['prefill'] / 1e9:.3f} -> {flops['after']['prefill'] / 1e9:.3f}"
    )

    # The runtime needs only numpy + onnxruntime: this part runs on a machine without torch.
    engine = load(out_dir)
    answer = engine.generate(
        HERE / "images" / "shapes.png", "Describe the image.", max_new_tokens=12
    )
    print(f"tokens: {answer.token_ids}")
    print(f"text: {answer.text!r}")
    print(
        f"prefill {answer.timings['prefill_s'] * 1e3:.1f} ms, "
        f"decode {answer.timings['decode_s_per_token'] * 1e3:.2f} ms/token"
    )


if __name__ == "__main__":
    main()
