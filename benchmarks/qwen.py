"""Qwen2.5-VL benchmark: small-qwen2.5-vl with one square image (448x448 by default: 1,024
patches, 256 visual rows), a short chat prompt, in one process: HF eager
(Qwen2_5_VLForConditionalGeneration), the unrewritten mllmc ONNX engine and the engines with
passes, timed in interleaved rounds on the same threads (`mllmc bench`'s machinery:
compiler/tools/bench.py, and benchmarks/llava_next.py's grouping); then the decoder alone side
by side with onnxruntime-genai 0.18's builder on the same text weights (fp32, CPU).

    nice python benchmarks/qwen.py [--model models/small-qwen2.5-vl] [--rounds 3]
        [--variants fastv,vte,shortv,vispruner+shortv | all] [--out benchmarks/results]
        [--artifacts-dir DIR [--reuse]] [--no-genai] [--genai-rounds 15]

Variants: each in-LLM pass alone (fastv, vte:k=L/2, shortv at ratio 0.6: the last round(0.6 L)
layers) and the pre-LLM scorer for towers without [CLS] composed with ShortV (vispruner +
shortv; and vispruner alone with --variants); a variant naming a pass the registry does not hold
is skipped, with the reason recorded. Per engine: vision ms, LLM prefill ms, decode ms/token,
KV-cache bytes, each part's speedup over HF eager and over the unrewritten engine (median of
the per-round ratios, with min-max). Per pass: the FLOPs-ideal LLM-prefill speedup at the
benchmark's prompt (prefill FLOPs before / after its passes, `mllmc plan`'s formula for this
image's rows and text tokens; the manifest's own count, at the 448 px reference image, is kept
as flops_ideal_reference) and the share of its gain measured, (measured - 1) / (ideal - 1).

The genai comparison: the decoder and lm_head are written out as a plain Hugging Face
Qwen2ForCausalLM directory (`extract_language_model`, checked against the Qwen2.5-VL model's
own logits on a text prompt), built with `python -m onnxruntime_genai.models.builder -p fp32
-e cpu` (its defaults: logits at every prompt row; and with `prune_lm_head=true`: the last row's
only, as mllmc's prefill computes them), and timed against the unrewritten mllmc engine on one
text-only prompt of the image prompt's token count (the same ids for both): prefill
(genai: `append_tokens`) and decode ms/token, interleaved (--genai-rounds rounds: a round
is cheap, and one decode's time moves by several percent from round to round on a shared
machine), every engine on the same threads.
On a text-only prompt every M-RoPE axis holds the same position, so Qwen2.5-VL's rotary
embedding is the 1-D RoPE of Qwen2: both run the same computation, and their first greedy
tokens and logits are compared. The goals are reported as met or not, never asserted. Writes
OUT/qwen.json and OUT/qwen.png. benchmarks/genai_processes.py compares the same two decoders
with each engine alone in a process of its own (give it the artifacts of `--artifacts-dir`).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llava_next as lnx  # noqa: E402  (its compile, grouping and ratio helpers)
from genai_runner import (  # noqa: E402
    build_genai,
    engine_text_entry,
    genai_entry,
    genai_model,
    greedy_parity,
    text_layout,
)

from mllmc.compiler.tools import bench  # noqa: E402

BASE = lnx.BASE
PARTS = lnx.PARTS
DEFAULT_VARIANTS = "fastv,vte,shortv,vispruner+shortv"
PARITY_STEPS = 8  # greedy steps compared between genai and mllmc on the text prompt
GENAI_BUILDS = {"genai_fp32": [], "genai_fp32+prune_lm_head": ["prune_lm_head=true"]}
TEXT_ROW = "mllmc_onnx (text)"


def variants(chosen: str, vte_k: int, shortv: str, ratio: float) -> dict[str, list[str]]:
    """Engine row name -> pass specs, for the unrewritten engine and the `chosen` variants (a
    comma list of fastv, vte, shortv, vispruner, vispruner+shortv, or "all")."""
    from mllmc.runtime.errors import UserError

    table = {
        "fastv": ("fastv", ["fastv"]),
        "vte": (f"vte:k={vte_k}", [f"vte:k={vte_k}"]),
        "shortv": (f"shortv:ratio={ratio}", [shortv]),
        "vispruner": ("vispruner", ["vispruner"]),
        "vispruner+shortv": ("vispruner+shortv", ["vispruner", shortv]),
    }
    keys = list(table) if chosen == "all" else [k.strip() for k in chosen.split(",") if k.strip()]
    unknown = [k for k in keys if k not in table]
    if unknown or not keys:
        raise UserError(
            f"--variants: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
            f"give 'all' or a comma list of {', '.join(table)}"
        )
    return {BASE: [], **{f"{BASE}+{table[k][0]}": table[k][1] for k in dict.fromkeys(keys)}}


def registered(configs: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The variants whose passes the registry holds, and why each other one is skipped."""
    from mllmc.passes import REGISTRY

    kept, skipped = {}, {}
    for name, specs in configs.items():
        missing = [s.split(":")[0] for s in specs if s.split(":")[0] not in REGISTRY]
        if missing:
            skipped[name] = f"pass {missing[0]!r} is not registered in this mllmc"
        else:
            kept[name] = specs
    return kept, skipped


