"""Backends: exported segment -> engine file. `get_backend(target, options)` returns a
`Backend`: called on each segment, it writes the engine file and returns the segment's manifest
entry (`SegmentEntry`); `settings` (`TargetSettings`: target, device, dtype, decode cache,
longest sequence) go into the manifest, `tol` is the logit tolerance the compile validation
holds it to."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllmc.compiler.core.model_dir import MAX_SEQ
from mllmc.runtime.errors import UserError
from mllmc.runtime.manifest import (
    DECODE_CACHES,
    DTYPES,
    FLOAT32_TOL,
    SCHEMES,
    SegmentEntry,
    TargetSettings,
    TensorSpec,
)

TARGETS = ("onnx", "aoti", "trt")
DEFAULT_DTYPE = {"onnx": "float32", "aoti": "float32", "trt": "float16"}
# compile validation against eager in the same dtype: fp32 holds 1e-4 (docs/promises.md); a
# 16-bit engine's kernels round differently from eager's, by up to a few units of the last bit
DTYPE_TOL = {"float32": FLOAT32_TOL, "bfloat16": 0.25, "float16": 0.05}


def cast_model(model: Any, dtype: str) -> Any:
    """The eager model in `dtype` (one of DTYPES): what an engine of that dtype is held to."""
    if dtype == "float32":
        return model
    import torch

    return model.to(getattr(torch, dtype))


# the targets whose runtime runs a static-cache decode (aoti: CUDA graphs; onnx: in place)
STATIC_TARGETS = ("aoti", "onnx")


@dataclass(frozen=True)
class TargetOptions:
    """Where and in what precision a target's engines run."""

    device: str = "cpu"
    dtype: str | None = None  # None: the target's default (DEFAULT_DTYPE)
    max_seq_len: int | None = None  # trt: the longest prompt / cache its profiles accept
    # None: static for aoti on CUDA (decode as CUDA graphs) and for onnx (rows written in
    # place), growing otherwise
    decode_cache: str | None = None
    # weight-only int4 / int8 (a `quantize.QuantizeConfig`: onnx MatMulNBits, aoti torchao int4);
    # None: float weights
    quantize: Any = None


def segment_entry(
    file: str, io: dict[str, list[dict[str, Any]]], external_data: str | None = None
) -> SegmentEntry:
    """A segment's manifest entry: its engine file and its IO records (`segment_io`)."""

    def specs(records: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in records)

    return SegmentEntry(file, specs(io["inputs"]), specs(io["outputs"]), external_data)


Entries = dict[str, SegmentEntry]


@dataclass(frozen=True)
class Backend:
    export: Callable[[Any, Path], SegmentEntry]
    options: TargetOptions
    settings: TargetSettings  # what the manifest records the engines were built for

    # after every segment is written: (out_dir, entries) -> entries (e.g. one weights file)
    finish: Callable[[Path, Entries], Entries] | None = None
    # the static-cache decode's attention as one fused operator (onnxruntime's
    # GroupQueryAttention, writing the cache in place): capture.StaticCacheDecodeSegment
    fused_attention: bool = False

    def __call__(self, seg: Any, out_dir: Path) -> SegmentEntry:
        return self.export(seg, out_dir)

    def finish_artifact(self, out_dir: Path, entries: Entries) -> Entries:
        return self.finish(out_dir, entries) if self.finish else entries

    def prepare(self, model: Any) -> Any:
        """The eager model in the engines' dtype (and, for torchao, with its int4 weights):
        captured, and validated against, in it."""
        model = cast_model(model, str(self.options.dtype))
        precision = self.settings.precision
        if precision.method == "torchao":
            from .torchao_int4 import quantize_model

            quantize_model(model, precision)
        return model

    @property
    def tol(self) -> float:
        if self.options.quantize is not None:
            from .quantize import quantized_tol

            return quantized_tol(self.options.quantize.record())
        return DTYPE_TOL[self.options.dtype]


