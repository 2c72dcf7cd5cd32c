"""A captured segment's IO as manifest records: names, shapes (dynamic dims named `n` for the
prompt length, `visual` for its visual rows, `tiles` for the vision segment's batch of tiles
(`merged`, `image_bounds` and `window_bounds` for Qwen2-VL's patches: 4·merged of them),
`batch` for the samples of a decode step,
`past_<l>` for layer l's cache length and `capacity` for the static-cache buffers' rows
(`rotary_len` for the fused step's rotary tables),
outputs as expressions of them such as
`past_3 + 1`) and dtypes, read from the ExportedProgram's own metadata. Backends that do not
write a self-describing file (AOTInductor, TensorRT) and the torch engine use it."""

from __future__ import annotations

import re
from typing import Any

import torch

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def rename_symbols(expr: str, renames: dict[str, str]) -> str:
    """`expr` (a dim name or expression such as 's26 + 1') with each whole identifier in
    `renames` replaced: s2 never matches inside s26."""
    return _IDENT.sub(lambda m: renames.get(m.group(0), m.group(0)), expr)


def dim_names(segment: str, inputs: list[tuple[str, list[int | str]]]) -> dict[str, str]:
    """Symbol -> readable name for the dynamic dims of `inputs` (name, shape with symbols)."""
    renames: dict[str, str] = {}
    for name, shape in inputs:
        if name == "input_ids" and segment == "prefill" and isinstance(shape[1], str):
            renames[shape[1]] = "n"
        elif name == "input_ids" and segment.startswith("decode") and isinstance(shape[0], str):
            renames[shape[0]] = "batch"  # the samples a decode step runs
        elif name == "visual_rows" and isinstance(shape[0], str):
            renames[shape[0]] = "visual"
        elif name == "pixel_values" and isinstance(shape[0], str) and shape[0].isidentifier():
            renames[shape[0]] = "tiles"
        elif name == "pixel_values" and isinstance(shape[0], str):
            # Qwen2-VL's patches: 4·merged (one merged row per 2 x 2 patches)
            renames.update({sym: "merged" for sym in _IDENT.findall(shape[0])})
        elif name in ("cu_seqlens", "cu_window_seqlens") and isinstance(shape[0], str):
            renames[shape[0]] = "image_bounds" if name == "cu_seqlens" else "window_bounds"
        elif name == "rotary_cos" and isinstance(shape[0], str):
            renames[shape[0]] = "rotary_len"  # the fused static decode's tables: batch + capacity
        elif name.startswith("past.") and len(shape) > 2 and isinstance(shape[2], str):
            # the static-cache decode's buffers share one capacity; otherwise one length a layer
            static = segment == "decode_static"
            renames[shape[2]] = "capacity" if static else f"past_{name.split('.')[1]}"
    return renames


def _dim(d: Any) -> int | str:
    return int(d) if isinstance(d, int) or str(d).isdigit() else str(d)


def segment_io(seg: Any) -> dict[str, list[dict[str, Any]]]:
    """{"inputs": [...], "outputs": [...]} of a `Segment`, each {name, shape, dtype}."""
    graph = seg.program.graph
    user = set(seg.program.graph_signature.user_inputs)
    in_vals = [n.meta["val"] for n in graph.nodes if n.op == "placeholder" and n.name in user]
    out_vals = [o.meta["val"] for o in next(n for n in graph.nodes if n.op == "output").args[0]]
    ins = [
        (name, [_dim(d) for d in v.shape]) for name, v in zip(seg.input_names, in_vals, strict=True)
    ]
    renames = dim_names(seg.name, ins)

    def records(names: list[str], vals: list[torch.Tensor]) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "shape": [
                    rename_symbols(d, renames) if isinstance(d, str) else d
                    for d in map(_dim, v.shape)
                ],
                "dtype": str(v.dtype).removeprefix("torch."),
            }
            for name, v in zip(names, vals, strict=True)
        ]

    return {
        "inputs": records(seg.input_names, in_vals),
        "outputs": records(seg.output_names, out_vals),
    }
