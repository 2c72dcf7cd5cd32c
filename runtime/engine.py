"""Engine: runs an mllmc artifact (vision -> prefill -> decode loop) with onnxruntime.

No torch, and no knowledge of passes: the prefill graph already holds every rewrite, and each
layer's KV cache is whatever the prefill returned for it (passes may leave layers with different
cache lengths; decode just appends one row to each). Positions continue from the prompt length n,
as recorded in the manifest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .manifest import SEGMENTS, check_files, read_manifest

log = logging.getLogger(__name__)


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


def _session(path: Path, providers: list[str] | None, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    available = ort.get_available_providers()
    chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available]
    if providers and not chosen:
        raise UserError(
            f"none of the providers {providers} is available; available: {', '.join(available)}"
        )
    try:
        return ort.InferenceSession(str(path), opts, providers=chosen or None)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf classes
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"corrupt engine file {path}: {first}") from None


class Engine:
    """A loaded artifact. `generate()` is the whole pipeline; `prefill()` / `decode_step()` are
    the two halves for callers that run their own loop."""

    def __init__(
        self, root: str | Path, providers: list[str] | None = None, threads: int | None = None
    ):
        from .preprocess import ImagePreprocessor, PromptEncoder, read_image_processor_config

        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        check_files(self.root, self.manifest)
        self.sessions = {
            name: _session(self.root / self.manifest.segments[name].file, providers, threads)
            for name in SEGMENTS
        }
        self.num_visual_tokens: int = self.manifest.visual_tokens
        self.num_layers: int = len(self.manifest.layers)
        self.eos_token_ids: set[int] = set(self.manifest.model.eos_token_ids)
        self.image_preprocessor = ImagePreprocessor(read_image_processor_config(self.root))
        self.prompt_encoder = PromptEncoder.from_dir(self.root)
        self._past_names = [i.name for i in self.sessions["decode"].get_inputs()][2:]

    # -- the three segments ---------------------------------------------------------------

    def encode_image(self, image: Any) -> np.ndarray:
        """image (path, PIL image or HxWx3 uint8 array) -> image features (1, N_v, d)."""
        pixel_values = self.image_preprocessor(image)  # (1, 3, H, W)
        (features,) = self.sessions["vision"].run(None, {"pixel_values": pixel_values})
        return features

    def prefill(
        self, input_ids: np.ndarray, image_features: np.ndarray, visual_start: int
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids (1, n) int64 -> (logits at the last position (V,), KV cache per layer)."""
        outputs = self.sessions["prefill"].run(
            None,
            {
                "input_ids": input_ids.astype(np.int64),
                "image_features": image_features.astype(np.float32),
                "visual_start": np.array([visual_start], dtype=np.int64),
            },
        )
        return outputs[0][0], outputs[1:]

    def decode_step(
        self, token_id: int, position: int, cache: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One new token at `position` -> (logits (V,), cache with one more row per layer)."""
        feeds = {
            "input_ids": np.array([[token_id]], dtype=np.int64),
            "position_ids": np.array([[position]], dtype=np.int64),
        }
        feeds.update(zip(self._past_names, cache, strict=True))
        outputs = self.sessions["decode"].run(None, feeds)
        return outputs[0][0], outputs[1:]

    # -- generation ---------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> tuple[np.ndarray, int]:
        return self.prompt_encoder.encode(prompt, self.num_visual_tokens)

    def generate(
        self,
        image: Any,
        prompt: str,
        max_new_tokens: int = 32,
        *,
        stop_at_eos: bool = True,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> GenerationResult:
        """Greedy (temperature 0) or sampled generation for one image + prompt."""
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        rng = np.random.default_rng(seed)
        input_ids, visual_start = self.encode_prompt(prompt)
        t0 = time.perf_counter()
        features = self.encode_image(image)
        t1 = time.perf_counter()
        logits, cache = self.prefill(input_ids, features, visual_start)
        t2 = time.perf_counter()
        position = input_ids.shape[1] + self.manifest.decode_position_offset
        tokens: list[int] = []
        chosen: list[np.ndarray] = []
        while True:
            token = _choose(logits, temperature, top_k, rng)
            tokens.append(token)
            chosen.append(logits.astype(np.float32))
            if len(tokens) >= max_new_tokens or (stop_at_eos and token in self.eos_token_ids):
                break
            logits, cache = self.decode_step(token, position, cache)
            position += 1
        t3 = time.perf_counter()
        decode_steps = max(len(tokens) - 1, 1)
        return GenerationResult(
            token_ids=tokens,
            text=self.prompt_encoder.decode(tokens),
            logits=np.stack(chosen),
            timings={
                "vision_s": t1 - t0,
                "prefill_s": t2 - t1,
                "decode_s_per_token": (t3 - t2) / decode_steps if len(tokens) > 1 else 0.0,
                "total_s": t3 - t0,
            },
            prompt_tokens=int(input_ids.shape[1]),
        )


def _choose(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k > 0:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z < cut, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(len(p), p=p))


def load(
    path: str | Path, providers: list[str] | None = None, threads: int | None = None
) -> Engine:
    """Load an artifact directory written by `mllmc compile`."""
    return Engine(path, providers=providers, threads=threads)
