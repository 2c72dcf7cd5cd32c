"""Batched decode: ms per decode step at B = 1, 2, 4, 8, 16 samples on one engine.

    nice python benchmarks/batch_decode.py [--model models/small-llava] [--artifact DIR]
        [--batches 1,2,4,8,16] [--caches static,growing] [--steps 16] [--rounds 3] [--threads N]
        [--out benchmarks/results]

Compiles the model (small-llava by default, written from its preset when --model is not given)
without passes to the ONNX target (into --artifact when given and not there yet, kept for the
next run; else into a temporary directory), prefills four prompts of
different lengths (one image each) once, and then, in every round and for every B in turn,
joins B of those caches into a fresh `DecodeBatch` (each sample left-padded to the longest, as
a serving batch is) and times `--steps` greedy `decode_batch_step` calls after one warm-up step,
on one engine per decode cache of `--caches` (static: rows written in place into buffers,
runtime/inplace_cache.py; growing: the graph appends each row to a copy of the cache), the
engines' steps alternating one by one (a round's time is the median of its steps). Reported per
cache and B: the median ms per step over the rounds (with min-max), ms per generated token (a step makes B), decode tokens/s, throughput and
step time relative to B = 1 of the same cache, and each cache's step time relative to the
first's. Writes OUT/batch_decode.json and OUT/batch_decode.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mllmc.compiler.tools.cli import OneLineParser

PROMPTS = [
    "Describe the image.",
    "What is in the picture? Answer in one sentence.",
    "List every object you can see in this image, from left to right, and say what colour each "
    "one is.",
    "Is there a circle?",
]


def build_artifact(args: argparse.Namespace, work: Path) -> Path:
    """The artifact to time: --artifact if it holds one, else the model compiled without passes
    (into --artifact, or into `work`)."""
    if args.artifact and (Path(args.artifact) / "manifest.json").is_file():
        return Path(args.artifact)
    from mllmc.compiler.data.presets import write_preset
    from mllmc.compiler.pipeline import compile_model

    model = Path(args.model) if args.model else write_preset("small-llava", work / "small-llava")
    out = Path(args.artifact) if args.artifact else work / "artifact"
    compile_model(model, out, [], validate=False, progress=False)
    return out


def prefilled(engine: Any) -> list[tuple[list[Any], int, int]]:
    """Each prompt's (KV cache, first token, next position), prefilled once."""
    rng = np.random.default_rng(0)
    out = []
    for prompt in PROMPTS:
        image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        features, counts = engine.encode_images([image])
        layout = engine.encode_prompt(prompt, counts)
        logits, cache = engine.prefill(layout, features)
        out.append((cache, int(np.argmax(logits)), layout.next_position))
    return out


def time_batch(
    engines: dict[str, Any], caches: list[tuple[list[Any], int, int]], b: int, steps: int
) -> dict[str, float]:
    """Seconds per decode step for a batch of b samples (caches cycled) on each engine: the
    median over `steps` steps after one warm-up, the engines' steps alternating one by one, so
    that load from other processes falls on each alike."""
    runs = {}
    for name, engine in engines.items():
        batch = engine.new_batch()
        for i in range(b):
            batch.join(i, caches[i % len(caches)][0])
        tokens = [caches[i % len(caches)][1] for i in range(b)]
        positions = [caches[i % len(caches)][2] for i in range(b)]
        runs[name] = (engine, batch, tokens, positions)

    def step(name: str) -> float:
        engine, batch, tokens, positions = runs[name]
        began = time.perf_counter()
        logits = engine.decode_batch_step(tokens, positions, batch)
        took = time.perf_counter() - began
        tokens[:] = [int(t) for t in np.argmax(logits, axis=1)]
        positions[:] = [p + 1 for p in positions]
        return took

    times: dict[str, list[float]] = {name: [] for name in runs}
    for name in runs:
        step(name)  # warm-up
    for _ in range(steps):
        for name in runs:
            times[name].append(step(name))
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(times: dict[int, list[float]], first: int) -> dict[str, dict[str, Any]]:
    """Per B: the medians of `times` (seconds per step, one a round) and ratios to B = first."""
    base = statistics.median(times[first])
    rows = {}
    for b, ts in times.items():
        med = statistics.median(ts)
        rows[str(b)] = {
            "ms_per_step": 1e3 * med,
            "ms_per_step_min_max": [1e3 * min(ts), 1e3 * max(ts)],
            "ms_per_token": 1e3 * med / b,
            "tokens_per_s": b / med,
            "step_time_vs_first": med / base,
            "throughput_vs_first": (b / med) / (first / base),
        }
    return rows


def measure(args: argparse.Namespace, artifact: Path) -> dict[str, Any]:
    from mllmc.runtime import load

    engines = {c: load(artifact, threads=args.threads, decode_cache=c) for c in args.caches}
    engine = engines[args.caches[0]]
    caches = prefilled(engine)
    times = {c: {b: [] for b in args.batches} for c in args.caches}
    load_avg = []
    for r in range(args.rounds):
        for b in args.batches:  # every B in each round, so drift lands on no single row
            for c, t in time_batch(engines, caches, b, args.steps).items():
                times[c][b].append(t)
        load_avg.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    by_cache = {c: table(t, args.batches[0]) for c, t in times.items()}
    for rows in by_cache.values():
        for b, row in rows.items():
            first = by_cache[args.caches[0]][b]["ms_per_step"]
            row["step_time_vs_" + args.caches[0]] = row["ms_per_step"] / first
    manifest = engine.manifest
    return {
        "artifact": str(artifact),
        "model": manifest.model.model_dir,
        "prompt_tokens": [int(c[2]) for c in caches],
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": args.threads,
        "device": f"cpu ({platform.machine()}, {len(os.sched_getaffinity(0))} cores)",
        "load_average_1min": load_avg,
        "command": "python " + shlex.join(sys.argv),
        "caches": list(args.caches),
        "rows": by_cache[args.caches[0]],
        "by_cache": by_cache,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """ms per step and decode tokens/s against B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = [int(b) for b in report["rows"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for cache, table_ in report["by_cache"].items():
        rows = list(table_.values())
        left.plot(bs, [r["ms_per_step"] for r in rows], "o-", label=f"{cache} cache")
        right.plot(bs, [r["tokens_per_s"] for r in rows], "o-", label=f"{cache} cache")
    left.set(xscale="log", xlabel="samples per decode step (B)", ylabel="ms per step")
    right.set(xscale="log", xlabel="samples per decode step (B)", ylabel="decode tokens / s")
    for ax in (left, right):
        ax.legend()
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.grid(alpha=0.3)
    fig.suptitle(f"batched decode, {Path(report['model']).name} (ONNX, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model dir (default: the small-llava preset)")
    parser.add_argument("--artifact", help="the artifact to time (compiled there if absent)")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--caches", default="static,growing", help="decode caches to compare")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.caches = args.caches.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        report = measure(args, build_artifact(args, Path(tmp)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_decode.json").write_text(json.dumps(report, indent=2))
    if not args.no_plot:
        plot(report, out / "batch_decode.png")
    print(f"{'cache':>8} {'B':>3} {'ms/step':>9} {'ms/token':>9} {'tokens/s':>9} {'x thru':>7}")
    for cache, rows in report["by_cache"].items():
        for b, r in rows.items():
            print(
                f"{cache:>8} {b:>3} {r['ms_per_step']:9.1f} {r['ms_per_token']:9.2f} "
                f"{r['tokens_per_s']:9.1f} {r['throughput_vs_first']:6.2f}x"
            )
    print(f"wrote {out / 'batch_decode.json'}")


if __name__ == "__main__":
    main()
