"""Batched decode and continuous batching: `DecodeBatch` (left-padded caches), the decode graph
at B > 1 against each sample alone, `Engine.generate_batch` and the `Scheduler` (requests that
join a running batch, cancel, close) against `Engine.generate` run on each sample alone: the same
tokens, logits within 1e-4. Per-pass, per-family parity is in tests/passes/test_batch_decode.py."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mllmc.runtime import UserError, load
from mllmc.runtime.batching import Request, Scheduler
from mllmc.runtime.decode_batch import DecodeBatch
from mllmc.runtime.engine import Engine, SegmentLoop
from mllmc.runtime.manifest import read_manifest

TOL = 1e-4


def shapes(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    """An RGB image of `size` with a rectangle and an ellipse on `colour`."""
    from PIL import ImageDraw

    image = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.rectangle((w // 8, h // 8, w // 2, h // 2), fill=(240, 200, 30))
    draw.ellipse((w // 2, h // 3, w - 4, h - 4), fill=(30, 60, 200))
    return image


# each sample's own images (sizes and counts differ), prompt (lengths differ), max_new_tokens
SAMPLES = [
    ([shapes((120, 90), (250, 250, 250))], "Describe the image.", 7),
    (
        [shapes((70, 150), (20, 20, 40)), shapes((300, 200), (200, 30, 30))],
        "What differs between the two pictures? Answer in one long sentence, please.",
        3,
    ),
    ([shapes((64, 64), (10, 120, 10))], "Hi", 12),
]


@pytest.fixture(scope="module", params=["static", "growing"])
def engine(tiny_base_artifact: Path, request: pytest.FixtureRequest) -> Engine:
    """tiny-llava without passes, with each decode cache (static: rows written in place,
    runtime/inplace_cache.py); EOS does not stop it (a random model may emit it early)."""
    engine = load(tiny_base_artifact, decode_cache=request.param)
    engine.eos_token_ids = set()
    return engine


def alone(engine: Engine, images: list[Any], prompt: str, steps: int, **sampling: Any) -> Any:
    return engine.generate(
        images=images, prompt=prompt, max_new_tokens=steps, stop_at_eos=False, **sampling
    )


def assert_same(got: Any, want: Any) -> None:
    """A batched sample's result is the one it gets alone: tokens, and logits within TOL."""
    assert got.token_ids == want.token_ids
    assert got.logits.shape == want.logits.shape
    assert float(np.abs(got.logits - want.logits).max()) <= TOL
    assert got.prompt_tokens == want.prompt_tokens and got.text == want.text


# -- DecodeBatch ------------------------------------------------------------------------------


def _cache(rows: list[int], fill: float) -> list[np.ndarray]:
    """One sample's cache for two layers (key and value each): (1, 2, rows[l], 3), every row
    its (1-based) index times `fill`, so where each row went is visible."""
    out = []
    for n in rows:
        row = (np.arange(1, n + 1, dtype=np.float32) * fill)[None, None, :, None]
        out += [np.broadcast_to(row, (1, 2, n, 3)).copy() for _ in range(2)]
    return out


def test_decode_batch_join_left_pads_and_leave_trims():
    batch = DecodeBatch([0, 0, 1, 1])
    caches = {"a": _cache([4, 2], 1.0), "b": _cache([6, 3], 10.0), "c": _cache([5, 1], 100.0)}
    for key, cache in caches.items():
        batch.join(key, cache)
    assert batch.keys == ["a", "b", "c"] and len(batch) == 3 and "b" in batch
    assert batch.pads.tolist() == [[2, 0, 1], [1, 0, 2]]  # layer 0 holds 6 rows, layer 1 3
    for b, cache in enumerate(caches.values()):
        for i, layer in enumerate(batch.layers):
            pad = batch.pads[layer, b]
            assert not batch.cache[i][b, :, :pad].any()  # the pad rows are zeros
            np.testing.assert_array_equal(batch.cache[i][b : b + 1, :, pad:], cache[i])
    batch.leave(["b", "zz"])  # b held the longest caches: every pad shrinks by the shared rows
    assert batch.keys == ["a", "c"] and batch.pads.tolist() == [[1, 0], [0, 1]]
    assert [c.shape[2] for c in batch.cache] == [5, 5, 2, 2]
    np.testing.assert_array_equal(batch.cache[0][0:1, :, 1:], caches["a"][0])
    np.testing.assert_array_equal(batch.cache[3][1:2, :, 1:], caches["c"][3])
    batch.leave(["a", "c"])
    assert len(batch) == 0 and batch.cache == [] and batch.pads.shape == (2, 0)
    batch.join("d", caches["a"])  # an empty batch takes a sample as it is
    assert batch.pads.tolist() == [[0], [0]] and batch.cache[0] is caches["a"][0]