# -- HF eager and the engines on the image prompt -------------------------------------------


def eager_decode(model: Any, model_dir: str, image: Any, prompt: str, tokens: int) -> bench.Timer:
    """HF eager's decode timer, from one prefill made now (`bench.eager_calls`, any family):
    each run decodes `tokens` greedy steps, then crops the cache back to the prompt (Qwen's
    decode positions come from the rope deltas the prefill left on the model)."""
    calls, _ = bench.eager_calls(model, model_dir, image, prompt)
    out = calls["prefill"]()
    first, cache = out.logits[:, -1:].argmax(-1), out.past_key_values

    @torch.no_grad()
    def decode() -> float:
        token = first
        t0 = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            int(token)  # the host reads each token, as the engines do
        seconds = time.perf_counter() - t0
        cache.crop(-tokens)
        return seconds / tokens

    return decode


def time_groups(
    model: Any, model_dir: str, paths: dict[str, Path], configs: dict[str, list[str]],
    image: Any, args: argparse.Namespace, threads: int,
) -> tuple[list[dict[str, dict[str, Any]]], dict[str, Any], dict[str, Any], int]:  # fmt: skip
    """HF eager, the unrewritten engine and each group of pass engines, timed side by side
    (`bench.side_by_side`), one group after another; returns (each group's rows, the manifests
    by row name, the roofline, the prompt's visual rows)."""
    from mllmc.runtime.manifest import read_manifest

    prompt = bench.prompt_for(args.text_tokens)
    tokens = args.decode_tokens
    eager = bench.eager_entry(model, model_dir, image, prompt, tokens)
    eager.timers["decode"] = eager_decode(model, model_dir, image, prompt, tokens)
    fixed: dict[str, Any] = {"hf_eager": eager}  # HF eager stays loaded; engines are loaders
    n = eager.prompt_tokens
    manifest, visual = bench.probe_engine(paths[BASE], image, prompt, n, threads)
    manifests = {BASE: manifest}
    peak = bench.roofline(manifest.model, n, max(args.rounds, 1), threads=threads)
    fixed[BASE] = lnx.engine_entry(paths[BASE], image, prompt, tokens, threads)
    groups = lnx.groups_of([k for k in paths if k != BASE], configs, args.group_size)
    out = []
    for i, names in enumerate(groups, 1):
        entries = dict(fixed)
        for name in names:
            entries[name] = lnx.engine_entry(paths[name], image, prompt, tokens, threads)
            manifests[name] = read_manifest(paths[name])
        print(
            f"timing group {i}/{len(groups)} ({', '.join(entries)}): {args.rounds} round(s) "
            f"over {min(bench.LOADS, args.rounds)} load(s) of the engines, each after a warm-up",
            flush=True,
        )
        out.append(bench.side_by_side(entries, args.rounds, threads, rounds_option="--rounds"))
        del entries
        gc.collect()
    return out, manifests, peak, visual


