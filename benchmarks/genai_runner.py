"""onnxruntime-genai 0.18 beside mllmc's engines in a benchmark: build a causal LM directory
with genai's model builder, load it on the benchmark's threads, and time its prefill and decode
the way `mllmc bench` times an engine (`bench.Entry` timers). Shared by benchmarks/precision.py
and benchmarks/qwen.py (imported from the benchmarks folder they run from)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mllmc.compiler.tools import bench


def build_genai(
    lm_dir: Path, out: Path, precision: str = "fp32", extra: Sequence[str] = (), reuse: bool = True
) -> Path:
    """genai's builder on `lm_dir` for the CPU (`-p precision -e cpu`, `extra` as key=value
    options: block_size, accuracy_level, prune_lm_head ...); a directory already built is
    reused when `reuse`."""
    if reuse and (out / "genai_config.json").is_file():
        print(f"reusing {out}", flush=True)
        return out
    print(f"building {out} with onnxruntime-genai", flush=True)
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(lm_dir),
        "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache"),
    ]  # fmt: skip
    cmd += ["--extra_options", *extra] if extra else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai's builder failed:\n{proc.stderr[-3000:]}")
    print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def genai_model(path: Path, threads: int | None = None) -> Any:
    """A genai model, on `threads` intra-op threads (as every other engine) when given."""
    import onnxruntime_genai as og

    config = og.Config(str(path))
    if threads:
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def genai_entry(path: Path, ids: np.ndarray, tokens: int, threads: int | None = None) -> Any:
    """Timers of a genai model on the prompt `ids`: "llm_prefill" (append_tokens, which runs
    the model on the prompt) and "decode" per token, a fresh Generator each run.
    generate_next_token picks from the logits it holds and runs the model on the new token at
    the next call, so tokens + 1 calls run `tokens` forward steps; min_length keeps EOS out."""
    import onnxruntime_genai as og

    before = bench.rss_mb()
    model = genai_model(path, threads)
    prompt = ids.astype(np.int32)
    length = len(prompt) + tokens + 2

    def generator() -> Any:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        return og.Generator(model, params)

    def prefill() -> float:
        g = generator()
        t0 = time.perf_counter()
        g.append_tokens(prompt)
        return time.perf_counter() - t0

    def decode() -> float:
        g = generator()
        g.append_tokens(prompt)
        t0 = time.perf_counter()
        for _ in range(tokens + 1):
            g.generate_next_token()
        seconds = time.perf_counter() - t0
        assert len(g.get_sequence(0)) == len(prompt) + tokens + 1
        return seconds / tokens

    prefill()
    timers = {"llm_prefill": prefill, "decode": decode}
    return bench.Entry(timers, len(prompt), bench.rss_mb() - before, model)
