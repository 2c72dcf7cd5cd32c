"""Serving many prompts at once: iteration-level ("continuous") batching of the decode step.

Each prompt is prefilled alone (the prefill graphs take one prompt: on a CPU a prefill is
compute-bound, so stacking padded prompts buys nothing), then decodes together with every other
prompt in flight, one `decode_batch_step` a token for all of them (runtime/decode_batch.py). A
sample joins the running batch between two steps and leaves after the step that finishes it;
the others never wait for it.

    results = engine.generate_batch([[img_a], [img_b, img_c]], ["Describe it.", "Compare."], 32)

    scheduler = Scheduler(engine, max_batch=16)          # one background thread
    future = scheduler.submit(Request([png_bytes], "What is this?", max_new_tokens=32))
    result = future.result()                             # a GenerationResult
    scheduler.cancel(future)                             # or future.cancel(): stops at next step
    scheduler.stats()                                    # SchedulerStats(queued, running, completed)
    scheduler.close(drain=True, timeout=30)              # finish in-flight requests, join

`submit` checks a request on the caller's thread (its fields, that every image decodes, the
prompt's placeholders and, where the image rows are known before the vision engine runs, its
length): a bad request raises `UserError` there and nothing is queued. What only the engines can
tell (a LLaVA-NeXT prompt's length after its images' rows are counted) comes back as the
future's `UserError`. A request's future stays pending until its result is set, so
`future.cancel()` works while it generates; a cancelled request is dropped from the batch at the
next step and costs nothing afterwards. While the scheduler runs, the engine is its own: use
another engine for calls of your own.

`close(drain=True, timeout=T)` stops taking requests and lets the queued and running ones finish
for up to T seconds; what is left then is cancelled (its future raises CancelledError), and
close returns, once the thread has ended (at most one more decode step), the number of requests
it cancelled. `drain=False` cancels them at once. A second close is a no-op returning 0;
`submit` after close raises UserError. Where the artifact takes text-only prompts
(`Engine.text_only`), a request's images may be an empty list.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from .engine import Engine, GenerationResult, _check_generate_args, _choose, _is_int
from .errors import UserError
from .preprocess import check_pixels

log = logging.getLogger(__name__)

# the most samples one Scheduler decodes together
MAX_SCHEDULER_BATCH = 1024


@dataclass
class Request:
    """One generation request: its images (PIL images, paths, or encoded image files as bytes),
    its prompt (one image placeholder per image, or none: the chat template puts the images
    first), and its sampling settings (temperature 0: greedy; top_k 0: every token; seed None:
    fresh randomness)."""

    images: list[Any]
    prompt: str
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    seed: int | None = None


class SchedulerStats(NamedTuple):
    """queued: requests waiting for their prefill; running: samples in the decode batch;
    completed: requests answered (a result or an error; cancelled ones are not counted)."""

    queued: int
    running: int
    completed: int


@dataclass
class _Prepared:
    """A checked request with its host-side work done: each image's tiles, and the prompt's
    layout where the images' rows are known before the vision engine runs (`exact`)."""

    request: Request
    tiles: list[np.ndarray]
    metas: list[Any]
    counts: list[int]
    layout: Any
    exact: bool
    submitted: float = field(default_factory=time.perf_counter)


