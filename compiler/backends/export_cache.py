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
- the versions of torch, onnx, onnx-ir, onnxscript and mllmc, the opset, and a digest of the compiler's
  and runtime's source files (the ONNX translations of the fused operators live there): a
  changed exporter never reads an entry of another.

An entry is the segment's `.onnx` (and `.onnx.data`) as the export wrote them, with the manifest
entry and each file's size and SHA-256 beside them. It is written to a temporary folder in the
cache, flushed to disk and renamed into place whole, so concurrent compiles (test workers, say)
never read one half-written; an entry whose files do not match what was stored is exported anew
and replaced. The cache folder may be neither the artifact's output folder nor the model's (nor
inside them). Nothing is ever evicted: the folder is the user's to clear (`rm -rf`)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mllmc.runtime.errors import UserError
from mllmc.runtime.manifest import SegmentEntry, from_json, to_plain

log = logging.getLogger(__name__)

ENV = "MLLMC_CACHE_DIR"
ENTRY = "entry.json"
LAYOUT = "onnx-segment-2"  # what an entry holds; bumped when that changes
TMP_PREFIX = ".tmp-"
STALE_SECONDS = 24 * 3600  # a temporary folder this old was left by a compile that was killed


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
    for name in ("torch", "onnx", "onnx-ir", "onnxscript", "mllmc"):
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


def check_folder(root: Path | None, out_dir: Path, model_dir: Path) -> None:
    """UserError unless `root` (None: no cache) can be the cache folder: a folder or a path that
    can become one, and neither the artifact's output folder, the model folder, nor inside
    either (the cache's entries would become files of theirs). Creates it."""
    if root is None:
        return
    where = f"the export cache folder {str(root)!r} ({ENV} / --cache-dir)"
    resolved = root.resolve()
    for folder, what in ((out_dir, "the output folder"), (model_dir, "the model folder")):
        mine = folder.resolve()
        if resolved == mine or mine in resolved.parents:
            raise UserError(f"{where} is {what} or inside it: give a folder of its own")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{where} is not a folder") from None
    except OSError as e:  # a file on the way (NotADirectoryError), no permission, ...
        raise UserError(f"{where} cannot be made: {e.strerror or e}") from None


def _hashed(src: Path, dst: Path | None = None) -> tuple[int, str]:
    """(size, SHA-256) of file `src`, read once; with `dst`, copied there on the way and
    flushed to disk (what `store` writes must be whole before its rename)."""
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") if dst else contextlib.nullcontext() as fout:
        while chunk := fin.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
            if fout:
                fout.write(chunk)
        if fout:
            fout.flush()
            os.fsync(fout.fileno())
    return size, h.hexdigest()


def _files_of(entry: SegmentEntry) -> list[str]:
    return [entry.file] + ([entry.external_data] if entry.external_data else [])


def restore(root: Path, key: str, out_dir: Path) -> SegmentEntry | None:
    """The cached entry of `key`, its files copied into `out_dir` and checked against the sizes
    and SHA-256s stored with them; None when there is none or it does not hold (it is then
    exported anew and replaced)."""
    folder = root / key
    if not (folder / ENTRY).is_file():
        return None
    try:
        data = json.loads((folder / ENTRY).read_text())
        entry = from_json(SegmentEntry, data["entry"], str(folder))
        files = data["files"]
        if sorted(files) != sorted(_files_of(entry)):
            raise ValueError(f"it lists {sorted(files)}")
        for name, (size, digest) in files.items():
            if Path(name).name != name:
                raise ValueError(f"file name {name!r}")
            shutil.copyfile(folder / name, out_dir / name)  # the staged artifact: no flush
            if _hashed(out_dir / name) != (size, digest):
                raise ValueError(f"{name} is not the file stored")
    except Exception as e:  # a damaged entry is a miss, never a failed compile
        log.warning("the export cache entry %s is damaged (%s): exporting anew", folder, e)
        return None
    log.info("segment %s from the export cache (%s)", entry.file, key[:12])
    return entry


_unwritable: set[Path] = set()  # cache folders already warned about, once a process


def store(root: Path, key: str, out_dir: Path, entry: SegmentEntry) -> None:
    """Keep `entry` and its files (in `out_dir`) under `key`: written to a temporary folder in
    `root` and flushed, then renamed into place whole. An entry another compile stored
    meanwhile is kept; a damaged one is replaced. A failure to write is a warning (once a
    folder), never an error: the cache only saves time."""
    tmp = root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        tmp.mkdir(parents=True)
        _remove_stale(root)
        files = {name: _hashed(out_dir / name, tmp / name) for name in _files_of(entry)}
        with open(tmp / ENTRY, "w") as f:
            json.dump({"entry": to_plain(entry), "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        folder = root / key
        if folder.exists() and _holds(folder):
            return  # another compile stored it meanwhile: keep that one
        shutil.rmtree(folder, ignore_errors=True)  # a damaged entry
        with contextlib.suppress(OSError):  # another compile renamed its own first
            os.rename(tmp, folder)
    except OSError as e:
        if root not in _unwritable:
            _unwritable.add(root)
            log.warning("cannot store exports in the cache %s (%s): compiling without it", root, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _holds(folder: Path) -> bool:
    """Whether an entry folder is whole: its entry.json readable, each file of the stored size
    and SHA-256."""
    try:
        files = json.loads((folder / ENTRY).read_text())["files"]
        return all(_hashed(folder / name) == (size, sha) for name, (size, sha) in files.items())
    except Exception:
        return False


def _remove_stale(root: Path) -> None:
    """Temporary folders a killed compile left in `root` (older than STALE_SECONDS)."""
    now = time.time()
    for tmp in root.glob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_SECONDS:
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
