"""Every pass through `--target aoti` (CPU): the two composed pipelines that between them hold
all five passes (pre-LLM fastervlm / vtc_cls, in-LLM fastv / vte, shortv), compiled from
tiny-llava and run for 16 greedy steps against HF generate with the composed eager references
(<= 1e-4, identical tokens), as tests/passes/test_pruning.py does for the ONNX engine. Each
compile reuses the Inductor cache of the packages that passes do not change (decode; vision for
in-LLM passes). Both run with the `slow` tests: by default, the first pipeline runs through
`--target aoti` with int4 weights (tests/compiler/backends/test_torchao_int4.py), and
tests/compiler/backends/test_aoti.py holds a float aoti artifact (ShortV) to 1e-4."""

from __future__ import annotations

import pytest

from mllmc.compiler.core.capture import load_model
from tests.passes.test_pruning import PIPELINES


# ~50 s each on 2 cores
@pytest.mark.slow
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_aoti_matches_composed_references_for_16_tokens(tiny_model_dir, tmp_path, pipeline):
    from mllmc.compiler.pipeline import compile_model
    from mllmc.compiler.verify import LOGIT_TOL, records_from_manifest, verify

    result = compile_model(
        tiny_model_dir,
        tmp_path / pipeline,
        PIPELINES[pipeline],
        target="aoti",
        validate=False,
        progress=False,
    )
    assert [p.name for p in result.manifest.passes] == [
        s.split(":")[0] for s in PIPELINES[pipeline]
    ]
    model, info = load_model(tiny_model_dir)
    records = records_from_manifest(result.manifest)
    report = verify(result.out_dir, model, info, records, max_new_tokens=16)
    assert len(report.step_diffs) == 16, report.line()
    assert report.tokens_match and report.max_abs_logit_diff <= LOGIT_TOL, report.line()
