"""Side-by-side benchmark: Hugging Face eager vs mllmc engines, in one process.

The fair baseline is HF eager with its own KV cache and logits at the last position only
(`logits_to_keep=1`). Every engine gets the same image and prompt; times are medians over
`repeats` rounds after one warm-up round, each round running every engine in turn
(`interleaved`). The same run measures the machine's roofline (GEMM GFLOP/s in the engines'
dtype at the model's shapes, memory read GB/s) and reports each engine as a fraction of it.
On a GPU (`device="cuda"`, targets that build for it: aoti, trt) HF eager runs there in the same
dtype, and every timer waits for the device before it stops.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FILLER = (
    "Describe the image in detail: the objects, their colours and shapes, where they are, any "
    "text that is written on them, and what the scene as a whole looks like to a person."
)


def median_time(
    fn: Callable[[], Any],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], Any] | None = None,
) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` untimed ones; `sync` (e.g.
    torch.cuda.synchronize) is called before and after each timed run, so that a GPU's queued
    work is inside the time it belongs to."""
    wait = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        wait()
        t0 = time.perf_counter()
        fn()
        wait()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def best_gemm_flops(
    info: Any, n: int, time_of: Callable[[Callable[[], Any]], float], **like: Any
) -> float:
    """Best FLOP/s of the decoder's prefill GEMM shapes (q/o projections, MLP up and down) at
    n rows; `like` places and types the operands (device=, dtype=), `time_of` times one product."""
    d, m = info.hidden_size, info.intermediate_size
    best = 0.0
    for k, cols in ((d, d), (d, m), (m, d)):
        a, b = torch.randn(n, k, **like), torch.randn(k, cols, **like)
        best = max(best, 2 * n * k * cols / time_of(lambda a=a, b=b: a @ b))
    return best


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def device_sync(device: str) -> Callable[[], Any] | None:
    """What waits for `device`'s queued work (None on the CPU)."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else None


def roofline(
    info: Any, n: int, repeats: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, float]:
    """Best GEMM GFLOP/s in `dtype` over the decoder's prefill shapes (q/o projections, MLP up
    and down), and memory read GB/s over a buffer well past the caches, on `device`."""
    sync = device_sync(device)

    def best_of(fn: Callable[[], Any]) -> float:
        return min(median_time(fn, 1, sync=sync) for _ in range(repeats))

    best = best_gemm_flops(info, n, best_of, device=device, dtype=dtype)
    size = 2**30 if sync else 256 * 2**20  # well past a GPU's L2 / a CPU's caches
    big = torch.empty(size // 4, dtype=torch.float32, device=device).fill_(1.0)
    t_read = best_of(lambda: big.sum())
    return {"gemm_gflops": best / 1e9, "mem_read_gbs": size / t_read / 1e9}


def prompt_for(n_text: int) -> str:
    words = (FILLER + " ") * (1 + n_text // 20)
    return " ".join(words.split()[: max(1, n_text - 12)])  # the chat template adds ~12 tokens


Timer = Callable[[], float]  # runs once; returns the seconds (per token, for decode) it took


def interleaved(
    timers: dict[str, dict[str, Timer]], repeats: int, pause: float = 0.1
) -> dict[str, dict[str, float]]:
    """Median of every timer over `repeats` rounds after one warm-up round. Each round runs every
    engine once, in turn, so the slow drifts of a shared machine (neighbours, clocks; ±20% here
    between runs) fall on all rows alike instead of on whichever engine ran last. Each timer
    starts after `pause` seconds idle: onnxruntime's pool threads spin-wait for a while after a
    run, and would otherwise take the cores from the engine timed next (HF eager measured 50×
    slower on tiny-llava right after an onnxruntime call on 2 cores)."""

    def run(timer: Timer) -> float:
        time.sleep(pause)
        return timer()

    for engine in timers.values():
        for timer in engine.values():
            run(timer)
    samples: dict[str, dict[str, list[float]]] = {
        name: {metric: [] for metric in engine} for name, engine in timers.items()
    }
    for _ in range(repeats):
        for name, engine in timers.items():
            for metric, timer in engine.items():
                samples[name][metric].append(run(timer))
    return {
        name: {metric: statistics.median(v) for metric, v in metrics.items()}
        for name, metrics in samples.items()
    }


def timed(fn: Callable[[], Any], sync: Callable[[], Any] | None = None) -> Timer:
    """A Timer of fn(); with `sync` (a GPU's), the device's queued work is inside the time."""
    wait = sync or (lambda: None)

    def run() -> float:
        wait()
        t0 = time.perf_counter()
        fn()
        wait()
        return time.perf_counter() - t0

    return run


def eager_timers(
    model: Any, model_dir: str, image: Any, prompt: str, decode_tokens: int
) -> tuple[dict[str, Timer], int]:
    """Timers of HF eager: "prefill" (vision + LLM, one forward), "vision", "decode" (per token),
    on the model's device and in its dtype."""
    from transformers import AutoProcessor

    from .verify import processor_inputs

    param = next(model.parameters())
    inputs = processor_inputs(AutoProcessor.from_pretrained(model_dir), image, prompt)
    inputs = inputs.to(param.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    sync = device_sync(str(param.device))

    @torch.no_grad()
    def prefill():
        return model(**inputs, use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def vision():
        return model.model.get_image_features(pixel_values=inputs["pixel_values"])

    @torch.no_grad()
    def decode() -> float:
        out = prefill()
        token = out.logits[:, -1:].argmax(-1)
        cache = out.past_key_values
        if sync:
            sync()
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
            int(token)  # the host reads each token, as a generate loop and the engines do
        return (time.perf_counter() - t0) / decode_tokens

    timers = {"prefill": timed(prefill, sync), "vision": timed(vision, sync), "decode": decode}
    return timers, int(inputs["input_ids"].shape[1])


def engine_timers(
    engine: Any, image: Any, prompt: str, decode_tokens: int, device: str = "cpu"
) -> tuple[dict[str, Timer], int]:
    """Timers of an mllmc engine: "vision", "llm_prefill", "decode" (per token); the engine
    runs on `device` (its outputs may stay there: the timers wait for it)."""
    sync = device_sync(device)
    ids, start = engine.encode_prompt(prompt)
    feats = engine.encode_image(image)

    def decode() -> float:
        logits, cache = engine.prefill(ids, feats, start)
        pos = ids.shape[1]
        t0 = time.perf_counter()
        for i in range(decode_tokens):
            logits, cache = engine.decode_step(int(np.argmax(logits)), pos + i, cache)
        return (time.perf_counter() - t0) / decode_tokens

    timers = {
        "vision": timed(lambda: engine.encode_image(image), sync),
        "llm_prefill": timed(lambda: engine.prefill(ids, feats, start), sync),
        "decode": decode,
    }
    return timers, int(ids.shape[1])


RSS_NOTE = (
    "rows: hf_eager = process RSS with the model loaded; engines = RSS growth from loading the "
    "engine and running one prefill"
)


@dataclass
class Entry:
    """One engine of a side-by-side run: its timers, prompt length and memory (RSS_NOTE)."""

    timers: dict[str, Timer]
    prompt_tokens: int
    rss_mb: float
    engine: Any = None  # kept alive until the timers have run


def eager_entry(model: Any, model_dir: str, image: Any, prompt: str, decode_tokens: int) -> Entry:
    timers, n = eager_timers(model, model_dir, image, prompt, decode_tokens)
    timers["prefill"]()
    return Entry(timers, n, rss_mb())


def loaded_entry(
    load: Callable[[], Any], timers_of: Callable[[Any], tuple[dict[str, Timer], int]]
) -> Entry:
    """Load an engine, make its timers and run its LLM prefill once, measuring the RSS added."""
    gc.collect()
    before = rss_mb()
    engine = load()
    timers, n = timers_of(engine)
    timers["llm_prefill"]()
    return Entry(timers, n, rss_mb() - before, engine)


def side_by_side(entries: dict[str, Entry], repeats: int) -> dict[str, dict[str, Any]]:
    """Table rows of `entries` timed `interleaved`."""
    medians = interleaved({name: e.timers for name, e in entries.items()}, repeats)
    return {
        name: {**row_from(medians[name], e.prompt_tokens), "rss_mb": e.rss_mb}
        for name, e in entries.items()
    }


def add_ratios(
    rows: dict[str, dict[str, Any]],
    info: Any,
    peak: dict[str, float],
    flops: dict[str, int],
    itemsize: int = 4,
) -> None:
    """Each row's prefill FLOPs (`flops[name]`), its fractions of the roofline and its speedups
    over the "hf_eager" row, in place."""
    eager = rows["hf_eager"]
    for name, row in rows.items():
        row["llm_prefill_flops"] = flops[name]
        row["prefill_fraction_of_gemm_peak"] = (
            flops[name] / row["llm_prefill_s"] / 1e9 / peak["gemm_gflops"]
        )
        row["decode_fraction_of_bandwidth"] = (
            decode_bytes(info, row["prompt_tokens"], itemsize)
            / row["decode_s_per_token"]
            / 1e9
            / peak["mem_read_gbs"]
        )
        row["llm_prefill_speedup_vs_eager"] = eager["llm_prefill_s"] / row["llm_prefill_s"]
        row["prefill_speedup_vs_eager"] = eager["prefill_s"] / row["prefill_s"]
        row["decode_speedup_vs_eager"] = eager["decode_s_per_token"] / row["decode_s_per_token"]


def row_from(times: dict[str, float], prompt_tokens: int) -> dict[str, float]:
    """A table row from interleaved medians (eager's prefill includes its vision tower)."""
    vision = times.get("vision", float("nan"))
    if "llm_prefill" in times:
        llm, prefill = times["llm_prefill"], vision + times["llm_prefill"]
    else:
        prefill = times["prefill"]
        llm = prefill - vision
    return {
        "prompt_tokens": prompt_tokens,
        "prefill_s": prefill,
        "vision_s": vision,
        "llm_prefill_s": llm,
        "decode_s_per_token": times["decode"],
    }


def decode_bytes(info: Any, past: int, itemsize: int = 4) -> int:
    """Bytes one decode step must read: decoder weights (+ lm_head) and the KV cache, at
    `itemsize` bytes per element (4: float32)."""
    d, m, L = info.hidden_size, info.intermediate_size, info.num_layers
    q_dim, kv_dim = info.num_heads * info.head_dim, info.num_kv_heads * info.head_dim
    per_layer = d * q_dim * 2 + d * kv_dim * 2 + 3 * d * m
    weights = L * per_layer + d * info.vocab_size
    kv = L * 2 * past * kv_dim
    return itemsize * (weights + kv)


def plan_prefill_flops(manifest: Any, n_text: int) -> int:
    """Analytic LLM-prefill FLOPs of an artifact for n_text text tokens, from its layer plan
    (and the layers a pass scores one extra attention row in, as its stats record)."""
    from .flops import analytic_prefill_flops

    scored = [p.stats["score_layer"] for p in manifest.passes if "score_layer" in p.stats]
    return analytic_prefill_flops(
        manifest.model, n_text, plan=manifest.layers, scored_layers=scored
    )


def bench(
    model_dir: str,
    passes: list,
    target: str = "onnx",
    work_dir: str | Path = "benchmarks/results",
    n_text: int = 32,
    decode_tokens: int = 32,
    repeats: int = 3,
    device: str = "cpu",
    dtype: str | None = None,
) -> dict[str, Any]:
    """Eager vs the unrewritten engine vs the engine with `passes`, one process, one image;
    `device` and `dtype` as for `mllmc compile` (HF eager runs on that device in that dtype)."""
    from mllmc.runtime import load

    from . import backends
    from .capture import load_model
    from .pipeline import compile_model
    from .verify import probe_image

    options = backends.resolve_options(target, backends.TargetOptions(device, dtype))
    torch_dtype = getattr(torch, str(options.dtype))
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model, info = load_model(model_dir)
    model = model.to(device=options.device, dtype=torch_dtype)
    image = probe_image(size=info.image_size)
    prompt = prompt_for(n_text)
    entries = {"hf_eager": eager_entry(model, model_dir, image, prompt, decode_tokens)}
    variants = [("mllmc_" + target, [])]
    if passes:
        variants.append(("mllmc_" + target + "+" + "+".join(p.name for p, _ in passes), passes))
    manifests = {}
    for name, plist in variants:
        out = work / "artifacts" / f"{Path(model_dir).name}-{name}"
        result = compile_model(
            model_dir,
            out,
            plist,
            target=target,
            device=options.device,
            dtype=options.dtype,
            validate=False,
            force=True,
        )
        manifests[name] = result.manifest
        entries[name] = loaded_entry(
            lambda out=out: load(out),
            lambda engine: engine_timers(engine, image, prompt, decode_tokens, options.device),
        )
    rows = side_by_side(entries, repeats)
    del entries
    n = rows["hf_eager"]["prompt_tokens"]
    peak = roofline(info, n, repeats, options.device, torch_dtype)
    base_manifest = manifests[variants[0][0]]
    from .inspect import kv_cache_bytes

    flops = {}
    for name in rows:
        m = manifests.get(name, base_manifest)
        flops[name] = plan_prefill_flops(m, n - info.num_visual_tokens)
        kv = kv_cache_bytes(m, n - info.num_visual_tokens)
        rows[name]["kv_cache_bytes_prompt"] = kv["prompt"]
        rows[name]["kv_cache_bytes_per_token"] = kv["per_token"]
    add_ratios(rows, info, peak, flops, torch_dtype.itemsize)
    report: dict[str, Any] = {
        "model": str(model_dir),
        "device": torch.cuda.get_device_name() if options.device == "cuda" else "cpu",
        "dtype": options.dtype,
        "torch": torch.__version__,
        "visual_tokens": info.num_visual_tokens,
        "prompt_tokens": n,
        "decode_tokens": decode_tokens,
        "threads": torch.get_num_threads(),
        "roofline": peak,
        "peak_rss_mb": peak_rss_mb(),
        "rss_note": RSS_NOTE,
        "rows": rows,
    }
    if passes:
        base, rewritten = variants[0][0], variants[1][0]
        ideal = rows[base]["llm_prefill_flops"] / rows[rewritten]["llm_prefill_flops"]
        measured = rows[base]["llm_prefill_s"] / rows[rewritten]["llm_prefill_s"]
        report["pass_speedup"] = {
            "flops_ideal": ideal,
            "measured": measured,
            "fraction_of_ideal": (measured - 1) / (ideal - 1) if ideal > 1 else None,
        }
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']}: {report['prompt_tokens']} prompt tokens "
        f"({report['visual_tokens']} visual), {report.get('dtype', 'float32')} on "
        f"{report.get('device', 'cpu')}, {report['threads']} threads",
        f"roofline: GEMM {report['roofline']['gemm_gflops']:.1f} GFLOP/s, "
        f"read {report['roofline']['mem_read_gbs']:.1f} GB/s",
        f"{'engine':28s} {'vision ms':>9s} {'LLM prefill ms':>14s} {'vs eager':>8s} "
        f"{'decode ms/tok':>13s} {'vs eager':>8s} {'%GEMM':>6s} {'%BW':>5s} "
        f"{'KV MiB':>7s} {'KV KiB/tok':>10s}",
    ]
    for name, r in report["rows"].items():
        lines.append(
            f"{name:28s} {r['vision_s'] * 1e3:9.1f} {r['llm_prefill_s'] * 1e3:14.1f} "
            f"{r['llm_prefill_speedup_vs_eager']:7.2f}x {r['decode_s_per_token'] * 1e3:13.2f} "
            f"{r['decode_speedup_vs_eager']:7.2f}x {r['prefill_fraction_of_gemm_peak']:6.0%} "
            f"{r['decode_fraction_of_bandwidth']:5.0%} "
            f"{r.get('kv_cache_bytes_prompt', float('nan')) / 2**20:7.2f} "
            f"{r.get('kv_cache_bytes_per_token', float('nan')) / 2**10:10.1f}"
        )
    if "pass_speedup" in report:
        s = report["pass_speedup"]
        # The FLOPs cut is what the pass removes; the measured speedup says whether FLOPs set
        # the time (on a tiny model per-op overhead does, and the measured ratio can be < 1).
        cut = 1 - 1 / s["flops_ideal"]
        lines.append(
            f"pass prefill: {cut:.1%} fewer FLOPs (FLOPs-ideal speedup {s['flops_ideal']:.2f}x); "
            f"measured speedup {s['measured']:.2f}x"
        )
        if s["measured"] < 1 + cut / 2:
            lines.append(
                "  (at this size per-op overhead, not FLOPs, sets the prefill time; the FLOPs "
                "cut shows as time on a model where FLOPs dominate)"
            )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in (
        (axes[0], "llm_prefill_s", "LLM prefill (ms)"),
        (axes[1], "decode_s_per_token", "decode (ms / token)"),
    ):
        vals = [report["rows"][n][key] * 1e3 for n in names]
        ax.barh(names, vals, color=["#888"] + ["#2a7"] * (len(names) - 1))
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.1f}", va="center")
        ax.set_title(title)
        ax.invert_yaxis()
    fig.suptitle(
        f"{Path(report['model']).name}: {report['prompt_tokens']} prompt tokens, "
        f"{report['visual_tokens']} visual"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bench_cli(
    model_dir: str,
    passes: list,
    target: str,
    output: str,
    n_text: int,
    decode_tokens: int,
    repeats: int,
    device: str = "cpu",
    dtype: str | None = None,
) -> dict[str, Any]:
    from .outputs import write_file

    out = Path(output)
    report = bench(
        model_dir, passes, target, out.parent, n_text, decode_tokens, repeats, device, dtype
    )
    write_file(out, json.dumps(report, indent=2), force=True)  # the CLI checked --force up front
    plot(report, out.with_suffix(".png"))
    print(format_table(report))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return report
