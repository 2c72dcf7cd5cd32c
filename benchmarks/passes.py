"""Pruning / early-exit benchmark: small-llava (576 visual tokens), one process, engines interleaved
per round: HF eager, the unrewritten ONNX engine, each pass at its defaults (fastv, vte:k=L/2,
fastervlm, vtc_cls) and `fastervlm:keep=144 + shortv:ratio=0.6`. Per engine: vision ms, LLM
prefill ms, decode ms/token, KV-cache bytes at the end of the prompt, prefill GFLOP (from the
layer plan, checked against the graphs in tests/passes/test_pruning.py), measured vs FLOPs-ideal
prefill speedup over the unrewritten ONNX engine.

    python benchmarks/passes.py [--model models/small-llava] [--repeats 2]
    (or first --compile-only, then --reuse: the timing run then only loads the artifacts)

Writes results/passes.json and results/passes.png (measured speedup against the FLOPs cut, one
point per pass / config, with the ideal line).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from mllmc.compiler.data.presets import write_preset
from mllmc.compiler.tools import bench
from mllmc.compiler.tools.cli import OneLineParser
from mllmc.compiler.tools.inspect_artifact import kv_cache_bytes

LC_FILE = Path("benchmarks/results/shortv-lc.json")  # benchmarks/shortv.py's LC calibration


def variants(num_layers: int, num_visual: int) -> dict[str, list[str]]:
    """Each pass at its defaults (vte at the middle layer), and fastervlm keeping a quarter of the
    visual tokens (144 of 576) composed with ShortV at ratio 0.6."""
    shortv = "shortv:ratio=0.6"
    if LC_FILE.is_file() and json.loads(LC_FILE.read_text())["num_layers"] == num_layers:
        shortv += f",lc={LC_FILE}"
    return {
        "fastv": ["fastv"],
        f"vte:k={num_layers // 2}": [f"vte:k={num_layers // 2}"],
        "fastervlm": ["fastervlm"],
        "vtc_cls": ["vtc_cls"],
        f"fastervlm:keep={num_visual // 4}+shortv": [f"fastervlm:keep={num_visual // 4}", shortv],
    }


def run(
    model_dir: str,
    out: Path,
    n_text: int,
    decode_tokens: int,
    repeats: int,
    reuse: bool = False,
    compile_only: bool = False,
) -> dict[str, Any] | None:
    """Compile every variant (or reuse artifacts an earlier run left), then time all engines
    interleaved in this process."""
    from mllmc.compiler.core.capture import load_model
    from mllmc.compiler.pipeline import compile_model
    from mllmc.compiler.verify import probe_image
    from mllmc.runtime import load
    from mllmc.runtime.manifest import read_manifest

    torch.set_num_threads(os.cpu_count() or 1)
    model, info = load_model(model_dir)
    image = probe_image(size=info.image_size)
    prompt = bench.prompt_for(n_text)
    entries = {"hf_eager": bench.eager_entry(model, model_dir, image, prompt, decode_tokens)}
    manifests = {}
    configs = {"onnx": [], **variants(info.num_layers, info.visual_tokens)}
    for name, specs in configs.items():
        path = out / "artifacts" / f"{Path(model_dir).name}-{name.replace(':', '-')}"
        if reuse and (path / "manifest.json").is_file():
            manifests[name] = read_manifest(path)  # compiled by an earlier run
        else:
            manifests[name] = compile_model(
                model_dir, path, specs, validate=False, force=True, progress=False
            ).manifest
        if compile_only:
            continue
        entries[name] = bench.loader(
            lambda path=path: load(path),
            lambda engine: bench.engine_timers(engine, image, prompt, decode_tokens),
        )
    if compile_only:
        return None
    rows = bench.side_by_side(entries, repeats)
    n_text_eager = rows["hf_eager"]["prompt_tokens"] - info.visual_tokens
    flops = {}
    for name in rows:
        m = manifests.get(name, manifests["onnx"])
        flops[name] = bench.plan_prefill_flops(m, n_text_eager)
        kv = kv_cache_bytes(m, n_text_eager)
        rows[name]["kv_cache_bytes_prompt"] = kv["prompt"]
        rows[name]["kv_cache_bytes_per_token"] = kv["per_token"]
    peak = bench.roofline(info, rows["hf_eager"]["prompt_tokens"], repeats)
    bench.add_ratios(rows, info, peak, flops)
    base = rows["onnx"]
    for row in rows.values():
        row["flops_ideal_speedup_vs_onnx"] = base["llm_prefill_flops"] / row["llm_prefill_flops"]
        row["measured_speedup_vs_onnx"] = base["llm_prefill_s"] / row["llm_prefill_s"]
    return {
        "model": model_dir,
        "visual_tokens": info.visual_tokens,
        "prompt_tokens": rows["hf_eager"]["prompt_tokens"],
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "roofline": peak,
        "passes": {name: specs for name, specs in configs.items()},
        "rows": rows,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    rows = {k: v for k, v in report["rows"].items() if k not in ("hf_eager", "onnx")}
    ideal = [r["flops_ideal_speedup_vs_onnx"] for r in rows.values()]
    top = max([*ideal, *(r["measured_speedup_vs_onnx"] for r in rows.values()), 1.5])
    ax.plot([1, top], [1, top], "--", color="#888", label="FLOPs-ideal")
    for name, r in rows.items():
        ax.scatter(r["flops_ideal_speedup_vs_onnx"], r["measured_speedup_vs_onnx"])
        ax.annotate(name, (r["flops_ideal_speedup_vs_onnx"], r["measured_speedup_vs_onnx"]))
    ax.set_xlabel("FLOPs-ideal prefill speedup (1 / (1 - FLOPs cut))")
    ax.set_ylabel("measured LLM prefill speedup vs unrewritten ONNX")
    ax.set_title(f"{Path(report['model']).name}: {report['visual_tokens']} visual tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/small-llava")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name", default="passes", help="results file stem")
    ap.add_argument(
        "--reuse", action="store_true", help="reuse artifacts under OUT/artifacts from a run before"
    )
    ap.add_argument("--compile-only", action="store_true", help="compile the artifacts, no timing")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(args.model) / "config.json").is_file():
        write_preset("small-llava", args.model)
    report = run(
        args.model,
        out,
        args.text_tokens,
        args.decode_tokens,
        args.repeats,
        args.reuse,
        args.compile_only,
    )
    if report is None:
        return
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    plot(report, out / f"{args.name}.png")
    print(f"{'engine':24s} {'vision ms':>9s} {'prefill ms':>10s} {'decode ms/tok':>13s} "
          f"{'KV MiB':>7s} {'GFLOP':>7s} {'ideal':>6s} {'measured':>8s}")  # fmt: skip
    for name, r in report["rows"].items():
        print(
            f"{name:24s} {r['vision_s'] * 1e3:9.1f} {r['llm_prefill_s'] * 1e3:10.1f} "
            f"{r['decode_s_per_token'] * 1e3:13.2f} {r['kv_cache_bytes_prompt'] / 2**20:7.2f} "
            f"{r['llm_prefill_flops'] / 1e9:7.2f} {r['flops_ideal_speedup_vs_onnx']:5.2f}x "
            f"{r['measured_speedup_vs_onnx']:7.2f}x"
        )
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.png')}")


if __name__ == "__main__":
    main()
