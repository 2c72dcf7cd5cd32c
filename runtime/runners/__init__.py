"""Segment runners: one small module per artifact target (`onnx.py`, `aoti.py`, `trt.py`).

The engine (runtime/engine.py) holds the one generate loop; it asks the module named by the
manifest's `target` for one runner per segment:

    open_segment(root, name, entry, manifest, options) -> SegmentRunner

A runner checks its engine file's IO (names, ranks, dtypes, fixed dims) against the manifest's
`SegmentEntry` when it opens it, takes feeds by input name (numpy arrays made on the host, cast
here to the manifest's dtypes, or values it returned itself, such as a KV cache that stays on
its device) and returns its outputs by name. A new target is one new module here; nothing else
in the runtime changes. This package imports no torch; the torch runners import it lazily.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import UserError
from ..manifest import DECODE_CACHES

if TYPE_CHECKING:
    from ..manifest import Manifest, SegmentEntry, TensorSpec

__all__ = [
    "DECODE_CACHES",
    "RunnerOptions",
    "SegmentRunner",
    "check_cache_rows",
    "check_feeds",
    "check_io",
    "check_target",
    "known_targets",
    "open_segment",
]


@dataclass(frozen=True)
class RunnerOptions:
    """What a caller of `load()` may choose: onnxruntime providers, CPU threads, and whether
    the segments share the artifact's one copy of the weights in memory (`share_weights`: the
    ONNX runner maps weights.data instead of repacking each graph's GEMM weights: ~1x the
    weights in memory instead of ~1.7x, at a slower decode on the CPU; see README), and whether
    an aoti artifact on CUDA runs its segments as CUDA graph replays (`cuda_graphs`) and which of
    its decode programs it runs (`decode_cache`)."""

    providers: tuple[str, ...] | None = None
    threads: int | None = None
    share_weights: bool = False
    cuda_graphs: bool | None = None  # aoti on CUDA: graph replays (None: on where it can be)
    # aoti, onnx: "growing" or "static" (None: the artifact's own, its target_settings.decode_cache)
    decode_cache: str | None = None


class SegmentRunner(Protocol):
    """One segment's engine, opened and checked against its manifest entry."""

    entry: SegmentEntry

    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run once: `feeds` by input name -> outputs by name (the runner's own array type)."""
        ...

    def to_numpy(self, value: Any) -> np.ndarray:
        """An output of this runner as a host numpy array (float32 for floating outputs)."""
        ...


def open_segment(
    target: str,
    root: Path,
    name: str,
    entry: SegmentEntry,
    manifest: Manifest,
    options: RunnerOptions,
) -> SegmentRunner:
    """The runner for segment `name` of an artifact compiled for `target`."""
    check_target(root, target)
    module = importlib.import_module(f"{__name__}.{target}")
    return module.open_segment(root, name, entry, manifest, options)


def check_target(root: Path, target: str) -> None:
    """UserError unless this mllmc has a runner for `target` (the artifact at `root`'s)."""
    if target not in known_targets():
        raise UserError(
            f"artifact {root} is for target {target!r}, which this mllmc cannot run "
            f"(targets it runs: {', '.join(known_targets())})"
        )


def known_targets() -> list[str]:
    """The targets that have a runner module in this package."""
    here = Path(__file__).parent
    return sorted(p.stem for p in here.glob("*.py") if not p.stem.startswith("_"))


def check_io(
    path: Path,
    segment: str,
    kind: str,
    found: Sequence[tuple[str, Sequence[int | str | None] | int, str]],
    expected: Sequence[TensorSpec],
) -> None:
    """UserError naming the first difference between an engine file's inputs or outputs
    (`found`: name, shape (or only its rank), dtype each) and the manifest's (`expected`):
    names, ranks, dtypes, and every dim the manifest fixes that the file fixes otherwise, or
    one the manifest leaves free that the file fixes (an engine swapped from another model)."""
    want = [(t.name, len(t.shape), t.dtype) for t in expected]
    if [n for n, _, _ in found] != [n for n, _, _ in want]:
        names = ", ".join(n for n, _, _ in found[:4]) + (", ..." if len(found) > 4 else "")
        wanted = ", ".join(n for n, _, _ in want[:4]) + (", ..." if len(want) > 4 else "")
        raise UserError(
            f"corrupt artifact: {path.name} does not match the manifest's {segment!r} segment: "
            f"its {kind} are [{names}], the manifest says [{wanted}]"
        )
    for (name, shape, dtype), spec in zip(found, expected, strict=True):
        rank = shape if isinstance(shape, int) else len(shape)
        if rank != len(spec.shape) or dtype != spec.dtype:
            raise UserError(
                f"corrupt artifact: {path.name} does not match the manifest's {segment!r} "
                f"segment: {kind[:-1]} {name!r} is rank {rank} {dtype}, the manifest says rank "
                f"{len(spec.shape)} {spec.dtype}"
            )
        if isinstance(shape, int):
            continue
        for dim, want_dim in zip(shape, spec.shape, strict=True):
            if _static(dim) and dim != want_dim:
                raise UserError(
                    f"corrupt artifact: {path.name} does not match the manifest's {segment!r} "
                    f"segment: {kind[:-1]} {name!r} has shape {_dims(shape)}, the manifest "
                    f"says {_dims(spec.shape)} (an engine file of another model?): recompile "
                    "the artifact"
                )


def _static(dim: Any) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool)


