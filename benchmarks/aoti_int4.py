"""AOTInductor int4 benchmark: small-llava compiled for `--target aoti` (CPU) in float32 and with
`--quantize int4` (torchao's int4 weight-only, blocks 32 and 128), beside Hugging Face eager in
the same process, interleaved; accuracy of the same precisions compiled from the trained preset.

    python benchmarks/aoti_int4.py [--model models/small-llava] [--trained models/trained-tiny-llava]
        [--repeats 3] [--decode-tokens 32] [-n 200] [--reuse]

Per row: decode ms/token (32 greedy tokens after the prompt), LLM prefill ms (576 visual + ~32
text tokens), engine bytes (the files the manifest names), shapes-qa held-out accuracy. Needs
the `torchao` extra. Writes results/aoti_int4.json and results/aoti_int4.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from precision import compile_once, goal, parser, plot, points_lost, print_goals  # noqa: E402

from mllmc.compiler.tools import bench  # noqa: E402

# name -> block size of torchao's int4 (None: float32 weights)
VARIANTS = {"aoti-fp32": None, "aoti-int4-b32": 32, "aoti-int4-b128": 128}


def compile_variant(model_dir: str | Path, path: Path, block: int | None, reuse: bool) -> Path:
    """One aoti artifact of `model_dir`, float32 weights or int4 in blocks of `block`."""
    from mllmc.compiler.backends.quantize import quantize_config

    cfg = quantize_config("int4", block, target="aoti") if block else None
    return compile_once(model_dir, path, [], cfg, reuse, target="aoti")


def goals(rows: dict[str, dict[str, Any]], acc: dict[str, float]) -> dict[str, dict[str, Any]]:
    """What the int4 engines gain over the float32 one (medians of per-round ratios), and the
    accuracy they cost; the precision goals (>= 3x decode, <= 0.3x bytes, <= 1 point) applied to
    this target too."""
    out = {}
    for block in (32, 128):
        name = f"aoti-int4-b{block}"
        speed = bench.ratio_spread(rows["aoti-fp32"], rows[name], "decode_s_per_token")["median"]
        out[f"{name} decode vs aoti fp32 (>= 3x)"] = goal(speed, 3.0)
        size = rows[name]["engine_bytes"] / rows["aoti-fp32"]["engine_bytes"]
        out[f"{name} engine bytes vs fp32 (<= 0.3x)"] = goal(size, 0.3, at_most=True)
        lost = points_lost(acc, "aoti-fp32", name)
        out[f"{name} accuracy points lost (<= 1)"] = goal(lost, 1.0, at_most=True)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mllmc.compiler.core.capture import load_model
    from mllmc.compiler.data.presets import write_preset
    from mllmc.compiler.tools.evaluate import evaluate
    from mllmc.compiler.tools.inspect_artifact import engine_bytes
    from mllmc.compiler.verify import probe_image
    from mllmc.runtime import load
    from mllmc.runtime.manifest import read_manifest

    root = args.out / "artifacts"
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        write_preset("small-llava", model_dir)
    paths = {
        name: compile_variant(model_dir, root / f"{model_dir.name}-{name}", block, args.reuse)
        for name, block in VARIANTS.items()
    }
    acc = {}
    for name, block in VARIANTS.items():
        trained = compile_variant(args.trained, root / f"trained-{name}", block, args.reuse)
        acc[name] = evaluate(trained, task="shapes-qa", n=args.num_items).accuracy
        print(f"accuracy {name}: {acc[name]:.2%}", flush=True)
    info = read_manifest(paths["aoti-fp32"]).model
    image, prompt = probe_image(size=info.image_size), bench.prompt_for(args.text_tokens)
    model, _ = load_model(model_dir)
    entries = {"hf-eager": bench.eager_entry(model, str(model_dir), image, prompt,
                                             args.decode_tokens)}  # fmt: skip
    for name, path in paths.items():
        entries[name] = bench.loader(
            lambda path=path: load(path),
            lambda e: bench.engine_timers(e, image, prompt, args.decode_tokens),
        )
    rows = bench.side_by_side(entries, args.repeats)
    for name, row in rows.items():
        path = paths.get(name)
        row["engine_bytes"] = engine_bytes(path, read_manifest(path)) if path else None
        row["accuracy"] = acc.get(name)
        row["decode_vs_hf_eager"] = bench.ratio_spread(rows["hf-eager"], row, "decode_s_per_token")
    return {
        "model": str(model_dir),
        "trained": args.trained,
        "accuracy_items": args.num_items,
        "prompt_tokens": rows["aoti-fp32"]["prompt_tokens"],
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "accuracy_level": "none (bfloat16 activations)",
        "threads": os.cpu_count(),
        "trust": bench.run_trust(rows),
        "rows": rows,
        "goals": goals(rows, acc),
    }


def main() -> None:
    args = parser(__doc__).parse_args()
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aoti_int4.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = {n: r for n, r in report["rows"].items() if r["engine_bytes"] is not None}
    title = f"{Path(report['model']).name}: --target aoti, float32 vs torchao int4 (CPU)"
    plot({**report, "rows": rows}, args.out / "aoti_int4.png", title)
    for name, row in report["rows"].items():
        acc = f"{row['accuracy']:.1%}" if row["accuracy"] is not None else "-"
        size = f"{row['engine_bytes'] / 2**20:8.1f} MiB" if row["engine_bytes"] else "       -    "
        print(
            f"{name:16s} decode {row['decode_s_per_token'] * 1e3:7.2f} ms/token "
            f"({row['decode_vs_hf_eager']['median']:.2f}x HF eager)  LLM prefill "
            f"{row['llm_prefill_s'] * 1e3:8.1f} ms  {size}  {acc}"
        )
    if not report["trust"]["ok"]:
        print("NOT TRUSTED: " + "; ".join(report["trust"]["reasons"]))
    print_goals(report["goals"])


if __name__ == "__main__":
    main()