# -- onnxruntime-genai on the same text weights ---------------------------------------------


def extract_language_model(model: Any, model_dir: Path, out: Path) -> tuple[Path, float]:
    """Qwen2.5-VL's decoder + lm_head as a plain Hugging Face Qwen2ForCausalLM directory
    (config, safetensors, tokenizer): what onnxruntime-genai's builder takes. Returns (the
    directory, max |Δlogit| of its logits against the Qwen2.5-VL model's on a text prompt: on
    text every M-RoPE axis holds the same position, which is Qwen2's 1-D RoPE)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text = model.config.text_config
    rope = dict(getattr(text, "rope_parameters", None) or {})
    config = Qwen2Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope.get("rope_theta", 1e6)},
        tie_word_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)),
        bos_token_id=getattr(text, "bos_token_id", None),
        eos_token_id=getattr(text, "eos_token_id", None),
        architectures=["Qwen2ForCausalLM"],
    )
    lm = Qwen2ForCausalLM(config).eval()
    missing, unexpected = lm.model.load_state_dict(
        model.model.language_model.state_dict(), strict=False
    )
    if [k for k in missing + unexpected if "rotary_emb" not in k]:
        raise RuntimeError(f"Qwen2 decoder keys differ: {missing} / {unexpected}")
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        diff = (lm(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    if out.exists():
        shutil.rmtree(out)
    lm.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    return out, diff


def genai_comparison(
    model: Any, model_dir: Path, root: Path, base: Path, n: int, args: argparse.Namespace,
    threads: int,
) -> dict[str, Any]:  # fmt: skip
    """Extract the decoder, build it with genai (each of GENAI_BUILDS), check greedy parity,
    and time genai and the unrewritten engine's decoder interleaved on n-row text prompts
    (`bench.side_by_side` loads each `bench.LOADS` times, in alternating order)."""
    from mllmc.runtime import load

    lm, diff = extract_language_model(model, model_dir, root / f"{model_dir.name}-qwen2-lm")
    builds = {
        name: build_genai(lm, root / f"{model_dir.name}-{name}", "fp32", extra, args.reuse)
        for name, extra in GENAI_BUILDS.items()
    }
    engine = load(base, threads=threads)  # the prompt's ids and the parity (a load of its own)
    ids = text_layout(engine, n).input_ids[0]
    parity = {
        name: greedy_parity(engine, genai_model(path, threads), n, PARITY_STEPS)
        for name, path in builds.items()
    }
    del engine
    entries = {TEXT_ROW: engine_text_entry(base, n, args.decode_tokens, threads)}
    for name, path in builds.items():
        entries[name] = lambda path=path: genai_entry(path, ids, args.decode_tokens, threads)
    print(
        f"timing the decoders ({', '.join(entries)}): {args.genai_rounds} round(s) over "
        f"{min(bench.LOADS, args.genai_rounds)} load(s) of the engines",
        flush=True,
    )
    rows = bench.side_by_side(entries, args.genai_rounds, threads, rounds_option="--genai-rounds")
    for row in rows.values():
        row.pop("vision_s", None)
        row.pop("prefill_s", None)
    for name in builds:
        for key, part in (("llm_prefill_s", "prefill"), ("decode_s_per_token", "decode")):
            rows[name][f"mllmc_speedup_{part}"] = bench.ratio_spread(
                rows[name], rows[TEXT_ROW], key
            )
    return {
        "prompt_tokens": n,
        "extraction_max_abs_logit_diff": diff,
        "builder": "python -m onnxruntime_genai.models.builder -i LM_DIR -o OUT -p fp32 -e cpu",
        "builds": {name: GENAI_BUILDS[name] for name in builds},
        "parity": parity,
        "rounds": args.genai_rounds,
        "loads": min(bench.LOADS, args.genai_rounds),
        "rows": rows,
    }


# -- report ---------------------------------------------------------------------------------


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark's goals, each with whether this run met it and the numbers behind it."""
    rows, speed = report["rows"], report["pass_speedups"]
    base = rows[BASE]["vs_hf_eager"]
    out = [
        lnx.pass_goal(speed),
        {
            "goal": "the unrewritten engine is >= 1.0x HF eager on vision, LLM prefill, decode",
            "met": all(s["median"] >= 1 for s in base.values()),
            "detail": ", ".join(f"{part} {s['median']:.2f}x" for part, s in base.items()),
        },
    ]
    genai = report.get("genai")
    if genai:
        ratios = genai["rows"]["genai_fp32"]
        out.append(
            {
                "goal": "mllmc's decoder prefill and decode no slower than onnxruntime-genai's "
                "(fp32, CPU, builder defaults)",
                "met": all(
                    ratios[f"mllmc_speedup_{p}"]["median"] >= 1 for p in ("prefill", "decode")
                ),
                "detail": ", ".join(
                    f"{p} {ratios[f'mllmc_speedup_{p}']['median']:.2f}x"
                    for p in ("prefill", "decode")
                ),
            }
        )
    return out


