"""Golden outputs: record what an artifact generates, check later that it still does.

A golden file holds the inputs (prompt, image digest), the generated tokens and text, a per-step
logits summary (top-5 ids and values, mean, std), and provenance (mllmc and onnxruntime versions,
the artifact's manifest digest, source model hash, passes). `check` reruns the artifact and
compares: tokens exactly, logit summaries within `tol`. Torch-free: it runs in a user's CI with
only the runtime installed.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

GOLDEN_VERSION = 1
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
    artifact: str | Path, image: str | Path, prompt: str, max_new_tokens: int = 16
) -> dict[str, Any]:
    import onnxruntime

    from . import __version__, load

    engine = load(artifact)
    image_path = Path(image)
    if not image_path.is_file():
        raise UserError(f"cannot read image {image_path}: no such file")
    result = engine.generate(image_path, prompt, max_new_tokens=max_new_tokens)
    m = engine.manifest
    return {
        "golden_version": GOLDEN_VERSION,
        "inputs": {
            "image": str(image_path),
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


def read_golden(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"golden file {p} not found (make one with: mllmc golden record)")
    try:
        golden = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"corrupt golden file {p}: {e}") from None
    if not isinstance(golden, dict) or golden.get("golden_version") != GOLDEN_VERSION:
        raise UserError(f"{p} is not an mllmc golden file of version {GOLDEN_VERSION}")
    return golden


def check(artifact: str | Path, golden: dict[str, Any], tol: float = 1e-3) -> list[str]:
    """Rerun the golden's inputs on `artifact`; returns the differences (empty: it matches)."""
    inputs = golden["inputs"]
    image = Path(inputs["image"])
    if image.is_file() and _digest(image) != inputs["image_sha256"]:
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
        worst = max(abs(x - y) for x, y in zip(a["top_values"], b["top_values"], strict=True))
        worst = max(worst, abs(a["mean"] - b["mean"]), abs(a["std"] - b["std"]))
        if a["top_ids"][:1] != b["top_ids"][:1] or worst > tol:
            problems.append(f"step {step}: logits moved by {worst:.2e} (tol {tol:.0e})")
            break
    return problems
