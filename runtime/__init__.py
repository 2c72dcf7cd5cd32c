"""mllmc runtime: loads an mllmc artifact and runs it on the runner its target names
(runtime/runners/): numpy + onnxruntime for onnx artifacts, which never import torch; aoti and
trt artifacts import torch when they are loaded.

from mllmc.runtime import load
engine = load("out/tiny-shortv")
result = engine.generate("cat.png", "Describe the image.", max_new_tokens=32)
print(result.text, result.timings)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import UserError
from .manifest import FORMAT_VERSION

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .engine import Engine, GenerationResult, load

__all__ = ["Engine", "FORMAT_VERSION", "GenerationResult", "UserError", "load", "__version__"]


def __getattr__(name: str) -> Any:
    # The engine pulls in onnxruntime; import it only when asked for, so that the compiler can
    # use UserError and the manifest schema without paying for it.
    if name in ("Engine", "GenerationResult", "load"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)
