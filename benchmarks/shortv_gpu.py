"""ShortV on a GPU, in one process: LLM prefill of HF eager (SDPA), the captured prefill program
and the ShortV-rewritten one, each run by PyTorch on CUDA (plain and torch.compile'd), with the
measured speedup against the FLOPs-ideal one and the parity of the rewrite in the model's dtype.

    python benchmarks/shortv_gpu.py [--model models/llava-7b-shape] [--dtype bfloat16]
    python benchmarks/shortv_gpu.py --cuda-graphs --decode --profile     # every row

Each row reports wall time and, on CUDA, the time of its kernels (torch.profiler) side by side:
a call whose wall time exceeds its kernel time is host-bound. `--cuda-graphs` adds the two
programs as CUDA graphs, twice: the exported programs op by op captured into one graph per
prompt length (`mllmc_cuda_graphs`, the runtime's GraphPerShape), and compiled with
torch.compile(mode="reduce-overhead") (`mllmc_compile_graphs`, Inductor's CUDA graphs): one
replay per call, no per-op launch on the host. `--decode` adds a greedy loop of `--decode-steps`
steps after the prompt, ms/token with the host reading each token, for the growing cache
(`decode`), the static-cache program (`decode_static`) and, with --cuda-graphs, its CUDA graph
replays (`decode_cuda_graphs`), with the bytes a step must read (decoder weights + the KV cache
at mid-loop) as a fraction of the device's copy bandwidth. `--device cpu` is a smoke run of the
rows that do not need CUDA (tests/test_benchmarks.py).

The ONNX and TensorRT engines need onnxruntime-gpu / TensorRT, which the machines here lack; what
this measures is the graph rewrite itself on the GPU: the same exported programs the backends
lower (see compiler/tools/torch_engine.py). A missing model dir is written from the preset of that name
(`llava-7b-shape`: LLaVA-1.5-7B's shapes, whose config matches the published ShortV layer list).
Writes results/shortv_gpu.json and results/shortv_gpu.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllmc.compiler.tools.bench import best_gemm_flops, device_sync, median_time
from mllmc.compiler.tools.cli import OneLineParser
from mllmc.runtime.static_cache import GraphPerShape


def device_time(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after two warm-ups, waiting for the GPU."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else None
    return median_time(fn, repeats, warmup=2, sync=sync)


def kernel_table(fn, rows: int = 25) -> str:
    """The top kernels of three calls of fn, by device time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    tables = [
        prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
        for key in (["cuda_time_total"] if torch.cuda.is_available() else []) + ["cpu_time_total"]
    ]
    return "\n".join(tables)