def test_decode_batch_refuses_what_does_not_fit():
    batch = DecodeBatch([0, 0])
    batch.join("a", _cache([3], 1.0))
    cases = [
        ("a", _cache([3], 1.0), "sample 'a' is in the batch already"),
        ("b", _cache([3, 3], 1.0), "cache must be the list of 2 arrays prefill"),
        ("b", [np.zeros((2, 2, 3, 3), np.float32)] * 2, "must be one sample's"),
        ("b", [np.zeros((1, 4, 3, 3), np.float32)] * 2, "unlike the batch's"),
    ]
    for key, cache, match in cases:
        with pytest.raises(UserError, match=match):
            batch.join(key, cache)
    assert batch.keys == ["a"]


# -- the decode graph at B > 1, through the engine ----------------------------------------------


def test_decode_batch_step_equals_decode_step(engine: Engine):
    """Two prefilled prompts of different lengths decoded together for 4 steps: each sample's
    logits and cache are the single-sample decode_step's."""
    own: dict[int, tuple[Any, list[Any], int]] = {}
    batch = engine.new_batch()
    for i, (images, prompt, _) in enumerate(SAMPLES[:2]):
        features, counts = engine.encode_images(images)
        layout = engine.encode_prompt(prompt, counts)
        logits, cache = engine.prefill(layout, features)
        own[i] = (int(np.argmax(logits)), cache, layout.next_position)
        batch.join(i, cache)
    assert batch.pads[:, 0].max() > 0 or batch.pads[:, 1].max() > 0
    tokens = [own[i][0] for i in range(2)]
    positions = [own[i][2] for i in range(2)]
    caches = [own[i][1] for i in range(2)]
    for _ in range(4):
        got = engine.decode_batch_step(tokens, positions, batch)
        assert got.shape == (2, engine.manifest.model.vocab_size)
        for b in range(2):
            want, caches[b] = engine.decode_step(tokens[b], positions[b], caches[b])
            assert float(np.abs(got[b] - want).max()) <= TOL
            pads = batch.pads[:, b]
            for c, mine, layer in zip(batch.cache, caches[b], batch.layers, strict=True):
                np.testing.assert_allclose(c[b : b + 1, :, pads[layer] :], mine, atol=TOL)
        tokens = [int(t) for t in np.argmax(got, axis=1)]
        positions = [p + 1 for p in positions]
    with pytest.raises(UserError, match="token_ids must be 2 integers"):
        engine.decode_batch_step(tokens[:1], positions, batch)
    with pytest.raises(UserError, match="positions must be integers >= 0"):
        engine.decode_batch_step(tokens, [-1, 3], batch)
    with pytest.raises(UserError, match="the batch is empty"):
        engine.decode_batch_step([], [], engine.new_batch())


# -- generate_batch -------------------------------------------------------------------------


def test_generate_batch_greedy_equals_each_alone(engine: Engine):
    images, prompts, steps = (list(x) for x in zip(*SAMPLES, strict=True))
    results = engine.generate_batch(images, prompts, steps)
    assert [len(r.token_ids) for r in results] == steps  # the 3-token sample left first
    for result, (imgs, prompt, n) in zip(results, SAMPLES, strict=True):
        assert_same(result, alone(engine, imgs, prompt, n))
        assert set(result.timings) >= {"vision_s", "prefill_s", "decode_s_per_token", "total_s"}


