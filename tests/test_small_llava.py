"""At a size where FLOPs set the time: small-llava (275M parameters, 576 visual tokens), compiled
with ShortV and checked against its eager reference end to end. Slow (minutes on 2 cores):
`make test-all` runs it, the default suite does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllmc.compiler.core.capture import load_model
from mllmc.compiler.data.presets import write_preset
from mllmc.compiler.pipeline import compile_model
from mllmc.compiler.verify import records_from_manifest, verify
from mllmc.runtime.manifest import read_manifest

pytestmark = pytest.mark.slow


def test_small_llava_shortv_matches_its_eager_reference(tmp_path: Path, sample_image: Path):
    model_dir = write_preset("small-llava", tmp_path / "small-llava")
    frozen = [0, 5, 6, 7, 8, 9, 10, 12, 14, 15]  # 10 of 16, first / last / adjacent included
    out = compile_model(
        model_dir, tmp_path / "art", [f"shortv:layers={frozen}"], validate=False, progress=False
    ).out_dir
    manifest = read_manifest(out)
    assert [not layer.visual_computed for layer in manifest.layers] == [
        i in frozen for i in range(16)
    ]
    assert manifest.flops["after"]["prefill"] < 0.6 * manifest.flops["before"]["prefill"]
    model, info = load_model(model_dir)
    report = verify(
        out, model, info, records_from_manifest(manifest), image=sample_image, max_new_tokens=8
    )
    assert report.ok and report.tokens_match, report.line()
    assert report.max_abs_logit_diff <= 1e-4, report.line()
