"""AOTInductor runner: a segment's `.pt2` package (torch._inductor.aoti_load_package) on the
device it was compiled for. Imports torch when an aoti artifact is loaded, never before.

Before the shared library is loaded, the package's metadata is read from the zip: AOTInductor's
device key must be the manifest's device (and that device must be here), and the IO the
compiler recorded in it must be the manifest's."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from . import RunnerOptions, check_io

if TYPE_CHECKING:
    from ..manifest import Manifest, SegmentEntry

IO_KEY = "mllmc_io"  # written by compiler/backends/aoti.py


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
    path = root / entry.file
    device = str(manifest.extra.get("device", "cpu"))
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
            found = [(t["name"], len(t["shape"]), t["dtype"]) for t in io[kind]]
            check_io(path, name, kind, found, getattr(entry, kind))
    except (KeyError, TypeError, json.JSONDecodeError):
        raise UserError(f"corrupt engine file {path}: no mllmc IO record in its metadata") from None

    import torch

    from ._torch import TorchCallRunner

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"artifact {root} runs on {device}: no CUDA device on this machine")
    if options.threads and device == "cpu":
        torch.set_num_threads(options.threads)
    try:
        model = torch._inductor.aoti_load_package(str(path))
    except Exception as e:  # the loader raises RuntimeError with a C++ message
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load engine file {path}: {first}") from None
    return TorchCallRunner(name, entry, model, device)
