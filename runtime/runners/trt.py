"""TensorRT runner: a segment's `.ep` (an ExportedProgram holding TensorRT engines, written by
compiler/backends/trt.py) loaded with torch-tensorrt on CUDA. Imports torch and torch_tensorrt
when a trt artifact is loaded, never before.

NOT RUN in this repository (no TensorRT where mllmc is built); written for torch-tensorrt 2.14
(importing it registers the engine ops; the program loads with `torch.export.load`, as 2.13 and
2.14 save it). What is checked here: the capability detection (no CUDA / tensorrt / torch_tensorrt ->
one line naming what is missing) and the IO check against the manifest."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from . import RunnerOptions, check_io

if TYPE_CHECKING:
    from ..manifest import Manifest, SegmentEntry

# the most samples a decode step takes: the upper end of the `batch` range of the decode
# engine's optimisation profile (compiler/backends/trt.py builds it)
MAX_DECODE_BATCH = 16


def open_segment(
    root: Path, name: str, entry: SegmentEntry, manifest: Manifest, options: RunnerOptions
) -> Any:
    has_torch = importlib.util.find_spec("torch") is not None
    cuda = has_torch and _cuda_available()
    missing = [] if cuda else ["a CUDA device"]
    missing += [
        m for m in ("torch", "tensorrt", "torch_tensorrt") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise UserError(
            f"artifact {root} is a TensorRT engine: running it needs {', '.join(missing)} "
            "(pip install 'mllmc[trt]' on a machine with an NVIDIA GPU)"
        )
    import torch
    import torch_tensorrt  # noqa: F401  (registers the TensorRT engine ops the program calls)

    from ..torch_runner import TorchCallRunner

    path = root / entry.file
    try:
        program = torch.export.load(str(path))
    except Exception as e:  # torch.export.load raises several types for a bad archive
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load engine file {path}: {first}") from None
    user = set(program.graph_signature.user_inputs)
    vals = [n.meta["val"] for n in program.graph.nodes if n.op == "placeholder" and n.name in user]
    outs = [o.meta["val"] for o in next(n for n in program.graph.nodes if n.op == "output").args[0]]
    for kind, found, expected in (("inputs", vals, entry.inputs), ("outputs", outs, entry.outputs)):
        # the program names its placeholders itself (past_0, ...): count, shapes and dtypes
        io = [
            (
                t.name,
                [d if isinstance(d, int) else str(d) for d in v.shape],
                str(v.dtype).removeprefix("torch."),
            )
            for t, v in zip(expected, found, strict=False)
        ]
        if len(found) != len(expected):
            io.append((f"({len(found)} {kind})", 0, ""))
        check_io(path, name, kind, io, expected)
    runner = TorchCallRunner(name, entry, program.module(), manifest.target_settings.device)
    if name == "decode":
        runner.max_batch = MAX_DECODE_BATCH
    return runner


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
