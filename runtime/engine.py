"""Engine: runs an mllmc artifact (vision -> prefill -> decode loop) on the runner its target
names (runtime/runners/: onnx, aoti, trt), for a prompt with any number of images.

One generate loop, `SegmentLoop`, over three segment runners; the runners take feeds by the
manifest's IO names and cast them to the manifest's dtypes, so nothing here knows the target.
No torch (the torch-based runners import it themselves), and no knowledge of passes: the prefill
graph already holds every rewrite, and each layer's KV cache is whatever the prefill returned for
it (passes may leave layers with different cache lengths; decode appends one row to each).
The host lays the prompt out (`runtime/layout.py`: its rows, visual rows and positions) and the
family's image side (`runtime/images.py`) turns images into tiles and tile features into rows;
decode positions continue from the layout's next position.

Decode runs a batch of samples a step (`decode_batch_step` over a `DecodeBatch`: each sample's
cache left-padded to the batch's length, `runtime/decode_batch.py`); `decode_step` is that step
for one sample, and `Engine.generate_batch` (and runtime/batching.py's `Scheduler`, which lets
requests join a running batch) prefill each prompt alone and decode them together.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .decode_batch import DecodeBatch
from .errors import UserError
from .images import MAX_TILES, encode_each
from .layout import MIN_TEXT_ROWS, PromptLayout
from .manifest import MANIFEST_NAME, SEGMENTS, LayerPlan, check_files, read_manifest
from .runners import (
    DECODE_CACHES,
    RunnerOptions,
    SegmentRunner,
    check_cache_rows,
    check_feeds,
    open_segment,
)

log = logging.getLogger(__name__)

# the engines' CPU threads when load() is given none (else onnxruntime's / torch's own default)
THREADS_ENV = "MLLMC_THREADS"
# the decode segment's inputs besides the cache
DECODE_INPUTS = ("input_ids", "position_ids", "cache_pad")
PREFILL_INPUTS = ("input_ids", "image_features", "visual_rows", "position_ids", "attention_mask")
# passes whose prefill takes the prompt's last row for its last text token: fastv scores the
# visual tokens by its attention, vte's exit keeps the text rows only
LAST_TEXT_ROW_PASSES = ("fastv", "vte")
# the most tokens one generate() call may ask for, whatever the model's positions
MAX_NEW_TOKENS = 100_000
# temperatures below this sample as greedy: softmax(logits / t) is argmax in the limit, and
# dividing by a smaller t overflows
MIN_TEMPERATURE = 1e-6


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    logits: np.ndarray  # (steps, V) float32: the logits that chose each generated token
    timings: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "timings": self.timings,
        }


@dataclass
class LoopOutput:
    tokens: list[int]
    logits: np.ndarray  # (steps, V) float32
    timings: dict[str, float]


class SegmentLoop:
    """vision -> prefill -> greedy/sampled decode over three `SegmentRunner`s.

    The decode cache is matched to the prefill's outputs by name: decode input `past.<l>.<kv>`
    is fed the prefill's (or the last decode step's) output `present.<l>.<kv>`."""

    def __init__(self, runners: Mapping[str, SegmentRunner]):
        self.runners = dict(runners)
        decode_inputs = [t.name for t in self.runners["decode"].entry.inputs]
        for seg, names, wanted in (
            ("prefill", [t.name for t in self.runners["prefill"].entry.inputs], PREFILL_INPUTS),
            ("decode", decode_inputs[: len(DECODE_INPUTS)], DECODE_INPUTS),
        ):
            if seg == "prefill" and "visual_start" in names:
                raise UserError(
                    "the artifact was compiled by an mllmc whose prefill took one image span "
                    "(manifest format 3 or older): recompile it with this mllmc"
                )
            if seg == "decode" and "cache_pad" not in decode_inputs:
                raise UserError(
                    "the artifact was compiled by an mllmc whose decode took one sample "
                    "(manifest format 4): recompile it with this mllmc"
                )
            if sorted(names) != sorted(wanted):
                raise UserError(f"corrupt artifact: the {seg} segment's inputs are {names}")
        self._past_names = [n for n in decode_inputs if n not in DECODE_INPUTS]
        self._present_of = {p: "present" + p[len("past") :] for p in self._past_names}
        # the most samples one decode step takes (None: any number), where the runner is bounded
        self.max_decode_batch: int | None = getattr(self.runners["decode"], "max_batch", None)
        self._position_rank = len(
            next(t.shape for t in self.runners["decode"].entry.inputs if t.name == "position_ids")
        )
        for seg in ("prefill", "decode"):
            outputs = {t.name for t in self.runners[seg].entry.outputs}
            missing = [n for n in ["logits", *self._present_of.values()] if n not in outputs]
            if missing or not all(p.startswith("past.") for p in self._past_names):
                raise UserError(
                    f"corrupt artifact: the {seg} segment does not output "
                    f"{', '.join(missing) or 'a cache for every past.* input'}"
                )
        self._cache_layers = _cache_layers(self._past_names)  # the layer of each cache input
        self._num_layers_cached = max(self._cache_layers) + 1  # cache_pad's rows
        # one sample's decode inputs: its position_ids' shape, and no left padding
        self._one_position = (3, 1, 1) if self._position_rank == 3 else (1, 1)
        self._no_pads = np.zeros((self._num_layers_cached, 1), dtype=np.int64)  # read only
        # a decode runner's step on the caches it returned, without feeds (in-place decoder)
        decoder = self.runners["decode"]
        self._continue_step = (
            decoder.continue_step
            if getattr(decoder, "cache_names", None) == self._past_names
            else None
        )
        prefill = self.runners["prefill"].entry
        # the vocabulary (logits' last dim), where the manifest fixes it: what token ids are
        # checked against
        self._vocab = _static_dim(prefill.outputs, "logits", -1)
        # the layer plan, where it is known (`Engine`): the visual rows each layer's cache holds
        self._plan: list[LayerPlan] | None = None
        self._min_visual = 1
        self._kv_visual: list[int] | None = None  # for the prompt last prefilled

    # -- the three segments -------------------------------------------------------------

    def encode_pixels(self, pixel_values: np.ndarray) -> dict[str, Any]:
        """(T, 3, H, W) tiles -> the vision segment's outputs, in its runner's arrays:
        `image_features` (T, K, d), and where the model has them `image_newline` (d,) and
        `patch_index` (T, K)."""
        return self.runners["vision"]({"pixel_values": pixel_values})

    def prefill(self, layout: PromptLayout, image_features: Any) -> tuple[np.ndarray, list[Any]]:
        """A laid-out prompt and its visual rows' features (1, V, d) -> (logits at the last row
        (vocab,) float32, KV cache per input `past.*` of the decode segment, in its order)."""
        if not isinstance(layout, PromptLayout):
            raise UserError(
                f"layout must be the PromptLayout encode_prompt() returned, got "
                f"{type(layout).__name__}"
            )
        layout.check(vocab_size=self._vocab)
        self._check_visual_rows(layout, image_features)
        runner = self.runners["prefill"]
        out = runner(
            {
                "input_ids": layout.input_ids,
                "image_features": image_features,
                "visual_rows": layout.visual_rows,
                "position_ids": layout.position_ids,
                "attention_mask": layout.attention_mask,
            }
        )
        if self._plan is not None:
            self._kv_visual = [p.kv_visual_rows(layout.num_visual) for p in self._plan]
        return runner.to_numpy(out["logits"])[0], [
            out[self._present_of[p]] for p in self._past_names
        ]

    def _check_visual_rows(self, layout: PromptLayout, image_features: Any) -> None:
        """UserError unless the layout's visual rows fit the features and the graphs' ranges."""
        v, n = layout.num_visual, layout.n
        shape = tuple(getattr(image_features, "shape", ()))
        if len(shape) != 3 or shape[0] != 1 or shape[1] != v:
            raise UserError(
                f"image_features must be (1, {v}, d) for the layout's {v} visual rows, got "
                f"shape {shape}"
            )
        if v < self._min_visual:
            raise UserError(
                f"the prompt has {v} visual row{'s' if v != 1 else ''}; this artifact's "
                f"passes need at least {self._min_visual} (give a larger image)"
            )
        if n - v < MIN_TEXT_ROWS:
            raise UserError(
                f"the prompt has {n - v} text token{'s' if n - v != 1 else ''} besides its "
                "images; mllmc needs at least "
                f"{MIN_TEXT_ROWS} (add text to the prompt)"
            )

    def decode_step(
        self, token_id: int, position: int, cache: list[Any]
    ) -> tuple[np.ndarray, list[Any]]:
        """One new token at `position` -> (logits (V,), cache with one more row per layer)."""
        if not _is_int(token_id):
            raise UserError(f"token_id must be an integer token id, got {token_id!r}")
        if not 0 <= token_id < (self._vocab or 2**62):  # the batch's check, without its arrays
            self._check_token_ids(np.array([token_id]), "token_id")
        if not _is_int(position) or not 0 <= position < 2**62:
            raise UserError(f"position must be an integer >= 0, got {position!r}")
        if not isinstance(cache, (list, tuple)) or len(cache) != len(self._past_names):
            got = f"{len(cache)} values" if isinstance(cache, (list, tuple)) else repr(cache)[:40]
            raise UserError(
                f"cache must be the list of {len(self._past_names)} arrays prefill() or "
                f"decode_step() returned, got {got}"
            )
        runner = self.runners["decode"]
        ids = np.full((1, 1), token_id, dtype=np.int64)
        positions = np.full(self._one_position, position, dtype=np.int64)
        if self._continue_step is not None:  # the in-place decoder, on the caches it returned
            step = self._continue_step(cache, ids, positions, self._no_pads)
            if step is not None:
                return runner.to_numpy(step[0])[0], step[1]
        feeds = {
            "input_ids": ids,
            "position_ids": positions,
            "cache_pad": self._no_pads,
            **dict(zip(self._past_names, cache, strict=True)),
        }
        owns = getattr(runner, "owns", None)  # the in-place decoder knows its own caches
        if self._kv_visual is not None and not (owns is not None and owns(cache)):
            check_feeds(runner.entry, feeds, "decode")
            check_cache_rows(feeds, self._kv_visual)
        out = runner(feeds)
        return runner.to_numpy(out["logits"])[0], [
            out[self._present_of[p]] for p in self._past_names
        ]

    def new_batch(self) -> DecodeBatch:
        """An empty `DecodeBatch` for this artifact's decode cache (samples join it with the
        cache prefill() returned)."""
        return DecodeBatch(self._cache_layers)

    def decode_batch_step(
        self, token_ids: Sequence[int], positions: Sequence[int], batch: DecodeBatch
    ) -> np.ndarray:
        """One step for every sample of `batch`: token_ids[b] at positions[b] for its b-th sample
        -> logits (B, V) float32; each sample's cache in `batch` gets one more row per layer."""
        b = len(batch)
        if b == 0:
            raise UserError("the batch is empty: join() a prefilled sample first")
        ids = np.asarray(token_ids)
        pos = np.asarray(positions)
        for name, value in (("token_ids", ids), ("positions", pos)):
            if value.shape != (b,) or value.dtype.kind not in "iu":
                raise UserError(
                    f"{name} must be {b} integers, one per sample of the batch, got "
                    f"{np.asarray(value).tolist()!r:.80}"
                )
        self._check_token_ids(ids, "token_ids")
        if pos.min() < 0:
            raise UserError(f"positions must be integers >= 0, got {pos.tolist()!r:.80}")
        if self.max_decode_batch is not None and b > self.max_decode_batch:
            most = self.max_decode_batch
            raise UserError(
                f"this engine decodes at most {most} sample{'s' if most != 1 else ''} a step, the "
                f"batch has {b}"
            )
        runner = self.runners["decode"]
        feeds = self._decode_feeds(ids, pos, batch.pads)
        feeds.update(zip(self._past_names, batch.cache, strict=True))
        out = runner(feeds)
        batch.cache = [out[self._present_of[p]] for p in self._past_names]
        return runner.to_numpy(out["logits"])

    def _decode_feeds(self, ids: Any, positions: Any, pads: np.ndarray) -> dict[str, Any]:
        """The decode step's inputs besides the cache for B samples: input_ids (B, 1),
        position_ids (B, 1) (for a family with 3-axis positions (3, B, 1), every axis the
        same: generated tokens are text), cache_pad (L, B)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1, 1)
        pos = np.asarray(positions, dtype=np.int64).reshape(-1, 1)
        if self._position_rank == 3:
            pos = np.ascontiguousarray(np.broadcast_to(pos[None], (3, *pos.shape)))
        pads = np.asarray(pads, dtype=np.int64)
        return {"input_ids": ids, "position_ids": pos, "cache_pad": pads}

    def _check_token_ids(self, ids: np.ndarray, what: str) -> None:
        """UserError unless the integers `ids` are token ids of the vocabulary."""
        low, high, vocab = ids.min(), ids.max(), self._vocab
        if low < 0 or (vocab is not None and high >= vocab):
            top = f"0 to {vocab - 1}" if vocab is not None else ">= 0"
            bad = low if low < 0 else high
            raise UserError(f"{what}: {bad} is not a token id of this model ({top})")

    # -- the loop -----------------------------------------------------------------------

    def loop(
        self,
        layout: PromptLayout,
        encode: Callable[[], Any],
        max_new_tokens: int,
        *,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> LoopOutput:
        """Generate up to `max_new_tokens` tokens (stopping after one in `eos_token_ids`) for
        `layout`, whose visual rows' features (1, V, d) `encode()` computes (timed as vision)."""
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        features = encode()
        t1 = time.perf_counter()
        logits, cache = self.prefill(layout, features)
        t2 = time.perf_counter()
        position = layout.next_position
        tokens: list[int] = []
        chosen: list[np.ndarray] = []
        while True:
            token = _choose(logits, temperature, top_k, rng)
            tokens.append(token)
            chosen.append(logits.astype(np.float32))
            if len(tokens) >= max_new_tokens or token in eos_token_ids:
                break
            logits, cache = self.decode_step(token, position, cache)
            position += 1
        t3 = time.perf_counter()
        steps = len(tokens) - 1
        return LoopOutput(
            tokens,
            np.stack(chosen),
            {
                "vision_s": t1 - t0,
                "prefill_s": t2 - t1,
                "decode_s_per_token": (t3 - t2) / steps if steps else 0.0,
                "total_s": t3 - t0,
            },
        )


