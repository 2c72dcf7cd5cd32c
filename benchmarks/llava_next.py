"""LLaVA-NeXT benchmark: small-llava-next with one square image (672x672 by default: the base
tile and a 2x2 grid of 336 px tiles, 2,928 visual rows), a short chat prompt, in one process:
HF eager (LlavaNextForConditionalGeneration), the unrewritten mllmc ONNX engine and the engines
with passes, timed in interleaved rounds on the same threads (`mllmc bench`'s machinery:
compiler/tools/bench.py).

    nice python benchmarks/llava_next.py [--model models/small-llava-next] [--rounds 3]
        [--variants fastv,vte,shortv,fastv+shortv,fastervlm+shortv | all]
        [--out benchmarks/results] [--artifacts-dir DIR [--reuse]]

Variants (`--variants`, default all but fastervlm and vtc_cls alone): each pass alone (fastv,
vte:k=L/2, shortv at ratio 0.6, fastervlm and vtc_cls keeping a quarter of each tile), fastv +
shortv and fastervlm + shortv (the composition the prefill goal was set for). ShortV freezes the
last round(0.6 L) layers (`--shortv-calibrate`: the lowest-LC layers of a calibration on built-in
data, slow); which layers are frozen does not change the speed, only how many. A variant with a
pre-LLM pass that mllmc refuses on the model is skipped, with the reason printed and recorded.

Each artifact compiles in its own `mllmc compile` process. An engine holds ~5 GB once it has
run a 2,978-token prompt (weights, prepacked GEMM weights, onnxruntime's arenas, a prefilled
cache), so the engines are timed in groups of at most `--group-size` (default 1) whose LLM runs
on every visual row (the ones behind a pre-LLM pass are small and join the groups in turn); HF
eager and the unrewritten engine run in every group, and a row's ratios are taken against those
of its own rounds. Decode is timed from
a prefilled cache each round (no prefill inside the timing loop).

Per engine: vision ms, LLM prefill ms, decode ms/token, KV-cache bytes at the end of the prompt
(from the layer plan, which the runtime checks the cache against at every decode step), and
each part's speedup over HF eager and over the unrewritten engine (median of the per-round
ratios, with min-max). Per pass: the FLOPs-ideal LLM-prefill speedup (the artifact manifest's
prefill FLOPs before / after its passes, at the reference image) and the share of it measured.
The goals are reported as met or not, never asserted. Writes OUT/llava_next.json and
OUT/llava_next.png (the ratios as bars).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllmc.compiler.tools import bench
from mllmc.compiler.tools.cli import OneLineParser

BASE = "mllmc_onnx"
PARTS = (("vision_s", "vision"), ("llm_prefill_s", "LLM prefill"), ("decode_s_per_token", "decode"))
PASS_GOAL = 0.9  # share of its FLOPs-ideal LLM-prefill gain each pass should reach
COMPOSED_GOAL = 6.0  # LLM-prefill speedup over HF eager set for fastervlm 25% + shortv 0.6
PRE_LLM_PASSES = ("fastervlm", "vtc_cls")
DEFAULT_VARIANTS = "fastv,vte,shortv,fastv+shortv,fastervlm+shortv"


def shortv_spec(num_layers: int, ratio: float, calibrate: bool) -> str:
    """ShortV at `ratio`: calibrated (`calibrate`) or the last round(ratio * L) layers listed."""
    if calibrate:
        return f"shortv:ratio={ratio}"
    frozen = round(ratio * num_layers)
    return f"shortv:layers={list(range(num_layers - frozen, num_layers))}".replace(" ", "")


def variants(chosen: str, vte_k: int, shortv: str, ratio: float) -> dict[str, list[str]]:
    """Engine row name -> pass specs, for the unrewritten engine and the `chosen` variants (a
    comma list of fastv, vte, shortv, fastervlm, vtc_cls, fastv+shortv, fastervlm+shortv, or
    "all")."""
    from mllmc.runtime.errors import UserError

    table = {
        "fastv": ("fastv", ["fastv"]),
        "vte": (f"vte:k={vte_k}", [f"vte:k={vte_k}"]),
        "shortv": (f"shortv:ratio={ratio}", [shortv]),
        "fastervlm": ("fastervlm", ["fastervlm"]),
        "vtc_cls": ("vtc_cls", ["vtc_cls"]),
        "fastv+shortv": ("fastv+shortv", ["fastv", shortv]),
        "fastervlm+shortv": ("fastervlm+shortv", ["fastervlm", shortv]),
    }
    keys = list(table) if chosen == "all" else [k.strip() for k in chosen.split(",") if k.strip()]
    unknown = [k for k in keys if k not in table]
    if unknown or not keys:
        raise UserError(
            f"--variants: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
            f"give 'all' or a comma list of {', '.join(table)}"
        )
    return {BASE: [], **{f"{BASE}+{table[k][0]}": table[k][1] for k in dict.fromkeys(keys)}}


def square_image(size: int) -> Any:
    """The benchmark's image: verify.probe_image's shapes on a gradient, cropped square."""
    from mllmc.compiler.verify import probe_image

    return probe_image(size=size).crop((0, 0, size, size))


def compile_variants(
    model_dir: str, root: Path, configs: dict[str, list[str]], reuse: bool
) -> tuple[dict[str, Path], dict[str, str]]:
    """Compile each variant into root/<model>-<name> with `mllmc compile --no-validate` (as
    `mllmc bench`), one process each, so that no compile's memory stays in the timing process;
    with `reuse`, an artifact an earlier run left there with the same passes (and this mllmc's
    manifest format) is kept. A variant
    with a pre-LLM pass that mllmc refuses on this model is left out: returns (the artifact
    paths, why each variant left out was refused)."""
    from mllmc.runtime.errors import UserError
    from mllmc.runtime.manifest import FORMAT_VERSION, read_manifest

    paths, skipped = {}, {}
    for name, specs in configs.items():
        path = root / f"{Path(model_dir).name}-{re.sub(r'[^A-Za-z0-9_.+-]+', '_', name)}"
        wanted = [spec.split(":")[0] for spec in specs]
        if reuse and (path / "manifest.json").is_file():
            manifest = read_manifest(path)
            current = manifest.format_version == FORMAT_VERSION  # else this runtime may refuse it
            if current and [p.name for p in manifest.passes] == wanted:
                print(f"reusing {path}", flush=True)
                paths[name] = path
                continue
        print(f"compiling {name} -> {path}", flush=True)
        cmd = [sys.executable, "-m", "mllmc.compiler.tools.cli", "compile", model_dir, "-o",
               str(path), "--no-validate", "--force", "-q"]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd + [a for spec in specs for a in ("--pass", spec)], capture_output=True, text=True
        )
        if proc.returncode == 0:
            print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
            paths[name] = path
            continue
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        why = lines[-1].removeprefix("mllmc: error: ") if lines else f"exit {proc.returncode}"
        if proc.returncode != 2:
            raise RuntimeError(f"mllmc compile failed on {name}:\n{proc.stderr[-3000:]}")
        if not set(wanted) & set(PRE_LLM_PASSES):
            raise UserError(f"compiling {name}: {why}")
        print(f"skipping {name}: {why}", flush=True)
        skipped[name] = why
    return paths, skipped


def groups_of(names: list[str], configs: dict[str, list[str]], size: int) -> list[list[str]]:
    """The pass engines in timing groups: at most `size` whose LLM runs on every visual row
    each; an engine behind a pre-LLM pass (few rows, small) joins the groups in turn."""
    light = [n for n in names if set(s.split(":")[0] for s in configs[n]) & set(PRE_LLM_PASSES)]
    heavy = [n for n in names if n not in light]
    groups = [heavy[i : i + size] for i in range(0, len(heavy), size)] or [[]]
    for i, name in enumerate(light):
        groups[i % len(groups)].append(name)
    return groups


def eager_decode(model: Any, model_dir: str, image: Any, prompt: str, tokens: int) -> bench.Timer:
    """HF eager's decode timer, from one prefill made now: each run decodes `tokens` greedy
    steps after the prompt, then crops the cache back to the prompt."""
    from transformers import AutoProcessor

    from mllmc.compiler.core.capture import processor_inputs

    inputs = processor_inputs(AutoProcessor.from_pretrained(model_dir), image, prompt)
    with torch.no_grad():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
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


def engine_decode(engine: Any, image: Any, prompt: str, tokens: int) -> bench.Timer:
    """An engine's decode timer, from one prefill made now: each run decodes `tokens` greedy
    steps from that cache (the engine returns new cache arrays; its input stays as it was)."""
    feats, counts = engine.encode_images(image)
    layout = engine.encode_prompt(prompt, counts)
    first, cache = engine.prefill(layout, feats)

    return lambda: bench.greedy_steps(engine, layout, first, cache, tokens)


def engine_entry(path: Path, image: Any, prompt: str, tokens: int, threads: int) -> bench.Loader:
    """`bench.loader` of the artifact at `path` (`bench.side_by_side` loads it), its decode
    timed by `engine_decode`."""
    from mllmc.runtime import load

    def timers_of(engine: Any) -> tuple[dict[str, bench.Timer], int]:
        timers, n = bench.engine_timers(engine, image, prompt, tokens)
        timers["decode"] = engine_decode(engine, image, prompt, tokens)
        return timers, n

    return bench.loader(lambda: load(path, threads=threads), timers_of)


def time_groups(
    model_dir: str, paths: dict[str, Path], configs: dict[str, list[str]], image: Any,
    args: argparse.Namespace, threads: int,
) -> tuple[list[dict[str, dict[str, Any]]], dict[str, Any], Any, dict[str, Any], int]:  # fmt: skip
    """HF eager, the unrewritten engine and each group of pass engines, timed side by side
    (`bench.side_by_side`), one group after another; returns (each group's rows, the manifests
    by row name, the ModelInfo, the roofline, the prompt's visual rows)."""
    from transformers.utils import logging as hf_logging

    from mllmc.compiler.core.capture import load_model
    from mllmc.runtime.manifest import read_manifest

    hf_logging.disable_progress_bar()
    model, info = load_model(model_dir)
    prompt = bench.prompt_for(args.text_tokens)
    tokens = args.decode_tokens
    eager = bench.eager_entry(model, model_dir, image, prompt, tokens)
    eager.timers["decode"] = eager_decode(model, model_dir, image, prompt, tokens)
    fixed: dict[str, Any] = {"hf_eager": eager}  # HF eager stays loaded; engines are loaders
    n = eager.prompt_tokens
    peak = bench.roofline(info, n, max(args.rounds, 1), threads=threads)
    manifest, visual = bench.probe_engine(paths[BASE], image, prompt, n, threads)
    manifests = {BASE: manifest}
    fixed[BASE] = engine_entry(paths[BASE], image, prompt, tokens, threads)
    groups = groups_of([k for k in paths if k != BASE], configs, args.group_size)
    out = []
    for i, names in enumerate(groups, 1):
        entries = dict(fixed)
        for name in names:
            entries[name] = engine_entry(paths[name], image, prompt, tokens, threads)
            manifests[name] = read_manifest(paths[name])
        print(
            f"timing group {i}/{len(groups)} ({', '.join(entries)}): {args.rounds} round(s) "
            f"over {min(bench.LOADS, args.rounds)} load(s) of the engines, each after a warm-up",
            flush=True,
        )
        out.append(bench.side_by_side(entries, args.rounds, threads, rounds_option="--rounds"))
        del entries
        gc.collect()
    return out, manifests, info, peak, visual


def add_kv_and_flops(
    rows: dict[str, dict[str, Any]], manifests: dict[str, Any], n_text: int
) -> dict[str, int]:
    """Each row's KV-cache bytes (prompt end, per token) for the prompt's n_text text rows and
    the visual rows entering its LLM (its prompt's other rows), in place; returns each row's
    analytic LLM-prefill FLOPs. HF eager is counted with the unrewritten engine's plan."""
    from mllmc.compiler.tools.inspect_artifact import kv_cache_bytes

    flops = {}
    for name, row in rows.items():
        m = manifests.get(name, manifests[BASE])
        flops[name] = bench.plan_prefill_flops(m, n_text)
        kv = kv_cache_bytes(m, n_text, row["prompt_tokens"] - n_text)
        row["kv_cache_bytes_prompt"], row["kv_cache_bytes_per_token"] = (
            kv["prompt"],
            kv["per_token"],
        )
    return flops


def add_part_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """Each row's speedup of vision, LLM prefill and decode over HF eager ("vs_hf_eager") and
    over the unrewritten engine ("vs_mllmc_onnx"): `bench.ratio_spread` of the per-round times."""
    for row in rows.values():
        for ref in ("hf_eager", BASE):
            row[f"vs_{ref}"] = {
                part: bench.ratio_spread(rows[ref], row, key) for key, part in PARTS
            }


def pass_speedups(rows: dict[str, Any], manifests: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per rewritten engine in `rows`: the FLOPs-ideal LLM-prefill speedup (manifest prefill
    FLOPs before / after, at the reference prompt), the measured one over the unrewritten engine
    (`add_part_ratios`), the share of
    the ideal measured (measured / ideal) and the share of the ideal gain ((m - 1) / (i - 1))."""
    out = {}
    for name in rows:
        if name in ("hf_eager", BASE):
            continue
        m = manifests[name]
        before, after = m.flops["before"]["prefill"], m.flops["after"]["prefill"]
        ideal = before / after
        measured = rows[name][f"vs_{BASE}"]["LLM prefill"]  # against its group's rounds
        out[name] = {
            "passes": [{"name": p.name, "config": p.config} for p in m.passes],
            "prefill_flops_before": before,
            "prefill_flops_after": after,
            "reference_prompt_tokens": m.flops["after"]["reference_prompt_tokens"],
            "flops_ideal": ideal,
            "measured": measured["median"],
            "measured_spread": measured,
            "share_of_ideal": measured["median"] / ideal,
            "share_of_ideal_gain": (measured["median"] - 1) / (ideal - 1) if ideal > 1 else None,
        }
    return out


def pass_goal(speed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The goal every mllmc benchmark sets a pass, on `pass_speedups`: >= PASS_GOAL of its
    FLOPs-ideal LLM-prefill gain, (measured - 1) / (ideal - 1)."""
    return {
        "goal": f"every pass reaches >= {PASS_GOAL:.0%} of its FLOPs-ideal LLM-prefill "
        "gain over the unrewritten engine ((measured - 1) / (ideal - 1))",
        "met": all((s["share_of_ideal_gain"] or 0) >= PASS_GOAL for s in speed.values()),
        "detail": ", ".join(
            f"{name[len(BASE) + 1 :]} {s['share_of_ideal_gain'] or 0:.1%} "
            f"({s['measured']:.2f}x of {s['flops_ideal']:.2f}x)"
            for name, s in speed.items()
        ),
    }


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark's goals, each with whether this run met it and the numbers behind it. The
    prefill goal is judged on fastervlm + shortv, or on fastv + shortv where fastervlm was
    refused."""
    rows, speed = report["rows"], report["pass_speedups"]
    base = rows[BASE]["vs_hf_eager"]
    composed = {
        name[len(BASE) + 1 :]: rows[name]["vs_hf_eager"]["LLM prefill"]["median"]
        for name in (f"{BASE}+fastervlm+shortv", f"{BASE}+fastv+shortv")
        if name in rows
    }
    judged = next(iter(composed), None)
    return [
        pass_goal(speed),
        {
            "goal": "the unrewritten engine is no slower than HF eager on any part",
            "met": all(s["median"] >= 1 for s in base.values()),
            "detail": ", ".join(f"{part} {s['median']:.2f}x" for part, s in base.items()),
        },
        {
            "goal": f"the composed pipeline's LLM prefill >= {COMPOSED_GOAL:.0f}x HF eager (set "
            f"for fastervlm 25% + shortv 0.6; judged on {judged})",
            "met": judged is not None and composed[judged] >= COMPOSED_GOAL,
            "detail": ", ".join(f"{name} {x:.2f}x" for name, x in composed.items()) or "not run",
        },
    ]


def merge_groups(
    groups: list[dict[str, dict[str, Any]]], order: list[str]
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The report's rows (HF eager and the unrewritten engine of the first group, each pass
    engine from its group, in `order`), and each group's engines with its two reference rows'
    times."""
    found = {name: row for g in groups for name, row in g.items()}
    rows = {"hf_eager": groups[0]["hf_eager"], BASE: groups[0][BASE]}
    rows.update({name: found[name] for name in order if name in found and name not in rows})
    keep = ("vision_s", "llm_prefill_s", "decode_s_per_token", "spread", "trust")
    refs = [
        {"engines": list(g), **{ref: {k: g[ref][k] for k in keep} for ref in ("hf_eager", BASE)}}
        for g in groups
    ]
    return rows, refs


def run_trust(groups: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """`bench.run_trust` over every row of every group (a group's rows named "(group i)")."""
    if len(groups) == 1:
        return bench.run_trust(groups[0])
    return bench.run_trust(
        {f"{name} (group {i})": row for i, g in enumerate(groups, 1) for name, row in g.items()}
    )


def run(args: argparse.Namespace, artifacts: Path) -> dict[str, Any]:
    """Compile every variant into `artifacts`, time them in groups with HF eager and the
    unrewritten engine, build the report."""
    from mllmc.compiler.core.model_dir import read_config
    from mllmc.runtime.errors import UserError

    model_dir = str(args.model)
    cfg = read_config(model_dir)
    if cfg["model_type"] != "llava_next":
        raise UserError(f"{model_dir} is a {cfg['model_type']!r} model, not llava_next")
    threads = bench.check_threads(args.threads)
    torch.set_num_threads(threads)
    num_layers = cfg["text_config"]["num_hidden_layers"]
    vte_k = args.vte_k if args.vte_k is not None else num_layers // 2
    shortv = shortv_spec(num_layers, args.shortv_ratio, args.shortv_calibrate)
    configs = variants(args.variants, vte_k, shortv, args.shortv_ratio)
    image = square_image(args.image_size)
    paths, skipped = compile_variants(model_dir, artifacts, configs, args.reuse)
    groups, manifests, info, peak, visual = time_groups(
        model_dir, paths, configs, image, args, threads
    )
    n = groups[0]["hf_eager"]["prompt_tokens"]
    for rows in groups:
        bench.add_ratios(rows, info, peak, add_kv_and_flops(rows, manifests, n - visual))
        add_part_ratios(rows)
    rows, refs = merge_groups(groups, list(configs))
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
        "trust": run_trust(groups),
        "roofline": peak,
        "peak_rss_mb": bench.peak_rss_mb(),
        "rss_note": bench.RSS_NOTE,
        "rows": rows,
        "pass_speedups": pass_speedups(rows, manifests),
    }
    report["goals"] = goals(report)
    return report


def versions() -> dict[str, str]:
    import onnxruntime
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Bars of the ratios: each part's speedup over HF eager per engine (left) and each pass's
    LLM-prefill speedup over the unrewritten engine, measured against FLOPs-ideal (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mllmc.compiler.files.outputs import write_figure

    rows = report["rows"]
    names = list(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    y, height = np.arange(len(names)), 0.8 / len(PARTS)
    for i, (_, part) in enumerate(PARTS):
        vals = [rows[n]["vs_hf_eager"][part]["median"] for n in names]
        left.barh(y + i * height, vals, height, label=part)
    left.set_yticks(y + height, names)
    left.axvline(1, color="#444", lw=0.8)
    left.set_xlabel("speedup over HF eager (median of per-round ratios)")
    left.invert_yaxis()
    left.legend(fontsize=8)
    speed = report["pass_speedups"]
    y = np.arange(len(speed))
    right.barh(y - 0.2, [s["flops_ideal"] for s in speed.values()], 0.4, color="#bbb",
               label="FLOPs-ideal")  # fmt: skip
    right.barh(y + 0.2, [s["measured"] for s in speed.values()], 0.4, color="#2a7",
               label="measured")  # fmt: skip
    right.set_yticks(y, [name[len(BASE) + 1 :] for name in speed])
    right.axvline(1, color="#444", lw=0.8)
    right.set_xlabel("LLM-prefill speedup over the unrewritten engine")
    right.invert_yaxis()
    right.legend(fontsize=8)
    fig.suptitle(
        f"{Path(report['model']).name}: {report['image'][0]}x{report['image'][1]} image, "
        f"{report['prompt_tokens']} prompt tokens ({report['visual_tokens']} visual), "
        f"{report['threads']} threads"
    )
    write_figure(fig, path, force=True)


def summary(report: dict[str, Any]) -> str:
    """`mllmc bench`'s table, then the speedups over the unrewritten engine, the passes against
    their FLOPs-ideal speedup, the skipped passes and the goals."""
    lines = [bench.format_table(report), "", f"{'vs mllmc_onnx':28s}" + "".join(
        f" {part:>21s}" for _, part in PARTS)]  # fmt: skip
    for name, row in report["rows"].items():
        lines.append(
            f"{name:28s}"
            + "".join(f" {bench.format_spread(row['vs_' + BASE][p]):>21s}" for _, p in PARTS)
        )
    lines += ["", f"{'pass':28s} {'FLOPs-ideal':>11s} {'measured':>21s} {'of ideal gain':>13s}"]
    for name, s in report["pass_speedups"].items():
        lines.append(
            f"{name[len(BASE) + 1 :]:28s} {s['flops_ideal']:10.2f}x "
            f"{bench.format_spread(s['measured_spread']):>21s} {s['share_of_ideal_gain'] or 0:13.0%}"
        )
    if len(report["groups"]) > 1:
        lines.append(
            "timed in groups, each with HF eager and mllmc_onnx (rows above: group 1's): "
            + "; ".join(", ".join(g["engines"][2:]) for g in report["groups"])
        )
    lines += [f"skipped {name}: {why}" for name, why in report["skipped"].items()]
    lines += [
        f"goal {'MET' if g['met'] else 'NOT MET'}: {g['goal']} ({g['detail']})"
        for g in report["goals"]
    ]
    return "\n".join(lines)


def family_parser(
    doc: str, model: str, model_help: str, image_size: int, variants: str, group: tuple[int, str]
) -> argparse.ArgumentParser:
    """The options every family benchmark takes (this one, qwen.py): model, out, artifacts,
    image size, tokens, rounds, threads, variants, group size (default, help), vte-k, shortv
    ratio."""
    ap = OneLineParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=model, help=model_help)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--artifacts-dir", help="compile here (default: a temporary directory)")
    ap.add_argument(
        "--reuse", action="store_true", help="keep artifacts an earlier run left in --artifacts-dir"
    )
    ap.add_argument(
        "--image-size", type=int, default=image_size, help="side of the square image (px)"
    )
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    ap.add_argument("--threads", type=int, help="threads for every engine (default: every CPU)")
    ap.add_argument(
        "--variants", default=variants, help=f"'all' or a comma list (default {variants})"
    )
    ap.add_argument("--group-size", type=int, default=group[0], help=group[1])
    ap.add_argument("--vte-k", type=int, help="VTE's exit layer (default: L / 2)")
    ap.add_argument("--shortv-ratio", type=float, default=0.6)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = family_parser(
        __doc__,
        "models/small-llava-next",
        "a llava_next model dir (small-llava-next is written there if missing)",
        672,
        DEFAULT_VARIANTS,
        (1, "pass engines on every visual row loaded at once (memory)"),
    )
    ap.add_argument(
        "--shortv-calibrate",
        action="store_true",
        help="ShortV's layers from a calibration on built-in data (slow)",
    )
    return ap.parse_args(argv)


def bench_main(args: Any, name: str, preset: str, run: Any, plot: Any, summary: Any) -> int:
    """The main of a family benchmark (this one, qwen.py): check the options, write the preset
    where the model directory has no config, `run(args, artifacts_dir)` in a scratch directory
    or --artifacts-dir, then OUT/<name>.json, OUT/<name>.png and the summary. Exit 2 with one
    line on a bad option."""
    from mllmc.compiler.data.presets import write_preset
    from mllmc.compiler.files import outputs
    from mllmc.runtime.errors import UserError

    try:
        for option in ("rounds", "genai_rounds"):  # genai_rounds: qwen.py's alone
            value = getattr(args, option, None)
            if value is not None and not 1 <= value <= bench.MAX_REPEATS:
                flag = "--" + option.replace("_", "-")
                raise UserError(f"{flag} must be from 1 to {bench.MAX_REPEATS}, got {value}")
        if args.group_size < 1:
            raise UserError(f"--group-size must be >= 1, got {args.group_size}")
        out = outputs.check_output_folder(args.out, "benchmark results")
        if not (Path(args.model) / "config.json").is_file():
            write_preset(preset, args.model)
        if args.artifacts_dir is None:
            scratch = outputs.scratch_directory(f"mllmc-{name}-")
            report = run(args, Path(scratch.name))
            scratch.cleanup()
        else:
            report = run(args, outputs.check_output_folder(args.artifacts_dir, "artifacts"))
    except UserError as e:
        print(f"{name}.py: error: {e}", file=sys.stderr)
        return 2
    outputs.write_file(out / f"{name}.json", json.dumps(report, indent=2), force=True)
    plot(report, out / f"{name}.png")
    print(summary(report))
    print(f"wrote {out / f'{name}.json'} and {out / f'{name}.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main(parse_args(argv), "llava_next", "small-llava-next", run, plot, summary)


if __name__ == "__main__":
    sys.exit(main())
