"""vispruner on Qwen2-VL and Qwen2.5-VL (fixtures `qwen_dirs`, `qwen`: tests/conftest.py): the
rewritten vision segment (one call per image) keeps the merged tokens the eager reference on
HF's own model keeps (scores from HF's last vision block through hooks), the prefill on the kept
rows at their own 3-D positions matches HF's language model under the references (alone, then
shortv, then fastv; one and two images), identity configs, no NonZero, the layer plan and
FLOPs, the ONNX engine end to end against HF `generate` with the references active (alone and
then shortv), and the one-line refusals (bad options; a tower with [CLS])."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mllmc.compiler.core.capture import prefill_feeds
from mllmc.compiler.core.flops import analytic_prefill_flops, count_flops, reference_prefill_inputs
from mllmc.compiler.pipeline import prepare_passes, resolve_passes, run_passes
from mllmc.passes.vispruner import VisPrunerConfig, vispruned_forward
from tests.compiler.test_qwen2_vl import CASES, hf_generate, hf_inputs, image, rope_index
from tests.compiler.test_qwen2_vl import vision_feeds as hf_vision_feeds
from tests.compiler.tools.test_cli import user_error

SPECS = [
    ["vispruner:ratio=0.5"],
    ["vispruner:keep=3", "shortv:layers=[0,2]"],
    ["vispruner:ratio=0.5", "fastv:k=1,ratio=0.5"],
    ["vispruner"],
]


def rewrite(qwen, specs):
    _, model, info, segs = qwen
    return run_passes(segs, prepare_passes(resolve_passes(specs), model, info))


@pytest.fixture(scope="module")
def rewritten(qwen):
    """rewrite(qwen, specs), each spec list rewritten once per model."""
    done: dict[tuple[str, ...], tuple] = {}

    def get(specs):
        if tuple(specs) not in done:
            done[tuple(specs)] = rewrite(qwen, specs)
        return done[tuple(specs)]

    return get


def per_image(info, inputs) -> list[list[torch.Tensor]]:
    """The vision segment's feeds for each image of HF's inputs alone (one call per image)."""
    grids = inputs["image_grid_thw"]
    pixels = inputs["pixel_values"].split(grids.prod(-1).tolist())
    return [hf_vision_feeds(info, p, g[None]) for p, g in zip(pixels, grids, strict=True)]


def run_vision(segs, info, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every image's kept rows (V, d), in order, and each image's `patch_index`."""
    vision = segs.vision.program.module()
    with torch.no_grad():
        outs = [vision(*feeds) for feeds in per_image(info, inputs)]
    return torch.cat([o[0] for o in outs]), [o[1] for o in outs]


def kept_prompt(info, inputs, index: list[torch.Tensor]) -> torch.Tensor:
    """(n,) bool: the prompt's text rows and each image's kept rows."""
    ids = inputs["input_ids"][0]
    is_image = ids == info.image_token_id
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    table = torch.cat(
        [
            torch.zeros(c, dtype=torch.bool).index_fill(0, i, True)
            for c, i in zip(counts, index, strict=True)
        ]
    )
    return ~is_image | table[(torch.cumsum(is_image.long(), 0) - 1).clamp(min=0)]


def pruned_prefill(qwen, segs, inputs) -> tuple[torch.Tensor, list[torch.Tensor], tuple]:
    """(the rewritten prefill's last logits, each image's patch_index, the prefill's feeds): the
    prompt holds the kept rows only, each at the 3-D position HF's get_rope_index gives it over
    the whole image."""
    _, model, info, _ = qwen
    features, index = run_vision(segs, info, inputs)
    keep = kept_prompt(info, inputs, index)
    positions = rope_index(model, inputs)[..., keep]
    feeds = prefill_feeds(inputs["input_ids"][:, keep], features, info.image_token_id, positions)
    with torch.no_grad():
        out = segs.prefill.program.module()(*feeds)
    return out[0][0], index, feeds


