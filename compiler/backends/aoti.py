"""AOTInductor backend: each exported segment -> `<segment>.pt2` (torch._inductor.
aoti_compile_and_package), for a CPU or a CUDA device.

The program is compiled as it is after the passes, with its dynamic dims (the prompt length,
each layer's cache length) kept dynamic. The package's metadata carries the segment's IO (names,
shapes, dtypes) beside AOTInductor's own device key, so the runner (runtime/runners/aoti.py)
checks both against the manifest before it loads the shared library.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from ..segment_io import segment_io

log = logging.getLogger(__name__)

IO_KEY = "mllmc_io"  # package metadata key holding the segment's IO records (JSON)


def compile_segment(seg: Any, out_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """Write `out_dir/<seg.name>.pt2` compiled for `device`; return its manifest entry."""
    program = seg.program
    if torch.device(device).type != "cpu":
        from ..torch_engine import on_device

        on_device(program, device)
    io = segment_io(seg)
    path = out_dir / f"{seg.name}.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._inductor.aoti_compile_and_package(
            program,
            package_path=str(path),
            inductor_configs={"aot_inductor.metadata": {IO_KEY: json.dumps(io)}},
        )
    return {"file": path.name, "external_data": None, **io}
