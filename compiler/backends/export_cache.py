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
entry, its SHA-256 and each file's size and SHA-256 beside them. It is written to a temporary
folder in the cache, flushed to disk and renamed into place whole, so concurrent compiles (test
workers, say) never read one half-written; an entry whose files or manifest entry do not match
what was stored is exported anew and replaced.

The cache folder is mllmc's alone: a new or empty folder becomes one when a compile first uses
it, marked by a `CACHEDIR.TAG` (the Cache Directory Tagging convention, which backup tools
skip); a folder that holds anything else is refused, so that nothing of the user's is written
into or cleared (a compile removes only the temporary folders that killed compiles left in the
cache). It may be neither the artifact's output folder nor the model's (nor inside them).
Nothing is ever evicted: the folder is the user's to clear (`rm -rf`)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
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
LAYOUT = "onnx-segment-3"  # what an entry holds; bumped when that changes
TMP_PREFIX = ".tmp-"  # + uuid4().hex: a temporary entry folder (TEMPORARY matches only these)
TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{32}")
TAG = "CACHEDIR.TAG"
TAG_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by mllmc: its ONNX export cache.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)
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
    """UserError unless `root` (None: no cache) can be the cache folder: mllmc's cache already,
    or a path that can become one (new, or an empty folder), and neither the artifact's output
    folder, the model folder, nor inside either (the cache's entries would become files of
    theirs). Creates it and its tag."""
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
    _claim(root, where)


def _is_tagged(root: Path) -> bool:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return (root / TAG).read_text() == TAG_TEXT
    return False


def _claim(root: Path, where: str) -> None:
    """Tag `root` as mllmc's export cache unless it is one: only when it is empty (or holds
    another compile's tag on its way in), else UserError. The tag is renamed into place whole,
    so a compile beside this one reads it whole or not at all."""
    if _is_tagged(root):
        return
    try:
        others = [p.name for p in root.iterdir() if not p.name.startswith(f"{TAG}.tmp-")]
    except OSError as e:
        raise UserError(f"{where} cannot be read: {e.strerror or e}") from None
    if others and not (others == [TAG] and _is_tagged(root)):  # a tag renamed in meanwhile
        raise UserError(
            f"{where} holds files and is not an mllmc export cache (it has no mllmc {TAG}): "
            "give a new or empty folder"
        )
    tmp = root / f"{TAG}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.write_text(TAG_TEXT)
        os.replace(tmp, root / TAG)
    except OSError as e:
        raise UserError(f"{where} cannot be written: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


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
        data = _record(folder)
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
            plain = to_plain(entry)
            record = {"entry": plain, "entry_sha256": _entry_digest(plain), "files": files}
            json.dump(record, f, indent=1)
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


def _entry_digest(plain: Any) -> str:
    """SHA-256 of a manifest entry as JSON (keys sorted)."""
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def _record(folder: Path) -> dict[str, Any]:
    """An entry folder's entry.json; ValueError when its manifest entry is not the one stored."""
    data = json.loads((folder / ENTRY).read_text())
    if _entry_digest(data["entry"]) != data["entry_sha256"]:
        raise ValueError("its manifest entry is not the one stored")
    return data


def _holds(folder: Path) -> bool:
    """Whether an entry folder is whole: its entry.json readable, its manifest entry the one
    stored, each file of the stored size and SHA-256."""
    try:
        files = _record(folder)["files"]
        return all(_hashed(folder / name) == (size, sha) for name, (size, sha) in files.items())
    except Exception:
        return False


def _remove_stale(root: Path) -> None:
    """Temporary entry folders a killed compile left in `root` (older than STALE_SECONDS): only
    names a compile gives them (TEMPORARY)."""
    now = time.time()
    for tmp in root.glob(f"{TMP_PREFIX}*"):
        if not TEMPORARY.fullmatch(tmp.name):
            continue
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)


def cached(
    export: Callable[[Any, Path], SegmentEntry], opset: int
) -> Callable[[Any, Path], SegmentEntry]:
    """`export(seg, out_dir)` through the cache `cache_dir()` names (read when each segment is
    exported); without one, or where the folder is not tagged as mllmc's cache yet
    (`check_folder` tags it before a compile), `export` itself."""

    def run(seg: Any, out_dir: Path) -> SegmentEntry:
        root = cache_dir()
        if root is None or not _is_tagged(root):
            return export(seg, out_dir)
        key = segment_key(seg, opset)
        entry = restore(root, key, out_dir)
        if entry is None:
            entry = export(seg, out_dir)
            store(root, key, out_dir, entry)
        return entry

    return run
