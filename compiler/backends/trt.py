"""TensorRT backend (torch-tensorrt's dynamo path): each exported segment -> `<segment>.ep`, an
ExportedProgram whose graph holds TensorRT engines, built for CUDA from the program as it is
after the passes.

NOT RUN in this repository: TensorRT cannot be installed where mllmc is built and tested. The
code is written against torch-tensorrt 2.5+ (`torch_tensorrt.dynamo.compile`, `Input(min_shape,
opt_shape, max_shape)`, `torch_tensorrt.save(..., output_format="exported_program")`); the parts
that need neither TensorRT nor a GPU (input shape ranges, precisions, capability detection,
manifest entries) are what tests/compiler/test_trt.py checks.

Dynamic dims become TensorRT optimisation profiles: the prompt length `n` ranges from the image
span + 2 to `max_seq_len` (default: the capture's maximum, 8192), each layer's cache length
`past_<l>` from 1 to `max_seq_len`; the profile is tuned (`opt`) for an image span plus
OPT_TEXT_TOKENS text tokens. Precision: float16 by default (float32 / bfloat16 on request).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllmc.runtime.errors import UserError

OPT_TEXT_TOKENS = 64
INSTALL = "pip install 'mllmc[trt]'"
# engine precision -> the precisions TensorRT may choose kernels in
PRECISIONS = {
    "float32": ("float32",),
    "float16": ("float16", "float32"),
    "bfloat16": ("bfloat16", "float32"),
}


@dataclass(frozen=True)
class InputSpec:
    """One engine input: its name, dtype and the shape range of its optimisation profile."""

    name: str
    dtype: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]


def missing_requirements(cuda_available: bool, has_module: Any = None) -> list[str]:
    """What a TensorRT build or run lacks here: 'a CUDA device', 'tensorrt', 'torch_tensorrt'."""
    has_module = has_module or (lambda m: importlib.util.find_spec(m) is not None)
    missing = [] if cuda_available else ["a CUDA device"]
    return missing + [m for m in ("tensorrt", "torch_tensorrt") if not has_module(m)]


def check_available(what: str = "target 'trt'") -> None:
    """UserError naming what is missing (no CUDA, no tensorrt, no torch_tensorrt)."""
    import torch

    missing = missing_requirements(torch.cuda.is_available())
    if missing:
        raise UserError(
            f"{what} needs {', '.join(missing)}: {INSTALL} on a machine with an NVIDIA GPU "
            "(or use --target onnx / aoti)"
        )


def input_specs(inputs: list[dict[str, Any]], max_seq_len: int) -> list[InputSpec]:
    """Shape ranges for a segment's inputs (manifest records: name, shape, dtype), its dynamic
    dims named as the manifest names them (`n`, `past_<l>`). The image span N_v is the
    prefill's static `image_features` length; a decode segment has cache lengths only."""
    span = next((t["shape"][1] for t in inputs if t["name"] == "image_features"), 0)
    low = {"n": span + 2}
    if max_seq_len < max(low["n"], 2):
        raise UserError(
            f"--max-seq-len {max_seq_len} is shorter than the image span + 2 ({low['n']} tokens)"
        )
    opt = min(max_seq_len, span + OPT_TEXT_TOKENS)
    specs = []
    for t in inputs:
        ranges = []
        for d in t["shape"]:
            if isinstance(d, int):
                ranges.append((d, d, d))
            elif d == "n" or d.startswith("past_"):
                lo = low.get(d, 1)
                ranges.append((lo, max(lo, opt), max_seq_len))
            else:
                raise ValueError(f"input {t['name']} has a dim {d!r} with no known range")
        mins, opts, maxs = (tuple(r[i] for r in ranges) for i in range(3))
        specs.append(InputSpec(t["name"], t["dtype"], mins, opts, maxs))
    return specs


def compile_segment(seg: Any, out_dir: Path, dtype: str, max_seq_len: int) -> dict[str, Any]:
    """Write `out_dir/<seg.name>.ep` (TensorRT engines inside an ExportedProgram); return its
    manifest entry. Unrun here (see the module docstring)."""
    import torch
    import torch_tensorrt

    from ..segment_io import segment_io
    from ..torch_engine import on_device

    io = segment_io(seg)
    specs = input_specs(io["inputs"], max_seq_len)
    on_device(seg.program, "cuda")
    trt_inputs = [
        torch_tensorrt.Input(
            min_shape=s.min_shape,
            opt_shape=s.opt_shape,
            max_shape=s.max_shape,
            dtype=getattr(torch, s.dtype),
            name=s.name,
        )
        for s in specs
    ]
    module = torch_tensorrt.dynamo.compile(
        seg.program,
        inputs=trt_inputs,
        enabled_precisions={getattr(torch, p) for p in PRECISIONS[dtype]},
        truncate_double=True,
    )
    path = out_dir / f"{seg.name}.ep"
    examples = [t.to("cuda") for t in seg.example_inputs]
    torch_tensorrt.save(module, str(path), output_format="exported_program", inputs=examples)
    return {"file": path.name, "external_data": None, **io}