class _Sample:
    """One generation in flight: its sampling state, and the tokens and logits so far."""

    def __init__(self, prepared: _Prepared, layout: Any, eos: set[int] | frozenset[int]):
        r = prepared.request
        self.max_new_tokens, self.temperature, self.top_k = r.max_new_tokens, r.temperature, r.top_k
        self.rng = np.random.default_rng(r.seed)
        self.eos = eos
        self.prompt_tokens = layout.n
        self.position = layout.next_position  # where the next token fed back sits
        self.tokens: list[int] = []
        self.logits: list[np.ndarray] = []
        self.finished = False
        self.timings = {"queue_s": 0.0, "vision_s": 0.0, "prefill_s": 0.0}
        self.decode_s = 0.0
        self.started = time.perf_counter()

    def take(self, logits: np.ndarray) -> bool:
        """Choose the next token from `logits` (V,); whether the sample is finished."""
        token = _choose(logits, self.temperature, self.top_k, self.rng)
        self.tokens.append(token)
        self.logits.append(np.asarray(logits, dtype=np.float32))
        self.finished = len(self.tokens) >= self.max_new_tokens or token in self.eos
        return self.finished

    def result(self, engine: Engine) -> GenerationResult:
        steps = len(self.tokens) - 1
        timings = {
            **self.timings,
            "decode_s_per_token": self.decode_s / steps if steps else 0.0,
            "total_s": time.perf_counter() - self.started + self.timings["queue_s"],
        }
        return GenerationResult(
            token_ids=list(self.tokens),
            text=engine.prompt_encoder.decode(self.tokens),
            logits=np.stack(self.logits),
            timings=timings,
            prompt_tokens=self.prompt_tokens,
        )


# -- the steps both generate_batch and the Scheduler take ------------------------------------


