"""shortv, fastv and vte on Qwen2-VL and Qwen2.5-VL (M-RoPE decoders): the rewritten prefill
against the passes' eager references on HF's own model (two images of different sizes, one
image, and a text-only prompt), identity configs, no NonZero, the prefill FLOPs against the
analytic formula, 16 steps through the ONNX engine against HF `generate` with the references
active, and the [CLS] scorers refused on a tower without [CLS]."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mllmc.compiler.core.capture import prefill_feeds
from mllmc.compiler.core.flops import analytic_prefill_flops, count_flops, reference_prefill_inputs
from mllmc.compiler.pipeline import prepare_passes, resolve_passes, run_passes
from tests.compiler.test_qwen2_vl import (
    CASES,
    hf_generate,
    hf_inputs,
    image,
    rope_index,
    vision_feeds,
)
from tests.compiler.tools.test_cli import user_error

SPECS = [
    ["shortv:layers=[0,2]"],
    ["fastv:k=1,ratio=0.5"],
    ["vte:k=1"],
    ["fastv:k=2,ratio=0.75", "shortv:layers=[0,1]"],
    ["vte:k=2", "shortv:layers=[0,2]"],
]


def rewrite(qwen, specs):
    _, model, info, segs = qwen
    return run_passes(segs, prepare_passes(resolve_passes(specs), model, info))


def prefill_vs_reference(qwen, segs, records, case: str):
    """(rewritten prefill's output, reference logits, plain HF logits, the prefill's feeds) on
    the prompt of CASES[case]."""
    model_dir, model, info, base = qwen
    inputs = hf_inputs(model_dir, [image(*c) for c in CASES[case]])
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if "pixel_values" in inputs:
            grid = inputs["image_grid_thw"]
            features = base.vision.program.module()(
                *vision_feeds(info, inputs["pixel_values"], grid)
            )
        else:
            features = torch.zeros(0, info.hidden_size)
        feeds = prefill_feeds(
            inputs["input_ids"], features, info.image_token_id, rope_index(model, inputs)
        )
        got = segs.prefill.program.module()(*feeds)
        plain = model(**inputs).logits[0, -1]
        for record in records:
            stack.enter_context(record.reference(model, None))
        ref = model(**inputs).logits[0, -1]
    return got, ref, plain, feeds


@pytest.mark.parametrize("specs", SPECS, ids=["+".join(s) for s in SPECS])
def test_rewrite_matches_eager_reference(qwen, specs):
    segs, records = rewrite(qwen, specs)
    for case in ("two-images", "wide"):
        got, ref, plain, feeds = prefill_vs_reference(qwen, segs, records, case)
        assert (got[0][0] - ref).abs().max().item() <= 1e-4, (specs, case)
        assert (ref - plain).abs().max().item() > 1e-3, (specs, case)  # the check can fail
        v = feeds[2].shape[0]
        n_text = feeds[0].shape[1] - v
        for layer, key in zip(segs.layer_plan, got[1::2], strict=True):
            assert key.shape[2] == n_text + layer.kv_visual_rows(v)


@pytest.mark.parametrize("specs", [["shortv:layers=[0,2]"], ["vte:k=1", "shortv:layers=[0]"]])
def test_text_only_prompt_runs_the_rewritten_prefill(qwen, specs):
    """V = 0: the prefill takes a prompt without images; a pass over visual rows changes
    nothing (fastv needs a few visual rows to keep: its artifact records the fewest)."""
    segs, records = rewrite(qwen, specs)
    assert segs.min_visual_rows == 0
    got, ref, plain, _ = prefill_vs_reference(qwen, segs, records, "text-only")
    assert (got[0][0] - plain).abs().max().item() <= 1e-4
    assert (ref - plain).abs().max().item() == 0
    fastv, _ = rewrite(qwen, ["fastv:k=1,ratio=0.5"])
    assert fastv.min_visual_rows == 3  # keeps round(V / 2) >= 2 rows


def test_identity_configs_match_the_unrewritten_prefill(qwen):
    _, _, info, base = qwen
    _, _, _, feeds = prefill_vs_reference(qwen, base, [], "two-images")
    with torch.no_grad():
        expected = base.prefill.program.module()(*feeds)[0]
    for spec in ("shortv:layers=[]", "fastv:k=1,ratio=0", f"vte:k={info.num_layers}"):
        segs, _ = rewrite(qwen, [spec])
        with torch.no_grad():
            got = segs.prefill.program.module()(*feeds)[0]
        assert (got - expected).abs().max().item() <= 1e-5, spec


def test_no_nonzero_and_prefill_flops_follow_the_plan(qwen):
    _, _, info, _ = qwen
    segs, records = rewrite(qwen, ["fastv:k=2,ratio=0.75", "shortv:layers=[0,1]"])
    for seg in segs:
        targets = {str(n.target) for n in seg.program.graph.nodes if n.op == "call_function"}
        assert not any("nonzero" in t for t in targets), seg.name
    n_text = 16
    measured = count_flops(segs.prefill.program, reference_prefill_inputs(info, n_text))
    analytic = analytic_prefill_flops(info, n_text, plan=segs.layer_plan, scored_layers=[1])
    assert measured == analytic


def test_plan_at_another_image_size_counts_what_the_graph_computes(qwen):
    """`mllmc plan` with an image of another size than the reference (its own visual rows, the
    benchmark's text rows) gives the FLOPs the rewritten prefill graph performs on that
    prompt: FastV keeps its ratio of those rows, ShortV freezes them."""
    from mllmc.compiler.tools.plan import plan

    model_dir, _, info, _ = qwen
    specs = ["fastv:k=2,ratio=0.75", "shortv:layers=[0,1]"]
    segs, _ = rewrite(qwen, specs)
    n_text = 16
    for rows in (info.reference_visual_rows * 2, 7):
        inputs = reference_prefill_inputs(info, n_text, num_visual=rows)
        measured = count_flops(segs.prefill.program, inputs)
        flops = plan(model_dir, specs, visual_rows=rows, text_tokens=n_text)["prefill_flops"]
        assert flops["after"] == measured, rows
        unrewritten = count_flops(qwen[3].prefill.program, inputs)
        assert flops["before"] == unrewritten, rows


@pytest.fixture(scope="module")
def pass_artifact(qwen, tmp_path_factory):
    """fastv + shortv compiled to ONNX (validated at compile time against the references)."""
    from mllmc.compiler.pipeline import compile_model

    model_dir = qwen[0]
    out = tmp_path_factory.mktemp("qwen-passes") / "fastv-shortv"
    specs = ["fastv:k=1,ratio=0.5", "shortv:layers=[0,2]"]
    return compile_model(model_dir, out, specs, progress=False).out_dir, specs


@pytest.mark.slow  # compiles two artifacts (~20 s each)
@pytest.mark.parametrize("case", ["two-images", "tall"])
def test_onnx_engine_matches_hf_generate_with_references(qwen, pass_artifact, case):
    from mllmc.runtime import load

    model_dir, model, info, _ = qwen
    out, specs = pass_artifact
    images = [image(*c) for c in CASES[case]]
    result = load(out).generate(
        images=images, prompt="Describe the image.", max_new_tokens=16, stop_at_eos=False
    )
    _, records = rewrite(qwen, specs)
    with contextlib.ExitStack() as stack:
        for record in records:
            stack.enter_context(record.reference(model, None))
        tokens, logits = hf_generate(model, hf_inputs(model_dir, images))
    assert abs(result.logits - logits.numpy()).max() <= 1e-4
    assert result.token_ids == tokens


@pytest.mark.parametrize("spec", ["fastervlm:keep=4", "vtc_cls:ratio=0.5"])
def test_cls_scorers_refused_naming_the_alternative(qwen_dirs, tmp_path, spec):
    model_dir = qwen_dirs["tiny-qwen2.5-vl"]
    out = tmp_path / "out"
    line = user_error("compile", model_dir, "--pass", spec, "-o", out, match="no [CLS] token")
    assert "vispruner" in line and not out.exists()