def _dims(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if _static(d) else repr(d) for d in shape) + "]"


def check_feeds(
    entry: SegmentEntry,
    feeds: Mapping[str, Any],
    segment: str,
    only: Collection[str] | None = None,
) -> None:
    """ValueError if `feeds` does not name exactly the segment's inputs (a caller's bug);
    UserError if one has another rank, or another size in a dim the manifest fixes, than the
    engine takes (an image or a cache of another shape), or if inputs that share a named dim
    (one layer's key and value cache: `past_0`) differ in it. `only`: check the shapes of
    these inputs alone (the others are known to be right: a cache the runner itself returned)."""
    names = [t.name for t in entry.inputs]
    if set(feeds) != set(names):
        raise ValueError(f"{segment} takes inputs {names}, got {sorted(feeds)}")
    named: dict[str, tuple[str, int]] = {}  # a named dim -> the first input with it, its size
    for spec in entry.inputs:
        if only is not None and spec.name not in only:
            continue
        value = feeds[spec.name]
        shape = tuple(value.shape) if hasattr(value, "shape") else np.shape(value)
        if len(shape) != len(spec.shape) or any(
            _static(want) and want > 0 and got != want
            for got, want in zip(shape, spec.shape, strict=False)
        ):
            raise UserError(
                f"the {segment} segment takes {spec.name} of shape {_dims(spec.shape)}, got "
                f"{_dims(shape)}"
            )
        for got, want in zip(shape, spec.shape, strict=True):
            if not isinstance(want, str):
                continue
            first, size = named.setdefault(want, (spec.name, got))
            if got != size:
                # the other named dims as the inputs before fixed them (a decode's `batch`)
                expected = [
                    size if w == want else named[w][1] if isinstance(w, str) and w in named else w
                    for w in spec.shape
                ]
                raise UserError(
                    f"the {segment} segment takes {spec.name} of shape {_dims(expected)} "
                    f"(as many rows in {want!r} as {first}, which has {size}), got {_dims(shape)}"
                )


def check_cache_rows(feeds: Mapping[str, Any], kv_visual: Sequence[int]) -> None:
    """UserError unless the decode caches in `feeds` (`past.<l>.key` / `.value`, each
    (1, heads, rows, head_dim)) hold the rows the layer plan gives them: layer l caches the
    prompt's text rows, the tokens generated so far and `kv_visual[l]` visual rows, so
    rows - kv_visual[l] is the same in every layer."""
    first: tuple[str, int] | None = None  # the first cache, and its rows less its visual rows
    for name, value in feeds.items():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "past" or not parts[1].isdigit():
            continue
        layer = int(parts[1])
        shape = tuple(value.shape) if hasattr(value, "shape") else np.shape(value)
        if layer >= len(kv_visual) or len(shape) != 4:
            continue
        text = shape[2] - kv_visual[layer]
        if first is None:
            first = (name, text)
        elif text != first[1]:
            expected = [*shape[:2], first[1] + kv_visual[layer], shape[3]]
            raise UserError(
                f"the cache of layer {layer} does not match the layer plan: {name} should have "
                f"shape {_dims(expected)} ({kv_visual[layer]} visual rows, as many other rows as "
                f"{first[0]}), got {_dims(shape)}; pass the cache prefill() or decode_step() "
                "returned"
            )
