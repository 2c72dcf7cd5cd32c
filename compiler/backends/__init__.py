"""Backends: exported segment -> engine file. Each returns the segment's manifest entry."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mllmc.runtime.errors import UserError

TARGETS = ("onnx", "trt")


def get_backend(target: str) -> Callable[[Any, Path], dict[str, Any]]:
    if target == "onnx":
        from .onnx import export_segment

        return export_segment
    if target == "trt":
        missing = [m for m in ("tensorrt", "torch_tensorrt") if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(
                f"target 'trt' needs {', '.join(missing)} (pip install 'mllmc[trt]' on a machine "
                "with an NVIDIA GPU); use --target onnx here"
            )
        raise UserError("target 'trt' is not implemented in this version yet; use --target onnx")
    raise UserError(f"unknown target {target!r}; valid targets: {', '.join(TARGETS)}")
