"""Weight precision benchmark: small-llava's ONNX engines in float32, int8 and int4 (each in blocks
of 32 and 128, accuracy level 4), and int4 with the passes composed (fastervlm:keep=144 + fastv + shortv),
side by side with onnxruntime-genai 0.18's builder on the same language-model weights (`-p int4
-e cpu`, the same block size and accuracy level; and its fp32), all in one process, interleaved.

    python benchmarks/precision.py [--model models/small-llava] [--trained models/trained-tiny-llava]
        [--repeats 3] [--decode-tokens 32] [-n 200] [--reuse]

Per row: decode ms/token (32 greedy tokens after the prompt), LLM prefill ms (576 visual + ~32
text tokens; genai: a prompt of the same length), engine bytes (the files the manifest names;
genai: its model directory's .onnx and .data), and accuracy on the trained preset (shapes-qa
held-out items, the same precision compiled from trained-tiny-llava). genai takes a causal LM,
not LLaVA: the language model is written out as a plain Hugging Face LlamaForCausalLM directory
first (`extract_language_model`). Writes results/precision.json and results/precision.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from genai_runner import build_genai, genai_entry  # noqa: E402

from mllmc.compiler.tools import bench  # noqa: E402
from mllmc.compiler.tools.cli import OneLineParser  # noqa: E402

COMPOSED = ["fastervlm:keep=144", "fastv", "shortv:ratio=0.6"]
# name -> (--quantize, block size); accuracy level 4 throughout (genai's CPU default)
PRECISIONS = {
    "fp32": None,
    "int8-b32": ("int8", 32),
    "int8-b128": ("int8", 128),
    "int4-b32": ("int4", 32),
    "int4-b128": ("int4", 128),
}
GENAI = {
    "genai-fp32": ("fp32", 32),
    "genai-int4-b32": ("int4", 32),
    "genai-int4-b128": ("int4", 128),
}
ACCURACY_LEVEL = 4
ACCURACY = f"accuracy_level={ACCURACY_LEVEL}"  # genai builder's option


def extract_language_model(model_dir: Path, out: Path) -> Path:
    """LLaVA's language model + lm_head as a plain HF causal-LM directory (config, safetensors,
    tokenizer): what onnxruntime-genai's builder takes. The LLaVA model is loaded by
    transformers (which maps its checkpoint's key layouts) and its decoder saved on its own."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    if (out / "config.json").is_file():
        return out
    llava = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype="float32")
    text = llava.config.text_config
    text.architectures = ["LlamaForCausalLM"]
    lm = AutoModelForCausalLM.from_config(text, dtype="float32")
    lm.model.load_state_dict(llava.model.language_model.state_dict())
    lm.lm_head.load_state_dict(llava.lm_head.state_dict())
    lm.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    return out


def dir_bytes(path: Path) -> int:
    """Bytes of a genai model directory's graph and weight files."""
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".onnx", ".data"))


