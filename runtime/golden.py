"""Golden outputs: record what an artifact generates, check later that it still does.

A golden file holds the inputs (prompt, image digest), the generated tokens and text, a per-step
logits summary (top-5 ids and values, mean, std), and provenance (mllmc and onnxruntime versions,
the artifact's manifest digest, source model hash, passes). `check` reruns the artifact and
compares: tokens exactly, logit summaries within `tol`. Torch-free: it runs in a user's CI with
only the runtime installed.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from .engine import MAX_NEW_TOKENS
from .errors import UserError
from .jsonfile import JSONError, read_json
from .manifest import read_manifest

GOLDEN_VERSION = 2  # 2: the image path is relative to the golden file
TOP_K = 5


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _summary(logits: np.ndarray) -> list[dict[str, Any]]:
    steps = []
    for row in logits:
        top = np.argsort(row)[::-1][:TOP_K]
        steps.append(
            {
                "top_ids": [int(i) for i in top],
                "top_values": [float(row[i]) for i in top],
                "mean": float(row.mean()),
                "std": float(row.std()),
            }
        )
    return steps


def record(
    artifact: str | Path,
    image: str | Path,
    prompt: str,
    max_new_tokens: int = 16,
    golden_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run `artifact` on `image` + `prompt` and return the golden record. The image path is
    stored relative to the directory of `golden_path` (where the golden will be written), so a
    check works from any working directory; without it, as an absolute path."""
    import onnxruntime

    from . import __version__, load

    engine = load(artifact)
    image_path = Path(image)
    if not image_path.is_file():
        raise UserError(f"cannot read image {image_path}: no such file")
    result = engine.generate(image_path, prompt, max_new_tokens=max_new_tokens)
    m = engine.manifest
    if golden_path is not None:
        stored = os.path.relpath(image_path.resolve(), Path(golden_path).resolve().parent)
    else:
        stored = str(image_path.resolve())
    return {
        "golden_version": GOLDEN_VERSION,
        "inputs": {
            "image": Path(stored).as_posix(),
            "image_sha256": _digest(image_path),
            "prompt": prompt,
            "max_new_tokens": max_new_tokens,
        },
        "token_ids": result.token_ids,
        "text": result.text,
        "logits": _summary(result.logits),
        "provenance": {
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "mllmc_version": __version__,
            "onnxruntime_version": onnxruntime.__version__,
            "platform": platform.platform(),
            "manifest_sha256": _digest(Path(artifact) / "manifest.json"),
            "model_config_hash": m.model.config_hash,
            "passes": [{"name": p.name, "config": p.config} for p in m.passes],
        },
    }


def _schema_problem(golden: Any) -> str | None:
    """What makes `golden` not a well-formed golden record (None if it is one)."""
    if not isinstance(golden, dict):
        return "not a JSON object"
    inputs = golden.get("inputs")
    if not isinstance(inputs, dict):
        return "missing 'inputs'"
    for key, tp in (
        ("image", str),
        ("image_sha256", str),
        ("prompt", str),
        ("max_new_tokens", int),
    ):
        if not isinstance(inputs.get(key), tp) or isinstance(inputs.get(key), bool):
            return f"inputs.{key} should be {tp.__name__}"
    if not 1 <= inputs["max_new_tokens"] <= MAX_NEW_TOKENS:
        return f"inputs.max_new_tokens should be from 1 to {MAX_NEW_TOKENS}"
    tokens = golden.get("token_ids")
    if not isinstance(tokens, list) or not tokens or not all(_is_id(t) for t in tokens):
        return "token_ids should be a non-empty list of token ids"
    steps = golden.get("logits")
    if not isinstance(steps, list) or len(steps) != len(tokens):
        n = len(steps) if isinstance(steps, list) else "no"
        return f"logits should hold one entry per generated token ({len(tokens)}), it has {n}"
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            return f"logits[{i}] should be an object"
        ids, values = step.get("top_ids"), step.get("top_values")
        if not isinstance(ids, list) or not ids or not all(_is_id(t) for t in ids):
            return f"logits[{i}].top_ids should be a non-empty list of token ids"
        if not isinstance(values, list) or len(values) != len(ids) or not all(map(_is_num, values)):
            return f"logits[{i}].top_values should be {len(ids)} numbers"
        if not _is_num(step.get("mean")) or not _is_num(step.get("std")):
            return f"logits[{i}] should have numeric mean and std"
    if not isinstance(golden.get("provenance"), dict):
        return "provenance should be an object (what recorded it)"
    return None