def run(args: argparse.Namespace, artifacts: Path) -> dict[str, Any]:
    """Compile every variant into `artifacts`, time them in groups with HF eager and the
    unrewritten engine, then the decoder against genai; build the report."""
    from transformers.utils import logging as hf_logging

    from mllmc.compiler.core.capture import load_model
    from mllmc.compiler.core.model_dir import read_config
    from mllmc.runtime.errors import UserError

    model_dir = str(args.model)
    cfg = read_config(model_dir)
    if cfg["model_type"] not in ("qwen2_vl", "qwen2_5_vl"):
        raise UserError(f"{model_dir} is a {cfg['model_type']!r} model, not qwen2_vl / qwen2_5_vl")
    threads = bench.check_threads(args.threads)
    torch.set_num_threads(threads)
    num_layers = cfg["text_config"]["num_hidden_layers"]
    vte_k = args.vte_k if args.vte_k is not None else num_layers // 2
    shortv = lnx.shortv_spec(num_layers, args.shortv_ratio, False)
    configs, skipped = registered(variants(args.variants, vte_k, shortv, args.shortv_ratio))
    image = lnx.square_image(args.image_size)
    paths, refused = lnx.compile_variants(model_dir, artifacts, configs, args.reuse)
    skipped.update(refused)
    hf_logging.disable_progress_bar()
    model, info = load_model(model_dir)
    groups, manifests, peak, visual = time_groups(
        model, model_dir, paths, configs, image, args, threads
    )
    n = groups[0]["hf_eager"]["prompt_tokens"]
    for rows in groups:
        bench.add_ratios(rows, info, peak, lnx.add_kv_and_flops(rows, manifests, n - visual))
        lnx.add_part_ratios(rows)
    rows, refs = lnx.merge_groups(groups, list(configs))
    report = {
        "model": model_dir,
        "image": [args.image_size, args.image_size],
        "visual_tokens": visual,
        "prompt_tokens": n,
        "text_tokens": n - visual,
        "decode_tokens": args.decode_tokens,
        "rounds": args.rounds,
        "dtype": "float32",
        "device": f"cpu ({platform.machine()}, {bench.available_cpus()} cores)",
        "threads": threads,
        "cpus": os.cpu_count(),
        "versions": versions(),
        "command": "python " + shlex.join(sys.argv),
        "passes": configs,
        "skipped": skipped,
        "groups": refs,
        "trust": lnx.run_trust(groups),
        "roofline": peak,
        "peak_rss_mb": bench.peak_rss_mb(),
        "rss_note": bench.RSS_NOTE,
        "rows": rows,
        "pass_speedups": at_prompt(
            lnx.pass_speedups(rows, manifests), configs, model_dir, visual, n - visual
        ),
    }
    del groups
    gc.collect()
    if not args.no_genai:
        report["genai"] = genai_comparison(
            model, Path(model_dir), artifacts, paths[BASE], n, args, threads
        )
    report["peak_rss_mb"] = bench.peak_rss_mb()
    report["goals"] = goals(report)
    return report


