"""ONNX runner: one onnxruntime session per segment. numpy in, numpy out; no torch."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..manifest import STATIC_DECODE, STATIC_DECODE_INPUTS
from . import RunnerOptions, check_feeds, check_io

if TYPE_CHECKING:
    from ..manifest import Manifest, SegmentEntry

# onnxruntime's log levels: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal. Its log goes
# straight to the terminal; its errors reach the user as exceptions (one UserError line) anyway
LOG_SEVERITY = 4

# onnxruntime's type strings -> the manifest's numpy dtype names
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


class OnnxRunner:
    """A segment's .onnx file in an onnxruntime session, checked against its manifest entry."""

    def __init__(self, path: Path, name: str, entry: SegmentEntry, options: RunnerOptions):
        self.entry = entry
        self.name = name
        self.path = path
        self.session = _session(path, options)
        for kind, found, expected in (
            ("inputs", self.session.get_inputs(), entry.inputs),
            ("outputs", self.session.get_outputs(), entry.outputs),
        ):
            io = [(a.name, a.shape, ORT_DTYPES.get(a.type, a.type)) for a in found]
            check_io(path, name, kind, io, expected)
        self._dtypes = {t.name: np.dtype(t.dtype) for t in entry.inputs}
        self._outputs = [t.name for t in entry.outputs]

    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        check_feeds(self.entry, feeds, self.name)
        cast = {k: np.asarray(v, dtype=self._dtypes[k]) for k, v in feeds.items()}
        try:
            outputs = self.session.run(self._outputs, cast)
        except Exception as e:  # onnxruntime's own Fail / InvalidArgument / ... classes
            raise UserError(f"the {self.name} engine failed: {first_line(e)}") from None
        return dict(zip(self._outputs, outputs, strict=True))

    def to_numpy(self, value: Any) -> np.ndarray:
        a = np.asarray(value)
        return a.astype(np.float32) if a.dtype.kind == "f" else a


def _session(path: Path, options: RunnerOptions) -> Any:
    import onnxruntime as ort

    ort.set_default_logger_severity(LOG_SEVERITY)  # the log outside sessions too
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = LOG_SEVERITY
    if options.threads:
        opts.intra_op_num_threads = options.threads
    if options.share_weights:
        # prepacking copies every GEMM weight into a per-session buffer (prefill and decode
        # would hold one each); without it the initializers stay mapped from weights.data
        opts.add_session_config_entry("session.disable_prepacking", "1")
    available = ort.get_available_providers()
    providers = list(options.providers or ["CPUExecutionProvider"])
    chosen = [p for p in providers if p in available]
    if options.providers and not chosen:
        raise UserError(
            f"none of the providers {providers} is available; available: {', '.join(available)}"
        )
    try:
        return ort.InferenceSession(str(path), opts, providers=chosen or None)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf classes
        raise UserError(f"corrupt engine file {path}: {first_line(e)}") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _same_dims(a: Any, b: Any) -> bool:
    """Whether two recorded shapes agree: the same rank, and equal sizes wherever either side
    fixes one (dynamic dims may be named differently)."""
    if a is None or len(a) != len(b):
        return False
    return all(
        x == y for x, y in zip(a, b, strict=True) if isinstance(x, int) or isinstance(y, int)
    )


def open_segment(
    root: Path, name: str, entry: SegmentEntry, manifest: Manifest, options: RunnerOptions
) -> Any:
    """The runner of segment `name`. With the static decode cache (the caller's
    `options.decode_cache`, else the artifact's own), decode runs the artifact's `decode_static`
    program over numpy buffers it writes in place (runtime/inplace_cache.py)."""
    decode_cache = options.decode_cache or manifest.target_settings.decode_cache
    if name != "decode" or decode_cache != "static":
        return OnnxRunner(root / entry.file, name, entry, options)
    static = manifest.segments.get(STATIC_DECODE)
    if static is None:
        raise UserError(
            f"artifact {root} has no static-cache decode: recompile it with --decode-cache static"
        )
    from ..step_inputs import fused_input_names

    fused = any(t.name.startswith("inplace.") for t in static.outputs)
    if fused and static.step_inputs is None and manifest.format_version >= 7:
        raise UserError(
            f"corrupt artifact manifest {root}: the fused decode_static has no step_inputs"
        )
    if fused and static.step_inputs is None:  # format 6: the operator's inputs made in the graph
        raise UserError(
            f"the decode_static program of {root} was written by an older mllmc (format "
            f"{manifest.format_version}): recompile it with this mllmc, or run its growing "
            "decode (mllmc run --decode-cache growing; load(..., decode_cache='growing'))"
        )
    past = [t.name for t in entry.inputs if t.name.startswith("past.")]
    small = (
        STATIC_DECODE_INPUTS if static.step_inputs is None else fused_input_names(len(past) // 2)
    )
    if [t.name for t in static.inputs] != [*small, *past]:
        raise UserError(
            f"the decode_static segment of {root} takes {[t.name for t in static.inputs][:4]}..., "
            "not this mllmc's: recompile it with this mllmc"
        )
    shapes = {t.name: list(t.shape) for t in static.inputs}
    for t in entry.inputs:  # the step inputs both programs take must agree
        if t.name in ("input_ids", "position_ids") and t.name not in shapes:
            continue  # a fused program takes the operator's inputs instead
        if t.name in ("input_ids", "position_ids") and not _same_dims(shapes.get(t.name), t.shape):
            raise UserError(
                f"corrupt artifact: {STATIC_DECODE} input {t.name!r} has shape "
                f"{shapes.get(t.name)}, the manifest's 'decode' segment says {list(t.shape)}"
            )
    from ..inplace_cache import InPlaceCacheDecoder

    # the packed program folds its projections' weights into new tensors, which a session that
    # prepacks holds instead of the three it would have packed; one that maps weights.data
    # (share_weights) would hold them as a second copy, so it runs the unpacked one
    file = static.packed_file if static.packed_file and not options.share_weights else static.file
    runner = OnnxRunner(root / file, STATIC_DECODE, static, options)
    return InPlaceCacheDecoder(name, entry, runner)
