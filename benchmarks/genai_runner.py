"""onnxruntime-genai 0.18 beside mllmc's engines in a benchmark: build a causal LM directory
with genai's model builder, load it on the benchmark's threads, and time its prefill and decode
the way `mllmc bench` times an engine (`bench.Entry` timers), and mllmc's decoder on the same
text prompt. Shared by benchmarks/precision.py, benchmarks/qwen.py and
benchmarks/genai_processes.py (imported from the benchmarks folder they run from)."""

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


def text_layout(engine: Any, n: int) -> Any:
    """A text-only prompt of exactly n rows for `engine`: the filler text through the chat
    template, cut to n ids, with the family's positions (M-RoPE: arange on every axis)."""
    from mllmc.runtime.layout import expand_placeholders

    ids = engine.encode_prompt(bench.prompt_for(2 * n), []).input_ids[0]
    if ids.shape[0] < n:
        raise RuntimeError(f"the filler text makes {ids.shape[0]} tokens, fewer than {n}")
    layout = expand_placeholders(ids[:n], engine.manifest.model.image_token_id, [])
    hook = engine.prompt_encoder.positions
    return hook(layout, []) if hook else layout


def engine_text_entry(path: Path, n: int, tokens: int, threads: int) -> bench.Loader:
    """`bench.loader` of the unrewritten engine's decoder on a text-only prompt of n rows:
    "llm_prefill" and "decode" per token (from one prefill made at load)."""
    from mllmc.runtime import load

    def timers_of(engine: Any) -> tuple[dict[str, bench.Timer], int]:
        layout = text_layout(engine, n)
        none, _ = engine.encode_images([])  # (1, 0, d): no visual rows
        first, cache = engine.prefill(layout, none)

        timers = {
            "llm_prefill": bench.timed(lambda: engine.prefill(layout, none)),
            "decode": lambda: bench.greedy_steps(engine, layout, first, cache, tokens),
        }
        return timers, layout.n

    return bench.loader(lambda: load(path, threads=threads), timers_of)


def greedy_parity(engine: Any, genai: Any, n: int, steps: int) -> dict[str, Any]:
    """mllmc's and genai's greedy tokens over `steps` steps on the text prompt of n rows, and
    the largest |Δlogit| of the prefill's last-row logits."""
    import onnxruntime_genai as og

    layout = text_layout(engine, n)
    none, _ = engine.encode_images([])
    logits, cache = engine.prefill(layout, none)
    ours, first = [], logits
    for i in range(steps):
        ours.append(int(np.argmax(logits)))
        if i + 1 < steps:
            logits, cache = engine.decode_step(ours[-1], layout.next_position + i, cache)
    params = og.GeneratorParams(genai)
    length = n + steps
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    g = og.Generator(genai, params)
    g.append_tokens(layout.input_ids[0].astype(np.int32))
    theirs_first = np.asarray(g.get_logits()).reshape(-1)
    while len(g.get_sequence(0)) < length:
        g.generate_next_token()
    theirs = [int(t) for t in g.get_sequence(0)[n:]]
    return {
        "steps": steps,
        "mllmc_tokens": ours,
        "genai_tokens": theirs,
        "same_tokens": ours == theirs,
        "prefill_max_abs_logit_diff": float(np.abs(theirs_first - first).max()),
    }


if __name__ == "__main__":
    print(
        "genai_runner.py: error: a helper module, not a benchmark: run benchmarks/qwen.py, "
        "precision.py or genai_processes.py",
        file=sys.stderr,
    )
    sys.exit(2)
