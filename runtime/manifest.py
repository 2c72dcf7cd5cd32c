"""The artifact manifest: one typed `Manifest` the compiler writes and the runtime, `inspect`,
`bench` and `verify` read. Shared by both sides, so it lives in the runtime (the bottom layer).

    Manifest
      target_settings             what the engines were built for: target (the runner), device,
                                  dtype, decode cache, longest sequence, weight precision
                                  (`TargetSettings`, `Precision`)
      model: ModelInfo            the source model's shapes, tokens and provenance
      passes: (AppliedPass, ...)  each pass as applied: name, config, stats, seconds
      segments: {name: SegmentEntry}   engine file + IO names / shapes / dtypes
      visual_tokens               image-span length per image entering the LLM (after pre-LLM passes)
      layers: (LayerPlan, ...)    per decoder layer: visual rows in its input and KV cache, and
                                  whether it computes its visual rows
      tol                         the logit tolerance (x the logits' scale) the engines are held
                                  to against the eager model run in their dtype

`read_manifest` checks the file against this schema (types included; no NaN or infinite number,
no key given twice), that the model's numbers are possible (sizes >= 1, token ids inside the
vocabulary) and that every file it names lies inside the artifact, so a corrupt or hand-edited
manifest is one clear `UserError`, never a KeyError deep in the runtime. `check_files` checks
the named files are there (and no link leads out of the artifact), `Manifest.check_dims` that
the model's numbers agree with the dims the segments' IO records fix. A manifest of format version 2 (target and dtype at the
top level, the other target settings in an untyped `extra` object) is read into the same typed
`Manifest`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, TypedDict, TypeVar

from .errors import UserError
from .jsonfile import JSONError, read_json

# 7: an onnx `decode_static` program with the fused attention takes the operator's small inputs
# from the host (FUSED_STEP_INPUTS: rotary angles, write rows, attention bias; its entry's
# `step_inputs` says how to compute them) instead of position_ids / cache_len / cache_pad; 6's
# fused program took those three (its static decode asks for a recompile; its growing decode
# runs); 6 added the fused program's `inplace.*` outputs (the buffers, written in place) beside
# the unfused one's new rows (`new.*`); the decode step takes a batch of samples, each one's cache
# left-padded by `cache_pad` rows, since 5; 4 decoded one sample at a time; 3 and 2 also took one
# image span at visual_start in the prefill instead of a prompt layout. Their manifests still
# read (for `inspect`); the engine asks for a recompile of 4 and older
FORMAT_VERSION = 7
READABLE_VERSIONS = (2, 3, 4, 5, 6, FORMAT_VERSION)  # 2 is converted on reading (`_from_version_2`)
MANIFEST_NAME = "manifest.json"
SEGMENTS = ("vision", "prefill", "decode")
DTYPES = ("float32", "bfloat16", "float16")  # the precisions an artifact's engines run in
DEVICES = ("cpu", "cuda")  # where they run ("cuda:<index>" names one GPU)
# growing: the decode program takes each layer's cache and returns it one row longer (a copy);
# static: it reads fixed-capacity buffers the runner owns and returns the new rows, so each step
# has the same shapes (one CUDA graph replay on aoti, runtime/static_cache.py) and the runner
# writes the rows in place (onnx, runtime/inplace_cache.py)
DECODE_CACHES = ("growing", "static")
# the fields of a segment's manifest entry that name files of the artifact
SEGMENT_FILE_FIELDS = ("file", "external_data", "packed_file")
STATIC_DECODE = "decode_static"  # the segment of a static-cache decode, beside "decode"
STATIC_DECODE_INPUTS = ("input_ids", "position_ids", "cache_len", "cache_pad")  # then past.*
# the fused static decode's inputs (then seqlens.<l> and bias.<l> for each layer l, then past.*):
# what its GroupQueryAttention nodes take, computed on the host from the inputs above
# (runtime/step_inputs.py), so the program runs no small ops before its first layer
FUSED_STEP_INPUTS = ("input_ids", "rotary_cos", "rotary_sin", "rotary_rows", "total_len")
# the logit tolerance of a float32 engine against float32 eager; also what a manifest that
# records no dtype / tolerance (written before they were recorded) is held to
FLOAT32_TOL = 1e-4
T = TypeVar("T")
# dataclass field metadata: the field's key in the manifest JSON, where it differs from its name
JSON_KEY = "json_key"


# weight-only block quantization: an ONNX artifact's MatMuls (MatMulNBits, symmetric, int4 or
# int8), an AOTInductor artifact's Linears (torchao's int4 weight-only, asymmetric) and embedding
QUANTIZED_WEIGHTS = ("int4", "int8")
# how the weights were quantized, by target: the scheme's name and the weights it builds
SCHEMES = {"onnx": "matmulnbits", "aoti": "torchao"}
SCHEME_WEIGHTS = {"matmulnbits": ("int4", "int8"), "torchao": ("int4",)}
TORCHAO_BLOCK_SIZES = (32, 64, 128)  # torchao's CPU int4 group sizes
# the model parts a quantized artifact may hold in low precision
QUANTIZED_PARTS = ("decoder", "lm_head", "embedding", "projector", "vision")


@dataclass(frozen=True)
class Precision:
    """The engines' weight precision, beside their compute dtype:

    weights         None: the dtype's own (nothing quantized); "int4" / "int8": block-wise
                    weight-only quantization, by `scheme`
    block_size      weights per scale along a MatMul's K (an embedding row's hidden dim)
    accuracy_level  MatMulNBits' compute: 0/1 float32, 2 float16, 3 bfloat16, 4 int8 activations
                    (None for torchao: its int4 kernel takes bfloat16 activations)
    parts           the model parts held in that precision (QUANTIZED_PARTS)
    scheme          "matmulnbits" (onnx; what a record without it means): symmetric, onnxruntime's
                    MatMulNBits and GatherBlockQuantized for an int4 embedding; "torchao" (aoti):
                    torchao's int4 weight-only for the Linears (a scale and a zero point per
                    block, torch's `_weight_int4pack_mm_for_cpu` on bfloat16 activations) and
                    the int4 GatherBlockQuantized scheme for the embedding

    A manifest without the record describes float engines. Invalid values raise ValueError."""

    weights: str | None = None
    block_size: int | None = None
    accuracy_level: int | None = None
    parts: tuple[str, ...] = ()
    scheme: str | None = None

    def __post_init__(self) -> None:
        if self.weights is None:
            if self.block_size is not None or self.accuracy_level is not None or self.parts:
                raise ValueError("precision: block_size, accuracy_level or parts without weights")
            if self.scheme is not None:
                raise ValueError("precision: a scheme without weights")
            return
        if self.weights not in QUANTIZED_WEIGHTS:
            raise ValueError(
                f"unknown weight precision {self.weights!r}; valid: {', '.join(QUANTIZED_WEIGHTS)}"
            )
        if self.weights not in SCHEME_WEIGHTS.get(self.method, ()):
            raise ValueError(
                f"precision: scheme {self.scheme!r} with {self.weights} weights; valid schemes: "
                + ", ".join(f"{k} ({'/'.join(v)})" for k, v in SCHEME_WEIGHTS.items())
            )
        size = self.block_size
        if size is None or size < 16 or size & (size - 1):
            raise ValueError(f"precision: block_size must be a power of two >= 16, got {size}")
        if self.method == "torchao":
            if self.accuracy_level is not None:
                raise ValueError("precision: torchao's int4 has no accuracy_level")
            if size not in TORCHAO_BLOCK_SIZES:
                raise ValueError(f"precision: torchao's block_size is 32, 64 or 128, got {size}")
        elif self.accuracy_level is None or not 0 <= self.accuracy_level <= 4:
            raise ValueError(f"precision: accuracy_level must be 0..4, got {self.accuracy_level}")
        unknown = [p for p in self.parts if p not in QUANTIZED_PARTS]
        if unknown or not self.parts:
            raise ValueError(f"precision: parts must be some of {', '.join(QUANTIZED_PARTS)}")

    def describe(self) -> str:
        """One phrase: 'float weights' or 'int4 weights (block 32, accuracy level 4: ...)'."""
        if self.weights is None:
            return "float weights"
        if self.method == "torchao":
            return (
                f"{self.weights} weights (torchao, block {self.block_size}, bf16 activations): "
                f"{', '.join(self.parts)}"
            )
        return (
            f"{self.weights} weights (block {self.block_size}, accuracy level "
            f"{self.accuracy_level}): {', '.join(self.parts)}"
        )

    @property
    def method(self) -> str | None:
        """The scheme (`matmulnbits` where a quantized record names none); None: float."""
        if self.weights is None:
            return None
        return self.scheme or SCHEMES["onnx"]


@dataclass(frozen=True)
class TargetSettings:
    """What an artifact's engines were built for, each field read by the runtime:

    target        the runner module that opens the engine files (runtime/runners/<target>.py)
    device        where they run: "cpu", "cuda" or "cuda:<index>" (aoti and trt runners)
    dtype         their floating precision, one of DTYPES (verify's eager oracle, KV-cache size)
    decode_cache  the decode the runtime runs by default: "static" (the artifact holds a
                  `decode_static` segment beside `decode`) or "growing"
    max_seq_len   the longest sequence (prompt, KV cache) the engines accept (trt: its shape
                  profiles), which `generate` refuses to pass; None: no bound but the model's
    precision     the weights' precision (`Precision`; default: the dtype's own)

    Invalid values raise ValueError (a corrupt manifest: UserError from `read_manifest`)."""

    target: str
    device: str
    dtype: str
    decode_cache: str = "growing"
    max_seq_len: int | None = None
    precision: Precision = Precision()

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("target must name a target")
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; valid devices: {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid dtypes: {', '.join(DTYPES)}")
        if self.decode_cache not in DECODE_CACHES:
            raise ValueError(
                f"unknown decode cache {self.decode_cache!r}; valid: {', '.join(DECODE_CACHES)}"
            )
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be None or >= 2, got {self.max_seq_len}")
        method = self.precision.method
        if method is not None and SCHEMES.get(self.target) != method:
            raise ValueError(
                f"{self.precision.weights} weights ({method}) on target {self.target!r}"
            )


@dataclass(frozen=True)
class ModelInfo:
    """What the compiler and the runtime need to know about a captured model."""

    model_dir: str
    config_hash: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    image_token_id: int
    # N_v per image from the vision tower, after the feature-select strategy (before any pass);
    # written to JSON as `num_visual_tokens`
    visual_tokens: int = field(metadata={JSON_KEY: "num_visual_tokens"})
    image_size: int
    vision_hidden_size: int
    vision_layers: int
    vision_patch_size: int
    eos_token_ids: tuple[int, ...]
    text_model_type: str
    max_position_embeddings: int
    # which tower rows reach the projector ("default": the patches, "full": [CLS] too)
    vision_feature_select_strategy: str = "default"
    # the visual rows of the reference image the layer plan and FLOPs are stated for (0: one
    # tile, `visual_tokens`; LLaVA-NeXT: an image at its largest square pinpoint)
    reference_visual_rows: int = 0
    reference_tiles: int = 1  # the vision tiles of that image
    # Qwen2-VL / Qwen2.5-VL (defaults elsewhere): the <|vision_start|> token, the patches merged
    # into one row per side, the frames per temporal patch, the temporal positions a second of
    # video spans, the M-RoPE split of a head's rotary pairs into (temporal, height, width)
    # (empty: 1-D positions), and the attention window in pixels (0: none; Qwen2.5-VL)
    vision_start_token_id: int | None = None
    spatial_merge_size: int = 1
    temporal_patch_size: int = 1
    tokens_per_second: int = 0
    mrope_section: tuple[int, ...] = ()
    vision_window_size: int = 0


def parse_keep(rule: str) -> tuple[int, int]:
    """A keep rule ("1", "0" or "p/q" with 0 <= p <= q) -> (p, q); ValueError otherwise."""
    num, _, den = rule.partition("/")
    p, q = int(num), int(den or 1)
    if not (0 <= p <= q and q >= 1) or str(rule) != (f"{p}/{q}" if den else str(p)):
        raise ValueError(f"not a keep rule: {rule!r} (want 1, 0 or p/q with 0 <= p <= q)")
    return p, q


def keep_count(v: Any, rule: str) -> Any:
    """floor(v·p/q + 1/2) for the keep rule "p/q": v·p/q rounded, halves up. Integer arithmetic
    only, so v may be an int or a traced symbolic size (a pass computes its kept count inside the
    prefill graph from the visual rows it is given, with this same function; one floor division
    keeps the count's range provable there)."""
    p, q = parse_keep(rule)
    return (2 * v * p + q) // (2 * q)


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer holds after the passes.

    visual_tokens: visual rows in this layer's input hidden state (per layer: a pruning pass or
    early exit leaves fewer rows in later layers than `Manifest.visual_tokens`);
    kv_visual_tokens: visual rows in its KV cache; visual_computed: whether the layer updates its
    visual rows (False: ShortV freezes them, they pass through unchanged). The two counts are
    for one reference image (`Manifest.visual_tokens` entering the LLM); `kv_visual_keep` is the
    rule that gives the cache's visual rows for any number V entering: "1" all, "0" none, "p/q"
    round(V·p/q), halves up (`keep_count`)."""

    index: int
    visual_tokens: int
    kv_visual_tokens: int
    visual_computed: bool = True
    kv_visual_keep: str = "1"

    def kv_visual_rows(self, entering: int) -> int:
        """Visual rows in this layer's KV cache for a prompt whose `entering` visual rows enter
        the LLM (the counts above are for one reference image; this holds for any layout)."""
        return keep_count(entering, self.kv_visual_keep)


@dataclass(frozen=True)
class AppliedPass:
    """A pass as it was applied: its resolved config, what it did, and how long it took."""

    name: str
    config: dict[str, Any]
    stats: dict[str, Any]
    seconds: float = 0.0


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # ints are static, strings name a dynamic dim
    dtype: str  # numpy dtype name: float32, int64, ...


@dataclass(frozen=True)
class StepInputs:
    """How the host computes a fused static decode step's inputs (FUSED_STEP_INPUTS) from the
    step's positions, cache lengths and padding (runtime/step_inputs.py):

    inv_freq      the rotary embedding's inverse frequencies (hd/2), as the model holds them
    rope_scaling  its attention scaling (cos and sin are multiplied by it)
    rope_axes     M-RoPE: the position axis (0 temporal, 1 height, 2 width) of each frequency;
                  empty: 1-D positions
    windows       each decoder layer's sliding window (None: the whole cache)"""

    inv_freq: tuple[float, ...]
    rope_scaling: float = 1.0
    rope_axes: tuple[int, ...] = ()
    windows: tuple[int | None, ...] = ()

    def __post_init__(self) -> None:
        if not self.inv_freq:
            raise ValueError("step_inputs: inv_freq is empty")
        if self.rope_axes and (
            len(self.rope_axes) != len(self.inv_freq) or not set(self.rope_axes) <= {0, 1, 2}
        ):
            raise ValueError("step_inputs: rope_axes must give an axis 0-2 to each frequency")
        if any(w is not None and w < 1 for w in self.windows):
            raise ValueError("step_inputs: a window must be None or >= 1")