def check_options(target: str, options: TargetOptions) -> None:
    """UserError for a dtype or device the target cannot build for here."""
    if options.dtype not in DTYPES:
        raise UserError(f"unknown dtype {options.dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    if target == "onnx" and (options.device != "cpu" or options.dtype != "float32"):
        raise UserError(
            "target 'onnx' builds float32 engines for onnxruntime (--device cpu --dtype "
            "float32); use --target aoti for another device or dtype"
        )
    if options.device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {options.device!r}; valid devices: cpu, cuda")
    if options.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device cuda: no CUDA device on this machine (target {target!r})")


def resolve_options(target: str, options: TargetOptions | None = None) -> TargetOptions:
    """The target's options with its defaults filled in, or UserError for what it cannot build.
    Imports nothing heavy (torch only to ask whether CUDA is there), so that `mllmc compile`
    refuses bad options before it loads anything."""
    options = options or TargetOptions()
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; valid targets: {', '.join(TARGETS)}")
    if options.quantize is not None:
        scheme = options.quantize.record().method
        if target not in SCHEMES:
            raise UserError(
                f"--quantize builds weight-only engines for --target onnx (onnxruntime's "
                f"MatMulNBits, int4 / int8) and aoti (torchao's int4); target {target!r} has none"
            )
        if SCHEMES[target] != scheme:
            raise UserError(
                f"these --quantize settings are {scheme}'s, target {target!r} quantizes with "
                f"{SCHEMES[target]}: make them with quantize_config(..., target={target!r})"
            )
        if target == "aoti" and (options.device != "cpu" or options.dtype not in (None, "float32")):
            raise UserError(
                "--quantize on --target aoti builds float32 CPU engines (torchao's int4 CPU "
                "layout): use --device cpu --dtype float32"
            )
    if options.max_seq_len is not None:
        if target != "trt":
            raise UserError(
                f"--max-seq-len sizes TensorRT's shape profiles (--target trt); target "
                f"{target!r} accepts any length up to {MAX_SEQ}"
            )
        if not 2 <= options.max_seq_len <= MAX_SEQ:
            raise UserError(
                f"--max-seq-len must be between 2 and {MAX_SEQ}, got {options.max_seq_len}"
            )
    if options.dtype is None:
        options = dataclasses.replace(options, dtype=DEFAULT_DTYPE[target])
    if options.decode_cache is None:
        static = (target == "aoti" and options.device == "cuda") or target == "onnx"
        options = dataclasses.replace(options, decode_cache="static" if static else "growing")
    if options.decode_cache not in DECODE_CACHES:
        raise UserError(
            f"unknown decode cache {options.decode_cache!r}; valid: {', '.join(DECODE_CACHES)}"
        )
    if options.decode_cache == "static" and target not in STATIC_TARGETS:
        raise UserError(
            f"--decode-cache static is built for --target {' and '.join(STATIC_TARGETS)}; target "
            f"{target!r} decodes with a growing cache"
        )
    if target == "trt":
        from . import trt

        if options.device == "cpu":  # the CLI's default device; TensorRT runs on CUDA only
            options = dataclasses.replace(options, device="cuda")
        if options.dtype not in DTYPES:
            raise UserError(f"unknown dtype {options.dtype!r}; valid dtypes: {', '.join(DTYPES)}")
        trt.check_available()
    check_options(target, options)
    return options


def get_backend(target: str, options: TargetOptions | None = None) -> Backend:
    return build_backend(target, resolve_options(target, options))


def build_backend(target: str, options: TargetOptions) -> Backend:
    """The backend for options `resolve_options` returned (it checks; this only builds)."""
    settings = TargetSettings(
        target=target,
        device=options.device,
        dtype=str(options.dtype),
        decode_cache=str(options.decode_cache),
        # trt's shape profiles bound the sequence; the other targets accept the capture's range
        max_seq_len=(options.max_seq_len or MAX_SEQ) if target == "trt" else None,
    )
    if options.quantize is not None:
        settings = dataclasses.replace(settings, precision=options.quantize.record())
    if target == "trt":
        from . import trt

        max_seq = int(settings.max_seq_len or MAX_SEQ)
        return Backend(
            lambda seg, out: trt.compile_segment(seg, out, settings.dtype, max_seq),
            options,
            settings,
        )
    if target == "onnx":
        from .onnx import export_segment, share_weights

        export: Callable[[Any, Path], SegmentEntry] = export_segment
        if options.quantize is not None:
            from .quantize import quantized_export

            export = functools.partial(quantized_export, options.quantize)
        return Backend(export, options, settings, finish=share_weights, fused_attention=True)
    from .aoti import WeightStore, compile_segment

    store = WeightStore()  # the weights of all three segments, each tensor once
    return Backend(
        lambda seg, out: compile_segment(seg, out, options.device, store),
        options,
        settings,
        finish=store.save,
    )