def kernel_time(fn, calls: int = 5) -> float | None:
    """Seconds of GPU kernels per call of fn (torch.profiler, self device time of every event);
    None on the CPU. Beside the wall time it shows whether a call is host-bound."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us = sum(
        getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
        for e in prof.key_averages()
    )
    return total_us / 1e6 / calls


def copy_bandwidth(device: str, repeats: int, gib: float = 1.0) -> float:
    """Best bytes/s of a device-to-device copy (read + write), the memory-bandwidth roofline the
    decode row is held to."""
    x = torch.empty(int(gib * 2**30) // 2, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    t = device_time(lambda: y.copy_(x), repeats)
    return 2 * x.numel() * x.element_size() / t


def gemm_peak(info: Any, n: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    """Best TFLOP/s of the decoder's prefill GEMM shapes on this GPU, in the model's dtype."""
    time_of = lambda fn: device_time(fn, repeats)  # noqa: E731
    return best_gemm_flops(info, n, time_of, device=device, dtype=dtype) / 1e12


def parse_args() -> argparse.Namespace:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/llava-7b-shape")
    ap.add_argument("--preset", default=None, help="preset to write if --model is missing")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="shortv_gpu", help="stem of the JSON / PNG written")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--device", default="cuda", help="cuda (the point); cpu for a smoke run")
    ap.add_argument("--layers", help="frozen layers as a JSON list, instead of --ratio")
    ap.add_argument("--profile", action="store_true", help="write each engine's top kernels")
    ap.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="add rows compiled with torch.compile(mode='reduce-overhead'): Inductor's CUDA "
        "graphs, one replay per call, no per-op launches on the host",
    )
    ap.add_argument(
        "--decode", action="store_true", help="add decode ms/token against memory bandwidth"
    )
    ap.add_argument("--decode-steps", type=int, default=32, help="decode steps per timed loop")
    ap.add_argument(
        "--sdpa-ab",
        action="store_true",
        help="CUDA: add the ShortV rows (op by op, and as CUDA graphs with --cuda-graphs) with "
        "attention held to the memory-efficient kernel, '@efficient': does the kernel PyTorch "
        "picks for the frozen layers' few-row masked attention (cuDNN) cost host time?",
    )
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("shortv_gpu: no CUDA device; this benchmark runs on a GPU", file=sys.stderr)
        sys.exit(2)
    from transformers import AutoProcessor

    from mllmc.compiler.core.capture import prefill_feeds, processor_inputs
    from mllmc.compiler.tools.bench import prompt_for
    from mllmc.compiler.verify import probe_image
    from mllmc.passes.shortv import keep_rows

    device, dtype = args.device, getattr(torch, args.dtype)
    model_dir = Path(args.model)
    model, model_info, cfg, segments, fns = load_and_rewrite(args, model_dir, dtype)
    vision_fn, base_fn, short_fn = fns
    processor = AutoProcessor.from_pretrained(str(model_dir))
    image, prompt = probe_image(model_info.image_size), prompt_for(args.text_tokens)
    inputs = processor_inputs(processor, image, prompt).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    ids = inputs["input_ids"]
    n = ids.shape[1]

    with torch.no_grad():
        feeds = prefill_feeds(ids, vision_fn(inputs["pixel_values"]), model_info.image_token_id)
        rows: dict[str, Any] = {"hf_eager": time_hf_eager(model, inputs, args.repeats)}
        profiles: dict[str, str] = {}
        for name, fn, frozen in prefill_variants(args, base_fn, short_fn, cfg.layers):
            rows[name], profile = time_variant(args, name, fn, frozen, feeds)
            if profile is not None:
                profiles[name] = profile

        # parity in the model's dtype: unrewritten vs HF, ShortV vs HF with the frozen-row hooks
        hf_logits = model(**inputs).logits[0, -1].float()
        with keep_rows(model, cfg.layers):
            ref_logits = model(**inputs).logits[0, -1].float()
        base_out = base_fn(*feeds)
        base_logits = base_out[0][0].float()
        short_logits = short_fn(*feeds)[0][0].float()
        decode = measure_decode(args, segments, base_out, n) if args.decode else None

    peak = gemm_peak(model_info, n, dtype, args.device, args.repeats)
    report = {
        "model": str(model_dir),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "prompt_tokens": n,
        "visual_tokens": model_info.visual_tokens,
        "frozen_layers": list(cfg.layers),
        "order_from": cfg.order_from,
        "gemm_peak_tflops": peak,
        "rows": rows,
        "pass_speedup": add_flops(rows, model_info, n, cfg.layers, peak),
        "decode": decode,
        "parity": {
            "captured_vs_hf": parity(base_logits, hf_logits),
            "shortv_vs_reference": parity(short_logits, ref_logits),
            "reference_vs_hf": parity(ref_logits, hf_logits),
        },
    }
    write_report(args, report, profiles)


def load_and_rewrite(args: argparse.Namespace, model_dir: Path, dtype: torch.dtype) -> tuple:
    """Write the model from its preset if missing; load, capture and ShortV-rewrite it on the
    CPU; move the model and the (vision, prefill, ShortV prefill) programs to the device.
    Returns (model, ModelInfo, ShortV config, captured segments, the three programs)."""
    from transformers import LlavaForConditionalGeneration

    from mllmc.compiler.core.capture import capture, model_info, on_device, read_config
    from mllmc.compiler.data.presets import write_preset
    from mllmc.passes.shortv import ShortVConfig, prepare, shortv

    device = args.device
    if not (model_dir / "config.json").is_file():
        t0 = time.perf_counter()
        write_preset(args.preset or model_dir.name, model_dir, device=device)
        print(f"wrote {model_dir} in {time.perf_counter() - t0:.0f} s")
    read_config(model_dir)
    t0 = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype).eval()
    info = model_info(model, model_dir)
    layers = tuple(json.loads(args.layers)) if args.layers else None
    ratio = None if layers is not None else args.ratio
    cfg = prepare(ShortVConfig(layers=layers, ratio=ratio), model, info)
    segments = capture(model, info, static_decode=args.decode)
    rewritten = shortv(segments, cfg).segments
    model = model.to(device)
    fns = tuple(
        on_device(program, device)
        for program in (
            segments.vision.program,
            segments.prefill.program,
            rewritten.prefill.program,
        )
    )
    setup_s = time.perf_counter() - t0
    print(f"loaded, captured and rewrote in {setup_s:.0f} s; frozen {list(cfg.layers)}")
    print(f"  ({cfg.order_from})")
    return model, info, cfg, segments, fns


def time_hf_eager(model: Any, inputs: Any, repeats: int) -> dict[str, Any]:
    """HF eager's LLM prefill: the full forward's time less the vision tower's."""

    def hf_full():
        return model(**inputs, use_cache=True, logits_to_keep=1)

    def hf_vision():
        return model.model.get_image_features(pixel_values=inputs["pixel_values"])

    t_full, t_vision = device_time(hf_full, repeats), device_time(hf_vision, repeats)
    return {"llm_prefill_s": t_full - t_vision, "frozen": []}


