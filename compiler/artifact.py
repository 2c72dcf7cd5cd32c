"""The artifact directory and its manifest.

    OUT/
      manifest.json          format_version, mllmc version, source model + config hash, passes
                             with configs and stats, segments (file, IO names/shapes/dtypes),
                             visual tokens per layer, FLOPs before/after, validation result
      vision.onnx  prefill.onnx  decode.onnx   (+ <file>.data when weights are external)
      tokenizer.json  tokenizer_config.json  chat_template.jinja  processor_config.json ...
      image_processor.json   one normalised copy of the image settings, whichever file held them

It runs with no access to the source model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mllmc.runtime import __version__
from mllmc.runtime.manifest import (
    FORMAT_VERSION,
    Manifest,
    ModelInfo,
    SegmentEntry,
    from_json,
    write_manifest,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mllmc.compiler.capture import Segments
    from mllmc.passes import PassRecord

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


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out`; when the block succeeds it replaces `out` (one
    rename), when it fails it is removed. So `out` is never seen half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; give it the user's usual mode
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    entries: dict[str, dict[str, Any]],
    flops: dict[str, dict[str, int]],
    target: str,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """The manifest of an artifact: `entries` are the backend's per-segment file + IO records."""
    return Manifest(
        format_version=FORMAT_VERSION,
        mllmc_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        target=target,
        model=info,
        passes=tuple(r.applied for r in records if r.applied is not None),
        segments={name: from_json(SegmentEntry, e, f"{name} entry") for name, e in entries.items()},
        visual_tokens=segments.num_visual_tokens,
        layers=tuple(segments.layer_plan),
        flops=flops,
        extra=dict(extra or {}),
    )