@dataclass(frozen=True)
class SegmentEntry:
    """One segment's engine file (relative to the artifact) and its IO. `packed_file`: the same
    program with sibling projections run as one GEMM each (ONNX static decode), for sessions
    that prepack their weights; `file` serves the others (`load(..., share_weights=True)`).
    `step_inputs`: a fused static decode's host-computed inputs (`StepInputs`)."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: str | None = None
    packed_file: str | None = None
    step_inputs: StepInputs | None = None

    def files(self) -> list[str]:
        named = (getattr(self, field) for field in SEGMENT_FILE_FIELDS)
        return [f for f in named if f]


class FlopCounts(TypedDict):
    """FLOPs of each segment at the reference prompt (compiler/core/flops.py `segment_flops`)."""

    reference_text_tokens: int
    reference_prompt_tokens: int
    vision: int
    prefill: int
    decode_step: int


class Flops(TypedDict):
    before: FlopCounts  # the captured model
    after: FlopCounts  # the model after the passes


class Validation(TypedDict):
    """The compile-time check against the eager model: the keys every reader relies on (the
    check's report may hold more)."""

    max_abs_logit_diff: float
    steps: int
    tokens_match: bool


@dataclass(frozen=True)
class Manifest:
    format_version: int
    mllmc_version: str
    created: str
    target_settings: TargetSettings
    model: ModelInfo
    passes: tuple[AppliedPass, ...]
    segments: dict[str, SegmentEntry]
    visual_tokens: int
    layers: tuple[LayerPlan, ...]
    flops: Flops
    tol: float = FLOAT32_TOL
    validation: Validation | None = None
    # the fewest visual rows a prompt may hold (a pass's graph may need more than one)
    min_visual_rows: int = 1

    @property
    def target(self) -> str:
        """The runner module that opens the engine files (`target_settings.target`)."""
        return self.target_settings.target

    @property
    def dtype(self) -> str:
        """The engines' floating precision (`target_settings.dtype`)."""
        return self.target_settings.dtype

    @property
    def precision(self) -> Precision:
        """The weights' precision (`target_settings.precision`)."""
        return self.target_settings.precision

    @property
    def source(self) -> str:
        """The model directory the artifact was compiled from."""
        return self.model.model_dir

    @property
    def visual_tokens_per_layer(self) -> list[int]:
        return [layer.visual_tokens for layer in self.layers]

    def to_json(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST_NAME) -> Manifest:
        """Build a Manifest from parsed JSON (a version-2 manifest's converted first); UserError
        naming the first thing that is wrong."""
        if isinstance(data, dict) and data.get("format_version") == 2:
            data = _from_version_2(data)
        manifest = _build(cls, data, where)
        manifest.check(where)
        return manifest

    def check(self, where: str = MANIFEST_NAME) -> None:
        """Cross-field rules the types alone do not say."""

        def bad(msg: str) -> UserError:
            return UserError(f"corrupt artifact manifest {where}: {msg}")

        for seg in SEGMENTS:
            if seg not in self.segments:
                raise bad(f"no {seg!r} segment")
        for name, entry in self.segments.items():
            for f in entry.files():
                p = PurePosixPath(f)
                if p.is_absolute() or ".." in p.parts or f in ("", ".") or "\\" in f:
                    raise bad(f"segment {name!r} names file {f!r} outside the artifact")
        if len(self.layers) != self.model.num_layers:
            raise bad(f"{len(self.layers)} layer plans for a {self.model.num_layers}-layer model")
        if [layer.index for layer in self.layers] != list(range(len(self.layers))):
            raise bad("layer plans are not numbered 0..L-1")
        static = STATIC_DECODE in self.segments
        if static != (self.target_settings.decode_cache == "static"):
            raise bad(
                f"decode_cache {self.target_settings.decode_cache!r} with"
                f"{'' if static else 'out'} a {STATIC_DECODE!r} segment"
            )
        spec = self.segments[STATIC_DECODE].step_inputs if static else None
        if spec is not None and 2 * len(spec.inv_freq) != self.model.head_dim:
            raise bad(f"step_inputs: {len(spec.inv_freq)} rotary frequencies for head_dim "
                      f"{self.model.head_dim}")  # fmt: skip
        if spec is not None and bool(spec.rope_axes) != bool(self.model.mrope_section):
            raise bad("step_inputs: rope_axes must be given exactly when the model has M-RoPE")
        if spec is not None and len(spec.windows) != self.model.num_layers:
            raise bad(
                f"step_inputs: {len(spec.windows)} windows for {self.model.num_layers} layers"
            )
        text = {self.flops[k]["reference_text_tokens"] for k in ("before", "after")}
        if len(text) != 1:
            raise bad("flops before and after are counted at different prompts")
        if self.tol <= 0:
            raise bad(f"tol must be a positive number, got {self.tol}")
        if self.visual_tokens < 1:
            raise bad(f"visual_tokens must be >= 1, got {self.visual_tokens}")
        m_ref = self.model.reference_visual_rows
        for layer in self.layers:
            counts = (layer.visual_tokens, layer.kv_visual_tokens)
            if not all(0 <= c <= max(self.visual_tokens, m_ref) for c in counts):
                raise bad(f"layer {layer.index} has an impossible visual-token count {counts}")
            try:
                parse_keep(layer.kv_visual_keep)
            except ValueError as e:
                raise bad(f"layer {layer.index}: {e}") from None
        if self.min_visual_rows < 0:  # 0: a prompt may hold no image (Qwen2-VL's prefill)
            raise bad(f"min_visual_rows must be >= 0, got {self.min_visual_rows}")
        problem = self._model_problem()
        if problem:
            raise bad(problem)

    def _model_problem(self) -> str | None:
        """What makes `model`'s numbers impossible on their own (None if nothing does)."""
        m = self.model
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "image_size",
            "vision_hidden_size",
            "vision_layers",
            "vision_patch_size",
            "max_position_embeddings",
        ):
            if getattr(m, name) < 1:
                return f"model.{name} must be >= 1, got {getattr(m, name)}"
        if m.num_heads % m.num_kv_heads:
            return (
                f"model.num_heads {m.num_heads} is not a multiple of num_kv_heads {m.num_kv_heads}"
            )
        for name, ids in (
            ("image_token_id", (m.image_token_id,)),
            ("eos_token_ids", m.eos_token_ids),
        ):
            bad_ids = [i for i in ids if not 0 <= i < m.vocab_size]
            if bad_ids:
                return (
                    f"model.{name} {bad_ids[0]} is not a token id of a {m.vocab_size}-token "
                    "vocabulary"
                )
        if not self.passes and m.visual_tokens != self.visual_tokens:
            return (
                f"model.num_visual_tokens {m.visual_tokens} but {self.visual_tokens} visual "
                "tokens enter the LLM, with no pass applied"
            )
        if m.visual_tokens < self.visual_tokens:
            return (
                f"model.num_visual_tokens {m.visual_tokens} is fewer than the "
                f"{self.visual_tokens} visual tokens that enter the LLM"
            )
        return None

    def check_dims(self, where: str = MANIFEST_NAME) -> None:
        """UserError (a corrupt manifest) at the first dim the segments' IO records fix that
        contradicts the model's numbers: logits of vocab_size, image features of visual_tokens
        x hidden_size, images of image_size, caches of num_kv_heads x head_dim per layer. The
        engine (after its runners check each engine file against these records) and `inspect`
        call it, so an engine file of another model is named as such first."""
        m = self.model
        # (segment, "inputs"/"outputs", tensor name, axis, expected, what it is)
        wanted: list[tuple[str, str, str, int, int, str]] = [
            ("vision", "inputs", "pixel_values", -1, m.image_size, "model.image_size"),
            ("vision", "inputs", "pixel_values", -2, m.image_size, "model.image_size"),
            ("vision", "outputs", "image_features", 1, self.visual_tokens, "visual_tokens"),
            ("vision", "outputs", "image_features", -1, m.hidden_size, "model.hidden_size"),
        ]
        if m.mrope_section:  # Qwen2-VL: patches (N, 3·tp·p·p) in, merged rows (N / 4, d) out
            patch = 3 * m.temporal_patch_size * m.vision_patch_size**2
            wanted = [
                ("vision", "inputs", "pixel_values", -1, patch, "the patch size"),
                ("vision", "outputs", "image_features", -1, m.hidden_size, "model.hidden_size"),
            ]
        wanted += [
            ("prefill", "inputs", "image_features", 1, self.visual_tokens, "visual_tokens"),
            ("prefill", "inputs", "image_features", -1, m.hidden_size, "model.hidden_size"),
        ]
        for seg in ("prefill", "decode", STATIC_DECODE):
            wanted.append((seg, "outputs", "logits", -1, m.vocab_size, "model.vocab_size"))
        for seg in ("decode", STATIC_DECODE):
            for layer in range(m.num_layers):
                for kind in ("key", "value"):
                    name = f"past.{layer}.{kind}"
                    wanted.append((seg, "inputs", name, 1, m.num_kv_heads, "model.num_kv_heads"))
                    wanted.append((seg, "inputs", name, -1, m.head_dim, "model.head_dim"))
        for seg, kind, name, axis, expected, what in wanted:
            entry = self.segments.get(seg)
            specs = getattr(entry, kind) if entry is not None else ()
            for spec in specs:
                if spec.name != name or not -len(spec.shape) <= axis < len(spec.shape):
                    continue
                dim = spec.shape[axis]
                if isinstance(dim, int) and dim != expected:
                    raise UserError(
                        f"corrupt artifact manifest {where}: {what} is {expected}, but the "
                        f"{seg!r} segment's {name} has shape {list(spec.shape)}"
                    )