def check_threads(threads: Any, name: str, cpus: int | None = None) -> int:
    """`threads` as a CPU thread count: an integer from 1 to `cpus` (None: os.cpu_count());
    else UserError naming `name` (the argument, option or variable it came from)."""
    cpus = cpus or os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
        raise UserError(f"{name} must be an integer from 1 to {cpus} here, got {threads!r}")
    return threads


def threads_from_env() -> int | None:
    """The CPU threads `MLLMC_THREADS` asks for, None where it is unset or empty. Engines
    that share the machine with other processes (test workers, several servers on one host, a
    container whose CPU quota is smaller than the host) set it so that each does not start one
    thread per core. A value that is not an integer from 1 to the number of CPUs is refused."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    try:
        threads: Any = int(value)
    except ValueError:
        threads = value[:40]  # refused below, shown as given
    return check_threads(threads, THREADS_ENV)


class Engine(SegmentLoop):
    """A loaded artifact. `generate()` is the whole pipeline; `encode_image()`, `prefill()` and
    `decode_step()` are its parts for callers that run their own loop."""

    def __init__(
        self,
        root: str | Path,
        providers: list[str] | None = None,
        threads: int | None = None,
        share_weights: bool = False,
        cuda_graphs: bool | None = None,
        decode_cache: str | None = None,
    ):
        from .images import image_inputs, prompt_encoder
        from .preprocess import check_image_size, read_image_processor_config

        _check_engine_args(providers, share_weights, cuda_graphs)
        threads = threads_from_env() if threads is None else check_threads(threads, "threads")
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if self.manifest.format_version == 4:
            raise UserError(
                f"{self.root} was compiled by an mllmc whose decode took one sample (manifest "
                "format 4): recompile it with this mllmc"
            )
        check_files(self.root, self.manifest)
        if cuda_graphs and self.manifest.target != "aoti":
            raise UserError(
                f"CUDA graphs are built for aoti artifacts on CUDA; {self.root} is a "
                f"{self.manifest.target} artifact"
            )
        if decode_cache is not None and decode_cache not in DECODE_CACHES:
            raise UserError(
                f"decode_cache must be None or one of {', '.join(DECODE_CACHES)}, "
                f"got {decode_cache!r}"
            )
        if decode_cache == "static" and self.manifest.target not in ("aoti", "onnx"):
            raise UserError(
                f"{self.root} is a {self.manifest.target} artifact: its decode cache grows"
            )
        options = RunnerOptions(
            tuple(providers) if providers else None,
            threads,
            share_weights,
            cuda_graphs,
            decode_cache,
        )
        runners = {
            name: open_segment(
                self.manifest.target,
                self.root,
                name,
                self.manifest.segments[name],
                self.manifest,
                options,
            )
            for name in SEGMENTS
        }
        # after the runners: an engine file of another model is named as such first
        self.manifest.check_dims(str(self.root / MANIFEST_NAME))
        super().__init__(runners)
        self._plan = list(self.manifest.layers)
        self._min_visual = self.manifest.min_visual_rows
        self.visual_tokens: int = self.manifest.visual_tokens
        self.num_layers: int = len(self.manifest.layers)
        self.eos_token_ids: set[int] = set(self.manifest.model.eos_token_ids)
        processor = read_image_processor_config(self.root)
        check_image_size(processor, self.manifest.model.image_size, self.root)
        self.images = image_inputs(self.manifest, processor)
        self.prompt_encoder = prompt_encoder(self.images, self.root)

    @property
    def text_only(self) -> bool:
        """Whether a prompt may hold no image: the artifact's prefill takes V = 0
        (`Manifest.min_visual_rows` 0: Qwen2-VL's, unless a pass needs visual rows)."""
        return self._min_visual == 0

    def encode_images(self, images: Any) -> tuple[Any, list[int]]:
        """An image or a list of images (paths, PIL images or HxWx3 uint8 arrays) -> (the
        features of their visual rows (1, V, d), in order; each image's row count). One vision
        call runs every image's tiles. An empty list, where the artifact takes text-only prompts
        (`text_only`): no rows, (1, 0, d), and no counts; no vision call runs."""
        if self.text_only and isinstance(images, (list, tuple)) and not images:
            return np.zeros((1, 0, self.manifest.model.hidden_size), np.float32), []
        return self.encode_tiles(*self.image_tiles(images))

    def image_tiles(self, images: Any) -> tuple[list[np.ndarray], list[Any]]:
        """An image or a list of images -> each image's tiles (T_i, 3, S, S) float32 and what
        packing its features needs; the host side of `encode_images` (no engine runs)."""
        items = _image_list(images)
        tiles, metas = zip(*(self.images.tiles(image) for image in items), strict=True)
        total = sum(1 if isinstance(t, dict) else t.shape[0] for t in tiles)  # dict: feeds
        if total > MAX_TILES:
            raise UserError(
                f"{len(items)} images make {total} vision tiles; one prompt takes at most "
                f"{MAX_TILES}: give fewer or smaller images"
            )
        return list(tiles), list(metas)

    def encode_tiles(self, tiles: list[np.ndarray], metas: list[Any]) -> tuple[Any, list[int]]:
        """`image_tiles`' output -> (the features of the images' visual rows (1, V, d); each
        image's row count), from one vision call over every tile (for a `per_image` family,
        one call per image: runtime/images.py)."""
        if getattr(self.images, "per_image", False):
            return encode_each(self.images, tiles, metas, self.runners["vision"])
        to_numpy = self.runners["vision"].to_numpy
        outputs = self.encode_pixels(np.concatenate(tiles))
        outputs = {name: to_numpy(value) for name, value in outputs.items()}
        rows, start = [], 0
        for image_tiles, meta in zip(tiles, metas, strict=True):
            end = start + image_tiles.shape[0]
            mine = {k: v[start:end] if k != "image_newline" else v for k, v in outputs.items()}
            rows.append(self.images.pack(mine, meta))
            start = end
        counts = [r.shape[0] for r in rows]
        return np.concatenate(rows)[None], counts

    def encode_image(self, image: Any) -> Any:
        """One image -> the features of its visual rows (1, rows, d)."""
        return self.encode_images([image])[0]

    def image_rows(self, images: Any) -> list[int]:
        """How many prompt rows each image takes. Runs the vision segment: after a pre-LLM pass
        on LLaVA-NeXT the count depends on which patches each tile keeps."""
        return self.encode_images(images)[1]

    def encode_prompt(self, prompt: str, counts: list[int] | None = None) -> PromptLayout:
        """prompt and each image's row count (`encode_images`' counts; LLaVA-1.5's default: one
        image) -> its layout: input ids, visual rows, positions, attention mask, next position."""
        if not isinstance(prompt, str):
            raise UserError(f"prompt must be a string, got {type(prompt).__name__}")
        if counts is not None and (
            not isinstance(counts, (list, tuple)) or not all(_is_int(c) and c >= 1 for c in counts)
        ):
            raise UserError(
                f"counts must be a list of integers >= 1 (each image's rows), got {counts!r:.60}"
            )
        if counts is None and self.manifest.model.reference_visual_rows:
            raise UserError(
                "counts is needed for this model: an image's rows depend on its size; pass the "
                "counts encode_images() returned"
            )
        layout = self.prompt_encoder.layout(
            prompt, [self.visual_tokens] if counts is None else counts
        )
        last = layout.n - 1
        if layout.num_visual and int(layout.visual_rows[-1]) == last:
            # the prompt ends with an image: refused where a pass reads the last row as text
            passes = [p.name for p in self.manifest.passes if p.name in LAST_TEXT_ROW_PASSES]
            if passes:
                image = self.prompt_encoder.image_token
                raise UserError(
                    f"the prompt ends with the image, but {passes[0]} needs a text token last; "
                    f"put text after {image} (e.g. '{image} Describe the image.')"
                )
        return layout

    def generate(
        self,
        image: Any = None,
        prompt: str | None = None,
        max_new_tokens: int = 32,
        *,
        images: list[Any] | None = None,
        stop_at_eos: bool = True,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        strict: bool = False,
    ) -> GenerationResult:
        """Greedy (temperature 0) or sampled (softmax of logits / temperature, over the top_k
        logits when top_k > 0) generation for an image, or a list of images (`image`, or
        `images=[...]`), and a prompt (with one image placeholder per image, or none: then the
        chat template puts the images first). Where the artifact takes text-only prompts
        (`text_only`), no image (`generate(None, prompt)` or `images=[]`) is one.

        A prompt plus `max_new_tokens` longer than the model's max_position_embeddings logs one
        warning (positions past it were never trained), or raises UserError when `strict`; one
        longer than the engines accept (their `max_seq_len`), or a `max_new_tokens` that alone
        is past max_position_embeddings or MAX_NEW_TOKENS, always raises UserError. Temperatures
        below MIN_TEMPERATURE are greedy."""
        vocab = self.manifest.model.vocab_size
        _check_bool(stop_at_eos, "stop_at_eos")
        _check_bool(strict, "strict")
        _check_generate_args(max_new_tokens, temperature, top_k, seed, vocab)
        if not isinstance(prompt, str):
            raise UserError(f"prompt must be a string, got {type(prompt).__name__}")
        if image is None and images is None and self.text_only:
            images = []  # a text-only prompt
        if (image is None) == (images is None):
            raise UserError("give the image (or a list of images) or images=[...], one of them")
        t0 = time.perf_counter()
        # the row counts come with the features (they may depend on the patches a tile keeps)
        features, counts = self.encode_images(image if images is None else images)
        vision_s = time.perf_counter() - t0
        layout = self.encode_prompt(prompt, counts)
        self._check_length(layout.n, max_new_tokens, strict)
        out = self.loop(
            layout,
            lambda: features,
            max_new_tokens,
            eos_token_ids=self.eos_token_ids if stop_at_eos else frozenset(),
            temperature=temperature,
            top_k=top_k,
            seed=seed,
        )
        timings = {
            **out.timings,
            "vision_s": vision_s,
            "total_s": out.timings["total_s"] + vision_s,
        }
        return GenerationResult(
            token_ids=out.tokens,
            text=self.prompt_encoder.decode(out.tokens),
            logits=out.logits,
            timings=timings,
            prompt_tokens=layout.n,
        )

    def generate_batch(
        self,
        images_list: Sequence[Any],
        prompts: Sequence[str],
        max_new_tokens: int | Sequence[int] = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int | Sequence[int | None] | None = None,
        *,
        stop_at_eos: bool = True,
    ) -> list[GenerationResult]:
        """`generate` for several samples at once: sample i has its own images
        (`images_list[i]`: an image or a list of them, any count and sizes) and prompt, and
        `max_new_tokens` (one for all, or one per sample). Each prompt is prefilled alone; the
        samples then decode together, one batched step a token, and a finished sample (EOS or
        its max_new_tokens) leaves the batch while the others go on. `seed`: None, an int
        (sample i is seeded seed + i) or one seed per sample; sample i gets what
        `generate(images_list[i], prompts[i], ..., seed=its seed)` gets alone. A UserError about
        one sample names it ("sample 2: ..."). Results in sample order."""
        from .batching import generate_batch

        _check_bool(stop_at_eos, "stop_at_eos")
        return generate_batch(
            self, images_list, prompts, max_new_tokens, temperature, top_k, seed, stop_at_eos
        )

    def _check_length(self, prompt_tokens: int, max_new_tokens: int, strict: bool) -> None:
        limit = self.manifest.model.max_position_embeddings
        # the last token generated is never fed back, so the model sees n + new - 1 positions
        positions = prompt_tokens + max_new_tokens - 1
        engine_limit = self.manifest.target_settings.max_seq_len
        if max_new_tokens > limit:
            raise UserError(
                f"max_new_tokens ({max_new_tokens}) alone is past the model's "
                f"max_position_embeddings ({limit}): lower max_new_tokens"
            )
        if prompt_tokens > limit:
            raise UserError(
                f"the prompt takes {prompt_tokens} tokens with its images, more than the model's "
                f"context of {limit} positions: give fewer or smaller images, or less text"
            )
        # the prompt, and the KV cache (at most the positions before the last) must fit
        if engine_limit is not None and max(prompt_tokens, positions - 1) > engine_limit:
            raise UserError(
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) needs "
                f"sequences of {max(prompt_tokens, positions - 1)}, past the {engine_limit} the "
                f"engines of {self.root} accept: shorten the prompt, lower max_new_tokens or "
                "recompile with a larger --max-seq-len"
            )
        if positions <= limit:
            return
        msg = (
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) reaches "
            f"position {positions}, past the model's max_position_embeddings ({limit})"
        )
        if strict:
            raise UserError(f"{msg}; shorten the prompt or lower max_new_tokens")
        log.warning("%s: output past position %d is unreliable", msg, limit)