def test_generate_batch_sampled_is_reproducible_per_sample(engine: Engine):
    images, prompts, steps = (list(x) for x in zip(*SAMPLES, strict=True))
    sampling = {"temperature": 1.5, "top_k": 50}
    first = engine.generate_batch(images, prompts, steps, seed=7, **sampling)
    again = engine.generate_batch(images, prompts, steps, seed=7, **sampling)
    for i, (imgs, prompt, n) in enumerate(SAMPLES):
        assert first[i].token_ids == again[i].token_ids
        assert_same(first[i], alone(engine, imgs, prompt, n, seed=7 + i, **sampling))
    # one seed per sample: the sample seeded 7 gets what it got as sample 0 above
    own = engine.generate_batch(
        images[::-1], prompts[::-1], steps[::-1], seed=[1, 2, 7], **sampling
    )
    assert own[2].token_ids == first[0].token_ids


def test_generate_batch_errors_name_the_sample(engine: Engine):
    images = [s[0] for s in SAMPLES]
    prompts = [s[1] for s in SAMPLES]
    cases = [
        ((images[:2], prompts), {}, "got 2 entries for 3 prompts"),
        ((images, []), {}, "prompts must be a non-empty list"),
        ((images, prompts, [4, 4]), {}, "max_new_tokens has 2 values for 3 samples"),
        ((images, prompts, [4, 0, 4]), {}, "sample 1: max_new_tokens must be an integer from 1"),
        ((images, [*prompts[:2], 5]), {}, "sample 2: prompt must be a string"),
        ((images, ["<image><image> a", *prompts[1:]]), {}, "sample 0: the prompt has 2 <image>"),
        ((images, prompts), {"seed": [1, 2]}, "seed has 2 values for 3 samples"),
        ((images, prompts), {"temperature": -1.0}, "sample 0: temperature must be"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(UserError, match=match):
            engine.generate_batch(*args, **kwargs)


# -- format 4 artifacts -----------------------------------------------------------------------


class _FakeRunner:
    def __init__(self, inputs: list[str], outputs: list[str]):
        from mllmc.runtime.manifest import SegmentEntry, TensorSpec

        def specs(names: list[str]) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(n, (1, 1), "int64") for n in names)

        self.entry = SegmentEntry("x.onnx", specs(inputs), specs(outputs))


def test_format_4_artifact_asks_for_a_recompile(tiny_base_artifact: Path, tmp_path: Path):
    copy = tmp_path / "v4"
    shutil.copytree(tiny_base_artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 4
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(copy).format_version == 4  # inspect reads it
    with pytest.raises(UserError, match="decode took one sample .*format 4.*recompile"):
        load(copy)
    # a decode segment without cache_pad (what format 4 compiled), seen by the generate loop
    past = ["past.0.key", "past.0.value"]
    present = ["logits", "present.0.key", "present.0.value"]
    prefill = ["input_ids", "image_features", "visual_rows", "position_ids", "attention_mask"]
    runners = {
        "vision": _FakeRunner(["pixel_values"], ["image_features"]),
        "prefill": _FakeRunner(prefill, present),
        "decode": _FakeRunner(["input_ids", "position_ids", *past], present),
    }
    with pytest.raises(UserError, match="decode took one sample"):
        SegmentLoop(runners)


# -- the scheduler ----------------------------------------------------------------------------


class StepLog:
    """Wraps `engine.decode_batch_step`: records each step's batch keys; can hold the scheduler
    thread after step `pause_after` until `resume` is set."""

    def __init__(self, engine: Engine, pause_after: int | None = None):
        self.engine = engine
        self.steps: list[list[Any]] = []
        self.pause_after = pause_after
        self.paused, self.resume = threading.Event(), threading.Event()
        self._step = engine.decode_batch_step
        engine.decode_batch_step = self  # type: ignore[method-assign]

    def __call__(self, tokens: Any, positions: Any, batch: Any) -> Any:
        self.steps.append(list(batch.keys))
        if self.pause_after is not None and len(self.steps) == self.pause_after:
            self.paused.set()
            assert self.resume.wait(60)
        return self._step(tokens, positions, batch)

    def restore(self) -> None:
        del self.engine.decode_batch_step


@pytest.fixture
def step_log(engine: Engine):
    logs: list[StepLog] = []

    def make(pause_after: int | None = None) -> StepLog:
        logs.append(StepLog(engine, pause_after))
        return logs[-1]

    yield make
    for log in logs:
        log.resume.set()
        log.restore()


def request(i: int, steps: int | None = None, **sampling: Any) -> Request:
    images, prompt, n = SAMPLES[i]
    return Request(images, prompt, steps or n, **sampling)


def test_scheduler_requests_equal_each_alone(engine: Engine):
    sampling = {"temperature": 1.0, "seed": 11}
    with Scheduler(engine, max_batch=2) as scheduler:  # 3 requests, at most 2 decode together
        futures = [scheduler.submit(request(i)) for i in range(3)]
        sampled = scheduler.submit(request(0, 9, **sampling))
        results = [f.result(timeout=120) for f in futures]
        assert_same(sampled.result(timeout=120), alone(engine, *SAMPLES[0][:2], 9, **sampling))
    for result, (images, prompt, n) in zip(results, SAMPLES, strict=True):
        assert_same(result, alone(engine, images, prompt, n))
        assert result.timings["queue_s"] >= 0
    assert scheduler.stats() == (0, 0, 4)


def test_scheduler_request_joins_mid_way(engine: Engine, step_log: Any):
    """B arrives while A decodes: it is prefilled between two of A's steps, the two decode
    together, and each gets its alone-result."""
    log = step_log(pause_after=3)
    scheduler = Scheduler(engine)
    try:
        first = scheduler.submit(request(0, 10))
        assert log.paused.wait(60)
        assert scheduler.stats().running == 1
        png = io.BytesIO()
        SAMPLES[2][0][0].save(png, format="PNG")
        second = scheduler.submit(Request([png.getvalue()], SAMPLES[2][1], 5))  # encoded bytes
        log.resume.set()
        got = first.result(timeout=120), second.result(timeout=120)
    finally:
        scheduler.close()
    assert log.steps[:3] == [[0]] * 3 and [0, 1] in log.steps  # B joined A's running batch
    assert_same(got[0], alone(engine, SAMPLES[0][0], SAMPLES[0][1], 10))
    assert_same(got[1], alone(engine, SAMPLES[2][0], SAMPLES[2][1], 5))


def test_scheduler_cancel_stops_at_the_next_step(engine: Engine, step_log: Any):
    log = step_log(pause_after=2)
    scheduler = Scheduler(engine)
    try:
        long = scheduler.submit(request(0, 500))
        assert log.paused.wait(60)
        assert scheduler.cancel(long) and long.cancelled()
        log.resume.set()
        after = scheduler.submit(request(1))
        assert_same(after.result(timeout=120), alone(engine, *SAMPLES[1][:2], SAMPLES[1][2]))
        with pytest.raises(CancelledError):
            long.result(timeout=1)
        # the step that was running when it was cancelled is its last
        assert sum(0 in keys for keys in log.steps) == 2
        queued = scheduler.submit(request(2))
        queued.cancel()  # future.cancel() works as well, here maybe before it starts
    finally:
        scheduler.close()
    assert queued.cancelled() and scheduler.stats().running == 0


def test_scheduler_close_drains_or_cancels(engine: Engine):
    scheduler = Scheduler(engine, max_batch=2)
    futures = [scheduler.submit(request(i)) for i in range(3)]
    scheduler.close(drain=True)
    assert not scheduler._thread.is_alive()
    for future, (images, prompt, n) in zip(futures, SAMPLES, strict=True):
        assert_same(future.result(timeout=0), alone(engine, images, prompt, n))
    with pytest.raises(UserError, match="the scheduler is closed"):
        scheduler.submit(request(0))

    scheduler = Scheduler(engine, max_batch=1)
    futures = [scheduler.submit(request(i, 400)) for i in range(3)]
    scheduler.close(drain=False, timeout=60)
    assert not scheduler._thread.is_alive()
    assert all(f.cancelled() for f in futures)
    assert scheduler.stats() == (0, 0, 0)


def test_close_without_drain_cancels_a_request_whose_prefill_runs(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
):
    """A request the scheduler has taken from the queue but not yet added to the batch (its
    prefill runs) is cancelled by close(drain=False) like the others, and never joins."""
    import mllmc.runtime.batching as batching

    real_start, closers, submitted = batching.start, [], threading.Event()

    def start_while_closing(*args: Any, **kwargs: Any) -> Any:
        submitted.wait(60)
        scheduler = closers[0]  # a user's thread closes the scheduler during this prefill
        closer = threading.Thread(target=scheduler.close, kwargs={"drain": False})
        closer.start()
        closers.append(closer)
        while not scheduler._closed:
            time.sleep(0.001)
        return real_start(*args, **kwargs)

    monkeypatch.setattr(batching, "start", start_while_closing)
    scheduler = Scheduler(engine, max_batch=1)
    closers.append(scheduler)
    futures = [scheduler.submit(request(i, 400)) for i in range(2)]
    submitted.set()
    scheduler._thread.join(60)
    closers[1].join(60)
    assert not scheduler._thread.is_alive() and all(f.cancelled() for f in futures)
    assert scheduler.stats() == (0, 0, 0)


def test_close_timeout_cancels_what_is_left(engine: Engine, step_log: Any):
    """close(drain=True, timeout) lets requests finish for `timeout` s, then cancels the rest
    and joins the thread; a second close is a no-op, submit after close a UserError."""
    log = step_log(pause_after=2)
    scheduler = Scheduler(engine)
    long = scheduler.submit(request(0, 400))
    assert log.paused.wait(60)
    queued = scheduler.submit(request(1))

    def resume_once_cancelled() -> None:  # the paused step ends once close has cancelled
        while not long.cancelled():
            threading.Event().wait(0.01)
        log.resume.set()

    threading.Thread(target=resume_once_cancelled, daemon=True).start()
    assert scheduler.close(drain=True, timeout=0.05) == 2
    assert not scheduler._thread.is_alive()
    assert long.cancelled() and queued.cancelled()
    with pytest.raises(CancelledError):
        long.result(timeout=0)
    assert sum(0 in keys for keys in log.steps) == 2  # nothing ran after the cut
    assert scheduler.stats() == (0, 0, 0)
    assert scheduler.close() == 0  # a no-op
    with pytest.raises(UserError, match="the scheduler is closed"):
        scheduler.submit(request(0))


def test_close_timeout_never_aborts_the_process(tiny_base_artifact: Path, tmp_path: Path):
    """A generation still running when close's timeout passes is cancelled and the thread
    joined, so the interpreter exits normally (no abort from a thread inside onnxruntime)."""
    import subprocess
    import sys

    script = tmp_path / "close.py"
    script.write_text(
        f"""
import time
from concurrent.futures import CancelledError
from PIL import Image
from mllmc.runtime import load
from mllmc.runtime.batching import Request, Scheduler
engine = load({str(tiny_base_artifact)!r}, threads=1)
engine.eos_token_ids = set()
scheduler = Scheduler(engine)
future = scheduler.submit(Request([Image.new("RGB", (32, 32))], "Hi", 3000))
while scheduler.stats().running == 0:
    time.sleep(0.01)
print("cut", scheduler.close(drain=True, timeout=0.2))
try:
    future.result(timeout=0)
except CancelledError:
    print("cancelled")
"""
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["cut", "1", "cancelled"], proc.stdout
    assert "terminate called" not in proc.stderr


def test_submit_refuses_bad_requests_and_queues_nothing(engine: Engine, sample_image: Path):
    images = [sample_image]
    too_long = engine.manifest.model.max_position_embeddings + 1
    cases = [
        ("not a request", "submit takes a Request, got str"),
        (Request(images, "Hi", 0), "max_new_tokens must be an integer from 1"),
        (Request(images, "Hi", too_long), "alone is past the model's max_position_embeddings"),
        (Request(images, "Hi", 4, temperature=float("nan")), "temperature must be a finite"),
        (Request(images, "Hi", 4, top_k=-1), "top_k must be an integer from 0"),
        (Request(images, "Hi", 4, seed=-3), "seed must be None or an integer >= 0"),
        (Request(images, b"Hi", 4), "prompt must be a string, got bytes"),  # type: ignore[arg-type]
        (Request(sample_image, "Hi", 4), "images must be a non-empty list"),  # type: ignore[arg-type]
        (Request([b"not a png"], "Hi", 4), "image 0 does not decode: not an image file"),
        (Request([b""], "Hi", 4), "image 0 is empty"),
        (Request([3], "Hi", 4), "image 0 must be a PIL image, a path or encoded image bytes"),
        (Request(images, "<image> <image> two?", 4), "the prompt has 2 <image> placeholders"),
    ]
    cases.append((Request([], "Hi", 4), "images must be a non-empty list"))  # not text-only
    with Scheduler(engine) as scheduler:
        for bad, match in cases:
            with pytest.raises(UserError, match=match):
                scheduler.submit(bad)  # type: ignore[arg-type]
            assert scheduler.stats() == (0, 0, 0)
        with pytest.raises(UserError, match="cancel takes the Future that submit"):
            scheduler.cancel(object())  # type: ignore[arg-type]
    with pytest.raises(UserError, match="images_list must be a list of each sample's images"):
        engine.generate_batch("img.png", ["a"])  # type: ignore[arg-type]
    with pytest.raises(UserError, match="got 2 entries for 1 prompts"):
        engine.generate_batch([[], []], ["a"])
    for bad_max in (0, 2000, True):
        with pytest.raises(UserError, match="max_batch must be an integer from 1 to"):
            Scheduler(engine, max_batch=bad_max)


# -- Qwen2.5-VL: M-RoPE positions per sample ---------------------------------------------------


def test_qwen_batch_and_scheduler_equal_each_alone(
    qwen_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
):
    """Each sample's own image sizes give it its own grid, rows and 3-D positions (and its own
    decode offset); batched, every sample gets what it gets alone, through generate_batch and
    the Scheduler (whose requests lay their prompts out before the vision engine runs)."""
    from mllmc.compiler.pipeline import compile_model

    out = tmp_path_factory.mktemp("artifacts") / "qwen-batch"
    art = compile_model(qwen_dirs["tiny-qwen2.5-vl"], out, progress=False).out_dir
    qwen = load(art)
    qwen.eos_token_ids = set()
    images, prompts, steps = (list(x) for x in zip(*SAMPLES, strict=True))
    results = qwen.generate_batch(images, prompts, steps)
    wanted = [alone(qwen, imgs, prompt, n) for imgs, prompt, n in SAMPLES]
    for result, want in zip(results, wanted, strict=True):
        assert_same(result, want)
    with Scheduler(qwen, max_batch=4) as scheduler:
        futures = [
            scheduler.submit(Request(imgs, prompt, n, seed=None)) for imgs, prompt, n in SAMPLES
        ]
        for future, want in zip(futures, wanted, strict=True):
            assert_same(future.result(timeout=120), want)


def test_text_only_samples_batch_beside_image_samples(
    qwen_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
):
    """On a Qwen2-VL artifact (`text_only`): an empty image list is a text-only prompt in
    generate_batch and the Scheduler, and gets what generate gets alone, beside image samples."""
    from mllmc.compiler.pipeline import compile_model

    out = tmp_path_factory.mktemp("artifacts") / "qwen2-text-only"
    qwen = load(compile_model(qwen_dirs["tiny-qwen2-vl"], out, progress=False).out_dir)
    assert qwen.text_only
    qwen.eos_token_ids = set()
    samples = [([], "Hi there", 5), SAMPLES[0], ([], "Tell me a story, please.", 3)]
    wanted = [alone(qwen, imgs, prompt, n) for imgs, prompt, n in samples]
    assert wanted[0].token_ids == qwen.generate(None, "Hi there", 5, stop_at_eos=False).token_ids
    images, prompts, steps = (list(x) for x in zip(*samples, strict=True))
    for result, want in zip(qwen.generate_batch(images, prompts, steps), wanted, strict=True):
        assert_same(result, want)
    with Scheduler(qwen, max_batch=4) as scheduler:
        futures = [scheduler.submit(Request(imgs, p, n)) for imgs, p, n in samples]
        for future, want in zip(futures, wanted, strict=True):
            assert_same(future.result(timeout=120), want)
