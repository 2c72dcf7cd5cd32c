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
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllmc.compiler.tools.limits import MAX_REPEATS

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


MIN_ROUNDS = 3  # fewer rounds than this cannot show how much the timings vary
MAX_SPREAD = 0.3  # (max - min) / median of a row's timing over rounds above which it is flagged
CONTENTION_SLACK = 0.2  # share of the benchmark's threads other processes may take unflagged


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; the machine's count elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_clock() -> tuple[float, float, float]:
    """(wall seconds, this process's CPU seconds, the machine's busy CPU seconds, all processes
    together): between two readings, CPU seconds / wall seconds is the number of CPUs busy."""
    import psutil

    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    guest = getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)  # also counted in user
    return time.perf_counter(), time.process_time(), sum(t) - idle - guest


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of per-round values, and their relative spread (max - min) / median."""
    med, lo, hi = statistics.median(values), min(values), max(values)
    rel = (hi - lo) / med if med > 0 else 0.0
    return {"median": med, "min": lo, "max": hi, "rel": rel, "rounds": len(values)}


def format_spread(s: Mapping[str, float], suffix: str = "x") -> str:
    """A median with its range over rounds: '2.31x (1.90-2.70)'."""
    return f"{s['median']:.2f}{suffix} ({s['min']:.2f}-{s['max']:.2f})"


def trust_verdict(
    times: Mapping[str, Sequence[float]],
    others_cpus: float,
    threads: int,
    cpus: int | None = None,
    rounds_option: str = "--repeats",
) -> dict[str, Any]:
    """Whether one engine's timings can be trusted. `times`: per-round seconds of each of its
    metrics; `others_cpus`: how many CPUs other processes kept busy, on average, while it ran;
    `threads`: the threads every engine was given; `cpus`: the machine's CPUs (os.cpu_count());
    `rounds_option`: the option that sets the rounds, for the hint when there are too few.

    Untrusted: fewer than MIN_ROUNDS rounds (the spread is unknown), rounds that differ by more
    than MAX_SPREAD of their median, or other processes leaving fewer free CPUs than the threads
    need (less CONTENTION_SLACK). Contention slows engines unevenly (threads that wait on each
    other collapse, spinning ones do not), so ratios measured under it can be off many times."""
    cpus = cpus or os.cpu_count() or 1
    reasons = []
    rounds = min((len(v) for v in times.values()), default=0)
    if rounds < MIN_ROUNDS:
        reasons.append(
            f"{rounds} round(s): too few to see how much the timings vary "
            f"(use {rounds_option} {MIN_ROUNDS} or more)"
        )
    for metric, values in times.items():
        rel = spread(values)["rel"] if values else 0.0
        if rel > MAX_SPREAD:
            reasons.append(f"{metric} varies {rel:.0%} between rounds")
    free = cpus - others_cpus
    if free < threads * (1 - CONTENTION_SLACK):
        fewer = max(1, math.floor(free))
        reasons.append(
            f"other processes kept {others_cpus:.1f} of {cpus} CPUs busy, leaving "
            f"{max(free, 0.0):.1f} for {threads} thread{'s' if threads > 1 else ''} (bench a "
            f"quiet machine{f', or pass --threads {fewer}' if fewer < threads else ''})"
        )
    return {"ok": not reasons, "reasons": reasons, "others_cpus": others_cpus, "rounds": rounds}


def gemm_shapes(info: Any) -> list[tuple[int, int]]:
    """(k, columns) of the decoder's prefill GEMMs: q/o projections, MLP up and down."""
    d, m = info.hidden_size, info.intermediate_size
    return [(d, d), (d, m), (m, d)]


def best_gemm_flops(
    info: Any, n: int, time_of: Callable[[Callable[[], Any]], float], **like: Any
) -> float:
    """Best FLOP/s of the decoder's prefill GEMM shapes (q/o projections, MLP up and down) at
    n rows with torch; `like` places and types the operands (device=, dtype=), `time_of` times one
    product."""
    best = 0.0
    for k, cols in gemm_shapes(info):
        a, b = torch.randn(n, k, **like), torch.randn(k, cols, **like)
        best = max(best, 2 * n * k * cols / time_of(lambda a=a, b=b: a @ b))
    return best


def numpy_gemm_flops(info: Any, n: int, time_of: Callable[[Callable[[], Any]], float]) -> float:
    """`best_gemm_flops` in float32 with numpy's BLAS."""
    rng = np.random.default_rng(0)
    best = 0.0
    for k, cols in gemm_shapes(info):
        a = rng.standard_normal((n, k), dtype=np.float32)
        b = rng.standard_normal((k, cols), dtype=np.float32)
        best = max(best, 2 * n * k * cols / time_of(lambda a=a, b=b: a @ b))
    return best


