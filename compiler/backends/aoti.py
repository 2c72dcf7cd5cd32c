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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from mllmc.compiler.core.segment_io import segment_io
from mllmc.runtime.manifest import SegmentEntry

from . import segment_entry

log = logging.getLogger(__name__)

IO_KEY = "mllmc_io"  # package metadata: the segment's IO records (JSON)
CONSTANTS_KEY = "mllmc_constants"  # package metadata: constant name -> key in WEIGHTS (JSON)
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

    def save(self, out_dir: Path, entries: dict[str, SegmentEntry]) -> dict[str, SegmentEntry]:
        """Write WEIGHTS; the entries with `external_data` pointing at it."""
        torch.save({k: t.contiguous().cpu() for k, t in self.tensors.items()}, out_dir / WEIGHTS)
        return {name: dataclasses.replace(e, external_data=WEIGHTS) for name, e in entries.items()}


def compile_segment(
    seg: Any, out_dir: Path, device: str = "cpu", store: WeightStore | None = None
) -> SegmentEntry:
    """Write `out_dir/<seg.name>.pt2` compiled for `device`; return its manifest entry. With a
    `store`, the package holds no weights: they go to the store (saved by `store.save`)."""
    program = seg.program
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._inductor.aoti_compile_and_package(
            program,
            package_path=str(path),
            inductor_configs={"aot_inductor.metadata": metadata, **configs},
        )
    return segment_entry(path.name, io)