def _cache_layers(past_names: list[str]) -> list[int]:
    """The layer l of each decode cache input `past.<l>.key` / `.value`."""
    layers = []
    for name in past_names:
        parts = name.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            raise UserError(f"corrupt artifact: the decode segment has an input named {name!r}")
        layers.append(int(parts[1]))
    if not layers:
        raise UserError("corrupt artifact: the decode segment takes no cache")
    return layers


def _image_list(images: Any) -> list[Any]:
    """An image or a list / tuple of images -> a non-empty list."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise UserError("no image given: pass an image or a list of images")
    return items


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _static_dim(specs: Any, name: str, axis: int) -> int | None:
    """Dim `axis` of tensor `name` among `specs` when the manifest fixes it (None otherwise)."""
    dim = next((t.shape[axis] for t in specs if t.name == name and t.shape), None)
    return dim if _is_int(dim) and dim > 0 else None


def _check_bool(value: Any, name: str) -> None:
    """TypeError unless `value` is a real bool (a string such as 'no' is truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_engine_args(providers: Any, share_weights: Any, cuda_graphs: Any) -> None:
    if providers is not None and (
        not isinstance(providers, (list, tuple)) or not all(isinstance(p, str) for p in providers)
    ):
        raise TypeError(
            "providers must be None or a list of onnxruntime provider names, e.g. "
            f"['CPUExecutionProvider'], got {providers!r}"
        )
    _check_bool(share_weights, "share_weights")
    if cuda_graphs is not None:
        _check_bool(cuda_graphs, "cuda_graphs")


def _check_generate_args(
    max_new_tokens: Any, temperature: Any, top_k: Any, seed: Any, vocab: int
) -> None:
    if not _is_int(max_new_tokens) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(
            f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}, got {max_new_tokens!r}"
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, np.floating, np.integer))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise UserError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not _is_int(top_k) or not 0 <= top_k <= vocab:
        raise UserError(
            f"top_k must be an integer from 0 to the vocabulary size {vocab}, got {top_k!r}"
        )
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise UserError(f"seed must be None or an integer >= 0, got {seed!r}")