def read_manifest(artifact_dir: str | Path) -> Manifest:
    """Read and check `artifact_dir/manifest.json`; raise UserError with what is wrong."""
    root = Path(artifact_dir)
    if not root.is_dir():
        raise UserError(f"artifact {root} not found (make one with: mllmc compile MODEL -o {root})")
    path = root / MANIFEST_NAME
    if not path.is_file():
        if (root / "config.json").is_file():
            raise UserError(
                f"{root} is a model folder (config.json), not an mllmc artifact: compile it first "
                f"(mllmc compile {root} -o OUT) and give OUT"
            )
        raise UserError(f"{root} is not an mllmc artifact: {MANIFEST_NAME} is missing")
    try:
        data = read_json(path)  # no NaN: a compile whose check has none is refused
    except JSONError as e:
        raise UserError(f"corrupt artifact manifest {path}: {e}") from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise UserError(f"corrupt artifact manifest {path}: no format_version")
    version = data["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise UserError(
            f"corrupt artifact manifest {path}: format_version must be an integer, got "
            f"{json.dumps(version)[:40]}"
        )
    if version not in READABLE_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise UserError(
            f"artifact {root} has manifest format version {version!r}; this mllmc reads versions "
            f"{readable}: recompile it with this mllmc"
        )
    return Manifest.from_json(data, str(path))


