"""Serving load test: closed-loop clients against `mllmc serve` on small-llava, loopback only.

For each artifact (the unrewritten ONNX engine, and `fastervlm:keep=144 + shortv:ratio=0.6`):
a single-process loop calling `engine.generate` one request at a time (the baseline), then
`mllmc serve` with C clients (C = 1, 2, 4, 8, 16) each sending its next request as soon as its
last is answered, over HTTP with tritonclient. Every request asks for 32 new tokens of a prompt
about one image (prompts differ). Each level is bounded in count (--requests-per-client x C,
at least --min-requests) and time (--level-seconds: no request starts after it). Reported per
level: requests/s, generated tokens/s, p50 / p99 latency, errors; the goal at C = 8 is
throughput >= 2.5x the baseline's with p99 <= 3x p50, and no failed request in the whole run.

    python benchmarks/serve.py [--model models/small-llava] [--reuse]

Needs the serve extra (PyTriton, numpy < 2). Writes results/serve.json and results/serve.png
(throughput and latency against concurrency).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from mllmc.compiler.data.presets import write_preset
from mllmc.compiler.files.outputs import write_figure, write_file
from mllmc.compiler.tools.cli import OneLineParser

LC_FILE = Path("benchmarks/results/shortv-lc.json")  # benchmarks/shortv.py's LC calibration
LEVELS = (1, 2, 4, 8, 16)
NEW_TOKENS = 32
QUESTIONS = (
    "Describe the image.",
    "What shapes are in the picture?",
    "Which colours do you see?",
    "Where is the largest shape?",
    "How many objects are there?",
    "What is in the top left corner?",
)


def variants(config: dict[str, Any]) -> dict[str, list[str]]:
    """The unrewritten engine, and FasterVLM keeping a quarter of the visual tokens (144 of
    small-llava's 576) composed with ShortV at ratio 0.6 (benchmarks/passes.py's pipeline)."""
    num_layers = config["text_config"]["num_hidden_layers"]
    vision = config["vision_config"]
    keep = (vision["image_size"] // vision["patch_size"]) ** 2 // 4
    shortv = "shortv:ratio=0.6"
    if LC_FILE.is_file() and json.loads(LC_FILE.read_text())["num_layers"] == num_layers:
        shortv += f",lc={LC_FILE}"
    return {"onnx": [], f"fastervlm:keep={keep}+shortv": [f"fastervlm:keep={keep}", shortv]}


@functools.cache
def request(i: int) -> tuple[bytes, str]:
    """Request i: an encoded PNG (one of four synthetic 420x336 images: shapes on a gradient)
    and a prompt."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i % 4)
    grad = np.linspace(0, 255, 420, dtype=np.float32)[None, :, None].repeat(336, 0).repeat(3, 2)
    image = Image.fromarray((grad * rng.uniform(0.3, 1.0, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = int(rng.integers(0, 340)), int(rng.integers(0, 256))
        draw.ellipse((x, y, x + 80, y + 80), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"


def summary(latencies: list[float], tokens: int, errors: int, wall: float) -> dict[str, Any]:
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "requests": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "req_per_s": len(latencies) / wall,
        "tok_per_s": tokens / wall,
        "p50_s": float(np.percentile(lat, 50)),
        "p99_s": float(np.percentile(lat, 99)),
    }


def baseline(artifact: Path, first: int, n: int, threads: int) -> dict[str, Any]:
    """engine.generate on requests first .. first + n - 1, one at a time, in this process; with
    the median time of each phase (vision, prefill, decode per token)."""
    from PIL import Image

    from mllmc.runtime import load

    engine = load(artifact, threads=threads)
    engine.generate(Image.open(io.BytesIO(request(0)[0])), "warm up", NEW_TOKENS)
    latencies, tokens, phases = [], 0, []
    t0 = time.perf_counter()
    for i in range(first, first + n):
        data, prompt = request(i)
        t = time.perf_counter()
        result = engine.generate(Image.open(io.BytesIO(data)), prompt, NEW_TOKENS)
        latencies.append(time.perf_counter() - t)
        tokens += len(result.token_ids)
        phases.append([result.timings[k] for k in ("vision_s", "prefill_s", "decode_s_per_token")])
    out = summary(latencies, tokens, 0, time.perf_counter() - t0)
    vision, prefill, decode = np.median(np.array(phases), axis=0).tolist()
    out |= {"vision_s": vision, "prefill_s": prefill, "decode_s_per_token": decode}
    out |= {"latencies_s": latencies, "tokens": tokens, "load_1min": os.getloadavg()[0]}
    return out


def decode_steps(artifact: Path, threads: int, sizes=(1, 2, 4, 8, 16)) -> dict[str, float]:
    """Seconds of one batched decode step (engine.decode_batch_step) with B samples of request
    0's prompt (median of 3 steps), B in `sizes`: what a decode step costs as the batch grows."""
    from PIL import Image

    from mllmc.runtime import load

    engine = load(artifact, threads=threads)
    data, prompt = request(0)
    features, counts = engine.encode_images([Image.open(io.BytesIO(data))])
    layout = engine.encode_prompt(prompt, counts)
    _, cache = engine.prefill(layout, features)
    out = {}
    for b in sizes:
        batch = engine.new_batch()
        for key in range(b):
            batch.join(key, cache)
        times = []
        for s in range(3):
            t = time.perf_counter()
            engine.decode_batch_step([1] * b, [layout.next_position + s] * b, batch)
            times.append(time.perf_counter() - t)
        out[str(b)] = float(np.median(times))
    return out


def pooled(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The one-at-a-time loop measured before and after the server's levels, as one: the
    machine's load (other processes) drifts over a run."""
    lat = before["latencies_s"] + after["latencies_s"]
    out = summary(lat, before["tokens"] + after["tokens"], 0, before["wall_s"] + after["wall_s"])
    for k in ("vision_s", "prefill_s", "decode_s_per_token"):
        out[k] = (before[k] + after[k]) / 2
    # the most any batching of decode steps can give: vision and prefill stay one at a time
    one = out["vision_s"] + out["prefill_s"]
    out["decode_free_bound"] = (one + NEW_TOKENS * out["decode_s_per_token"]) / one
    out["before"], out["after"] = before, after
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(artifact: Path, log: Path, threads: int, max_batch: int) -> tuple[Any, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "mllmc.compiler.tools.cli", "serve", str(artifact)]
    cmd += ["--port", str(port), "--threads", str(threads), "--max-batch", str(max_batch)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while "serving " not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"mllmc serve did not start; see {log}")
        time.sleep(0.5)
    return proc, port


def infer(client: Any, i: int) -> int:
    """Send request i; the number of tokens it generated."""
    import tritonclient.http as http

    data, prompt = request(i)
    inputs = []
    for name, value, dtype in [
        ("image", np.array([[data]], dtype=np.object_), "BYTES"),
        ("prompt", np.array([[prompt.encode()]], dtype=np.object_), "BYTES"),
        ("max_new_tokens", np.array([[NEW_TOKENS]], dtype=np.int32), "INT32"),
    ]:
        tensor = http.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return int(client.infer("mllmc", inputs).as_numpy("token_ids").shape[1])


def closed_loop(port: int, clients: int, n: int, seconds: float) -> dict[str, Any]:
    """`clients` threads, each sending its next request when its last is answered, until `n`
    requests have started or `seconds` have passed."""
    import tritonclient.http as http

    lock = threading.Lock()
    state = {"next": 0, "tokens": 0, "errors": 0, "messages": []}
    latencies: list[float] = []
    t0 = time.perf_counter()

    def client_loop() -> None:
        client = http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=600)
        while True:
            with lock:
                i = state["next"]
                if i >= n or time.perf_counter() - t0 > seconds:
                    break
                state["next"] += 1
            t = time.perf_counter()
            try:
                tokens = infer(client, i)
            except Exception as e:  # counted as a failed request
                with lock:
                    state["errors"] += 1
                    state["messages"].append(str(e)[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - t)
                state["tokens"] += tokens
        client.close()

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = summary(latencies, state["tokens"], state["errors"], time.perf_counter() - t0)
    out["error_messages"] = state["messages"][:5]
    return out


def run_variant(artifact: Path, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    before = baseline(artifact, 0, args.baseline_requests, args.threads)
    print(f"  one at a time: {before['req_per_s']:.3f} req/s (before)", flush=True)
    proc, port = start_server(artifact, log, args.threads, args.max_batch)
    levels = {}
    try:
        closed_loop(port, 2, 2, 120)  # warm up
        for c in LEVELS:
            n = max(args.min_requests, args.requests_per_client * c)
            levels[str(c)] = r = closed_loop(port, c, n, args.level_seconds)
            r["load_1min"] = os.getloadavg()[0]
            print(
                f"  C={c:2d}: {r['requests']} req, {r['req_per_s']:.3f} req/s, "
                f"{r['tok_per_s']:.1f} tok/s, p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s, "
                f"errors {r['errors']}",
                flush=True,
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    after = baseline(artifact, args.baseline_requests, args.baseline_requests, args.threads)
    base = pooled(before, after)
    print(
        f"  one at a time: {after['req_per_s']:.3f} req/s (after), pooled {base['req_per_s']:.3f}"
        f"; vision {base['vision_s']:.2f} s, prefill {base['prefill_s']:.2f} s, decode "
        f"{base['decode_s_per_token'] * 1e3:.0f} ms/token: decode-free bound "
        f"{base['decode_free_bound']:.2f}x",
        flush=True,
    )
    steps = decode_steps(artifact, args.threads)
    print(f"  decode step s by batch size: {steps}", flush=True)
    c8 = levels.get("8")
    goal = None
    if c8 is not None:
        goal = {
            "speedup_at_8": c8["req_per_s"] / base["req_per_s"],
            "p99_over_p50_at_8": c8["p99_s"] / c8["p50_s"],
        }
    return {"baseline": base, "levels": levels, "goal": goal, "decode_step_s": steps}


def compile_variants(model_dir: str, out: Path, reuse: bool) -> dict[str, Path]:
    """Each variant's artifact under OUT/artifacts; with `reuse`, one there is kept where it
    holds the decode cache an ONNX compile makes by default now."""
    from mllmc.compiler.backends import TargetOptions, resolve_options
    from mllmc.compiler.pipeline import compile_model
    from mllmc.runtime.manifest import read_manifest

    config = json.loads((Path(model_dir) / "config.json").read_text())
    cache = resolve_options("onnx", TargetOptions()).decode_cache
    paths = {}
    for name, specs in variants(config).items():
        path = out / "artifacts" / f"{Path(model_dir).name}-serve-{name.replace(':', '-')}"
        found = reuse and (path / "manifest.json").is_file() and read_manifest(path)
        if not (found and found.target_settings.decode_cache == cache):
            compile_model(model_dir, path, specs, validate=False, force=True, progress=False)
        paths[name] = path
    return paths


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, v), color in zip(report["variants"].items(), ("C0", "C1"), strict=False):
        cs = [int(c) for c in v["levels"]]
        rows = list(v["levels"].values())
        ax1.plot(cs, [r["req_per_s"] for r in rows], "o-", color=color, label=f"{name}: serve")
        base = v["baseline"]["req_per_s"]
        ax1.axhline(base, color=color, ls=":", label=f"{name}: one at a time")
        ax1.axhline(2.5 * base, color=color, ls="--", lw=0.8, label=f"{name}: goal (2.5x)")
        ax2.plot(cs, [r["p50_s"] for r in rows], "o-", color=color, label=f"{name}: p50")
        ax2.plot(cs, [r["p99_s"] for r in rows], "s--", color=color, label=f"{name}: p99")
    for ax, ylabel in ((ax1, "requests / s"), (ax2, "latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(LEVELS, [str(c) for c in LEVELS])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_title(f"mllmc serve, small-llava, {NEW_TOKENS} new tokens: throughput")
    ax2.set_title("latency")
    write_figure(fig, path, force=True)


def main() -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/small-llava")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="serve", help="results file stem")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument(
        "--baseline-requests", type=int, default=4, help="one-at-a-time requests before and after"
    )
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=6)
    ap.add_argument("--level-seconds", type=float, default=90.0)
    ap.add_argument("--reuse", action="store_true", help="reuse OUT/artifacts from a run before")
    ap.add_argument(
        "--decode-steps-only",
        action="store_true",
        help="only time the batched decode step of each artifact (OUT/artifacts), into the "
        "existing report",
    )
    args = ap.parse_args()
    out = Path(args.out)
    if args.decode_steps_only:
        report = json.loads((out / f"{args.name}.json").read_text())
        artifacts = compile_variants(args.model, out, reuse=True)
        for name, path in artifacts.items():
            report["variants"][name]["decode_step_s"] = steps = decode_steps(path, args.threads)
            print(f"{name}: decode step s by batch size: {steps}", flush=True)
        write_file(out / f"{args.name}.json", json.dumps(report, indent=2) + "\n", force=True)
        return
    if not (Path(args.model) / "config.json").is_file():
        write_preset("small-llava", args.model)
    artifacts = compile_variants(args.model, out, args.reuse)
    report: dict[str, Any] = {
        "model": args.model,
        "new_tokens": NEW_TOKENS,
        "threads": args.threads,
        "max_batch": args.max_batch,
        "cpus": os.cpu_count(),
        "level_seconds": args.level_seconds,
        "variants": {},
    }
    for name, path in artifacts.items():
        print(f"{name}:", flush=True)
        log = out / "artifacts" / f"serve-{name.replace(':', '-')}.log"
        report["variants"][name] = run_variant(path, args, log)
    report["failed_requests"] = sum(
        r["errors"] for v in report["variants"].values() for r in v["levels"].values()
    )
    write_file(out / f"{args.name}.json", json.dumps(report, indent=2) + "\n", force=True)
    plot(report, out / f"{args.name}.png")
    print(f"wrote {out / args.name}.json and .png; failed requests: {report['failed_requests']}")


if __name__ == "__main__":
    main()