def at_prompt(
    speed: dict[str, dict[str, Any]],
    configs: dict[str, list[str]],
    model_dir: str,
    visual: int,
    text: int,
) -> dict[str, dict[str, Any]]:
    """Each pass's FLOPs-ideal speedup (and the share of it measured) at the benchmark's own
    prompt: `visual` rows of its image and `text` text rows, from `mllmc plan`'s formula with
    the passes' own keep rules. A manifest states FLOPs at the reference prompt (a 448 px
    image, 64 text tokens); an image of another size keeps another number of rows, so its
    ideal differs. The reference's counts and ideal stay as `*_reference`."""
    from mllmc.compiler.tools.plan import plan

    for name, s in speed.items():
        flops = plan(model_dir, configs[name], visual_rows=visual, text_tokens=text)
        before, after = flops["prefill_flops"]["before"], flops["prefill_flops"]["after"]
        ideal, measured = before / after, s["measured"]
        s.update(
            flops_ideal_reference=s["flops_ideal"],
            prefill_flops_before_reference=s["prefill_flops_before"],
            prefill_flops_after_reference=s["prefill_flops_after"],
            reference_prompt_tokens_reference=s.pop("reference_prompt_tokens"),
            prefill_flops_before=before,
            prefill_flops_after=after,
            flops_ideal=ideal,
            flops_at={"visual_rows": visual, "text_tokens": text},
            share_of_ideal=measured / ideal,
            share_of_ideal_gain=(measured - 1) / (ideal - 1) if ideal > 1 else None,
        )
    return speed


def versions() -> dict[str, str]:
    out = lnx.versions()
    try:
        import onnxruntime_genai

        out["onnxruntime-genai"] = onnxruntime_genai.__version__
    except ImportError:
        pass
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    """Bars: each part's speedup over HF eager per engine (left), each pass's LLM-prefill
    speedup measured against FLOPs-ideal (middle), mllmc's decoder against genai's (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mllmc.compiler.files.outputs import write_figure

    rows, speed, genai = report["rows"], report["pass_speedups"], report.get("genai")
    fig, axes = plt.subplots(1, 3 if genai else 2, figsize=(18 if genai else 13, 4.8))
    names = list(rows)
    y, height = np.arange(len(names)), 0.8 / len(PARTS)
    for i, (_, part) in enumerate(PARTS):
        vals = [rows[n]["vs_hf_eager"][part]["median"] for n in names]
        axes[0].barh(y + i * height, vals, height, label=part)
    axes[0].set_yticks(y + height, names)
    axes[0].set_xlabel("speedup over HF eager (median of per-round ratios)")
    y = np.arange(len(speed))
    axes[1].barh(y - 0.2, [s["flops_ideal"] for s in speed.values()], 0.4, color="#bbb",
                 label="FLOPs-ideal")  # fmt: skip
    axes[1].barh(y + 0.2, [s["measured"] for s in speed.values()], 0.4, color="#2a7",
                 label="measured")  # fmt: skip
    axes[1].set_yticks(y, [name[len(BASE) + 1 :] for name in speed])
    axes[1].set_xlabel("LLM-prefill speedup over the unrewritten engine")
    if genai:
        grows = genai["rows"]
        gnames = list(grows)
        y = np.arange(len(gnames))
        for i, (key, label) in enumerate(
            (("llm_prefill_s", "prefill ms"), ("decode_s_per_token", "decode ms/token x 10"))
        ):
            scale = 1e3 if i == 0 else 1e4
            axes[2].barh(y + 0.4 * i - 0.2, [grows[n][key] * scale for n in gnames], 0.4,
                         label=label)  # fmt: skip
        axes[2].set_yticks(y, gnames)
        axes[2].set_xlabel(f"decoder alone, {genai['prompt_tokens']}-token text prompt")
    for i, ax in enumerate(axes):
        if i < 2:  # the ratio panels
            ax.axvline(1, color="#444", lw=0.8)
        ax.invert_yaxis()
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{Path(report['model']).name}: {report['image'][0]}x{report['image'][1]} image, "
        f"{report['prompt_tokens']} prompt tokens ({report['visual_tokens']} visual), "
        f"{report['threads']} threads"
    )
    write_figure(fig, path, force=True)


def genai_lines(genai: dict[str, Any]) -> list[str]:
    """The decoder-alone table: mllmc's unrewritten engine against each genai build."""
    lines = [
        "",
        f"decoder alone, {genai['prompt_tokens']}-token text prompt (extracted Qwen2 LM matches "
        f"Qwen2.5-VL to {genai['extraction_max_abs_logit_diff']:.1e}), {genai['rounds']} "
        f"rounds over {genai.get('loads', 1)} load(s) of the engines:",
        f"{'engine':28s} {'prefill ms':>10s} {'mllmc faster':>21s} {'decode ms/tok':>13s} "
        f"{'mllmc faster':>21s}",
    ]
    for name, row in genai["rows"].items():
        ratios = [row.get(f"mllmc_speedup_{p}") for p in ("prefill", "decode")]
        cells = [bench.format_spread(r) if r else "" for r in ratios]
        lines.append(
            f"{name:28s} {row['llm_prefill_s'] * 1e3:10.1f} {cells[0]:>21s} "
            f"{row['decode_s_per_token'] * 1e3:13.2f} {cells[1]:>21s}"
        )
    for name, p in genai["parity"].items():
        lines.append(
            f"parity vs {name}: {p['steps']} greedy tokens "
            f"{'identical' if p['same_tokens'] else 'DIFFER'}, prefill max |dlogit| "
            f"{p['prefill_max_abs_logit_diff']:.1e}"
        )
    return lines