def _choose(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """Greedy below MIN_TEMPERATURE; else a sample of softmax(logits / temperature), computed in
    float64 after subtracting the largest logit (so nothing overflows)."""
    if temperature < MIN_TEMPERATURE:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    if not np.isfinite(z).all():  # an inf or NaN logit has no softmax: take the largest
        return int(np.nanargmax(z)) if not np.isnan(z).all() else 0
    z = (z - z.max()) / temperature
    if top_k > 0:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z < cut, -np.inf, z)
    p = np.exp(z)
    p /= p.sum()
    return int(rng.choice(len(p), p=p))


def load(
    path: str | Path,
    providers: list[str] | None = None,
    threads: int | None = None,
    share_weights: bool = False,
    cuda_graphs: bool | None = None,
    decode_cache: str | None = None,
) -> Engine:
    """Load an artifact directory written by `mllmc compile`. `threads`: the CPU threads each
    segment runs on (None: `MLLMC_THREADS` where it is set, else onnxruntime's or torch's
    default, one per core). `share_weights=True`: the
    segments use the artifact's one copy of the weights in memory (ONNX: ~1x the weights instead
    of ~1.7x, decode slower on the CPU without onnxruntime's prepacked GEMM weights).
    `cuda_graphs` (aoti artifacts compiled for CUDA; None: on there, off elsewhere): vision and
    prefill replay one CUDA graph per input shape, and decode (`--decode-cache static`) one per
    step, instead of launching each op from the host. `decode_cache` (aoti, onnx): None runs
    the artifact's own choice; "growing" runs its growing-cache decode even where it also holds
    a static one; "static" requires one (onnx: the cache rows are written in place,
    runtime/inplace_cache.py)."""
    return Engine(
        path,
        providers=providers,
        threads=threads,
        share_weights=share_weights,
        cuda_graphs=cuda_graphs,
        decode_cache=decode_cache,
    )