def prefill_variants(
    args: argparse.Namespace, base_fn: Any, short_fn: Any, frozen: Any
) -> list[tuple[str, Any, Any]]:
    """(row name, prefill callable, frozen layers) of every row the options ask for; rows that
    need CUDA are skipped, with a line saying so, on another device."""
    device = args.device
    variants = [("mllmc_torch", base_fn, []), ("mllmc_torch+shortv", short_fn, frozen)]
    if not args.no_compile:
        variants += [
            ("mllmc_torch_compile", torch.compile(base_fn, dynamic=False), []),
            ("mllmc_torch_compile+shortv", torch.compile(short_fn, dynamic=False), frozen),
        ]
    if args.cuda_graphs and device == "cuda":
        variants += [
            ("mllmc_cuda_graphs", GraphPerShape(base_fn, device), []),
            ("mllmc_cuda_graphs+shortv", GraphPerShape(short_fn, device), frozen),
        ]
    elif args.cuda_graphs:
        print("  mllmc_cuda_graphs rows: skipped, they need a CUDA device")
    if args.cuda_graphs:
        graphs = {"mode": "reduce-overhead", "dynamic": False}
        variants += [
            ("mllmc_compile_graphs", torch.compile(base_fn, **graphs), []),
            ("mllmc_compile_graphs+shortv", torch.compile(short_fn, **graphs), frozen),
        ]
    if args.sdpa_ab and device == "cuda":
        variants.append(("mllmc_torch+shortv@efficient", short_fn, frozen))
        if args.cuda_graphs:
            short_graphs = GraphPerShape(short_fn, device)
            variants.append(("mllmc_cuda_graphs+shortv@efficient", short_graphs, frozen))
    elif args.sdpa_ab:
        print("  @efficient rows: skipped, they need a CUDA device")
    return variants


def time_variant(
    args: argparse.Namespace, name: str, fn: Any, frozen: Any, call_args: tuple
) -> tuple[dict[str, Any], str | None]:
    """One prefill row: first-call, median wall and kernel seconds of fn(*call_args) (an
    '@efficient' row with attention held to the memory-efficient kernel), and its top
    kernels with --profile."""
    backend: Any = nullcontext()
    if name.endswith("@efficient"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])

    def call():
        with backend:
            return fn(*call_args)

    t0 = time.perf_counter()
    call()  # compiles, for the torch.compile rows; captures, for the graph rows
    first_s = time.perf_counter() - t0
    t = device_time(call, args.repeats)
    kernels = kernel_time(call)
    row = {"llm_prefill_s": t, "kernel_s": kernels, "frozen": list(frozen), "first_call_s": first_s}
    kernel_text = f", kernels {kernels * 1e3:.2f} ms" if kernels is not None else ""
    print(f"  {name}: {t * 1e3:.2f} ms{kernel_text} (first call {first_s:.1f} s)")
    return row, kernel_table(call) if args.profile else None