def _from_version_2(data: dict[str, Any]) -> dict[str, Any]:
    """A version-2 manifest's JSON in this version's shape: its top-level `target` and `dtype`
    and its `extra` object (device, dtype, decode_cache, max_seq_len, each where the target
    wrote it) become `target_settings`, with the defaults that version ran with where a key is
    absent (trt on cuda, the others on cpu; a static decode where a decode_static segment is)."""
    extra = data.get("extra")
    extra = extra if isinstance(extra, dict) else {}
    target = data.get("target")
    segments = data.get("segments")
    static = isinstance(segments, dict) and STATIC_DECODE in segments
    settings = {
        "target": target,
        "device": extra.get("device", "cuda" if target == "trt" else "cpu"),
        "dtype": data.get("dtype", extra.get("dtype", "float32")),
        "decode_cache": extra.get("decode_cache", "static" if static else "growing"),
        "max_seq_len": extra.get("max_seq_len"),
    }
    dropped = ("target", "dtype", "extra", "decode_position_offset")
    rest = {k: v for k, v in data.items() if k not in dropped}
    return {**rest, "format_version": FORMAT_VERSION, "target_settings": settings}


def write_manifest(out: Path, manifest: Manifest) -> None:
    (out / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2))


def check_files(root: str | Path, manifest: Manifest) -> None:
    """UserError if an engine file the manifest names is not a file in the artifact directory,
    or is a link that leads out of it."""
    root = Path(root)
    named = list(dict.fromkeys(f for entry in manifest.segments.values() for f in entry.files()))
    missing = [f for f in named if not (root / f).is_file()]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UserError(f"corrupt artifact {root}: {', '.join(missing)} {verb} missing")
    inside = root.resolve()
    for f in named:
        target = (root / f).resolve()
        if not target.is_relative_to(inside):
            raise UserError(
                f"corrupt artifact {root}: {f} is a link to {target}, outside the artifact; "
                "copy the file into the artifact or recompile it"
            )


