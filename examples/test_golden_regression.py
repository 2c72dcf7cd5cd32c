"""A golden regression test, written the way you would guard your own artifact in CI.

Record the golden once, next to this file, and commit it:

    mllmc golden record out/my-model --image examples/images/shapes.png \
        --prompt "Describe the image." -o examples/golden.json

Then this test (pytest examples/test_golden_regression.py) fails if a recompile, an onnxruntime
upgrade or a new pass changes what the artifact generates. It needs only the mllmc runtime
(numpy + onnxruntime), not torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mllmc.runtime import golden

ARTIFACT = Path(os.environ.get("MLLMC_ARTIFACT", "out/tiny-shortv"))
GOLDEN = Path(os.environ.get("MLLMC_GOLDEN", Path(__file__).with_name("golden.json")))


@pytest.mark.skipif(
    not ARTIFACT.is_dir() or not GOLDEN.is_file(), reason="no artifact/golden recorded"
)
def test_artifact_still_generates_the_golden_output() -> None:
    problems = golden.check(ARTIFACT, golden.read_golden(GOLDEN), tol=1e-3)
    assert not problems, "; ".join(problems)
