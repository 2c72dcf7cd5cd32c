"""A cache of exported ONNX segments, so that recompiling a model exports only what changed.

Compiling the same model with another pass list re-exports four segments, and most of them are
the same: a decoder pass leaves the vision segment and the decode steps as they were. With a
cache folder set (`MLLMC_CACHE_DIR`, or `mllmc compile --cache-dir`), each segment's ONNX
export is stored under a key of everything the export reads, and an equal segment later is
copied from the cache instead of exported again (the torch.onnx export is most of a compile).

The key is a SHA-256 of:
- the segment's program as `str(ExportedProgram)` prints it: the graph with every node's shapes
  and dtypes, the signature (inputs, parameters, constants, outputs) and the dynamic-dim ranges;
- the bytes, dtype and shape of every tensor the program holds (weights, buffers, constants):
  the same graph over other weights is another key;
- the segment's IO names, its example inputs' shapes and dtypes and its `step_inputs` record;
- the versions of torch, onnx, onnxscript and mllmc, the opset, and a digest of the compiler's
  and runtime's source files (the ONNX translations of the fused operators live there): a
  changed exporter never reads an entry of another.

An entry is the segment's `.onnx` (and `.onnx.data`) as the export wrote them, with the manifest
entry beside them. It is written to a temporary folder in the cache and renamed into place
whole, so concurrent compiles (test workers, say) never read one half-written; an entry that is
incomplete or unreadable is ignored and exported anew. Nothing is ever evicted: the folder is
the user's to clear (`rm -rf`)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mllmc.runtime.manifest import SegmentEntry, from_json, to_plain

log = logging.getLogger(__name__)

ENV = "MLLMC_CACHE_DIR"
ENTRY = "entry.json"
LAYOUT = "onnx-segment-1"  # what an entry holds; bumped when that changes


def cache_dir() -> Path | None:
    """The cache folder `MLLMC_CACHE_DIR` names, or None (no caching) when it is unset or empty."""
    value = os.environ.get(ENV, "").strip()
    return Path(value).expanduser() if value else None


@functools.cache
def _code_digest() -> bytes:
    """SHA-256 of the Python sources of mllmc's compiler and runtime, in path order (what a
    pass does is in the program it leaves, which the key holds)."""
    import mllmc.compiler
    import mllmc.runtime

    h = hashlib.sha256()
    for package in (mllmc.compiler, mllmc.runtime):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.digest()


@functools.cache
def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "onnx", "onnxscript", "mllmc"):
        try:
            found.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            found.append(f"{name}=none")
    return ",".join(found)


def _tensor_bytes(t: Any) -> memoryview:
    """A tensor's bytes in row-major order (any dtype: viewed as bytes, not converted)."""
    import torch

    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def segment_key(seg: Any, opset: int) -> str:
    """The cache key of exporting `seg` (a `capture.Segment`) at `opset` (see the module doc)."""
    import torch

    h = hashlib.sha256()

    def part(label: str, data: bytes | memoryview) -> None:
        h.update(f"{label}:{len(data)}:".encode())
        h.update(data)

    part("layout", LAYOUT.encode())
    part("versions", f"{_versions()},opset={opset}".encode())
    part("code", _code_digest())
    part("name", seg.name.encode())
    part("io", json.dumps([list(seg.input_names), list(seg.output_names)]).encode())
    examples = [f"{t.dtype}{tuple(t.shape)}" for t in seg.example_inputs]
    part("examples", json.dumps(examples).encode())
    step = getattr(seg, "step_inputs", None)
    part("step_inputs", json.dumps(to_plain(step), sort_keys=True).encode())
    program = seg.program
    part("program", str(program).encode())
    tensors = {**program.state_dict, **program.constants}
    for name in sorted(tensors):
        value = tensors[name]
        if not isinstance(value, torch.Tensor):  # a script object: its repr is all we know
            part(f"object {name}", repr(value).encode())
            continue
        part(f"tensor {name}", f"{value.dtype}{tuple(value.shape)}".encode())
        part("bytes", _tensor_bytes(value))
    return h.hexdigest()


def _files_of(entry: SegmentEntry) -> list[str]:
    return [entry.file] + ([entry.external_data] if entry.external_data else [])


def restore(root: Path, key: str, out_dir: Path) -> SegmentEntry | None:
    """The cached entry of `key`, its files copied into `out_dir`; None when there is none (or
    it cannot be read: it is then exported anew, and replaced)."""
    folder = root / key
    try:
        entry = from_json(SegmentEntry, json.loads((folder / ENTRY).read_text()), str(folder))
        for name in _files_of(entry):
            if Path(name).name != name:
                raise ValueError(f"file name {name!r} in a cache entry")
            shutil.copyfile(folder / name, out_dir / name)
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged entry is a miss, never a failed compile
        log.warning("ignoring the damaged export cache entry %s: %s", folder, e)
        return None
    log.info("segment %s from the export cache (%s)", entry.file, key[:12])
    return entry


def store(root: Path, key: str, out_dir: Path, entry: SegmentEntry) -> None:
    """Keep `entry` and its files (in `out_dir`) under `key`: written to a temporary folder in
    `root`, renamed into place whole. A failure to write is logged, never raised: the cache
    only saves time."""
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir(parents=True)
        for name in _files_of(entry):
            shutil.copyfile(out_dir / name, tmp / name)
        (tmp / ENTRY).write_text(json.dumps(to_plain(entry), indent=1))
        folder = root / key
        if folder.exists():  # a damaged entry, or one another compile stored meanwhile
            shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(FileExistsError, OSError):
            os.rename(tmp, folder)
    except OSError as e:
        log.warning("could not store %s in the export cache %s: %s", entry.file, root, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached(
    export: Callable[[Any, Path], SegmentEntry], opset: int
) -> Callable[[Any, Path], SegmentEntry]:
    """`export(seg, out_dir)` through the cache `cache_dir()` names (read when each segment is
    exported); without one, `export` itself."""

    def run(seg: Any, out_dir: Path) -> SegmentEntry:
        root = cache_dir()
        if root is None:
            return export(seg, out_dir)
        key = segment_key(seg, opset)
        entry = restore(root, key, out_dir)
        if entry is None:
            entry = export(seg, out_dir)
            store(root, key, out_dir, entry)
        return entry

    return run