# ----------------------------------------------------------------------------------------------
# JSON <-> dataclasses, checking every type on the way in.


def from_json(tp: type[T], data: Any, where: str = MANIFEST_NAME) -> T:
    """Any manifest dataclass (`SegmentEntry`, `LayerPlan`, ...) from parsed JSON, type-checked."""
    return _build(tp, data, where)


def to_plain(obj: Any) -> Any:
    """`obj` as plain JSON values; a dataclass field is written under its JSON_KEY metadata,
    where it has one, else under its name."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.metadata.get(JSON_KEY, f.name): to_plain(getattr(obj, f.name)) for f in fields(obj)
        }
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(tp: Any, value: Any, where: str, path: str = "") -> Any:
    """`value` (parsed JSON) as an instance of type `tp`, or UserError naming `path`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if typing.is_typeddict(tp):
        return _build_typeddict(tp, value, where, path)
    if origin in (typing.Union, types.UnionType):
        return _build_union(tp, value, where, path)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, where, path)
    if origin is tuple:
        if not isinstance(value, list):
            raise _bad("a list", value, where, path)
        item = typing.get_args(tp)[0]
        return tuple(_build(item, v, where, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _bad("an object", value, where, path)
        return {k: _build(val_tp, v, where, f"{path}.{k}") for k, v in value.items()}
    if tp in (bool, int, float, str):
        return _build_scalar(tp, value, where, path)
    raise TypeError(f"manifest schema has an unsupported type {tp!r} at {path}")  # a bug


def _bad(expected: str, value: Any, where: str, path: str) -> UserError:
    """The error for `value` at `path` not being `expected`."""
    got = type(value).__name__
    return UserError(
        f"corrupt artifact manifest {where}: {path or 'top level'} should be {expected}, "
        f"got {got} {json.dumps(value)[:60] if _jsonable(value) else ''}".rstrip()
    )


def _build_typeddict(tp: Any, value: Any, where: str, path: str) -> dict[str, Any]:
    """A JSON object with the TypedDict's required keys at least; other keys kept as they are."""
    if not isinstance(value, dict):
        raise _bad("an object", value, where, path)
    hints = typing.get_type_hints(tp, include_extras=True)
    for key in sorted(tp.__required_keys__):
        if key not in value:
            missing = f"{path}.{key}" if path else key
            raise UserError(f"corrupt artifact manifest {where}: missing {missing!r}")
    return {
        k: _build(hints[k], v, where, f"{path}.{k}") if k in hints else v for k, v in value.items()
    }


def _build_union(tp: Any, value: Any, where: str, path: str) -> Any:
    """The first option of the union `tp` that `value` builds as; for `X | None`, X's own error."""
    options = typing.get_args(tp)
    if value is None and type(None) in options:
        return None
    types_ = [o for o in options if o is not type(None)]
    if len(types_) == 1:
        return _build(types_[0], value, where, path)
    for option in types_:
        with contextlib.suppress(UserError):
            return _build(option, value, where, path)
    raise _bad(" or ".join(_type_name(o) for o in options), value, where, path)


def _build_dataclass(tp: Any, value: Any, where: str, path: str) -> Any:
    """Manifest dataclass `tp` from a JSON object: every field without a default must be there,
    and the record's own rules (raised as ValueError) become a UserError."""
    if not isinstance(value, dict):
        raise _bad("an object", value, where, path)
    hints = typing.get_type_hints(tp)
    kwargs = {}
    for f in fields(tp):
        key = f.metadata.get(JSON_KEY, f.name)
        sub = f"{path}.{key}" if path else key
        if key not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"corrupt artifact manifest {where}: missing {sub!r}")
            continue
        kwargs[f.name] = _build(hints[f.name], value[key], where, sub)
    try:
        return tp(**kwargs)
    except ValueError as e:
        raise UserError(f"corrupt artifact manifest {where}: {path or 'top level'}: {e}") from None


def _build_scalar(tp: type, value: Any, where: str, path: str) -> Any:
    """A JSON bool, int (not a bool), finite number (as float) or string."""
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad("true or false", value, where, path)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad("an integer", value, where, path)
        return value
    if tp is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise _bad("a finite number", value, where, path)
        return float(value)
    if not isinstance(value, str):
        raise _bad("a string", value, where, path)
    return value


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
