"""Golden regression tests of the project's own artifacts: the tiny preset (seed 0), compiled
without passes and with ShortV, must keep generating what tests/goldens/*.json recorded (tokens
exactly, logits within 1e-3). Re-record, deliberately, with `pytest tests/test_goldens.py
--update-goldens`; each file says where and with what it was recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllmc.runtime import golden

GOLDENS = Path(__file__).parent / "goldens"
IMAGE = Path(__file__).parents[1] / "examples" / "images" / "shapes.png"
PROMPT = "Describe the image."


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-llava-shortv"])
def test_golden(name, request, tiny_base_artifact, tiny_shortv_artifact):
    artifact = tiny_shortv_artifact if name.endswith("shortv") else tiny_base_artifact
    path = GOLDENS / f"{name}.json"
    if request.config.getoption("--update-goldens"):
        record = golden.record(artifact, IMAGE, PROMPT, max_new_tokens=16, golden_path=path)
        path.write_text(json.dumps(record, indent=2) + "\n")
        pytest.skip(f"re-recorded {path}")
    assert path.is_file(), f"{path} missing: record it with --update-goldens"
    expected = golden.read_golden(path)  # the image path is relative to the golden file
    problems = golden.check(artifact, expected, tol=1e-3)
    assert not problems, "; ".join(problems)
    assert len(expected["token_ids"]) >= 1
