"""AOTInductor backend: each exported segment -> `<segment>.pt2` (torch._inductor.
aoti_compile_and_package), for a CPU or a CUDA device, and the weights of all segments in one
`weights.pt` they share.

The program is compiled as it is after the passes, with its dynamic dims (the prompt length,
each layer's cache length) kept dynamic. The packages hold code only
(`aot_inductor.package_constants_in_so=False`): every weight tensor is saved once in
`weights.pt` (the prefill and decode programs hold the same decoder parameters), and each
package's metadata maps its constant names to keys there. The metadata also carries the
segment's IO (names, shapes, dtypes) beside AOTInductor's own device key, so the runner
(runtime/runners/aoti.py) checks both against the manifest before it loads the shared library,
then hands every package the same tensors (`load_constants(..., user_managed=True)`).

int4 Linears (`--quantize int4`, compiler/core/int4_linear.py) are decomposed into torch's int4
kernel call first; their codes are buffers like any weight. The small constants AOTInductor
itself adds while lowering (the int4 kernel's group size, as a tensor) are recorded as it adds
them and stored with the segment's weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mllmc.compiler.core import int4_linear
from mllmc.compiler.core.segment_io import segment_io
from mllmc.runtime.manifest import SegmentEntry
from mllmc.runtime.runners.aoti import CONSTANTS_KEY, IO_KEY, lowering_key

from . import segment_entry

log = logging.getLogger(__name__)

WEIGHTS = "weights.pt"


class WeightStore:
    """The tensors of every segment, each stored once: a tensor two programs share (the same
    storage, offset, shape, strides and dtype) gets one key."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._keys: dict[tuple[Any, ...], str] = {}

    def add(self, segment: str, named: dict[str, torch.Tensor]) -> dict[str, str]:
        """Constant name -> store key for one segment's tensors."""
        mapping = {}
        for name, t in named.items():
            ident = (
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                t.stride(),
                t.dtype,
            )
            if ident not in self._keys:
                key = name if name not in self.tensors else f"{segment}/{name}"
                self.tensors[key] = t.detach()
                self._keys[ident] = key
            mapping[name] = self._keys[ident]
        return mapping

    def add_lowering_constants(self, segment: str, added: dict[str, torch.Tensor]) -> None:
        """Store the constants AOTInductor added while lowering `segment`, under
        `lowering_key(segment, name)` (the package's metadata was written before they existed)."""
        for name, t in added.items():
            self.tensors[lowering_key(segment, name)] = t.detach()

    def save(self, out_dir: Path, entries: dict[str, SegmentEntry]) -> dict[str, SegmentEntry]:
        """Write WEIGHTS; the entries with `external_data` pointing at it."""
        torch.save({k: t.contiguous().cpu() for k, t in self.tensors.items()}, out_dir / WEIGHTS)
        return {name: dataclasses.replace(e, external_data=WEIGHTS) for name, e in entries.items()}


@contextlib.contextmanager
def lowering_constants() -> Iterator[dict[str, torch.Tensor]]:
    """The unnamed tensor constants AOTInductor adds to a graph while lowering it (name ->
    value), for the packages that hold no weights: e.g. the int4 matmul's group size, which its
    lowering makes a tensor. They are in no program's state, so they are caught as they are
    added."""
    from torch._inductor.graph import GraphLowering

    added: dict[str, torch.Tensor] = {}
    original = GraphLowering.add_tensor_constant

    def add_tensor_constant(self: Any, data: torch.Tensor, name: str | None = None) -> Any:
        box = original(self, data, name)
        if name is None:  # a graph's own constants (get_attr) come named, and are stored already
            added[box.get_name()] = data
        return box

    GraphLowering.add_tensor_constant = add_tensor_constant  # type: ignore[method-assign]
    try:
        yield added
    finally:
        GraphLowering.add_tensor_constant = original  # type: ignore[method-assign]


def compile_segment(
    seg: Any, out_dir: Path, device: str = "cpu", store: WeightStore | None = None
) -> SegmentEntry:
    """Write `out_dir/<seg.name>.pt2` compiled for `device`; return its manifest entry. With a
    `store`, the package holds no weights: they go to the store (saved by `store.save`)."""
    program = int4_linear.decompose(seg.program)
    if torch.device(device).type != "cpu":
        from mllmc.compiler.core.capture import on_device

        on_device(program, device)
    io = segment_io(seg)
    metadata = {IO_KEY: json.dumps(io)}
    configs: dict[str, Any] = {}
    if store is not None:
        named = {**program.state_dict, **program.constants}
        tensors = {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}
        metadata[CONSTANTS_KEY] = json.dumps(store.add(seg.name, tensors))
        configs["aot_inductor.package_constants_in_so"] = False
    path = out_dir / f"{seg.name}.pt2"
    with warnings.catch_warnings(), lowering_constants() as added:
        warnings.simplefilter("ignore")
        torch._inductor.aoti_compile_and_package(
            program,
            package_path=str(path),
            inductor_configs={"aot_inductor.metadata": metadata, **configs},
        )
    if store is not None:
        store.add_lowering_constants(seg.name, added)
    return segment_entry(path.name, io)
