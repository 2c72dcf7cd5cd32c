"""Pruning and early exit (fastv, vte, fastervlm, vtc_cls) and their composition with shortv:
graph rewrite vs eager reference on two LLaVA configs (prefill; one image, and two images of
different sizes in one prompt), identity configs through the
rewrite machinery, graph structure (TopK / Gather, no NonZero), FLOPs from the rewritten graph vs
the analytic formula over the plan, order rules, bad options through the console script, the vte
exit calibration, and 16-token parity (prefill + decode) through the ONNX engine."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from mllmc.compiler.core.capture import load_model, prefill_feeds
from mllmc.compiler.core.flops import analytic_prefill_flops, count_flops, reference_prefill_inputs
from mllmc.compiler.core.segment_io import segment_io
from mllmc.compiler.pipeline import check_order, prepare_passes, resolve_passes, run_passes
from mllmc.runtime.errors import UserError
from tests.compiler.tools.test_cli import mllmc, user_error

PROMPT = "USER: <image>\nDescribe the image. ASSISTANT:"


def _run(captured, specs, images, prompt=PROMPT):
    """Rewrite with `specs`, then run the rewritten prefill and the composed eager references on
    `images` (one path, or a list of paths / PIL images) + `prompt` (one <image> per image) ->
    (segments, records, graph outputs, reference logits, plain logits, the prefill's feeds)."""
    from PIL import Image
    from transformers import AutoProcessor

    model_dir, model, info, segs = captured
    segs, records = run_passes(segs, prepare_passes(resolve_passes(specs), model, info))
    images = images if isinstance(images, list) else [images]
    images = [Image.open(i) if not isinstance(i, Image.Image) else i for i in images]
    inputs = AutoProcessor.from_pretrained(model_dir)(
        images=images, text=prompt, return_tensors="pt"
    )
    ids = inputs["input_ids"]
    is_image = ids[0] == info.image_token_id
    # the runtime's prompt: each image's run of placeholders holds as many as the vision
    # segment gives per image (its first ones)
    rank = (torch.cumsum(is_image.long(), 0) - 1) % info.visual_tokens
    span = ~is_image | (rank < segs.visual_tokens)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        feats = segs.vision.program.module()(inputs["pixel_values"])  # (images, K, d)
        feeds = prefill_feeds(ids[:, span], feats, info.image_token_id)
        got = segs.prefill.program.module()(*feeds)
        plain = model(**inputs).logits[0, -1]
        for record in records:
            stack.enter_context(record.reference(model, None))
        ref = model(**inputs).logits[0, -1]
    return segs, records, got, ref, plain, feeds


CASES = [
    ["fastv"],
    ["vte:k=0"],
    ["vtc_cls:keep=9", "fastv:k=1,ratio=0.5", "shortv:layers=[0,2]"],
]
SLOW_CASES = [
    ["fastervlm:keep=5"],
    ["fastv:k=2,ratio=0.5", "shortv:layers=[1,2,3]"],
    ["fastv:k=1,ratio=0.75"],
    ["fastv:k=-1"],  # replaced below by the last valid k
    ["vte:k=2"],
    ["fastervlm:ratio=0.5"],
    ["vtc_cls:layers=[0,1],keep=7"],
    ["vte:k=2", "shortv:layers=[0,3]"],
    ["fastervlm:keep=6", "shortv:layers=[1,2]"],
]


@pytest.mark.parametrize(
    "specs",
    [pytest.param(c, id="+".join(c)) for c in CASES]
    + [pytest.param(c, id="+".join(c), marks=pytest.mark.slow) for c in SLOW_CASES],
)
def test_rewrite_matches_eager_reference(captured, sample_image, specs):
    info = captured[2]
    specs = [s.replace("k=-1", f"k={info.num_layers - 1}") for s in specs]
    _check_against_reference(captured, specs, sample_image)


def _check_against_reference(captured, specs, images, prompt=PROMPT):
    """The rewritten prefill against the composed eager references on `images` + `prompt`;
    returns the rewritten segments and the prefill's feeds."""
    segs, records, got, ref, plain, feeds = _run(captured, specs, images, prompt)
    assert (got[0][0] - ref).abs().max().item() <= 1e-4, specs
    # the check can fail: every case here changes what the model computes
    assert (ref - plain).abs().max().item() > 1e-3, specs
    # each layer's present K/V holds the text rows plus the visual rows the plan says
    v = feeds[2].shape[0]
    n_text = feeds[0].shape[1] - v
    for layer, key in zip(segs.layer_plan, got[1::2], strict=True):
        assert key.shape[2] == n_text + layer.kv_visual_rows(v)
        if v == segs.visual_tokens:  # one image: the plan's counts are its counts
            assert layer.kv_visual_rows(v) == layer.kv_visual_tokens
    if any(s.startswith("shortv") for s in specs):
        shortv = records[-1].applied.stats
        if specs[0].startswith("vte"):  # layer 3 is after the exit: nothing to freeze
            assert shortv["skipped_layers"] == [3] and shortv["frozen_layers"] == [0]
        else:
            assert not shortv.get("skipped_layers")
            frozen = [p.index for p in segs.layer_plan if not p.visual_computed]
            assert frozen == shortv["frozen_layers"]
            # frozen layers after a pruning pass freeze the rows they still hold: compare with
            # the pipeline without shortv, which must differ
            got_no_shortv = _run(captured, specs[:-1], images, prompt)[2]
            assert (got[0][0] - got_no_shortv[0][0]).abs().max().item() > 1e-3
    return segs, feeds


TWO_IMAGE_PROMPT = "USER: <image>\nDescribe this. <image>\nAnd this one? ASSISTANT:"


@pytest.mark.parametrize(
    "specs",
    [
        ["fastv"],
        ["vte:k=2"],
        ["shortv:layers=[0,2]"],
        ["fastervlm:keep=5"],
        ["vtc_cls:keep=9"],
        ["vtc_cls:keep=9", "fastv:k=1,ratio=0.5", "shortv:layers=[0,2]"],
    ],
    ids="+".join,
)
def test_rewrite_matches_eager_reference_on_two_images(captured, sample_image, specs):
    """Two images of different sizes in one prompt (two <image> placeholders, as the HF
    processor expands them): every pass keeps matching its eager reference, pre-LLM pruning
    per image and in-LLM pruning over both images' visual rows together."""
    from PIL import Image, ImageDraw

    second = Image.new("RGB", (64, 112), (20, 20, 20))
    draw = ImageDraw.Draw(second)
    draw.polygon([(8, 100), (32, 10), (56, 100)], fill=(240, 200, 20))
    draw.ellipse((20, 60, 44, 84), fill=(30, 200, 90))
    segs, feeds = _check_against_reference(
        captured, specs, [sample_image, second], TWO_IMAGE_PROMPT
    )
    assert feeds[2].shape[0] == 2 * segs.visual_tokens  # both images' rows reach the prefill


IDENTITY = ["fastv:ratio=0.0", "vte:k=L", "fastervlm:keep=N", "vtc_cls:keep=N"]


@pytest.mark.parametrize("spec", IDENTITY)
def test_identity_config_is_the_unmodified_graph(captured, sample_image, spec):
    """A do-nothing config runs the real rewrite (its gathers are in the graph) and gives the
    unrewritten graph's outputs to 1e-6."""
    _, _, info, base = captured
    spec = spec.replace("k=L", f"k={info.num_layers}").replace(
        "keep=N", f"keep={info.visual_tokens}"
    )
    segs, _, got, _, _, _ = _run(captured, [spec], sample_image)
    want = _run(captured, [], sample_image)[2]
    # the row gathers: index_select in the prefill, a per-tile gather in the vision segment
    gathers = (torch.ops.aten.index_select.default, torch.ops.aten.gather.default)
    rewritten = segs.vision if spec.startswith(("fastervlm", "vtc_cls")) else segs.prefill
    unrewritten = base.vision if rewritten.name == "vision" else base.prefill

    def count(seg):
        return sum(n.target in gathers for n in seg.program.graph.nodes)

    assert count(rewritten) > count(unrewritten), spec
    assert len(got) == len(want) == 1 + 2 * info.num_layers
    assert all((a - b).abs().max().item() <= 1e-6 for a, b in zip(got, want, strict=True))


def test_static_graph_and_plan(captured):
    """No NonZero in any graph; the visual rows are the dynamic dim `visual` and the pruned
    layers' caches hold n - visual + kept(visual) rows, the plan's rule."""
    _, model, info, base = captured
    segs, _ = run_passes(base, prepare_passes(resolve_passes(["fastv:k=2"]), model, info))
    targets = {n.target for n in segs.prefill.program.graph.nodes}
    # TopK picks the kept visual rows; the keep index comes in order from a running count and a
    # scatter-add (row_pruning.rows_where)
    assert torch.ops.aten.topk.default in targets
    assert torch.ops.aten.scatter_add.default in targets
    for seg in segs:
        assert not any("nonzero" in str(n.target) for n in seg.program.graph.nodes), seg.name
    kept = int(round(info.visual_tokens * 0.5))
    assert [p.visual_tokens for p in segs.layer_plan] == [info.visual_tokens] * 2 + [kept] * (
        info.num_layers - 2
    )
    assert [p.kv_visual_keep for p in segs.layer_plan] == ["1"] * 2 + ["1/2"] * (
        info.num_layers - 2
    )
    io = segment_io(segs.prefill)
    shapes = {t["name"]: t["shape"] for t in io["inputs"] + io["outputs"]}
    assert shapes["image_features"][1] == shapes["visual_rows"][0] == "visual"
    for p in segs.layer_plan:
        rows = shapes[f"present.{p.index}.key"][2]
        assert (rows == "n") == (p.index < 2), rows
        for n, v in [(40, 16), (40, 7), (100, 1)]:  # the graph's row count is the plan's
            assert eval(
                str(rows), {"__builtins__": {}, "n": n, "visual": v}
            ) == n - v + p.kv_visual_rows(v)
    assert segs.decode is base.decode  # decode takes per-layer cache lengths already
    segs, _ = run_passes(base, prepare_passes(resolve_passes(["fastervlm:keep=4"]), model, info))
    # per tile 4 rows leave the vision segment; the prefill takes any visual count as it is
    assert segs.visual_tokens == 4 and segs.prefill is base.prefill
    assert segment_io(segs.vision)["outputs"][0]["shape"][:2] == ["tiles", 4]
    vision_targets = {n.target for n in segs.vision.program.graph.nodes}
    assert torch.ops.aten.topk.default in vision_targets
    for seg in segs:
        assert not any("nonzero" in str(n.target) for n in seg.program.graph.nodes), seg.name


@pytest.mark.parametrize(
    "specs",
    [["fastv:k=2,ratio=0.5"], ["vte:k=1"], ["fastervlm:keep=5", "shortv:layers=[0,2]"]],
    ids=["fastv", "vte", "fastervlm+shortv"],
)
def test_flops_from_graph_match_analytic_formula(captured, specs):
    _, model, info, base = captured
    segs, records = run_passes(base, prepare_passes(resolve_passes(specs), model, info))
    n_text = 64
    inputs = reference_prefill_inputs(info, n_text, segs.visual_tokens)
    scored = [r.applied.stats["score_layer"] for r in records if r.name == "fastv"]
    want = analytic_prefill_flops(info, n_text, plan=segs.layer_plan, scored_layers=scored)
    assert count_flops(segs.prefill.program, inputs) == want
    assert want < analytic_prefill_flops(info, n_text)


def test_order_rules():
    def refused(*specs: str) -> str:
        with pytest.raises(UserError, match="pass order refused") as e:
            check_order(resolve_passes(list(specs)))
        return str(e.value)

    assert "must come before 'shortv'" in refused("shortv:layers=[1]", "fastv")
    assert "spans conflict" in refused("fastv", "vte:k=2")
    assert "spans conflict" in refused("fastervlm", "vtc_cls")
    assert "before the LLM" in refused("vte:k=2", "fastervlm")
    check_order(resolve_passes(["fastervlm", "fastv", "shortv:layers=[1]"]))  # allowed


def test_bad_options_through_the_console_script(tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    for spec, match in [
        ("fastv:ratio=1.0", "ratio must be in [0, 1)"),
        ("fastv:k=0", "k must be an integer layer index >= 1"),
        ("vte:k=-1", "k must be an integer layer index >= 0"),
        ("fastervlm:keep=0", "keep must be an integer >= 1"),
        ("fastv:scorer=cls", "unknown option 'scorer'"),
        ("fastv:k=6", "k must be in 1..5"),
        ("vte:k=7", "k must be in 0..6"),
        ("fastervlm:keep=17", "keep must be in 1..16"),
    ]:
        user_error("compile", tiny_model_dir, "--pass", spec, "-o", out, match=match)
        assert not out.exists()


def test_vte_calibration_file_feeds_the_pass(tiny_model_dir, tmp_path):
    exit_file = tmp_path / "exit.json"
    proc = mllmc(
        "calibrate", tiny_model_dir, "--pass", "vte", "--threshold", "0.05", "-n", "2", "-o",
        exit_file, "-q",
    )  # fmt: skip
    data = json.loads(exit_file.read_text())
    assert f"vte exit at layer {data['k']}" in proc.stdout
    kl = data["kl"]
    assert len(kl) == data["num_layers"] + 1 and kl[-1] == 0.0
    assert all(v >= 0.05 for v in kl[: data["k"]]) and kl[data["k"]] < 0.05
    from mllmc.passes import parse_pass_spec
    from mllmc.passes.vte import prepare

    model, info = load_model(tiny_model_dir)
    _, cfg = parse_pass_spec(f"vte:calib={exit_file}")
    assert prepare(cfg, model, info).k == data["k"]
    user_error("calibrate", tiny_model_dir, "--pass", "vte", "-o", exit_file, match="--threshold")


PIPELINES = {
    "fastervlm+fastv+shortv": ["fastervlm:keep=6", "fastv:k=2,ratio=0.5", "shortv:layers=[0,3]"],
    "vtc_cls+vte+shortv": ["vtc_cls:layers=[0,1],ratio=0.25", "vte:k=3", "shortv:layers=[1,4]"],
}
# every pass through the engine on both configs; the two cross pairs run with -m slow
ENGINE_CASES = [
    pytest.param("tiny_model_dir", "fastervlm+fastv+shortv", id="tiny-fastervlm+fastv+shortv"),
    pytest.param("other_model_dir", "vtc_cls+vte+shortv", id="other-vtc_cls+vte+shortv"),
    pytest.param(
        "tiny_model_dir", "vtc_cls+vte+shortv", id="tiny-vtc_cls+vte+shortv", marks=pytest.mark.slow
    ),
    pytest.param(
        "other_model_dir",
        "fastervlm+fastv+shortv",
        id="other-fastervlm+fastv+shortv",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize(("model_fixture", "pipeline"), ENGINE_CASES)
def test_engine_matches_composed_references_for_16_tokens(
    request, tmp_path, model_fixture, pipeline
):
    """Prefill and 15 decode steps through the ONNX engine (per-layer cache lengths, decode
    positions from the manifest) against HF generate with the composed eager references."""
    from mllmc.compiler.pipeline import compile_model
    from mllmc.compiler.tools.inspect_artifact import kv_cache_bytes
    from mllmc.compiler.verify import records_from_manifest, verify

    model_dir = request.getfixturevalue(model_fixture)
    model, info = load_model(model_dir)
    composed_artifact = compile_model(
        model_dir, tmp_path / pipeline, PIPELINES[pipeline], validate=False, progress=False
    )
    manifest = composed_artifact.manifest
    report = verify(
        composed_artifact.out_dir,
        model,
        info,
        records_from_manifest(manifest),
        max_new_tokens=16,
    )
    assert report.ok and report.tokens_match and len(report.step_diffs) == 16, report.line()
    # a prompt whose last token is an image token is refused, through the API and `mllmc run`:
    # fastv scores from the last row, vte's exit keeps text rows, so it must be text
    from mllmc.runtime import load

    image, prompt = request.getfixturevalue("sample_image"), "USER: Describe this: <image>"
    with pytest.raises(UserError, match="ends with the image"):
        load(composed_artifact.out_dir).generate(image, prompt, max_new_tokens=1)
    run = ["run", composed_artifact.out_dir, "--image", image, "--prompt", prompt]
    user_error(*run, "--max-new-tokens", "1", match="ends with the image")
    # KV cache bytes follow the plan: fewer visual rows than the unpruned model
    kv = kv_cache_bytes(manifest, 64)
    row = 2 * info.num_kv_heads * info.head_dim * 4
    assert kv["prompt"] == sum((64 + p.kv_visual_tokens) * row for p in manifest.layers)
    assert kv["prompt"] < (64 + info.visual_tokens) * row * info.num_layers


def test_prompt_ending_with_the_image_runs_without_row_pruning(tiny_base_artifact, sample_image):
    """Without fastv / vte the last row may be visual: the prompt runs as HF runs it."""
    from mllmc.runtime import load

    engine = load(tiny_base_artifact)
    layout = engine.encode_prompt("USER: Describe this: <image>")
    [(start, count)] = layout.image_spans
    assert count == engine.visual_tokens and start + count == layout.n
    out = engine.generate(sample_image, "USER: Describe this: <image>", 2, stop_at_eos=False)
    assert len(out.token_ids) == 2
