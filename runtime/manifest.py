"""The artifact manifest: schema version, reading and validation (shared by compiler and runtime)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SEGMENTS = ("vision", "prefill", "decode")


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    """Read and check `artifact_dir/manifest.json`; raise UserError with what is wrong."""
    root = Path(artifact_dir)
    if not root.is_dir():
        raise UserError(f"artifact {root} not found (make one with: mllmc compile MODEL -o {root})")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{root} is not an mllmc artifact: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"corrupt artifact manifest {path}: {e}") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise UserError(f"corrupt artifact manifest {path}: no format_version")
    version = manifest["format_version"]
    if version != FORMAT_VERSION:
        raise UserError(
            f"artifact {root} has manifest format version {version!r}; this mllmc reads version "
            f"{FORMAT_VERSION}: recompile it with this mllmc"
        )
    for key in ("segments", "model", "visual_tokens", "layers"):
        if key not in manifest:
            raise UserError(f"corrupt artifact manifest {path}: missing {key!r}")
    for seg in SEGMENTS:
        if seg not in manifest["segments"]:
            raise UserError(f"corrupt artifact manifest {path}: no {seg!r} segment")
    return manifest
