"""Baseline benchmark: on small-llava, in one process,
HF eager vs the mllmc ONNX engine vs the same model exported by `transformers.exporters`.

    python benchmarks/baseline.py [--model models/small-llava] [--out benchmarks/results]

Writes results/baseline.json and results/baseline.png. Rows: LLM prefill at 576 visual tokens
(+ a ~32-token prompt), decode ms/token over 32 tokens (medians of rounds that run every engine in
turn), the RSS each engine adds and the process peak; the machine's
roofline (fp32 GEMM GFLOP/s at the model's shapes, memory read GB/s) and each engine as a fraction
of it. The transformers.exporters row times the LLM only (its stock export has no vision part; see
hf_exporters.py), fed the same image features.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from hf_exporters import HFExportersRunner, export  # noqa: E402

from mllmc.compiler.core.capture import load_model  # noqa: E402
from mllmc.compiler.core.flops import analytic_prefill_flops  # noqa: E402
from mllmc.compiler.data.presets import write_preset  # noqa: E402
from mllmc.compiler.pipeline import compile_model  # noqa: E402
from mllmc.compiler.tools import bench  # noqa: E402
from mllmc.compiler.tools.cli import OneLineParser  # noqa: E402
from mllmc.compiler.verify import probe_image  # noqa: E402
from mllmc.runtime import load  # noqa: E402


def hf_exporters_timers(
    runner: HFExportersRunner, ids: np.ndarray, feats: np.ndarray, decode_tokens: int
) -> dict[str, bench.Timer]:
    """Timers of the transformers.exporters engine: LLM prefill and decode (it has no vision)."""
    embeds = runner.embed(ids, feats)

    def decode() -> float:
        logits, cache = runner.prefill(embeds)
        t0 = time.perf_counter()
        for i in range(decode_tokens):
            logits, cache = runner.decode_step(int(np.argmax(logits)), cache, ids.shape[1] + i)
        return (time.perf_counter() - t0) / decode_tokens

    return {"llm_prefill": bench.timed(lambda: runner.prefill(embeds)), "decode": decode}


def main() -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/small-llava")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(args.out)
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        write_preset("small-llava", model_dir)

    model, info = load_model(model_dir)
    image = probe_image(size=info.image_size)
    prompt = bench.prompt_for(args.text_tokens)
    entries = {
        "hf_eager": bench.eager_entry(model, str(model_dir), image, prompt, args.decode_tokens)
    }

    artifact = out / "artifacts" / f"{model_dir.name}-onnx"
    t0 = time.perf_counter()
    compile_model(model_dir, artifact, validate=True, force=True)
    compile_s = time.perf_counter() - t0
    entries["mllmc_onnx"] = bench.loader(
        lambda: load(artifact),
        lambda engine: bench.engine_timers(engine, image, prompt, args.decode_tokens),
    )
    engine = load(artifact)  # the features and ids the exporters' graphs take
    feats, counts = engine.encode_images(image)
    ids = engine.encode_prompt(prompt, counts).input_ids
    del engine

    hfx_dir = out / "artifacts" / f"{model_dir.name}-hf-exporters"
    t0 = time.perf_counter()
    if not (hfx_dir / "export.json").is_file():
        export(str(model_dir), str(hfx_dir))
    hfx_s = time.perf_counter() - t0
    entries["transformers_exporters_onnx"] = bench.loader(
        lambda: HFExportersRunner(hfx_dir),
        lambda runner: (
            hf_exporters_timers(runner, ids, feats, args.decode_tokens),
            int(ids.shape[1]),
        ),
    )

    rows = bench.side_by_side(entries, args.repeats)
    del entries

    n = rows["hf_eager"]["prompt_tokens"]
    peak = bench.roofline(info, n, args.repeats)
    flops = analytic_prefill_flops(info, n - info.visual_tokens)
    bench.add_ratios(rows, info, peak, dict.fromkeys(rows, flops))
    report = {
        "model": str(model_dir),
        "visual_tokens": info.visual_tokens,
        "prompt_tokens": n,
        "decode_tokens": args.decode_tokens,
        "threads": torch.get_num_threads(),
        "roofline": peak,
        "peak_rss_mb": bench.peak_rss_mb(),
        "rss_note": bench.RSS_NOTE,
        "compile_s": {"mllmc_onnx": compile_s, "transformers_exporters_onnx": hfx_s},
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "rows": rows,
    }
    (out / "baseline.json").write_text(json.dumps(report, indent=2))
    bench.plot(report, out / "baseline.png")
    print(bench.format_table(report))
    print(f"wrote {out / 'baseline.json'} and {out / 'baseline.png'}")


if __name__ == "__main__":
    main()
