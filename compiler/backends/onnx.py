"""ONNX backend: each exported segment -> `<segment>.onnx` (torch.onnx dynamo exporter), the
weights of all segments in one `weights.data` file they point into.

The exporter takes the `ExportedProgram` as it is after the passes, so what a pass removed from
the graph is absent from the ONNX. Dynamic dims get readable names (`n` for the prompt length,
`past_<l>` for layer l's cache length) and onnx.checker runs on every file. Weights go to
external data (`share_weights`): the prefill and decode graphs carry the same decoder weights,
and each distinct tensor is written to `weights.data` once, both graphs' initializers pointing
at the same offsets, so an artifact holds one copy of the weights, not two. With `--quantize`,
each segment's MatMuls are block-quantized right after its export (`quantize.py`, before
`share_weights`); prefill's and decode's quantized tensors are byte-identical, so they are
stored once too. The static decode step is also written with its sibling projections packed
(`packing.py`): `<segment>.packed.onnx` beside the unpacked graph, the same weights. With
`MLLMC_CACHE_DIR` set, exports are cached by segment (`export_cache.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from mllmc.compiler.core import compact_attention, fused_attention, fused_norm
from mllmc.compiler.core.segment_io import dim_names, rename_symbols
from mllmc.runtime.manifest import STATIC_DECODE, SegmentEntry, TensorSpec

from . import export_cache, packing

log = logging.getLogger(__name__)

OPSET = 18
EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB leave the exporter in `<file>.data`
SHARED_DATA = "weights.data"  # every segment's weights, each distinct tensor once
ALIGN = 4096  # tensor offsets in SHARED_DATA: page-aligned, so onnxruntime may map them
INLINE_BYTES = 4096  # smaller initializers (shapes, norms' eps...) stay inside the graph


def _segment_bytes(seg: Any) -> int:
    return sum(t.numel() * t.element_size() for t in seg.program.state_dict.values())


def _name_dims(model: onnx.ModelProto, seg: Any) -> None:
    """Give the dynamic dims stable names (the exporter calls them s2, s26, ...): the prompt
    length `n`, layer l's cache length `past_<l>`. Outputs carry expressions of the same symbols
    (`past_3 + 1`), renamed symbol by symbol: s2 never matches inside s26."""
    inputs = [
        (vi.name, [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim])
        for vi in model.graph.input
    ]
    renames = dim_names(seg.name, inputs)
    if not renames:
        return
    for vi in [*model.graph.input, *model.graph.output]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = rename_symbols(d.dim_param, renames)


def export_segment(seg: Any, out_dir: Path) -> SegmentEntry:
    """Write `out_dir/<seg.name>.onnx`; return its manifest entry (file, IO names/shapes/dtypes).
    With an export cache set (`export_cache`), an equal segment exported before is copied from
    it instead."""
    return export_cache.cached(_export, OPSET)(seg, out_dir)


def _export(seg: Any, out_dir: Path) -> SegmentEntry:
    path = out_dir / f"{seg.name}.onnx"
    external = _segment_bytes(seg) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            seg.program,
            seg.example_inputs,
            input_names=seg.input_names,
            output_names=seg.output_names,
            opset_version=OPSET,
            custom_translation_table={
                **compact_attention.onnx_translations(),
                **fused_attention.onnx_translations(),
                **fused_norm.onnx_translations(),
            },
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=external)
    model = onnx.load(str(path), load_external_data=False)
    _name_dims(model, seg)
    fused_attention.check_inplace_outputs(model)  # the fused decode's buffers alias its inputs
    onnx.save_model(model, str(path))  # external-data references are kept as they are
    onnx.checker.check_model(str(path))
    data = path.with_name(path.name + ".data")
    return SegmentEntry(
        file=path.name,
        inputs=tuple(_io(vi) for vi in model.graph.input),
        outputs=tuple(_io(vi) for vi in model.graph.output),
        external_data=data.name if data.exists() else None,
        step_inputs=getattr(seg, "step_inputs", None),
    )


def _io(vi: onnx.ValueInfoProto) -> TensorSpec:
    t = vi.type.tensor_type
    shape = tuple(d.dim_param or d.dim_value for d in t.shape.dim)
    return TensorSpec(vi.name, shape, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name)


def share_weights(out_dir: Path, entries: dict[str, SegmentEntry]) -> dict[str, SegmentEntry]:
    """Move every segment's initializers of INLINE_BYTES or more into one `SHARED_DATA` file,
    each distinct tensor (same dtype, shape and bytes) written once; return the entries with
    `external_data` pointing at it. The per-segment data files the exporter wrote are removed."""
    offsets: dict[tuple[int, tuple[int, ...], bytes], tuple[int, int]] = {}
    out = {}
    with open(out_dir / SHARED_DATA, "wb") as data:
        for name, entry in entries.items():
            path = out_dir / entry.file
            model = onnx.load(str(path), load_external_data=True)
            for init in model.graph.initializer:
                raw = _raw_bytes(init)
                if len(raw) < INLINE_BYTES:
                    continue
                key = (init.data_type, tuple(init.dims), hashlib.sha256(raw).digest())
                if key not in offsets:
                    start = -data.tell() % ALIGN + data.tell()
                    data.write(b"\0" * (start - data.tell()))
                    data.write(raw)
                    offsets[key] = (start, len(raw))
                offset, length = offsets[key]
                _point_at(init, offset, length)
            onnx.save_model(model, str(path))  # tensors already external: only the graph is written
            if entry.external_data:
                (out_dir / entry.external_data).unlink(missing_ok=True)
            onnx.checker.check_model(str(path))
            out[name] = dataclasses.replace(entry, external_data=SHARED_DATA)
    log.info("shared weights: %d distinct tensors in %s", len(offsets), SHARED_DATA)
    if STATIC_DECODE in out:
        out[STATIC_DECODE] = _write_packed(out_dir, out[STATIC_DECODE])
    return out


def _write_packed(out_dir: Path, entry: SegmentEntry) -> SegmentEntry:
    """`entry`'s graph with its sibling projections packed (`packing.pack_projections`), written
    beside it and named in the entry's `packed_file`; the entry as it is when nothing packs
    (a quantized graph's MatMulNBits, a model without such siblings)."""
    model = onnx.load(str(out_dir / entry.file), load_external_data=False)
    groups = packing.pack_projections(model)
    if not groups:
        return entry
    file = packing.packed_name(entry.file)
    onnx.save_model(model, str(out_dir / file))  # the same external tensors, the same offsets
    onnx.checker.check_model(str(out_dir / file))
    log.info("%s: %d groups of projections packed", file, groups)
    return dataclasses.replace(entry, packed_file=file)


def _raw_bytes(init: onnx.TensorProto) -> bytes:
    """The tensor's bytes as stored: raw_data as it is (int4 stays packed, two values a byte;
    numpy's view of it holds one a byte), else its numpy array's."""
    if init.HasField("raw_data"):
        return init.raw_data
    return onnx.numpy_helper.to_array(init).tobytes()


def _point_at(init: onnx.TensorProto, offset: int, length: int) -> None:
    """Make `init` an external tensor at SHARED_DATA[offset : offset + length]."""
    dims, data_type, name = list(init.dims), init.data_type, init.name
    init.Clear()
    init.name, init.data_type = name, data_type
    init.dims.extend(dims)
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", SHARED_DATA), ("offset", offset), ("length", length)):
        init.external_data.add(key=key, value=str(value))