def parity(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """How far logits `a` are from `b`: max |difference|, b's scale, whether top-1 agrees."""
    return {
        "max_abs_logit_diff": float((a - b).abs().max()),
        "logit_scale": float(b.abs().max()),
        "top1_match": bool(a.argmax() == b.argmax()),
    }


def add_flops(
    rows: dict[str, Any], model_info: Any, n: int, frozen: Any, peak: float
) -> dict[str, Any]:
    """Add each row's analytic LLM-prefill FLOPs, TFLOP/s, fraction of the GEMM peak and
    speedup over HF eager; returns every ShortV row's speedup over the same engine without
    the pass, beside the FLOPs-ideal one."""
    from mllmc.compiler.core.flops import analytic_prefill_flops

    n_text = n - model_info.visual_tokens
    for row in rows.values():
        row["llm_prefill_flops"] = analytic_prefill_flops(model_info, n_text, set(row["frozen"]))
        row["tflops"] = row["llm_prefill_flops"] / row["llm_prefill_s"] / 1e12
        row["fraction_of_gemm_peak"] = row["tflops"] / peak
        row["speedup_vs_hf_eager"] = rows["hf_eager"]["llm_prefill_s"] / row["llm_prefill_s"]
    ideal = analytic_prefill_flops(model_info, n_text) / analytic_prefill_flops(
        model_info, n_text, set(frozen)
    )
    pass_speedup = {}
    pairs = [(name.split("+shortv")[0], name) for name in rows if "+shortv" in name]
    for base, short in pairs:
        measured = rows[base]["llm_prefill_s"] / rows[short]["llm_prefill_s"]
        pass_speedup[short] = {
            "measured": measured,
            "flops_ideal": ideal,
            "fraction_of_ideal": (measured - 1) / (ideal - 1),
        }
    return pass_speedup


def write_report(args: argparse.Namespace, report: dict[str, Any], profiles: dict[str, str]):
    """Write the JSON report, its chart and (--profile) the kernel tables; print the table."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    plot(report, out / f"{args.name}.png")
    if profiles:
        text = "\n\n".join(f"== {name}\n{table}" for name, table in profiles.items())
        (out / f"{args.name}-profile.txt").write_text(text)
    print(format_table(report))
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.png')}")


def measure_decode(args: Any, segments: Any, prefill_out: Any, n: int) -> dict[str, Any]:
    """A greedy loop of --decode-steps steps after the n-token prompt, from the prefill's cache,
    the host reading each token as a generate loop does: ms/token for the growing cache, the
    static-cache program and (--cuda-graphs, CUDA) its graph replays, and the bytes a step reads
    (decoder weights + the cache at mid-loop) over that time as a fraction of copy bandwidth."""
    from mllmc.compiler.core.capture import on_device
    from mllmc.compiler.tools.torch_engine import segment_entry
    from mllmc.runtime.static_cache import StaticCacheDecoder
    from mllmc.runtime.torch_runner import TorchCallRunner

    device, steps = args.device, args.decode_steps
    entry = segment_entry(segments.decode)
    grow_fn = on_device(segments.decode.program, device)
    static_fn = on_device(segments.static_decode.program, device)
    runners: dict[str, Any] = {
        "decode": TorchCallRunner("decode", entry, grow_fn, device),
        "decode_static": StaticCacheDecoder("decode", entry, static_fn, device),
    }
    if args.cuda_graphs and device == "cuda":
        runners["decode_cuda_graphs"] = StaticCacheDecoder(
            "decode", entry, static_fn, device, cuda_graphs=True
        )
    elif args.cuda_graphs:
        print("  decode_cuda_graphs: skipped, it needs a CUDA device")
    past_names = [t.name for t in entry.inputs if t.name.startswith("past.")]
    prompt_cache = dict(zip(past_names, prefill_out[1:], strict=True))
    weight_bytes = sum(
        p.numel() * p.element_size()
        for name, p in grow_fn.named_parameters()
        if "vision" not in name and "projector" not in name
    )
    row_bytes = sum(t[0, :, 0].numel() * t.element_size() for t in prompt_cache.values())
    rows_mid = int(next(iter(prompt_cache.values())).shape[2]) + steps // 2
    kv_bytes = row_bytes * rows_mid
    bandwidth = copy_bandwidth(device, args.repeats)

    def generate(runner: Any) -> list[int]:
        cache, token, tokens = dict(prompt_cache), 1, []
        for step in range(steps):
            feeds = {"input_ids": np.array([[token]]), "position_ids": np.array([[n + step]])}
            feeds["cache_pad"] = np.zeros((len(past_names) // 2, 1), dtype=np.int64)
            out = runner({**feeds, **cache})
            token = int(out["logits"][0].argmax())  # the host waits for each token
            tokens.append(token)
            cache = {p: out["present" + p[len("past") :]] for p in past_names}
        return tokens

    # warm-up (and, for CUDA graphs, the captures), then rounds that run every loop in turn, so
    # that a machine's drift lands on no single row
    tokens = {name: generate(runner) for name, runner in runners.items()}
    first = next(iter(tokens.values()))
    times: dict[str, list[float]] = {name: [] for name in runners}
    sync = device_sync(device)
    for _ in range(max(3, args.repeats // 4)):
        for name, runner in runners.items():
            timed = median_time(lambda runner=runner: generate(runner), 1, warmup=0, sync=sync)
            times[name].append(timed / steps)
    rows = {}
    for name, runner in runners.items():
        t = float(np.median(times[name]))
        kernels = kernel_time(lambda runner=runner: generate(runner), calls=2)
        rows[name] = {
            "s_per_token": t,
            "kernel_s": kernels / steps if kernels is not None else None,
            "fraction_of_bandwidth": (weight_bytes + kv_bytes) / t / bandwidth,
            "same_tokens": tokens[name] == first,
        }
        print(f"  {name}: {t * 1e3:.2f} ms/token, same tokens: {tokens[name] == first}")
    return {
        "steps": steps,
        "weight_bytes": weight_bytes,
        "kv_bytes": kv_bytes,
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "rows": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{Path(report['model']).name} on {report['device']}, {report['dtype']}: "
        f"{report['prompt_tokens']} prompt tokens ({report['visual_tokens']} visual), "
        f"{len(report['frozen_layers'])} frozen layers; GEMM peak "
        f"{report['gemm_peak_tflops']:.0f} TFLOP/s",
        f"{'engine':28s} {'LLM prefill ms':>14s} {'kernels ms':>10s} {'vs HF eager':>11s} "
        f"{'TFLOP/s':>8s} {'%peak':>6s}",
    ]
    for name, r in report["rows"].items():
        kernels = r.get("kernel_s")
        kernel_text = f"{kernels * 1e3:10.2f}" if kernels is not None else f"{'-':>10s}"
        lines.append(
            f"{name:28s} {r['llm_prefill_s'] * 1e3:14.2f} {kernel_text} "
            f"{r['speedup_vs_hf_eager']:10.2f}x {r['tflops']:8.0f} {r['fraction_of_gemm_peak']:6.0%}"
        )
    decode = report.get("decode")
    if decode:
        reads = (decode["weight_bytes"] + decode["kv_bytes"]) / 1e9
        for name, r in decode["rows"].items():
            kernels = r.get("kernel_s")
            kernel_text = f", kernels {kernels * 1e3:.2f} ms" if kernels is not None else ""
            lines.append(
                f"{name}: {r['s_per_token'] * 1e3:.2f} ms/token{kernel_text}, reads {reads:.2f} "
                f"GB ({r['fraction_of_bandwidth']:.0%} of {decode['copy_bandwidth_gbs']:.0f} GB/s "
                f"copy), tokens {'same' if r['same_tokens'] else 'DIFFER'}"
            )
    for name, s in report["pass_speedup"].items():
        lines.append(
            f"{name}: {s['measured']:.2f}x measured vs {s['flops_ideal']:.2f}x FLOPs-ideal "
            f"({s['fraction_of_ideal']:.0%} of ideal)"
        )
    for name, p in report["parity"].items():
        lines.append(
            f"parity {name}: max |Δlogit| {p['max_abs_logit_diff']:.3g} (logits up to "
            f"{p['logit_scale']:.3g}), top-1 {'same' if p['top1_match'] else 'differs'}"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["rows"])
    vals = [report["rows"][n]["llm_prefill_s"] * 1e3 for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.barh(names, vals, color=["#888" if "shortv" not in n else "#2a7" for n in names])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.1f}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("LLM prefill (ms)")
    ax.set_title(
        f"{Path(report['model']).name} on {report['device']} ({report['dtype']}), "
        f"{report['prompt_tokens']} tokens, {len(report['frozen_layers'])} layers frozen"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