def _vocab_problem(golden: dict[str, Any], vocab: int) -> str | None:
    """The first token id of a well-formed `golden` that a `vocab`-token model has not."""
    steps = golden["logits"]
    for where, ids in [("token_ids", golden["token_ids"])] + [
        (f"logits[{i}].top_ids", step["top_ids"]) for i, step in enumerate(steps)
    ]:
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            return f"{where} holds {bad}, not a token id of the artifact's {vocab}-token vocabulary"
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_id(x: Any) -> bool:
    """A token id as far as the file alone says: an integer >= 0."""
    return _is_int(x) and x >= 0


def _is_num(x: Any) -> bool:
    """A number that is a float64 (NaN included: `check` reports it as a difference)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        float(x)
    except OverflowError:  # an integer beyond float64
        return False
    return True


def read_golden(path: str | Path) -> dict[str, Any]:
    """Read and check a golden file; its image path is resolved against the file's directory."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"golden file {p} not found (make one with: mllmc golden record)")
    try:
        golden = read_json(p, allow_nan=True)  # a NaN logit recorded fails the check
    except JSONError as e:
        raise UserError(f"corrupt golden file {p}: {e}") from None
    if not isinstance(golden, dict) or golden.get("golden_version") != GOLDEN_VERSION:
        version = golden.get("golden_version") if isinstance(golden, dict) else None
        raise UserError(
            f"{p} is not an mllmc golden file of version {GOLDEN_VERSION} (it says {version!r}); "
            "re-record it with: mllmc golden record"
        )
    problem = _schema_problem(golden)
    if problem:
        raise UserError(f"corrupt golden file {p}: {problem}")
    image = Path(golden["inputs"]["image"])
    golden["inputs"]["image"] = str(image if image.is_absolute() else p.resolve().parent / image)
    return golden


def check(artifact: str | Path, golden: dict[str, Any], tol: float = 1e-3) -> list[str]:
    """Rerun the golden's inputs on `artifact`; returns the differences (empty: it matches).

    Every recorded step is compared: tokens exactly, the top-5 logit values, mean and std within
    `tol`; a NaN on either side is a difference, never a pass."""
    if not (math.isfinite(tol) and tol > 0):
        raise UserError(f"tol must be a positive number, got {tol}")
    problem = _schema_problem(golden) or _vocab_problem(
        golden, read_manifest(artifact).model.vocab_size
    )
    if problem:
        raise UserError(f"corrupt golden record: {problem}")
    inputs = golden["inputs"]
    image = Path(inputs["image"])
    if not image.is_file():
        raise UserError(f"the golden's image {image} is not there (it was recorded with it)")
    if _digest(image) != inputs["image_sha256"]:
        return [f"image {image} changed since the golden was recorded"]
    now = record(artifact, image, inputs["prompt"], inputs["max_new_tokens"])
    problems = []
    if now["token_ids"] != golden["token_ids"]:
        first = next(
            (
                i
                for i, (a, b) in enumerate(zip(now["token_ids"], golden["token_ids"], strict=False))
                if a != b
            ),
            min(len(now["token_ids"]), len(golden["token_ids"])),
        )
        problems.append(
            f"tokens differ from step {first}: got {now['token_ids'][first : first + 4]}, "
            f"golden {golden['token_ids'][first : first + 4]}"
        )
    for step, (a, b) in enumerate(zip(now["logits"], golden["logits"], strict=False)):
        pairs = [*zip(a["top_values"], b["top_values"], strict=False), (a["mean"], b["mean"])]
        pairs.append((a["std"], b["std"]))
        if not all(math.isfinite(y) for _, y in pairs):
            problems.append(f"step {step}: the golden file records NaN or infinite logits")
            break
        if not all(math.isfinite(x) for x, _ in pairs):
            problems.append(f"step {step}: the engine gave NaN or infinite logits")
            break
        worst = max(abs(x - y) for x, y in pairs)
        if a["top_ids"][:1] != b["top_ids"][:1] or worst > tol:
            problems.append(f"step {step}: logits moved by {worst:.2e} (tol {tol:.0e})")
            break
    return problems
