"""What the torch-based runners (aoti, trt, and the compiler's TorchEngine) share: feeds cast to
the manifest's dtypes on the engine's device, outputs kept there (the KV cache never leaves the
device), logits brought to the host. Imported only by those runners: it imports torch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .runners import check_feeds

if TYPE_CHECKING:
    from .manifest import SegmentEntry


def torch_dtype(name: str) -> torch.dtype:
    """A manifest dtype name (float32, bfloat16, int64, ...) as a torch dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


class TorchCallRunner:
    """Runs `fn(*inputs in manifest order) -> tuple of outputs in manifest order` on `device`."""

    def __init__(self, name: str, entry: SegmentEntry, fn: Callable[..., Any], device: str):
        self.name = name
        self.entry = entry
        self.fn = fn
        self.device = torch.device(device)
        self._inputs = [(t.name, torch_dtype(t.dtype)) for t in entry.inputs]
        self._outputs = [t.name for t in entry.outputs]
        self.weights: Any = None  # what `fn` reads its weights from, kept alive with it

    def _tensor(self, value: Any, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            # a no-op for a contiguous cache a runner returned; compiled code assumes the strides
            # it was compiled with (a prefill output may be a transposed view)
            return value.to(self.device, dtype).contiguous()
        return torch.from_numpy(np.ascontiguousarray(value)).to(self.device, dtype)

    @torch.no_grad()
    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        check_feeds(self.entry, feeds, self.name)
        args = [self._tensor(feeds[name], dtype) for name, dtype in self._inputs]
        out = self.fn(*args)
        if isinstance(out, torch.Tensor):  # a module with one output returns it bare
            out = (out,)
        return dict(zip(self._outputs, out, strict=True))

    def to_numpy(self, value: torch.Tensor) -> np.ndarray:
        value = value.detach()
        if value.is_floating_point():
            value = value.float()
        return value.cpu().numpy()