def onnxruntime_gemm_flops(
    info: Any, n: int, time_of: Callable[[Callable[[], Any]], float], threads: int | None = None
) -> float:
    """`best_gemm_flops` in float32 with onnxruntime's CPU MatMul (the weight an initializer,
    prepacked as in an engine), on `threads` intra-op threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    best = 0.0
    for k, cols in gemm_shapes(info):
        w = numpy_helper.from_array(rng.standard_normal((k, cols), dtype=np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "w"], ["y"])],
            "gemm",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, cols])],
            [w],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9  # what every onnxruntime this project supports reads
        session = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        feeds = {"a": rng.standard_normal((n, k), dtype=np.float32)}
        best = max(best, 2 * n * k * cols / time_of(lambda s=session, f=feeds: s.run(None, f)))
    return best


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc's
    malloc_trim), so that the RSS an engine's load adds is its own even where an engine loaded
    and dropped before it left freed heap behind for it to reuse; nothing where there is no
    glibc."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def device_sync(device: str) -> Callable[[], Any] | None:
    """What waits for `device`'s queued work (None on the CPU)."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else None


def roofline(
    info: Any,
    n: int,
    repeats: int = 5,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
) -> dict[str, Any]:
    """Best GEMM GFLOP/s in `dtype` over the decoder's prefill shapes (q/o projections, MLP up
    and down), and memory read GB/s over a buffer well past the caches, on `device`. On the CPU
    in float32 the GEMM is the fastest of torch, numpy's BLAS and onnxruntime's MatMul (on
    `threads` threads): "gemm_source" names it, "gemm_gflops_by" has each. `raise_roof` lifts
    a limit that an engine then beats."""
    sync = device_sync(device)

    def best_of(fn: Callable[[], Any]) -> float:
        return min(median_time(fn, 1, sync=sync) for _ in range(repeats))

    by = {"torch": best_gemm_flops(info, n, best_of, device=device, dtype=dtype) / 1e9}
    if sync is None and dtype == torch.float32:
        by["numpy"] = numpy_gemm_flops(info, n, best_of) / 1e9
        by["onnxruntime"] = onnxruntime_gemm_flops(info, n, best_of, threads) / 1e9
    source = max(by, key=by.__getitem__)
    size = 2**30 if sync else 256 * 2**20  # well past a GPU's L2 / a CPU's caches
    big = torch.empty(size // 4, dtype=torch.float32, device=device).fill_(1.0)
    t_read = best_of(lambda: big.sum())
    return {
        "gemm_gflops": by[source],
        "gemm_source": source,
        "gemm_gflops_by": by,
        "mem_read_gbs": size / t_read / 1e9,
    }


def raise_roof(peak: dict[str, Any], key: str, achieved: Mapping[str, float]) -> str | None:
    """Lift `peak[key]` to the best of `achieved` (row name -> the same unit) when a row beat
    it: the measured limit was then not the machine's, and no row may show more than 100% of
    it. The measured limit stays as `key + "_measured"`, the row as `key + "_raised_by"`.
    Returns that row's name, or None when the limit held."""
    finite = {name: v for name, v in achieved.items() if math.isfinite(v)}
    if not finite:
        return None
    name = max(finite, key=finite.__getitem__)
    if not finite[name] > peak[key]:
        return None
    peak[key + "_measured"], peak[key], peak[key + "_raised_by"] = peak[key], finite[name], name
    return name


def check_lengths(model_dir: str | Path, n_text: int, decode_tokens: int) -> None:
    """Refuse text and decode token counts whose sequence (text + visual + decoded tokens) is
    longer than the model takes: its max_position_embeddings, and at most the longest sequence a
    captured graph accepts (MAX_SEQ). Reads config.json only, before anything loads."""
    from mllmc.compiler.core.model_dir import MAX_SEQ, model_shape, read_config
    from mllmc.runtime.errors import UserError

    cfg = read_config(model_dir)  # checked: text_config is an object, its sizes positive ints
    limit = min(cfg["text_config"].get("max_position_embeddings", MAX_SEQ), MAX_SEQ)
    visual = model_shape(cfg).visual_tokens or 0
    total = n_text + visual + decode_tokens
    if total > limit:
        raise UserError(
            f"--text-tokens {n_text} + {visual} visual tokens + --decode-tokens {decode_tokens} = "
            f"{total} positions, more than the model takes ({limit}: its max_position_embeddings, "
            f"at most {MAX_SEQ}); lower --text-tokens or --decode-tokens"
        )


def prompt_for(n_text: int) -> str:
    words = (FILLER + " ") * (1 + n_text // 20)
    return " ".join(words.split()[: max(1, n_text - 12)])  # the chat template adds ~12 tokens


Timer = Callable[[], float]  # runs once; returns the seconds (per token, for decode) it took


@dataclass
class Rounds:
    """What `interleaved_rounds` measured: per-round seconds of every engine's timers, the CPUs
    this process kept busy (on average) while each engine's timers ran, and the CPUs other
    processes kept busy over all the rounds (the machine's CPU time is counted in ticks of
    10 ms, too coarse for one engine's few milliseconds)."""

    times: dict[str, dict[str, list[float]]]
    cpus_used: dict[str, float]
    others_cpus: float


def interleaved_rounds(
    timers: dict[str, dict[str, Timer]], repeats: int, pause: float = 0.1, first: int = 0
) -> Rounds:
    """Every timer over `repeats` rounds after one warm-up round. Each round runs every engine
    once, in turn, so the slow drifts of a shared machine (neighbours, clocks) fall on all rows
    alike instead of on whichever engine ran last; every other round runs them in the reverse
    order, so that a drift within a round (a machine slowing while the round ran) does not
    always fall on the engines timed last. Each timer starts after `pause` seconds idle:
    onnxruntime's pool threads spin-wait for a while after a run, and would otherwise take the
    cores from the engine timed next (on a small model and few cores, HF eager run right after an
    onnxruntime call is many times slower). Around each timed run the process's and the
    machine's CPU time are read (`cpu_clock`), for `trust_verdict`. `first`: the rounds are
    numbered from it (an odd one begins in the reverse order), so that rounds shared out
    between several calls keep alternating."""

    def run(timer: Timer) -> float:
        time.sleep(pause)
        return timer()

    for engine in timers.values():
        for timer in engine.values():
            run(timer)
    samples: dict[str, dict[str, list[float]]] = {
        name: {metric: [] for metric in engine} for name, engine in timers.items()
    }
    clock = {name: np.zeros(3) for name in timers}  # wall, own CPU, machine busy CPU seconds
    start = np.array(cpu_clock())
    for i in range(first, first + repeats):
        order = list(timers.items())
        for name, engine in order if i % 2 == 0 else reversed(order):
            for metric, timer in engine.items():
                time.sleep(pause)
                before = np.array(cpu_clock())
                samples[name][metric].append(timer())
                clock[name] += np.array(cpu_clock()) - before
    wall, own, busy = (np.array(cpu_clock()) - start).tolist()
    return Rounds(
        samples,
        cpus_used={name: float(c[1] / max(c[0], 1e-9)) for name, c in clock.items()},
        others_cpus=max(busy - own, 0.0) / max(wall, 1e-9),
    )


def interleaved(
    timers: dict[str, dict[str, Timer]], repeats: int, pause: float = 0.1
) -> dict[str, dict[str, float]]:
    """Median of every timer of `interleaved_rounds`."""
    rounds = interleaved_rounds(timers, repeats, pause)
    return {
        name: {metric: statistics.median(v) for metric, v in metrics.items()}
        for name, metrics in rounds.times.items()
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


def image_kwargs(model: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The processor outputs besides pixel_values that the model's `get_image_features` takes:
    LLaVA-NeXT's `image_sizes`, Qwen2-VL's `image_grid_thw`; none for LLaVA."""
    import inspect

    params = inspect.signature(model.model.get_image_features).parameters
    return {k: v for k, v in inputs.items() if k in params and k != "pixel_values"}


def eager_calls(
    model: Any, model_dir: str, image: Any, prompt: str
) -> tuple[dict[str, Callable[[], Any]], Any]:
    """HF eager's parts for an image (or a list of images) and a prompt -> ({"prefill": the
    whole forward, "vision": `get_image_features`, "llm_prefill": the forward given those
    features as `mm_encoder_outputs` (embeddings, the features scattered into the image rows,
    positions: Qwen2-VL's M-RoPE index, the decoder, the last position's logits)}, the
    processor's inputs), on the model's device and in its dtype. The same calls serve every
    family transformers gives `mm_encoder_outputs` (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL)."""
    from mllmc.compiler.core.capture import load_processor, processor_inputs

    param = next(model.parameters())
    inputs = processor_inputs(load_processor(model_dir), image, prompt)
    inputs = inputs.to(param.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    text_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
    sizes = image_kwargs(model, inputs)

    @torch.no_grad()
    def prefill():
        return model(**inputs, use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def vision():
        return model.model.get_image_features(pixel_values=inputs["pixel_values"], **sizes)

    features = {"image": vision()}

    @torch.no_grad()
    def llm_prefill():
        # timed on its own, not as prefill minus vision: a difference of two noisy timings can
        # come out negative on a busy machine
        return model(**text_inputs, mm_encoder_outputs=features, use_cache=True, logits_to_keep=1)

    return {"prefill": prefill, "vision": vision, "llm_prefill": llm_prefill}, inputs


def eager_timers(
    model: Any, model_dir: str, image: Any, prompt: str, decode_tokens: int
) -> tuple[dict[str, Timer], int]:
    """Timers of HF eager (`eager_calls`): "vision", "llm_prefill", "decode" (per token, after
    a prefill: the model's forward on one token and its cache)."""
    calls, inputs = eager_calls(model, model_dir, image, prompt)
    prefill, vision, llm_prefill = calls["prefill"], calls["vision"], calls["llm_prefill"]
    sync = device_sync(str(next(model.parameters()).device))

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

    timers = {
        "vision": timed(vision, sync),
        "llm_prefill": timed(llm_prefill, sync),
        "decode": decode,
    }
    return timers, int(inputs["input_ids"].shape[1])


def greedy_steps(engine: Any, layout: Any, logits: Any, cache: Any, tokens: int) -> float:
    """Seconds per token of `tokens` greedy decode steps of `engine` after a prefill of `layout`
    that returned (logits, cache); the engine returns new cache arrays, so the same prefill's
    outputs can start any number of runs."""
    t0 = time.perf_counter()
    for i in range(tokens):
        logits, cache = engine.decode_step(int(np.argmax(logits)), layout.next_position + i, cache)
    return (time.perf_counter() - t0) / tokens


def engine_timers(
    engine: Any, image: Any, prompt: str, decode_tokens: int, device: str = "cpu"
) -> tuple[dict[str, Timer], int]:
    """Timers of an mllmc engine: "vision", "llm_prefill", "decode" (per token); the engine
    runs on `device` (its outputs may stay there: the timers wait for it)."""
    sync = device_sync(device)
    feats, counts = engine.encode_images(image)
    layout = engine.encode_prompt(prompt, counts)

    def decode() -> float:
        return greedy_steps(engine, layout, *engine.prefill(layout, feats), decode_tokens)

    timers = {
        "vision": timed(lambda: engine.encode_images(image), sync),
        "llm_prefill": timed(lambda: engine.prefill(layout, feats), sync),
        "decode": decode,
    }
    return timers, layout.n


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
    timers["llm_prefill"]()  # warm-up
    return Entry(timers, n, rss_mb())


def loaded_entry(
    load: Callable[[], Any], timers_of: Callable[[Any], tuple[dict[str, Timer], int]]
) -> Entry:
    """Load an engine, make its timers and run its LLM prefill once, measuring the RSS added."""
    release_free_memory()
    before = rss_mb()
    engine = load()
    timers, n = timers_of(engine)
    timers["llm_prefill"]()
    return Entry(timers, n, rss_mb() - before, engine)


Loader = Callable[[], Entry]  # loads an engine and makes its timers (`loaded_entry`)


def loader(
    load: Callable[[], Any], timers_of: Callable[[Any], tuple[dict[str, Timer], int]]
) -> Loader:
    """`loaded_entry` deferred: what `side_by_side` takes to load an engine itself, as often and
    in the order it chooses."""
    return lambda: loaded_entry(load, timers_of)


TIME_KEYS = ("prefill_s", "vision_s", "llm_prefill_s", "decode_s_per_token")

# How many times `side_by_side` loads the engines it is given as loaders, alternating the order.
# Identical onnxruntime sessions in one process need not run equally fast: on a 2-core AMD EPYC
# VM, of three copies of one decode program loaded as bare sessions the first created decoded
# 3-9% slower than the last over six runs (three whole engines, `benchmarks/session_order.py`,
# were within 3% of each other in two runs). Loading twice in alternating order spreads whatever
# a place in the load order costs over every engine, instead of charging it to the one always
# loaded first.
LOADS = 2


def probe_engine(path: Path, image: Any, prompt: str, n: int, threads: int) -> tuple[Any, int]:
    """The manifest of the artifact at `path` and the image's visual rows, from a load of its
    own (`side_by_side` loads the engines it times); RuntimeError unless its prompt has the n
    rows of HF's processor (the rows would not compare)."""
    from mllmc.runtime import load

    engine = load(path, threads=threads)
    counts = engine.image_rows(image)
    rows = engine.encode_prompt(prompt, counts).n
    if rows != n:
        raise RuntimeError(
            f"HF's processor makes a {n}-token prompt, the engine a {rows}-token one: the rows "
            "would not compare"
        )
    return engine.manifest, sum(counts)


def side_by_side(
    entries: Mapping[str, Entry | Loader],
    repeats: int,
    threads: int | None = None,
    loads: int = LOADS,
    rounds_option: str = "--repeats",
) -> dict[str, dict[str, Any]]:
    """Table rows of `entries` timed `interleaved_rounds`: each row has the medians, "rounds"
    (the per-round values), "spread" (`spread` of each), "cpus_used" (this process's busy CPUs
    while the row ran) and "trust" (`trust_verdict`, for `threads`: torch's by default;
    `rounds_option`: the caller's option for `repeats`, named in its hint).

    An entry given as a `Loader` is loaded `loads` times (at most once per round), in the
    order given on the first load, the reverse order on the second, and so on, and dropped after
    its share of the rounds: an engine's place in the load order (see LOADS) falls on every
    engine alike, as a round's place falls on every engine in `interleaved_rounds`. An `Entry`
    (HF eager, say) stays loaded throughout; its RSS is its own, a loaded engine's is from its
    first load."""
    fixed = {name: e for name, e in entries.items() if isinstance(e, Entry)}
    loaders = {name: e for name, e in entries.items() if not isinstance(e, Entry)}
    cycles = max(1, min(loads, repeats)) if loaders else 1
    times: dict[str, dict[str, list[float]]] = {}
    busy: dict[str, list[float]] = {name: [] for name in entries}
    shares: list[int] = []  # rounds per load, to weigh each load's CPU use
    others: list[float] = []
    # each row's prompt length and RSS (an engine's from its first load; its engine is dropped)
    info = {name: (e.prompt_tokens, e.rss_mb) for name, e in fixed.items()}
    done = 0  # rounds timed so far
    for cycle in range(cycles):
        order = list(loaders) if cycle % 2 == 0 else list(reversed(loaders))
        loaded = {name: loaders[name]() for name in order}
        for name in loaded:  # (no loop variable may keep an engine alive past this load)
            info.setdefault(name, (loaded[name].prompt_tokens, loaded[name].rss_mb))
        current = {name: fixed[name] if name in fixed else loaded[name] for name in entries}
        share = repeats // cycles + (cycle < repeats % cycles)
        timers = {name: e.timers for name, e in current.items()}
        measured = interleaved_rounds(timers, share, first=done)
        done += share
        shares.append(share)
        for name, metrics in measured.times.items():
            for metric, values in metrics.items():
                times.setdefault(name, {}).setdefault(metric, []).extend(values)
            busy[name].append(measured.cpus_used[name])
        others.append(measured.others_cpus)
        del loaded, current, measured, timers
        release_free_memory()
    threads = threads or torch.get_num_threads()
    rows = {}
    for name in entries:
        (prompt_tokens, rss), row_times = info[name], times[name]
        medians = {metric: statistics.median(v) for metric, v in row_times.items()}
        per_round = [
            row_from({metric: v[i] for metric, v in row_times.items()}, prompt_tokens)
            for i in range(min(len(v) for v in row_times.values()))
        ]
        rounds = {
            key: [r[key] for r in per_round]
            for key in TIME_KEYS
            if all(math.isfinite(r[key]) for r in per_round)
        }
        rows[name] = {
            **row_from(medians, prompt_tokens),
            "rss_mb": rss,
            "rounds": rounds,
            "spread": {key: spread(v) for key, v in rounds.items()},
            "cpus_used": statistics.fmean(busy[name], weights=shares),
            "loads": cycles if name in loaders else 1,
            "trust": trust_verdict(rounds, max(others), threads, rounds_option=rounds_option),
        }
    return rows


def ratio_spread(num: Mapping[str, Any], den: Mapping[str, Any], key: str) -> dict[str, float]:
    """`spread` of num[key] / den[key] over the rounds both rows ran (rounds interleave the
    engines, so round i of each saw the same machine); the ratio of the two values alone when
    either row has no per-round values."""
    a, b = num.get("rounds", {}).get(key), den.get("rounds", {}).get(key)
    if a and b and len(a) == len(b):
        return spread([x / y for x, y in zip(a, b, strict=True)])
    return spread([num[key] / den[key]])


def run_trust(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The whole run's verdict: trusted when every row's `trust_verdict` is; the reasons of
    those that are not, each once, with the rows it holds for."""
    by_reason: dict[str, list[str]] = {}
    for name, row in rows.items():
        for reason in row.get("trust", {}).get("reasons", []):
            by_reason.setdefault(reason, []).append(name)
    reasons = [
        f"{'all rows' if len(names) == len(rows) > 1 else ', '.join(names)}: {reason}"
        for reason, names in by_reason.items()
    ]
    busy = [row["trust"]["others_cpus"] for row in rows.values() if "trust" in row]
    return {"ok": not reasons, "reasons": reasons, "others_cpus": max(busy, default=0.0)}


def add_ratios(
    rows: dict[str, dict[str, Any]],
    info: Any,
    peak: dict[str, float],
    flops: dict[str, int],
    itemsize: int = 4,
) -> None:
    """Each row's prefill FLOPs (`flops[name]`), its fractions of the roofline and its speedups
    over the "hf_eager" row (the median over rounds, with "<name>_spread": `ratio_spread`), in
    place. A row faster than the roofline raises it (`raise_roof`), so no fraction tops 100%."""
    eager = rows["hf_eager"]
    gflops = {name: flops[name] / row["llm_prefill_s"] / 1e9 for name, row in rows.items()}
    gbs = {
        name: decode_bytes(info, row["prompt_tokens"], itemsize) / row["decode_s_per_token"] / 1e9
        for name, row in rows.items()
    }
    raise_roof(peak, "gemm_gflops", gflops)
    raise_roof(peak, "mem_read_gbs", gbs)
    for name, row in rows.items():
        row["llm_prefill_flops"] = flops[name]
        row["prefill_fraction_of_gemm_peak"] = gflops[name] / peak["gemm_gflops"]
        row["decode_fraction_of_bandwidth"] = gbs[name] / peak["mem_read_gbs"]
        for key, out in (
            ("llm_prefill_s", "llm_prefill_speedup_vs_eager"),
            ("prefill_s", "prefill_speedup_vs_eager"),
            ("decode_s_per_token", "decode_speedup_vs_eager"),
        ):
            s = ratio_spread(eager, row, key)
            row[out], row[out + "_spread"] = s["median"], s


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
    from mllmc.compiler.core.flops import analytic_prefill_flops

    scored = [p.stats["score_layer"] for p in manifest.passes if "score_layer" in p.stats]
    return analytic_prefill_flops(
        manifest.model, n_text, plan=manifest.layers, scored_layers=scored
    )


def check_threads(threads: int | None) -> int:
    """The thread count every engine of a benchmark runs on: `threads`, checked against the CPUs
    this process may use (`available_cpus`), or all of them when None."""
    from mllmc.runtime.engine import check_threads as check_count

    cpus = available_cpus()
    return cpus if threads is None else check_count(threads, "--threads", cpus)


def bench(
    model_dir: str,
    passes: list,
    target: str = "onnx",
    artifacts_dir: str | Path | None = None,
    n_text: int = 32,
    decode_tokens: int = 32,
    repeats: int = 3,
    device: str = "cpu",
    dtype: str | None = None,
    force: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Eager vs the unrewritten engine vs the engine with `passes`, one process, one image;
    `device` and `dtype` as for `mllmc compile` (HF eager runs on that device in that dtype).

    The engines are compiled into `artifacts_dir` (as `<model>-mllmc_<target>[+<passes>]`; an
    existing one is replaced only with `force`, and only if it is an artifact mllmc wrote),
    checked before any work; None: a temporary directory, removed when the timing is done."""
    from mllmc.compiler import backends
    from mllmc.compiler.files import artifact, outputs
    from mllmc.runtime.errors import UserError

    if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= MAX_REPEATS:
        raise UserError(f"--repeats must be an integer from 1 to {MAX_REPEATS}, got {repeats!r}")
    options = backends.resolve_options(target, backends.TargetOptions(device, dtype))
    check_lengths(model_dir, n_text, decode_tokens)
    torch_dtype = getattr(torch, str(options.dtype))
    threads = check_threads(threads)
    torch.set_num_threads(threads)  # and every engine's onnxruntime intra-op pool: load() below
    variants = [("mllmc_" + target, [])]
    if passes:
        variants.append(("mllmc_" + target + "+" + "+".join(p.name for p, _ in passes), passes))
    scratch = None
    if artifacts_dir is None:
        scratch = outputs.scratch_directory("mllmc-bench-")  # removed on any exit too
        root = Path(scratch.name)
    else:
        root = outputs.check_output_folder(artifacts_dir, "benchmark artifacts")
    paths = {name: root / f"{Path(model_dir).name}-{name}" for name, _ in variants}
    for path in paths.values():
        outputs.check_output_dir(
            path, force, artifact.replaceable, what="artifact", protected=[model_dir]
        )
    rows, manifests, model_info, visual = _time_variants(
        model_dir, paths, variants, target, options, n_text, decode_tokens, repeats, threads, force
    )
    if scratch is not None:
        scratch.cleanup()
    n = rows["hf_eager"]["prompt_tokens"]
    peak = roofline(model_info, n, repeats, options.device, torch_dtype, threads)
    flops = _add_kv_cache(rows, manifests, variants[0][0], n - visual)
    add_ratios(rows, model_info, peak, flops, torch_dtype.itemsize)
    report: dict[str, Any] = {
        "model": str(model_dir),
        "device": torch.cuda.get_device_name() if options.device == "cuda" else "cpu",
        "dtype": options.dtype,
        "torch": torch.__version__,
        "visual_tokens": visual,
        "prompt_tokens": n,
        "decode_tokens": decode_tokens,
        "threads": threads,
        "thread_settings": {
            "torch.set_num_threads": torch.get_num_threads(),
            "onnxruntime intra_op_num_threads": threads,
        },
        "cpus": os.cpu_count(),
        "trust": run_trust(rows),
        "roofline": peak,
        "peak_rss_mb": peak_rss_mb(),
        "rss_note": RSS_NOTE,
        "rows": rows,
    }
    if passes:
        report["pass_speedup"] = _pass_speedup(rows[variants[0][0]], rows[variants[1][0]])
    return report


def _time_variants(
    model_dir: str,
    paths: dict[str, Path],
    variants: list[tuple[str, list]],
    target: str,
    options: Any,
    n_text: int,
    decode_tokens: int,
    repeats: int,
    threads: int,
    force: bool,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], Any, int]:
    """Load HF eager, compile each variant (name, passes) into `paths[name]`, and time them all
    side by side on the family's reference image (`reference_image`); returns (rows by engine
    name, manifests by variant name, the ModelInfo, the image's visual rows)."""
    from mllmc.compiler.core.capture import load_model
    from mllmc.compiler.pipeline import compile_model
    from mllmc.runtime import load

    model, model_info = load_model(model_dir)
    model = model.to(device=options.device, dtype=getattr(torch, str(options.dtype)))
    image = reference_image(model)
    prompt = prompt_for(n_text)
    entries = {"hf_eager": eager_entry(model, model_dir, image, prompt, decode_tokens)}
    manifests = {}
    for name, plist in variants:
        out = paths[name]
        result = compile_model(
            model_dir,
            out,
            plist,
            target=target,
            device=options.device,
            dtype=options.dtype,
            validate=False,
            force=force,
        )
        manifests[name] = result.manifest
        entries[name] = loader(
            lambda out=out: load(out, threads=threads),
            lambda engine: engine_timers(engine, image, prompt, decode_tokens, options.device),
        )
    n = entries["hf_eager"].prompt_tokens
    _, visual = probe_engine(paths[variants[0][0]], image, prompt, n, threads)
    return side_by_side(entries, repeats, threads), manifests, model_info, visual


def reference_image(model: Any) -> Any:
    """The image `bench` times: a square of the family's reference side (`Family.reference_side`:
    LLaVA's tile, LLaVA-NeXT's largest square pinpoint, Qwen2-VL's 448 px), so that its visual
    rows are the ones the layer plan and FLOPs are stated for; `verify.probe_image`'s shapes."""
    from mllmc.compiler.core.families import family
    from mllmc.compiler.verify import probe_image

    side = family(model.config.model_type).reference_side(model.config)
    return probe_image(size=side).crop((0, 0, side, side))


def _add_kv_cache(
    rows: dict[str, dict[str, Any]], manifests: dict[str, Any], base: str, n_text: int
) -> dict[str, int]:
    """Add each row's KV-cache bytes (prompt, per token) for `n_text` text tokens; returns each
    row's analytic LLM-prefill FLOPs. HF eager is counted with the unrewritten `base` plan."""
    from .inspect_artifact import kv_cache_bytes

    flops = {}
    for name in rows:
        m = manifests.get(name, manifests[base])
        flops[name] = plan_prefill_flops(m, n_text)
        kv = kv_cache_bytes(m, n_text)
        rows[name]["kv_cache_bytes_prompt"] = kv["prompt"]
        rows[name]["kv_cache_bytes_per_token"] = kv["per_token"]
    return flops


def _pass_speedup(base: Mapping[str, Any], rewritten: Mapping[str, Any]) -> dict[str, Any]:
    """The passes' LLM-prefill speedup: FLOPs-ideal, measured (median and spread over rounds),
    and the fraction of the ideal the measurement reaches."""
    ideal = base["llm_prefill_flops"] / rewritten["llm_prefill_flops"]
    measured_spread = ratio_spread(base, rewritten, "llm_prefill_s")
    measured = measured_spread["median"]
    return {
        "flops_ideal": ideal,
        "measured": measured,
        "measured_spread": measured_spread,
        "fraction_of_ideal": (measured - 1) / (ideal - 1) if ideal > 1 else None,
    }


def roofline_lines(peak: Mapping[str, Any]) -> list[str]:
    """The roofline's line of the table, and one per limit a row beat (`raise_roof`)."""
    by = peak.get("gemm_gflops_by", {})
    others = ", ".join(f"{k} {v:.1f}" for k, v in by.items() if k != peak.get("gemm_source"))
    source = f" ({peak['gemm_source']}{'; ' + others if others else ''})" if by else ""
    lines = [
        f"roofline: GEMM {peak['gemm_gflops']:.1f} GFLOP/s{source}, "
        f"read {peak['mem_read_gbs']:.1f} GB/s"
    ]
    for key, what, unit in (("gemm_gflops", "GEMM", "GFLOP/s"), ("mem_read_gbs", "read", "GB/s")):
        if key + "_raised_by" in peak:
            lines.append(
                f"  {what} limit raised to {peak[key + '_raised_by']}'s measured {peak[key]:.1f} "
                f"{unit}: the measured limit ({peak[key + '_measured']:.1f}) was not the machine's"
            )
    return lines


def format_table(report: dict[str, Any]) -> str:
    """The report as the table `mllmc bench` prints: speedups as median (min-max) over rounds,
    and a warning with the reasons when a row's timings are not trustworthy (`trust_verdict`)."""
    rows = report["rows"]

    def ratio(r: Mapping[str, Any], key: str) -> str:
        return format_spread(r.get(key + "_spread") or spread([r[key]]))

    lines = [
        f"model {report['model']}: {report['prompt_tokens']} prompt tokens "
        f"({report['visual_tokens']} visual), {report.get('dtype', 'float32')} on "
        f"{report.get('device', 'cpu')}, {report['threads']} threads for every engine",
        *roofline_lines(report["roofline"]),
        f"{'engine':28s} {'vision ms':>9s} {'LLM prefill ms':>14s} {'vs eager':>21s} "
        f"{'decode ms/tok':>13s} {'vs eager':>21s} {'%GEMM':>6s} {'%BW':>5s} "
        f"{'KV MiB':>7s} {'KV KiB/tok':>10s} {'trust':>5s}",
    ]
    for name, r in rows.items():
        trusted = r.get("trust", {}).get("ok")
        lines.append(
            f"{name:28s} {r['vision_s'] * 1e3:9.1f} {r['llm_prefill_s'] * 1e3:14.1f} "
            f"{ratio(r, 'llm_prefill_speedup_vs_eager'):>21s} "
            f"{r['decode_s_per_token'] * 1e3:13.2f} "
            f"{ratio(r, 'decode_speedup_vs_eager'):>21s} "
            f"{r['prefill_fraction_of_gemm_peak']:6.0%} "
            f"{r['decode_fraction_of_bandwidth']:5.0%} "
            f"{r.get('kv_cache_bytes_prompt', float('nan')) / 2**20:7.2f} "
            f"{r.get('kv_cache_bytes_per_token', float('nan')) / 2**10:10.1f} "
            f"{'?' if trusted is None else 'ok' if trusted else 'NO':>5s}"
        )
    rounds = {s["rounds"] for r in rows.values() for s in r.get("spread", {}).values()}
    if rounds:
        lines.append(
            f"times: medians over {'/'.join(map(str, sorted(rounds)))} rounds; speedups: median "
            "(min-max) of the per-round ratios"
        )
    trust = report.get("trust")
    if trust and not trust["ok"]:
        lines.append("WARNING: these timings are not trustworthy; do not quote their ratios:")
        lines += [f"  {reason}" for reason in trust["reasons"]]
    if "pass_speedup" in report:
        s = report["pass_speedup"]
        # The FLOPs cut is what the pass removes; the measured speedup says whether FLOPs set
        # the time (on a tiny model per-op overhead does, and the measured ratio can be < 1).
        cut = 1 - 1 / s["flops_ideal"]
        lines.append(
            f"pass prefill: {cut:.1%} fewer FLOPs (FLOPs-ideal speedup {s['flops_ideal']:.2f}x); "
            "measured speedup " + format_spread(s.get("measured_spread") or spread([s["measured"]]))
        )
        if s["measured"] < 1 + cut / 2:
            lines.append(
                "  (at this size per-op overhead, not FLOPs, sets the prefill time; the FLOPs "
                "cut shows as time on a model where FLOPs dominate)"
            )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path, force: bool = True) -> None:
    """The prefill and decode times of `report` as a PNG chart at `path` (written through a
    temporary file; an existing file is replaced only with `force`)."""
    import matplotlib

    from mllmc.compiler.files.outputs import write_figure

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
    write_figure(fig, path, force=force)


def bench_cli(
    model_dir: str,
    passes: list,
    target: str,
    output: str | None,
    n_text: int,
    decode_tokens: int,
    repeats: int,
    device: str = "cpu",
    dtype: str | None = None,
    artifacts_dir: str | None = None,
    force: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """`mllmc bench`: print the table; with `output`, also write the report (JSON) there and
    its chart beside it (.png), each replacing an existing file only with `force`."""
    from mllmc.compiler.files.outputs import write_file

    report = bench(
        model_dir,
        passes,
        target,
        artifacts_dir,
        n_text,
        decode_tokens,
        repeats,
        device,
        dtype,
        force=force,
        threads=threads,
    )
    print(format_table(report))
    if output is not None:
        out = Path(output)
        write_file(out, json.dumps(report, indent=2), force=force)
        plot(report, out.with_suffix(".png"), force=force)
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return report