def compile_once(
    model_dir: str | Path,
    path: Path,
    passes: list[str],
    cfg: Any,
    reuse: bool,
    target: str = "onnx",
) -> Path:
    """`model_dir` compiled into `path` with `passes` and the QuantizeConfig `cfg` (None: float
    weights), unvalidated (the tests validate the same options on the tiny presets); an artifact
    already there is reused when `reuse`."""
    from mllmc.compiler.pipeline import compile_model

    if reuse and (path / "manifest.json").is_file():
        return path
    t0 = time.perf_counter()
    compile_model(
        model_dir, path, passes, target, quantize=cfg, validate=False, force=True, progress=False
    )
    print(f"compiled {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def compile_variants(model_dir: str, root: Path, reuse: bool) -> dict[str, Path]:
    """Every precision without passes, and int4 (block 32) composed with COMPOSED, compiled
    from `model_dir`. One small-llava compile takes ~3 min on the shared 2-core VM, so the other
    precisions are not compiled with the passes too: the passes do not touch the weights."""
    from mllmc.compiler.backends.quantize import quantize_config

    variants = [(name, q, []) for name, q in PRECISIONS.items()]
    variants.append(("int4-b32+passes", PRECISIONS["int4-b32"], COMPOSED))
    out = {}
    for name, q, passes in variants:
        path = root / f"precision-{Path(model_dir).name}-{name}"
        cfg = quantize_config(*q, accuracy_level=ACCURACY_LEVEL) if q else None
        out[name] = compile_once(model_dir, path, passes, cfg, reuse)
    return out


def accuracy(trained: str, root: Path, n: int, reuse: bool) -> dict[str, float]:
    """shapes-qa held-out accuracy of each precision compiled from the trained preset."""
    from mllmc.compiler.backends.quantize import quantize_config
    from mllmc.compiler.tools.evaluate import evaluate

    out = {}
    for name, q in PRECISIONS.items():
        cfg = quantize_config(*q, accuracy_level=ACCURACY_LEVEL) if q else None
        path = compile_once(trained, root / f"precision-trained-{name}", [], cfg, reuse)
        out[name] = evaluate(path, task="shapes-qa", n=n).accuracy
        print(f"accuracy {name}: {out[name]:.2%}", flush=True)
    return out


def goal(value: float, target: float, at_most: bool = False) -> dict[str, Any]:
    """A goal's record: the measured value, its target, and whether it is met (value >= target,
    or <= with `at_most`)."""
    return {"value": value, "goal": target, "met": value <= target if at_most else value >= target}


def points_lost(acc: dict[str, float], base: str, name: str) -> float:
    """Accuracy points `name` loses against `base` (0.98 - 0.97 is not 0.01 in floats)."""
    return round(100 * (acc[base] - acc[name]), 9)


def print_goals(goals: dict[str, dict[str, Any]]) -> None:
    for name, g in goals.items():
        print(f"{name}: {g['value']:.3g} -> {'met' if g['met'] else 'NOT met'}")


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The options the precision benchmarks share."""
    ap = OneLineParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/small-llava")
    ap.add_argument("--trained", default="models/trained-tiny-llava")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("-n", "--num-items", type=int, default=200)
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts an earlier run wrote")
    return ap


def goals(rows: dict[str, dict[str, Any]], acc: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The issue's goals, each with its measured value (a median over interleaved rounds where it
    is a speed ratio) and whether it is met."""

    def ratio(num: str, den: str, key: str) -> float:
        return bench.ratio_spread(rows[num], rows[den], key)["median"]

    d, p = "decode_s_per_token", "llm_prefill_s"
    out = {}
    for block in (32, 128):
        out[f"int4 decode vs mllmc fp32, block {block} (>= 3x)"] = (
            ratio("fp32", f"int4-b{block}", d),
            3.0,
        )
        out[f"int4 decode vs genai int4, block {block} (>= 1.1x)"] = (
            ratio(f"genai-int4-b{block}", f"int4-b{block}", d),
            1.1,
        )
        out[f"int8 LLM prefill vs fp32, block {block} (>= 1.3x)"] = (
            ratio("fp32", f"int8-b{block}", p),
            1.3,
        )
    result = {k: goal(v, g) for k, (v, g) in out.items()}
    size = rows["int4-b32"]["engine_bytes"] / rows["fp32"]["engine_bytes"]
    result["int4 engine bytes vs fp32 (<= 0.3x)"] = goal(size, 0.3, at_most=True)
    for name in PRECISIONS:
        if name != "fp32":
            lost = points_lost(acc, "fp32", name)
            result[f"{name} accuracy points lost (<= 1)"] = goal(lost, 1.0, at_most=True)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compile / build every engine (or reuse them), score accuracy, then time all interleaved."""
    from mllmc.compiler.data.presets import write_preset
    from mllmc.compiler.tools.inspect_artifact import engine_bytes
    from mllmc.compiler.verify import probe_image
    from mllmc.runtime import load
    from mllmc.runtime.manifest import read_manifest

    root = args.out / "artifacts"
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        write_preset("small-llava", model_dir)
    paths = compile_variants(str(model_dir), root, args.reuse)
    lm = extract_language_model(model_dir, root / f"{model_dir.name}-lm")
    genai = {
        n: build_genai(lm, root / f"precision-{n}", p, [f"block_size={b}", ACCURACY])
        for n, (p, b) in GENAI.items()
    }
    acc = accuracy(args.trained, root, args.num_items, args.reuse)
    info = read_manifest(paths["fp32"]).model
    image, prompt = probe_image(size=info.image_size), bench.prompt_for(args.text_tokens)
    entries = {}
    for name, path in paths.items():
        entries[name] = bench.loader(
            lambda path=path: load(path),
            lambda e: bench.engine_timers(e, image, prompt, args.decode_tokens),
        )
    fp32 = load(paths["fp32"])  # the prompt's ids, for genai
    ids = np.asarray(fp32.encode_prompt(prompt, fp32.encode_images(image)[1]).input_ids[0])
    del fp32
    for name, path in genai.items():
        entries[name] = lambda path=path: genai_entry(path, ids, args.decode_tokens, os.cpu_count())
    rows = bench.side_by_side(entries, args.repeats)
    for name, row in rows.items():
        path = paths.get(name)
        row["engine_bytes"] = (
            engine_bytes(path, read_manifest(path)) if path else dir_bytes(genai[name])
        )
    rows_acc = {name: acc.get(name.removesuffix("+passes")) for name in rows}
    for name, row in rows.items():
        row["accuracy"] = rows_acc[name] if not name.startswith("genai") else None
    return {
        "model": str(model_dir),
        "trained": args.trained,
        "accuracy_items": args.num_items,
        "prompt_tokens": rows["fp32"]["prompt_tokens"],
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "accuracy_level": ACCURACY_LEVEL,
        "composed_passes": COMPOSED,
        "threads": os.cpu_count(),
        "trust": bench.run_trust(rows),
        "rows": rows,
        "goals": goals(rows, acc),
    }


def plot(report: dict[str, Any], path: Path, title: str | None = None) -> None:
    """Three bar charts: decode ms/token, LLM prefill ms, engine MB, one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = list(rows)
    colors = ["#c44" if n.startswith("genai") else "#48c" for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, (key, scale, label) in zip(
        axes,
        [
            ("decode_s_per_token", 1e3, "decode ms / token"),
            ("llm_prefill_s", 1e3, "LLM prefill ms"),
            ("engine_bytes", 2**-20, "engine files MiB"),
        ],
        strict=True,
    ):
        ax.bar(range(len(names)), [rows[n][key] * scale for n in names], color=colors)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_title(label)
    fig.suptitle(
        title
        or f"{Path(report['model']).name}: mllmc (blue) vs onnxruntime-genai 0.18 (red), "
        f"accuracy level {report['accuracy_level']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    args = parser(__doc__).parse_args()
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "precision.png")
    for name, row in report["rows"].items():
        acc = f"{row['accuracy']:.1%}" if row["accuracy"] is not None else "-"
        print(
            f"{name:18s} decode {row['decode_s_per_token'] * 1e3:7.2f} ms/token  LLM prefill "
            f"{row['llm_prefill_s'] * 1e3:8.1f} ms  {row['engine_bytes'] / 2**20:8.1f} MiB  {acc}"
        )
    print_goals(report["goals"])


if __name__ == "__main__":
    main()