def summary(report: dict[str, Any]) -> str:
    """`mllmc bench`'s table, the speedups over the unrewritten engine, the passes against
    their FLOPs-ideal speedup, the genai comparison, the skipped variants and the goals."""
    lines = [bench.format_table(report), "", f"{'vs mllmc_onnx':28s}" + "".join(
        f" {part:>21s}" for _, part in PARTS)]  # fmt: skip
    for name, row in report["rows"].items():
        lines.append(
            f"{name:28s}"
            + "".join(f" {bench.format_spread(row['vs_' + BASE][p]):>21s}" for _, p in PARTS)
        )
    lines += ["", f"{'pass':28s} {'FLOPs-ideal':>11s} {'measured':>21s} {'of ideal gain':>13s}"]
    for name, s in report["pass_speedups"].items():
        gain = s["share_of_ideal_gain"]
        lines.append(
            f"{name[len(BASE) + 1 :]:28s} {s['flops_ideal']:10.2f}x "
            f"{bench.format_spread(s['measured_spread']):>21s} "
            f"{'n/a' if gain is None else format(gain, '.1%'):>13s}"
        )
    if report.get("genai"):
        lines += genai_lines(report["genai"])
    lines += [f"skipped {name}: {why}" for name, why in report["skipped"].items()]
    lines += [
        f"goal {'MET' if g['met'] else 'NOT MET'}: {g['goal']} ({g['detail']})"
        for g in report["goals"]
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = lnx.family_parser(
        __doc__,
        "models/small-qwen2.5-vl",
        "a qwen2_vl / qwen2_5_vl model dir (small-qwen2.5-vl is written there if missing)",
        448,
        DEFAULT_VARIANTS,
        (2, "pass engines loaded at once (memory)"),
    )
    ap.add_argument("--no-genai", action="store_true", help="skip the onnxruntime-genai rows")
    ap.add_argument(
        "--genai-rounds",
        type=int,
        default=15,
        help="timed rounds of the decoder-alone comparison with genai (a round is ~10 s on "
        "small-qwen2.5-vl with 2 threads; decode moves by several percent between rounds)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return lnx.bench_main(parse_args(argv), "qwen", "small-qwen2.5-vl", run, plot, summary)


if __name__ == "__main__":
    sys.exit(main())
