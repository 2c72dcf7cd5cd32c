"""The artifact manifest: one typed `Manifest` the compiler writes and the runtime, `inspect`,
`bench` and `verify` read. Shared by both sides, so it lives in the runtime (the bottom layer).

    Manifest
      model: ModelInfo            the source model's shapes, tokens and provenance
      passes: (AppliedPass, ...)  each pass as applied: name, config, stats, seconds
      segments: {name: SegmentEntry}   engine file + IO names / shapes / dtypes
      visual_tokens               image-span length per image entering the LLM (after pre-LLM passes)
      layers: (LayerPlan, ...)    per decoder layer: visual rows in its input and KV cache, and
                                  whether it computes its visual rows
      decode_position_offset      first decode position = prompt tokens fed to prefill + offset
      dtype, tol                  the engines' precision, and the logit tolerance (x the logits'
                                  scale) they are held to against the eager model run in it

`read_manifest` checks the file against this schema (types included), and that every file it
names lies inside the artifact, so a corrupt or hand-edited manifest is one clear `UserError`,
never a KeyError deep in the runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, TypedDict, TypeVar

from .errors import UserError
from .jsonfile import JSONError, read_json

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
SEGMENTS = ("vision", "prefill", "decode")
DTYPES = ("float32", "bfloat16", "float16")  # the precisions an artifact's engines run in
# the logit tolerance of a float32 engine against float32 eager; also what a manifest that
# records no dtype / tolerance (written before they were recorded) is held to
FLOAT32_TOL = 1e-4
T = TypeVar("T")


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
    num_visual_tokens: int  # N_v per image from the vision tower, after the feature-select strategy
    image_size: int
    vision_hidden_size: int
    vision_layers: int
    vision_patch_size: int
    eos_token_ids: tuple[int, ...]
    text_model_type: str
    max_position_embeddings: int


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer holds after the passes.

    visual_tokens: visual rows in the layer's input hidden state; kv_visual_tokens: visual rows in
    its KV cache; visual_computed: whether the layer updates its visual rows (False: ShortV
    freezes them, they pass through unchanged)."""

    index: int
    visual_tokens: int
    kv_visual_tokens: int
    visual_computed: bool = True


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
class SegmentEntry:
    """One segment's engine file (relative to the artifact) and its IO."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: str | None = None

    def files(self) -> list[str]:
        return [self.file] + ([self.external_data] if self.external_data else [])


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


NON_FINITE = "NaN or infinity allowed"  # marks a float statistic that may be NaN / infinite


class Validation(TypedDict):
    """The compile-time check against the eager model: the keys every reader relies on (the
    check's report may hold more)."""

    max_abs_logit_diff: Annotated[float, NON_FINITE]
    steps: int
    tokens_match: bool


@dataclass(frozen=True)
class Manifest:
    format_version: int
    mllmc_version: str
    created: str
    target: str
    model: ModelInfo
    passes: tuple[AppliedPass, ...]
    segments: dict[str, SegmentEntry]
    visual_tokens: int
    layers: tuple[LayerPlan, ...]
    flops: Flops
    decode_position_offset: int = 0
    dtype: str = "float32"
    tol: float = FLOAT32_TOL
    validation: Validation | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # target-specific settings (device, ...)

    @property
    def source(self) -> str:
        """The model directory the artifact was compiled from."""
        return self.model.model_dir

    @property
    def visual_tokens_per_layer(self) -> list[int]:
        return [layer.visual_tokens for layer in self.layers]

    def to_json(self) -> dict[str, Any]:
        return _plain(asdict(self))

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST_NAME) -> Manifest:
        """Build a Manifest from parsed JSON; UserError naming the first thing that is wrong."""
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
        if self.dtype not in DTYPES:
            raise bad(f"unknown dtype {self.dtype!r}; valid dtypes: {', '.join(DTYPES)}")
        if self.tol <= 0:
            raise bad(f"tol must be a positive number, got {self.tol}")
        if self.visual_tokens < 1:
            raise bad(f"visual_tokens must be >= 1, got {self.visual_tokens}")
        for layer in self.layers:
            counts = (layer.visual_tokens, layer.kv_visual_tokens)
            if not all(0 <= c <= self.visual_tokens for c in counts):
                raise bad(f"layer {layer.index} has an impossible visual-token count {counts}")