@pytest.mark.parametrize("specs", SPECS, ids=["+".join(s) for s in SPECS])
@pytest.mark.parametrize("case", ["wide", "two-images"])
def test_kept_tokens_and_prefill_match_eager_reference(qwen, rewritten, specs, case):
    model_dir, model, info, _ = qwen
    segs, records = rewritten(specs)
    inputs = hf_inputs(model_dir, [image(*c) for c in CASES[case]])
    got, index, feeds = pruned_prefill(qwen, segs, inputs)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        plain = model(**inputs).logits[0, -1]
        state = [stack.enter_context(r.reference(model, None)) for r in records][0]
        ref = model(**inputs).logits[0, -1]
    assert [i.tolist() for i in index] == [s.tolist() for s in state.selected]
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    assert [len(i) for i in index] == [records[0].config.kept(c) for c in counts]
    assert all(bool((i[1:] > i[:-1]).all()) for i in index)  # ascending
    assert feeds[2].shape[0] < sum(counts)  # fewer rows enter the LLM
    assert (got - ref).abs().max().item() <= 1e-4, (specs, case)
    assert (ref - plain).abs().max().item() > 1e-3  # the check can fail


def test_reference_decode_without_positions_follows_the_whole_prompt(qwen):
    """A decode step fed no positions (HF would count the shorter cache) equals generate's."""
    model_dir, model, _, _ = qwen
    inputs = hf_inputs(model_dir, [image(*CASES["wide"][0])])
    cfg = VisPrunerConfig(ratio=0.5)
    with torch.no_grad(), vispruned_forward(model, cfg):
        tokens, logits = hf_generate(model, inputs, steps=2)
        out = model(**inputs, use_cache=True)
        step = model(input_ids=torch.tensor([[tokens[0]]]), past_key_values=out.past_key_values)
    assert (out.logits[0, -1] - logits[0]).abs().max().item() <= 1e-5
    assert (step.logits[0, -1] - logits[1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("spec", ["vispruner:ratio=0", "vispruner:keep=100000"])
def test_identity_config_matches_the_unrewritten_vision_segment(qwen, rewritten, spec):
    _, _, info, base = qwen
    segs, _ = rewritten([spec])
    m = info.spatial_merge_size
    for grids in ([(1, 2 * m, 4 * m)], [(1, 6 * m, 2 * m)]):
        feeds = hf_vision_feeds(
            info,
            torch.randn(sum(t * h * w for t, h, w in grids), 6 * info.vision_patch_size**2),
            torch.tensor(grids),
        )
        with torch.no_grad():
            features, index = segs.vision.program.module()(*feeds)
            expected = base.vision.program.module()(*feeds)
        assert index.tolist() == list(range(expected.shape[0]))
        assert torch.equal(features, expected)
    assert segs.visual_tokens == base.visual_tokens


@pytest.mark.parametrize(
    "ratio, merged, kept", [(0.5, 2, 1), (0.778, 4, 1), (0.778, 36, 8), (0.5, 5, 3)]
)
def test_a_small_image_keeps_at_least_one_token(qwen, rewritten, ratio, merged, kept):
    """keep = max(1, round(M·(1-R))), halves up, computed in the graph from the image's M."""
    _, _, info, _ = qwen
    segs, _ = rewritten([f"vispruner:ratio={ratio}"])
    m = info.spatial_merge_size
    grid = [(1, m, merged * m)]
    feeds = hf_vision_feeds(
        info, torch.randn(merged * m * m, 6 * info.vision_patch_size**2), torch.tensor(grid)
    )
    with torch.no_grad():
        features, index = segs.vision.program.module()(*feeds)
    assert VisPrunerConfig(ratio=ratio).kept(merged) == kept == index.shape[0] == features.shape[0]


def test_no_nonzero_plan_and_flops(qwen, rewritten):
    _, _, info, _ = qwen
    segs, records = rewritten(["vispruner:ratio=0.5", "shortv:layers=[0,2]"])
    for seg in segs:
        targets = {str(n.target) for n in seg.program.graph.nodes if n.op == "call_function"}
        assert not any("nonzero" in t for t in targets), seg.name
    assert segs.vision.output_names == ["image_features", "patch_index"]
    rows = info.visual_tokens
    kept = (rows + 1) // 2
    assert records[0].applied.stats["kept_visual_tokens"] == kept == segs.visual_tokens
    assert [p.visual_tokens for p in segs.layer_plan] == [kept] * info.num_layers
    n_text = 16
    measured = count_flops(segs.prefill.program, reference_prefill_inputs(info, n_text, kept))
    assert measured == analytic_prefill_flops(info, n_text, plan=segs.layer_plan)
    # the plan from config.json alone says the same
    from mllmc.compiler.tools.plan import plan

    layers = plan(qwen[0] / "config.json", ["vispruner:ratio=0.5"])["layers"]
    assert [p["visual_tokens"] for p in layers] == [kept] * info.num_layers


# ----------------------------------------------------------------------------------------------
# The ONNX engine end to end


@pytest.fixture(scope="module")
def artifacts(qwen, tmp_path_factory):
    """vispruner alone, and then shortv, compiled to ONNX (validated at compile time)."""
    from mllmc.compiler.pipeline import compile_model

    root = tmp_path_factory.mktemp("vispruner")
    out = {}
    for specs in (["vispruner:ratio=0.5"], ["vispruner:keep=5", "shortv:layers=[0,2]"]):
        name = "+".join(s.split(":")[0] for s in specs)
        out[name] = compile_model(qwen[0], root / name, specs, progress=False).out_dir, specs
    return out


@pytest.mark.slow  # compiles four artifacts (~15 s each)
@pytest.mark.parametrize("name", ["vispruner", "vispruner+shortv"])
@pytest.mark.parametrize("case", ["tall", "two-images"])
def test_onnx_engine_matches_hf_generate_with_references(qwen, rewritten, artifacts, name, case):
    from mllmc.runtime import load

    model_dir, model, _, _ = qwen
    out, specs = artifacts[name]
    images = [image(*c) for c in CASES[case]]
    engine = load(out)
    result = engine.generate(
        images=images, prompt="Describe the image.", max_new_tokens=16, stop_at_eos=False
    )
    _, records = rewritten(specs)
    with contextlib.ExitStack() as stack:
        for record in records:
            stack.enter_context(record.reference(model, None))
        tokens, logits = hf_generate(model, hf_inputs(model_dir, images))
    scale = max(1.0, logits.abs().max().item())
    assert abs(result.logits - logits.numpy()).max() <= 1e-4 * scale
    assert result.token_ids == tokens
    assert engine.manifest.visual_tokens == records[0].applied.stats["kept_visual_tokens"]


# ----------------------------------------------------------------------------------------------
# One-line refusals through the console script


@pytest.mark.parametrize(
    "spec, match",
    [
        ("vispruner:ratio=1.5", "ratio must be in [0, 1)"),
        ("vispruner:keep=0", "keep must be an integer >= 1"),
        ("vispruner:keep=4,ratio=0.5", "not both"),
        ("vispruner:layer=3", "unknown option 'layer'"),
    ],
)
def test_bad_options_are_one_line(qwen_dirs, tmp_path, spec, match):
    out = tmp_path / "out"
    user_error("compile", qwen_dirs["tiny-qwen2.5-vl"], "--pass", spec, "-o", out, match=match)
    assert not out.exists()


def test_a_tower_with_cls_is_refused_naming_fastervlm(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    line = user_error("compile", tiny_model_dir, "--pass", "vispruner", "-o", out, match="[CLS]")
    assert "use fastervlm" in line and not out.exists()
