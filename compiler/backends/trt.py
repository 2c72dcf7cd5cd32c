"""TensorRT backend (torch-tensorrt's dynamo path): each exported segment -> `<segment>.ep`, an
ExportedProgram whose graph holds TensorRT engines, built for CUDA from the program as it is
after the passes.

NOT RUN in this repository: TensorRT cannot be installed where mllmc is built and tested. The
code is written for torch-tensorrt 2.14 (TensorRT 11), and calls only what 2.13, the release
built for this project's torch 2.13, accepts with the same meaning:
`torch_tensorrt.Input(min_shape=, opt_shape=, max_shape=, dtype=, name=)`,
`torch_tensorrt.dynamo.compile(exported_program, inputs=, truncate_double=)` and
`torch_tensorrt.save(module, file_path, output_format="exported_program", inputs=)`
(`compile_kwargs` / `save_kwargs` / `input_kwargs` build them; tests/compiler/backends/test_trt.py checks
them against the installed signatures when torch_tensorrt is importable). The parts that need
neither TensorRT nor a GPU (input shape ranges, capability detection, manifest entries) are what
those tests check everywhere.

Dynamic dims become TensorRT optimisation profiles: the prompt length `n` ranges from the image
span + 2 to `max_seq_len` (default: the capture's maximum, 8192), each layer's cache length
`past_<l>` from 1 to `max_seq_len`, the decode step's samples `batch` from 1 to MAX_DECODE_BATCH
(16); the profile is tuned (`opt`) for an image span plus OPT_TEXT_TOKENS text tokens and
OPT_DECODE_BATCH samples. Precision: float16 by default (float32 / bfloat16 on request). It
follows the captured graph's dtype: the model is cast to it before capture, and TensorRT 10+
builds strongly typed networks from the graph's dtypes (torch-tensorrt 2.14 has no
`enabled_precisions`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllmc.runtime.errors import UserError
from mllmc.runtime.images import MAX_TILES
from mllmc.runtime.layout import MIN_TEXT_ROWS
from mllmc.runtime.manifest import SegmentEntry
from mllmc.runtime.runners.trt import MAX_DECODE_BATCH

from . import segment_entry

OPT_TEXT_TOKENS = 64
OPT_DECODE_BATCH = 8  # samples per decode step the profile is tuned for (1 to MAX_DECODE_BATCH)
OPT_VISUAL_TOKENS = 576  # one LLaVA-1.5 image
INSTALL = "pip install 'mllmc[trt]'"


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
    dims named as the manifest names them (`n`, `visual`, `tiles`, `batch`, `past_<l>`); the
    profile is optimised for one image of OPT_VISUAL_TOKENS rows and OPT_TEXT_TOKENS of text,
    and a decode step of OPT_DECODE_BATCH samples."""
    low = {"n": MIN_TEXT_ROWS + 1, "visual": 1, "tiles": 1, "batch": 1}
    if max_seq_len < low["n"]:
        raise UserError(f"--max-seq-len {max_seq_len} is shorter than {low['n']} tokens")
    prefill = any("visual" in t["shape"] for t in inputs)
    visual = min(max_seq_len - MIN_TEXT_ROWS, OPT_VISUAL_TOKENS)
    opt = {
        "n": min(max_seq_len, (visual if prefill else 0) + OPT_TEXT_TOKENS),
        "visual": visual,
        "tiles": 1,
        "batch": OPT_DECODE_BATCH,
    }
    high = {
        "n": max_seq_len,
        "visual": max_seq_len - MIN_TEXT_ROWS,
        "tiles": MAX_TILES,
        "batch": MAX_DECODE_BATCH,
    }
    specs = []
    for t in inputs:
        ranges = []
        for d in t["shape"]:
            if isinstance(d, int):
                ranges.append((d, d, d))
            elif d in low:
                ranges.append((low[d], max(low[d], opt[d]), high[d]))
            elif d.startswith("past_"):
                ranges.append((1, max(1, opt["n"]), max_seq_len))
            else:
                raise ValueError(f"input {t['name']} has a dim {d!r} with no known range")
        mins, opts, maxs = (tuple(r[i] for r in ranges) for i in range(3))
        specs.append(InputSpec(t["name"], t["dtype"], mins, opts, maxs))
    return specs


def input_kwargs(spec: InputSpec, dtype: Any) -> dict[str, Any]:
    """Keyword arguments of `torch_tensorrt.Input` for one engine input (`dtype`: the torch
    dtype of `spec.dtype`): its optimisation profile and its name in the program."""
    return {
        "min_shape": spec.min_shape,
        "opt_shape": spec.opt_shape,
        "max_shape": spec.max_shape,
        "dtype": dtype,
        "name": spec.name,
    }


def compile_kwargs(trt_inputs: list[Any]) -> dict[str, Any]:
    """Keyword arguments of `torch_tensorrt.dynamo.compile(program, **kwargs)`: the inputs'
    shape ranges, and float64 constants truncated to float32 (TensorRT has no float64)."""
    return {"inputs": trt_inputs, "truncate_double": True}


def save_kwargs(examples: list[Any]) -> dict[str, Any]:
    """Keyword arguments of `torch_tensorrt.save(module, path, **kwargs)`: an ExportedProgram
    re-traced with the segment's example inputs."""
    return {"output_format": "exported_program", "inputs": examples}


def compile_segment(seg: Any, out_dir: Path, dtype: str, max_seq_len: int) -> SegmentEntry:
    """Write `out_dir/<seg.name>.ep` (TensorRT engines inside an ExportedProgram); return its
    manifest entry. `dtype` is the one the segment was captured in, which the engine follows.
    Unrun here (see the module docstring)."""
    import torch
    import torch_tensorrt

    from mllmc.compiler.core.capture import on_device
    from mllmc.compiler.core.segment_io import segment_io

    io = segment_io(seg)
    specs = input_specs(io["inputs"], max_seq_len)
    on_device(seg.program, "cuda")
    trt_inputs = [torch_tensorrt.Input(**input_kwargs(s, getattr(torch, s.dtype))) for s in specs]
    module = torch_tensorrt.dynamo.compile(seg.program, **compile_kwargs(trt_inputs))
    path = out_dir / f"{seg.name}.ep"
    examples = [t.to("cuda") for t in seg.example_inputs]
    torch_tensorrt.save(module, str(path), **save_kwargs(examples))
    return segment_entry(path.name, io)