def load_image_bytes(data: bytes, index: int) -> Image.Image:
    """An encoded image file (PNG, JPEG, ...) -> an RGB PIL image, decoded now, EXIF orientation
    applied (as for an image path); UserError naming image `index` if it does not decode."""
    if not data:
        raise UserError(f"image {index} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # the size is checked below, in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            check_pixels(image.width, image.height, f"image {index}")
            return ImageOps.exif_transpose(image).convert("RGB")
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        what = (
            "not an image file PIL can read" if isinstance(e, Image.UnidentifiedImageError) else e
        )
        first = str(what).strip().splitlines()[0][:200] if str(what).strip() else type(e).__name__
        raise UserError(f"image {index} does not decode: {first}") from None


def _images(images: Any, text_only: bool = False) -> list[Any]:
    """A request's images as the engine takes them (bytes decoded); UserError if not a list,
    or if it is empty where the artifact does not take text-only prompts (`text_only`)."""
    if not isinstance(images, (list, tuple)) or (not images and not text_only):
        what = "a list" if text_only else "a non-empty list"
        raise UserError(
            f"images must be {what} of PIL images, paths or encoded image bytes, got "
            f"{type(images).__name__ if not isinstance(images, (list, tuple)) else 'an empty list'}"
        )
    out = []
    for i, item in enumerate(images):
        if isinstance(item, (bytes, bytearray, memoryview)):
            out.append(load_image_bytes(bytes(item), i))
        elif isinstance(item, (str, os.PathLike, Image.Image, np.ndarray)):
            out.append(item)
        else:
            raise UserError(
                f"image {i} must be a PIL image, a path or encoded image bytes, got "
                f"{type(item).__name__}"
            )
    return out


def prepare(engine: Engine, request: Request) -> _Prepared:
    """Check `request` and do its host-side work (decode and tile the images, lay the prompt
    out); UserError for anything wrong with it. Runs no engine."""
    if not isinstance(request, Request):
        raise UserError(f"submit takes a Request, got {type(request).__name__}")
    r = request
    vocab = engine.manifest.model.vocab_size
    _check_generate_args(r.max_new_tokens, r.temperature, r.top_k, r.seed, vocab)
    if not isinstance(r.prompt, str):
        raise UserError(f"prompt must be a string, got {type(r.prompt).__name__}")
    images = _images(r.images, engine.text_only)
    tiles, metas = engine.image_tiles(images) if images else ([], [])  # []: a text-only prompt
    # an image's rows are known before the vision engine runs unless the family's depend on
    # the image. Then a per-image family's metas are its rows before any pruning (Qwen's
    # `ImageRows`, whose grids the prompt's M-RoPE positions need); other families count 1 per
    # image here, enough to check the placeholders. `start` lays the prompt out again.
    exact = not engine.manifest.model.reference_visual_rows
    if getattr(engine.images, "per_image", False):
        counts = list(metas)
    else:
        counts = [engine.visual_tokens if exact else 1] * len(tiles)
    layout = engine.encode_prompt(r.prompt, counts)
    if exact:
        engine._check_length(layout.n, r.max_new_tokens, False)
    return _Prepared(r, tiles, metas, counts, layout, exact)


def start(
    engine: Engine, prepared: _Prepared, eos: set[int] | frozenset[int]
) -> tuple[_Sample, list[Any]]:
    """Run a prepared request's vision and prefill and choose its first token -> (the sample,
    its KV cache as prefill() returned it)."""
    began = time.perf_counter()
    if prepared.tiles:
        features, counts = engine.encode_tiles(prepared.tiles, prepared.metas)
    else:  # a text-only prompt (the artifact's `text_only`): no rows, no vision call
        features, counts = engine.encode_images([])
    vision = time.perf_counter()
    layout = prepared.layout
    if counts != prepared.counts or not prepared.exact:
        layout = engine.encode_prompt(prepared.request.prompt, counts)
        engine._check_length(layout.n, prepared.request.max_new_tokens, False)
    logits, cache = engine.prefill(layout, features)
    sample = _Sample(prepared, layout, eos)
    sample.started = began
    sample.timings.update(
        queue_s=began - prepared.submitted,
        vision_s=vision - began,
        prefill_s=time.perf_counter() - vision,
    )
    sample.take(logits)
    return sample, cache


def step(engine: Engine, batch: Any, samples: dict[Hashable, _Sample]) -> list[Hashable]:
    """One decode step for every sample of `batch` (`samples` by batch key) -> the keys of the
    samples it finished (the caller removes them from the batch)."""
    keys = list(batch.keys)
    tokens = [samples[k].tokens[-1] for k in keys]
    positions = [samples[k].position for k in keys]
    began = time.perf_counter()
    logits = engine.decode_batch_step(tokens, positions, batch)  # (B, V)
    took = time.perf_counter() - began
    done = []
    for row, key in zip(logits, keys, strict=True):
        sample = samples[key]
        sample.position += 1
        sample.decode_s += took
        if sample.take(row):
            done.append(key)
    return done


@contextmanager
def _sample_errors(index: int) -> Iterator[None]:
    """A UserError about one sample of a batch, prefixed with the sample's index."""
    try:
        yield
    except UserError as e:
        raise UserError(f"sample {index}: {e}") from None


def _per_sample(value: Any, n: int, name: str) -> list[Any]:
    """`value` for each of n samples: a list of n values, or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"{name} has {len(value)} values for {n} samples: give one per sample")
        return list(value)
    return [value] * n


def _seeds(seed: Any, n: int) -> list[Any]:
    """Per-sample seeds: None for all, seed + i for sample i, or a list of n seeds (or None)."""
    if isinstance(seed, (list, tuple)):
        return _per_sample(seed, n, "seed")
    if _is_int(seed) and seed >= 0:
        return [int(seed) + i for i in range(n)]
    return [seed] * n  # None, or a bad value each sample's check names


def generate_batch(
    engine: Engine,
    images_list: Sequence[Any],
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int] = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int | Sequence[int | None] | None = None,
    stop_at_eos: bool = True,
) -> list[GenerationResult]:
    """`Engine.generate_batch`: each sample's prefill alone, then their decode steps together;
    the results in sample order."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise UserError("prompts must be a non-empty list of strings, one per sample")
    n = len(prompts)
    if not isinstance(images_list, (list, tuple)):
        raise UserError(
            f"images_list must be a list of each sample's images ({n} entries: an image or a "
            f"list of images each), got {type(images_list).__name__}"
        )
    if len(images_list) != n:
        raise UserError(
            f"images_list must be a list of each sample's images, one per prompt: got "
            f"{len(images_list)} entries for {n} prompts"
        )
    new_tokens = _per_sample(max_new_tokens, n, "max_new_tokens")
    seeds = _seeds(seed, n)
    prepared = []
    for i in range(n):
        images = images_list[i] if isinstance(images_list[i], (list, tuple)) else [images_list[i]]
        request = Request(list(images), prompts[i], new_tokens[i], temperature, top_k, seeds[i])
        with _sample_errors(i):
            prepared.append(prepare(engine, request))
    eos = engine.eos_token_ids if stop_at_eos else frozenset()
    return _run_all(engine, prepared, eos)


def _run_all(
    engine: Engine, prepared: list[_Prepared], eos: set[int] | frozenset[int]
) -> list[GenerationResult]:
    """Run prepared samples to the end, as many at a time as the decode engine takes."""
    limit = engine.max_decode_batch or len(prepared)
    pending = deque(enumerate(prepared))
    batch = engine.new_batch()
    samples: dict[Hashable, _Sample] = {}
    results: list[GenerationResult | None] = [None] * len(prepared)
    while pending or len(batch):
        while pending and len(batch) < limit:
            i, p = pending.popleft()
            with _sample_errors(i):
                sample, cache = start(engine, p, eos)
            if sample.finished:
                results[i] = sample.result(engine)
            else:
                samples[i] = sample
                batch.join(i, cache)
        if len(batch):
            done = step(engine, batch, samples)
            for i in done:
                results[i] = samples.pop(i).result(engine)
            batch.leave(done)
    return [r for r in results if r is not None]


# -- the scheduler --------------------------------------------------------------------------


class Scheduler:
    """Continuous batching over one engine in one background thread: requests are prefilled
    between decode steps and join the running batch (at most `max_batch` samples, and no more
    than the engine's decode takes a step).

    submit(request) -> Future[GenerationResult]; cancel(future) -> bool; stats() ->
    SchedulerStats; close(drain=True, timeout=None). See the module docstring."""

    def __init__(self, engine: Engine, max_batch: int = 16):
        if not isinstance(engine, Engine):
            raise UserError(
                f"Scheduler takes an Engine (mllmc.runtime.load), got {type(engine).__name__}"
            )
        if not _is_int(max_batch) or not 1 <= max_batch <= MAX_SCHEDULER_BATCH:
            raise UserError(
                f"max_batch must be an integer from 1 to {MAX_SCHEDULER_BATCH}, got {max_batch!r}"
            )
        self.engine = engine
        self.max_batch = min(int(max_batch), engine.max_decode_batch or int(max_batch))
        self._cond = threading.Condition()
        self._queue: deque[tuple[_Prepared, Future[GenerationResult]]] = deque()
        self._batch = engine.new_batch()
        self._samples: dict[Hashable, _Sample] = {}
        self._futures: dict[Hashable, Future[GenerationResult]] = {}
        # admitted and not yet in the batch (their prefill runs): close() cancels them too
        self._starting: dict[Future[GenerationResult], None] = {}
        self._keys = itertools.count()
        self._completed = 0
        self._closed = False
        self._drain = True
        self._thread = threading.Thread(target=self._run, name="mllmc-scheduler", daemon=True)
        self._thread.start()

    # -- the API the server calls ---------------------------------------------------------

    def submit(self, request: Request) -> Future[GenerationResult]:
        """Queue `request`; its future gets the GenerationResult (or the UserError the engines
        raised for it). A bad request raises UserError here, and nothing is queued."""
        self._check_open()
        prepared = prepare(self.engine, request)
        future: Future[GenerationResult] = Future()
        with self._cond:
            self._check_open()
            self._queue.append((prepared, future))
            self._cond.notify()
        return future

    def cancel(self, future: Future[GenerationResult]) -> bool:
        """Cancel a request (the Future `submit` returned): it stops at the next decode step
        (or is never started). False if it had finished already."""
        if not isinstance(future, Future):
            raise UserError(
                f"cancel takes the Future that submit() returned, got {type(future).__name__}"
            )
        cancelled = future.cancel()
        with self._cond:
            self._cond.notify()
        return cancelled

    def stats(self) -> SchedulerStats:
        with self._cond:
            return SchedulerStats(len(self._queue), len(self._samples), self._completed)

    def close(self, drain: bool = True, timeout: float | None = None) -> int:
        """Stop taking requests and end the thread -> how many requests this call cancelled.
        With `drain`, the queued and running requests finish, for up to `timeout` seconds
        (None: however long they take); what is left after that, or everything at once without
        `drain`, is cancelled (their futures raise CancelledError) and stops at the next decode
        step, which the call waits for. A second close is a no-op returning 0."""
        with self._cond:
            if self._closed and not self._thread.is_alive():
                return 0
            self._closed = True
            self._drain = self._drain and bool(drain)
            cut = 0 if drain else self._cancel_all()
            self._cond.notify_all()
        if threading.current_thread() is self._thread:  # from a future's callback: no join
            return cut
        self._thread.join(timeout)
        if self._thread.is_alive():  # the timeout passed: cancel what is left, then join
            with self._cond:
                cut += self._cancel_all()
            self._thread.join()
        return cut

    def _cancel_all(self) -> int:
        """Cancel every queued and running request (the caller holds the lock) -> how many."""
        cut = sum(f.cancel() for f in self._unanswered() if not f.done())
        self._cond.notify_all()
        return cut

    def _unanswered(self) -> list[Future[GenerationResult]]:
        """The queued, starting and running requests' futures, each once (the caller holds the
        lock; a starting one may already be running)."""
        queued = [f for _, f in self._queue]
        return list(dict.fromkeys([*queued, *self._starting, *self._futures.values()]))

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise UserError("the scheduler is closed: it takes no more requests")

    # -- the background thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                admitted = self._admit()
                if admitted is None:
                    return
                for prepared, future in admitted:
                    self._start(prepared, future)
                self._step()
        except BaseException as e:  # a bug: answer everything in flight rather than hang it
            log.exception("the scheduler thread failed")
            with self._cond:
                self._closed = True
                left = self._unanswered()
                self._queue.clear()
            for future in left:
                self._finish(future, error=RuntimeError(f"the scheduler failed: {e!r}"))

    def _admit(self) -> list[tuple[_Prepared, Future[GenerationResult]]] | None:
        """Wait for work; the queued requests that fit in the batch now (None: time to stop)."""
        with self._cond:
            while not self._queue and not self._samples and not self._closed:
                self._cond.wait()
            if not self._queue and not self._samples:
                return None  # closed, and nothing left
            free = self.max_batch - len(self._samples)
            admitted = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
            self._starting = dict.fromkeys(f for _, f in admitted)
            return admitted

    def _start(self, prepared: _Prepared, future: Future[GenerationResult]) -> None:
        try:
            self._start_one(prepared, future)
        finally:
            with self._cond:
                self._starting.pop(future, None)

    def _start_one(self, prepared: _Prepared, future: Future[GenerationResult]) -> None:
        if future.cancelled():
            return
        try:
            sample, cache = start(self.engine, prepared, self.engine.eos_token_ids)
        except Exception as e:  # a UserError about this request (or an engine failure)
            self._finish(future, error=e)
            return
        if sample.finished:
            self._finish(future, result=sample.result(self.engine))
            return
        key = next(self._keys)
        with self._cond:
            if future.cancelled():  # while its prefill ran (close without drain)
                return
            self._samples[key], self._futures[key] = sample, future
        self._batch.join(key, cache)  # before the next step, which this thread runs

    def _step(self) -> None:
        """Drop cancelled samples, run one decode step, answer the samples it finished."""
        cancelled = [k for k, f in self._futures.items() if f.cancelled()]
        if cancelled:
            self._leave(cancelled)
        if not len(self._batch):
            return
        try:
            done = step(self.engine, self._batch, self._samples)
        except Exception as e:  # the engine failed on the batch: every sample in it gets it
            keys = list(self._batch.keys)
            for key in keys:
                self._finish(self._futures[key], error=e)
            self._leave(keys)
            return
        for key in done:
            self._finish(self._futures[key], result=self._samples[key].result(self.engine))
        self._leave(done)

    def _leave(self, keys: list[Hashable]) -> None:
        self._batch.leave(keys)
        with self._cond:
            for key in keys:
                self._samples.pop(key, None)
                self._futures.pop(key, None)

    def _finish(
        self,
        future: Future[GenerationResult],
        result: GenerationResult | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Answer `future` unless it was cancelled (or answered already)."""
        try:
            if not future.set_running_or_notify_cancel():
                return
        except RuntimeError:  # being answered when the thread failed
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
        with self._cond:
            self._completed += 1