def read_manifest(artifact_dir: str | Path) -> Manifest:
    """Read and check `artifact_dir/manifest.json`; raise UserError with what is wrong."""
    root = Path(artifact_dir)
    if not root.is_dir():
        raise UserError(f"artifact {root} not found (make one with: mllmc compile MODEL -o {root})")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{root} is not an mllmc artifact: {MANIFEST_NAME} is missing")
    try:
        data = read_json(path, allow_nan=True)  # a NaN check statistic mllmc recorded
    except JSONError as e:
        raise UserError(f"corrupt artifact manifest {path}: {e}") from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise UserError(f"corrupt artifact manifest {path}: no format_version")
    version = data["format_version"]
    if version != FORMAT_VERSION:
        raise UserError(
            f"artifact {root} has manifest format version {version!r}; this mllmc reads version "
            f"{FORMAT_VERSION}: recompile it with this mllmc"
        )
    return Manifest.from_json(data, str(path))


def write_manifest(out: Path, manifest: Manifest) -> None:
    (out / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2))


def check_files(root: str | Path, manifest: Manifest) -> None:
    """UserError if an engine file the manifest names is not in the artifact directory."""
    root = Path(root)
    missing = [
        f for entry in manifest.segments.values() for f in entry.files() if not (root / f).is_file()
    ]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise UserError(f"corrupt artifact {root}: {', '.join(missing)} {verb} missing")


# ----------------------------------------------------------------------------------------------
# JSON <-> dataclasses, checking every type on the way in.


def from_json(tp: type[T], data: Any, where: str = MANIFEST_NAME) -> T:
    """Any manifest dataclass (`SegmentEntry`, `LayerPlan`, ...) from parsed JSON, type-checked."""
    return _build(tp, data, where)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(tp: Any, value: Any, where: str, path: str = "") -> Any:
    """`value` (parsed JSON) as an instance of type `tp`, or UserError naming `path`."""

    def bad(expected: str) -> UserError:
        got = type(value).__name__
        return UserError(
            f"corrupt artifact manifest {where}: {path or 'top level'} should be {expected}, "
            f"got {got} {json.dumps(value)[:60] if _jsonable(value) else ''}".rstrip()
        )

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if typing.is_typeddict(tp):  # a JSON object with these keys at least; others kept as they are
        if not isinstance(value, dict):
            raise bad("an object")
        hints = typing.get_type_hints(tp, include_extras=True)
        for key in sorted(tp.__required_keys__):
            if key not in value:
                missing = f"{path}.{key}" if path else key
                raise UserError(f"corrupt artifact manifest {where}: missing {missing!r}")
        return {
            k: _build(hints[k], v, where, f"{path}.{k}") if k in hints else v
            for k, v in value.items()
        }
    if origin is Annotated:
        base, *marks = typing.get_args(tp)
        if NON_FINITE in marks and isinstance(value, float) and not math.isfinite(value):
            return value
        return _build(base, value, where, path)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        types_ = [o for o in options if o is not type(None)]
        if len(types_) == 1:  # X | None: X's own error says what is wrong
            return _build(types_[0], value, where, path)
        for option in options:
            if option is type(None):
                continue
            with contextlib.suppress(UserError):
                return _build(option, value, where, path)
        raise bad(" or ".join(_type_name(o) for o in options))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad("an object")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in fields(tp):
            sub = f"{path}.{f.name}" if path else f.name
            if f.name not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise UserError(f"corrupt artifact manifest {where}: missing {sub!r}")
                continue
            kwargs[f.name] = _build(hints[f.name], value[f.name], where, sub)
        return tp(**kwargs)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise bad("a list")
        item = args[0]
        return tuple(_build(item, v, where, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise bad("an object")
        return {k: _build(val_tp, v, where, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise bad("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise TypeError(f"manifest schema has an unsupported type {tp!r} at {path}")  # a bug


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
