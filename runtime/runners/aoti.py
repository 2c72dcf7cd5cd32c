"""AOTInductor runner: a segment's `.pt2` package (torch._inductor.aoti_load_package) on the
device it was compiled for. Imports torch when an aoti artifact is loaded, never before. The
packages hold code; their weights come from the artifact's one weights file, loaded once and
handed to every package without a copy.

Before the shared library is loaded, the package's metadata is read from the zip: AOTInductor's
device key must be the manifest's device (and that device must be here), and the IO the
compiler recorded in it must be the manifest's."""

from __future__ import annotations

import json
import weakref
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..manifest import STATIC_DECODE, STATIC_DECODE_INPUTS
from . import RunnerOptions, check_io

if TYPE_CHECKING:
    from ..manifest import Manifest, SegmentEntry

# package metadata written by compiler/backends/aoti.py: the segment's IO records (JSON), and
# constant name -> key in the artifact's weights file (JSON)
IO_KEY = "mllmc_io"
CONSTANTS_KEY = "mllmc_constants"


def lowering_key(segment: str, name: str) -> str:
    """The weights-file key of constant `name` that AOTInductor added while lowering
    `segment`'s package: its metadata was written before such constants existed, so it does not
    name them, and the runner looks a constant it does not name up here."""
    return f"{segment}/lowered/{name}"


def package_metadata(path: Path) -> dict[str, str]:
    """The metadata AOTInductor stores in a .pt2 package (device key, platform, ...)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("wrapper_metadata.json")]
            if not names:
                raise UserError(f"corrupt engine file {path}: not an AOTInductor package")
            data = json.loads(z.read(names[0]))
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"corrupt engine file {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"corrupt engine file {path}: its metadata is not an object")
    return data


def open_segment(
    root: Path, name: str, entry: SegmentEntry, manifest: Manifest, options: RunnerOptions
) -> Any:
    """The runner of segment `name`. An artifact compiled with `--decode-cache static` holds a
    `decode_static` package beside `decode`: its decode runs that package over fixed-capacity
    buffers (runtime/static_cache.py). With CUDA graphs (the default on CUDA; off with
    `load(..., cuda_graphs=False)`), vision and prefill replay one graph per input shape and each
    static-cache decode step one graph per capacity bucket. Which decode runs: the caller's
    `options.decode_cache`, else the artifact's own (`target_settings.decode_cache`)."""
    device = manifest.target_settings.device
    on_cuda = device.startswith("cuda")
    graphs = on_cuda if options.cuda_graphs is None else options.cuda_graphs
    if graphs and not on_cuda:
        raise UserError(f"CUDA graphs need an artifact compiled for CUDA; {root} runs on {device}")
    decode_cache = options.decode_cache or manifest.target_settings.decode_cache
    if name == "decode" and decode_cache == "static":
        static = manifest.segments.get(STATIC_DECODE)
        if static is None:
            raise UserError(
                f"artifact {root} has no static-cache decode: recompile it with "
                "--decode-cache static"
            )
        want = list(STATIC_DECODE_INPUTS)
        want += [t.name for t in entry.inputs if t.name.startswith("past.")]
        if [t.name for t in static.inputs] != want:
            raise UserError(
                f"corrupt artifact: the decode_static segment's inputs do not match decode's in {root}"
            )
        from ..static_cache import StaticCacheDecoder

        package = _open_package(root, STATIC_DECODE, static, device, options)
        runner = StaticCacheDecoder(name, entry, package.fn, device, cuda_graphs=graphs)
        runner.weights = package.weights
        return runner
    runner = _open_package(root, name, entry, device, options)
    if graphs and name in ("vision", "prefill"):
        from ..static_cache import GraphPerShape

        runner.fn = GraphPerShape(runner.fn, device, name)
    return runner


def _open_package(
    root: Path, name: str, entry: SegmentEntry, device: str, options: RunnerOptions
) -> Any:
    """A TorchCallRunner over segment `name`'s .pt2 package, checked against its manifest
    entry before its shared library is loaded, with the artifact's shared weights."""
    path = root / entry.file
    meta = package_metadata(path)
    compiled_for = meta.get("AOTI_DEVICE_KEY")
    if compiled_for != device.split(":")[0]:
        raise UserError(
            f"corrupt artifact: {path.name} was compiled for {compiled_for}, the manifest says "
            f"{device}: recompile with mllmc compile --target aoti --device {device}"
        )
    try:
        io = json.loads(meta[IO_KEY])
        for kind in ("inputs", "outputs"):
            found = [(t["name"], list(t["shape"]), t["dtype"]) for t in io[kind]]
            check_io(path, name, kind, found, getattr(entry, kind))
    except (KeyError, TypeError, json.JSONDecodeError):
        raise UserError(f"corrupt engine file {path}: no mllmc IO record in its metadata") from None

    import torch

    from ..torch_runner import TorchCallRunner

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"artifact {root} runs on {device}: no CUDA device on this machine")
    if options.threads and device == "cpu":
        torch.set_num_threads(options.threads)
    try:
        model = torch._inductor.aoti_load_package(str(path))
    except Exception as e:  # the loader raises RuntimeError with a C++ message
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load engine file {path}: {first}") from None
    runner = TorchCallRunner(name, entry, model, device)
    if CONSTANTS_KEY in meta:
        if not entry.external_data:
            raise UserError(f"corrupt artifact: {path.name} needs a weights file, none is named")
        weights = shared_weights(root / entry.external_data, device)
        try:
            mapping = json.loads(meta[CONSTANTS_KEY])
            needed = set(model.get_constant_fqns())
            mapping.update({n: lowering_key(name, n) for n in needed if n not in mapping})
            constants = {n: weights.tensors[key] for n, key in mapping.items() if n in needed}
            model.load_constants(
                constants,
                check_full_update=True,
                user_managed=True,  # no copy: every package reads the one set of tensors
            )
        except (KeyError, TypeError, json.JSONDecodeError, RuntimeError) as e:
            raise UserError(
                f"corrupt artifact: {path.name} and {entry.external_data}: {e}"
            ) from None
        runner.weights = weights  # keep the tensors alive as long as the runner
    return runner


class SharedWeights:
    """The tensors of an artifact's weights file on one device, shared by its packages."""

    def __init__(self, tensors: dict[str, Any]):
        self.tensors = tensors


_LOADED: weakref.WeakValueDictionary[tuple[str, int, str], SharedWeights] = (
    weakref.WeakValueDictionary()
)


def shared_weights(path: Path, device: str) -> SharedWeights:
    """`path` loaded once per device while any runner uses it (memory-mapped on the CPU)."""
    import torch

    try:
        stat = path.stat()
    except OSError as e:
        raise UserError(f"corrupt artifact: cannot read {path}: {e}") from None
    key = (str(path.resolve()), stat.st_mtime_ns, device)
    found = _LOADED.get(key)
    if found is None:
        try:
            tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # a bad archive raises several types
            raise UserError(
                f"corrupt weights file {path}: {str(e).splitlines()[0][:300]}"
            ) from None
        if not isinstance(tensors, dict):
            raise UserError(f"corrupt weights file {path}: not a dict of tensors")
        if device != "cpu":
            tensors = {k: v.to(device) for k, v in tensors.items()}
        found = SharedWeights(tensors)
        _LOADED[key] = found
    return found
