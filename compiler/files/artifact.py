"""The artifact directory and its manifest.

    OUT/
      manifest.json          format_version, mllmc version, target settings (target, device,
                             dtype, decode cache, max_seq_len), source model + config hash, passes
                             with configs and stats, segments (file, IO names/shapes/dtypes),
                             visual tokens per layer, FLOPs before/after, validation result
      vision.onnx  prefill.onnx  decode.onnx   (+ <file>.data when weights are external)
      tokenizer.json  tokenizer_config.json  chat_template.jinja  processor_config.json ...
      image_processor.json   one normalised copy of the image settings, whichever file held them

It runs with no access to the source model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from mllmc.runtime import __version__
from mllmc.runtime.jsonfile import JSONError, read_json
from mllmc.runtime.manifest import (
    FLOAT32_TOL,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SEGMENT_FILE_FIELDS,
    Manifest,
    ModelInfo,
    SegmentEntry,
    TargetSettings,
    write_manifest,
)

from . import outputs

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mllmc.compiler.core.capture import Segments
    from mllmc.compiler.core.pass_types import PassRecord

__all__ = ["build_manifest", "copy_preprocessing", "staged_directory", "write_manifest"]

PREPROCESSING_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "generation_config.json",
)


def replaceable(path: Path) -> str | None:
    """None if `path` is an mllmc artifact that `--force` may replace; else why it is not.

    An artifact is a directory whose manifest.json names an mllmc version and format, holding
    only the files mllmc writes into one: the engine files its manifest names, the manifest and
    the preprocessing files. Anything else (a `my_model.onnx` of one's own, a results file) makes
    it a directory mllmc did not write, and it is not replaced."""
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"it is not an mllmc artifact (no {MANIFEST_NAME})"
    try:
        data = read_json(manifest_path, allow_nan=True)
    except JSONError:
        return f"its {MANIFEST_NAME} is not an mllmc manifest"
    if not isinstance(data, dict) or "format_version" not in data or "mllmc_version" not in data:
        return f"its {MANIFEST_NAME} is not an mllmc manifest"
    named: set[str] = set()
    segments = data.get("segments")
    if isinstance(segments, dict):
        for entry in segments.values():
            if isinstance(entry, dict):
                named |= {
                    v
                    for k, v in entry.items()
                    if k in SEGMENT_FILE_FIELDS and isinstance(v, str) and v
                }
    known = {MANIFEST_NAME, "image_processor.json", *PREPROCESSING_FILES, *named}
    foreign = sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in path.iterdir()
        if p.is_symlink() or not p.is_file() or p.name not in known
    )
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        return f"it holds files mllmc did not write ({shown})"
    return None


def staged_directory(out: str | os.PathLike, force: bool = False) -> ContextManager[Path]:
    """Write an artifact: a temporary directory that becomes `out` when complete (see
    `mllmc.compiler.files.outputs.staged_directory`); --force replaces only another artifact."""
    return outputs.staged_directory(out, force=force, replaceable=replaceable)


def copy_preprocessing(model_dir: str | Path, out: Path) -> None:
    from mllmc.runtime.preprocess import read_image_processor_config

    src = Path(model_dir)
    for name in PREPROCESSING_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    cfg = read_image_processor_config(src)
    (out / "image_processor.json").write_text(json.dumps(cfg, indent=2))


def build_manifest(
    info: ModelInfo,
    segments: Segments,
    records: Sequence[PassRecord],
    entries: dict[str, SegmentEntry],
    flops: dict[str, dict[str, int]],
    settings: TargetSettings,
    tol: float = FLOAT32_TOL,
) -> Manifest:
    """The manifest of an artifact: `entries` are the backend's per-segment entries (file + IO),
    `settings` what its engines were built for and `tol` the logit tolerance they are held to."""
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        mllmc_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        target_settings=settings,
        model=info,
        passes=tuple(r.applied for r in records if r.applied is not None),
        segments=dict(entries),
        visual_tokens=segments.visual_tokens,
        min_visual_rows=segments.min_visual_rows,
        layers=tuple(segments.layer_plan),
        flops=flops,
        tol=tol,
    )
    manifest.check()
    return manifest
