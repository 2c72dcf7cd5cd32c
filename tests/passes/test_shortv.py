"""ShortV: graph rewrite vs its eager reference (prefill, on two LLaVA configs), identity,
structure of the rewritten graph, FLOPs against the analytic formula, option errors, and LC
calibration. Decode parity (16 steps through the ONNX engine) is in tests/compiler/test_compile.py."""

from __future__ import annotations

import pytest
import torch

from mllmc.compiler.core.capture import capture, prefill_feeds
from mllmc.compiler.core.flops import analytic_prefill_flops, count_flops, reference_prefill_inputs
from mllmc.compiler.core.locator import locate_layers
from mllmc.passes import get_pass, parse_pass_spec
from mllmc.passes.shortv import ShortVConfig, keep_rows, prepare, shortv
from mllmc.runtime.errors import UserError


def _prefill_inputs(model_dir, info, image_path):
    """The HF processor's inputs for one image + prompt, and the prefill's feeds for the same
    prompt once `pixel_values` become features: feeds(features) -> the 5 prefill inputs."""
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    inputs = proc(
        images=Image.open(image_path),
        text="USER: <image>\nDescribe the image. ASSISTANT:",
        return_tensors="pt",
    )

    def feeds(features):
        return prefill_feeds(inputs["input_ids"], features, info.image_token_id)

    return inputs, feeds


def _frozen_sets(num_layers: int) -> list[tuple[int, ...]]:
    last = num_layers - 1
    return [(0,), (last,), (1, 2), (0, 2, 3, last), tuple(range(num_layers))]


def test_rewrite_matches_eager_reference(captured, sample_image):
    model_dir, model, info, segs = captured
    inputs, feeds = _prefill_inputs(model_dir, info, sample_image)
    with torch.no_grad():
        feats = segs.vision.program.module()(inputs["pixel_values"])
        base = model(**inputs).logits[0, -1]
        for layers in _frozen_sets(info.num_layers):
            out = shortv(segs, ShortVConfig(layers=layers)).segments
            got = out.prefill.program.module()(*feeds(feats))
            with keep_rows(model, layers):
                ref = model(**inputs).logits[0, -1]
            assert (got[0][0] - ref).abs().max().item() <= 1e-4, layers
            # the check can fail: freezing a layer below the last really changes the output
            # (the last layer's visual rows feed nothing: freezing it alone is exact)
            if min(layers) < info.num_layers - 1:
                assert (ref - base).abs().max().item() > 1e-3, layers
            else:
                assert (ref - base).abs().max().item() <= 1e-4
            # keys/values stay those of all n rows (text still attends to visual tokens)
            assert got[1].shape[2] == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rewrite_in_half_precision(tiny_model_dir, sample_image, dtype):
    """A model loaded in bf16/fp16 is captured and rewritten in its own dtype. In half precision
    the residual add reads the previous layer's output node itself (in fp32 an aliasing `to`
    node sits between), so adjacent frozen layers check that each rewrite sees the graph as the
    previous one left it."""
    from transformers import LlavaForConditionalGeneration

    from mllmc.compiler.core.capture import model_info

    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    info = model_info(model, tiny_model_dir)
    segs = capture(model, info)
    assert segs.prefill.example_inputs[1].dtype == dtype
    inputs, feeds = _prefill_inputs(tiny_model_dir, info, sample_image)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        feats = segs.vision.program.module()(inputs["pixel_values"])
        for layers in ((1, 2), (0, 1, 2, 3, 4, 5)):
            out = shortv(segs, ShortVConfig(layers=layers)).segments
            got = out.prefill.program.module()(*feeds(feats))
            assert got[0].dtype == dtype
            with keep_rows(model, layers):
                ref = model(**inputs).logits[0, -1]
            # same ops in the same order as HF: equal up to one half-precision step at the
            # largest logit (measured: bit-identical on CPU)
            tol = torch.finfo(dtype).eps * ref.abs().max().item()
            assert (got[0][0] - ref).abs().max().item() <= tol, (dtype, layers)


def _row_writes(seg) -> int:
    """index_copy nodes that write rows of a hidden state through a flattened (n, d) view:
    ShortV's write-back of each frozen layer's text rows. The image features' splice (dim 0 of
    the (n, d) embeddings, which no flatten produces) and the text index's own visual-row marks
    (an index_copy along dim 0 of a 1-D tensor) are not counted; neither is an index_copy along
    dim 1, which a graph counted here may still hold."""
    copy, flat = torch.ops.aten.index_copy.default, torch.ops.aten.flatten.using_ints
    return sum(
        n.target is copy and (n.args[1] == 1 or getattr(n.args[0], "target", None) is flat)
        for n in seg.program.graph.nodes
    )


def test_identity_config_is_the_unmodified_graph(captured, sample_image):
    """Freezing only the last layer's visual rows changes nothing the model outputs (those rows
    feed no later layer and no logit; keys/values are still computed from every row): the real
    rewrite runs, and its outputs equal the unrewritten graph's."""
    model_dir, model, info, segs = captured
    last = info.num_layers - 1
    result = shortv(segs, ShortVConfig(layers=(last,)))
    assert _row_writes(result.segments.prefill) == _row_writes(segs.prefill) + 1  # it did fire
    inputs, feeds = _prefill_inputs(model_dir, info, sample_image)
    with torch.no_grad():
        feats = segs.vision.program.module()(inputs["pixel_values"])
        args = feeds(feats)
        a = segs.prefill.program.module()(*args)
        b = result.segments.prefill.program.module()(*args)
    assert len(a) == len(b) == 1 + 2 * info.num_layers
    assert all((x - y).abs().max().item() <= 1e-6 for x, y in zip(a, b, strict=True))


def test_rewritten_graph_structure(captured):
    _, _, info, segs = captured
    frozen = (0, info.num_layers - 1)
    new = shortv(segs, ShortVConfig(layers=frozen)).segments
    layers = locate_layers(new.prefill.program.graph_module.graph)
    ids, _, visual_rows = new.prefill.example_inputs[:3]  # the example the graph is traced at
    n, n_text = ids.shape[1], ids.shape[1] - visual_rows.shape[0]
    for layer in layers:
        q_rows = layer.q_proj.meta["val"].shape[1]
        mlp_rows = layer.mlp_residual.meta["val"].shape[1]
        k_rows = layer.k_proj.meta["val"].shape[1]
        if layer.index in frozen:
            # q_proj and the MLP see the n_text text rows only; k/v see all n rows
            hint = lambda s: int(s.node.hint) if hasattr(s, "node") else int(s)  # noqa: E731
            assert hint(q_rows) == n_text and hint(mlp_rows) == n_text
            assert hint(k_rows) == n
        else:
            assert q_rows == k_rows == mlp_rows

    # per frozen layer: gathers of the norm output and of the residual, one scatter back; the
    # cos/sin tables and the causal mask are gathered once for all frozen layers
    def count(seg, op):
        return sum(n.target is op for n in seg.program.graph.nodes)

    select = torch.ops.aten.index_select.default
    assert count(new.prefill, select) - count(segs.prefill, select) == 2 * len(frozen) + 3
    assert _row_writes(new.prefill) - _row_writes(segs.prefill) == len(frozen)
    # the decode segment is not touched
    assert new.decode is segs.decode
    assert [not p.visual_computed for p in new.layer_plan] == [
        i in frozen for i in range(info.num_layers)
    ]


def test_flops_from_graph_match_analytic_formula(captured):
    _, _, info, segs = captured
    frozen = {1, 2}
    new = shortv(segs, ShortVConfig(layers=tuple(frozen))).segments
    inputs = reference_prefill_inputs(info, n_text=64)
    assert count_flops(segs.prefill.program, inputs) == analytic_prefill_flops(info, 64)
    assert count_flops(new.prefill.program, inputs) == analytic_prefill_flops(info, 64, frozen)
    assert analytic_prefill_flops(info, 64, frozen) < analytic_prefill_flops(info, 64)


def test_option_errors(captured):
    _, model, info, _ = captured
    with pytest.raises(UserError, match="out of range"):
        prepare(ShortVConfig(layers=(info.num_layers,)), model, info)
    with pytest.raises(UserError, match="duplicate layers"):
        parse_pass_spec("shortv:layers=[1,1]")
    with pytest.raises(UserError, match=r"ratio must be in \[0, 1\)"):
        parse_pass_spec("shortv:ratio=1.0")
    with pytest.raises(UserError, match="unknown option 'k'.*valid options: layers, ratio, lc"):
        parse_pass_spec("shortv:k=2")
    with pytest.raises(
        UserError,
        match="unknown pass 'shortx'.*valid passes: fastervlm, fastv, shortv, vispruner, vtc_cls",
    ):
        parse_pass_spec("shortx")
    with pytest.raises(UserError, match="LC file .* not found"):
        prepare(ShortVConfig(lc="/nonexistent/lc.json"), model, info)


def test_parse_pass_spec_values():
    info, cfg = parse_pass_spec("shortv:layers=[3,5,6]")
    assert info is get_pass("shortv")
    assert cfg.layers == (3, 5, 6) and parse_pass_spec("shortv:ratio=0.5")[1].ratio == 0.5
    assert parse_pass_spec("none") is None
    _, cfg = parse_pass_spec("shortv:lc=out/lc.json")
    assert cfg.lc == "out/lc.json" and cfg.layers is None


def test_calibration_order_is_deterministic_and_used(captured, tmp_path):
    from mllmc.compiler.data.calib_images import builtin_samples
    from mllmc.passes.calibration import layer_contribution

    _, model, info, _ = captured
    samples = builtin_samples(info, n=2)
    a = layer_contribution(model, info, samples)
    b = layer_contribution(model, info, samples)
    assert a["order"] == b["order"] and a["lc_visual"] == b["lc_visual"]
    assert sorted(a["order"]) == list(range(info.num_layers))
    assert all(v >= 0 for v in a["lc_visual"]) and max(a["lc_visual"]) > 0
    lc_vals = [a["lc_visual"][i] for i in a["order"]]
    assert lc_vals == sorted(lc_vals)
    import json

    path = tmp_path / "lc.json"
    path.write_text(json.dumps(a))
    cfg = prepare(ShortVConfig(ratio=0.4, lc=str(path)), model, info)
    k = int(round(0.4 * info.num_layers))
    assert cfg.layers == tuple(sorted(a["order"][:k]))
    assert "lc file" in cfg.order_from


def test_published_lists_are_used_for_matching_models():
    from types import SimpleNamespace

    from mllmc.passes.shortv import PUBLISHED_ORDERS

    model = SimpleNamespace(config=SimpleNamespace(model_type="llava"))
    llava7b = SimpleNamespace(hidden_size=4096, num_layers=32, image_size=336)
    cfg = prepare(ShortVConfig(), model, llava7b)  # ratio 0.6 of 32 layers = 19, the paper's count
    assert cfg.layers == tuple(sorted(PUBLISHED_ORDERS["llava-1.5-7b"]))
    assert "llava-1.5-7b" in cfg.order_from
    llava13b = SimpleNamespace(hidden_size=5120, num_layers=40, image_size=336)
    cfg = prepare(ShortVConfig(ratio=0.5), model, llava13b)
    assert cfg.layers == tuple(sorted(PUBLISHED_ORDERS["llava-1.5-13b"][:20]))
    with pytest.raises(UserError, match="published llava-1.5-7b list has 19"):
        prepare(ShortVConfig(ratio=0.9), model, llava7b)
    no_image = SimpleNamespace(hidden_size=64, num_layers=4, image_size=32, visual_tokens=0)
    with pytest.raises(UserError, match="no visual tokens"):
        prepare(ShortVConfig(layers=(1,)), model, no_image)


def test_recipe_file(tmp_path):
    from mllmc.passes import parse_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "shortv"\nlayers = [1, 3]\n\n[[pass]]\nname = "none"\n')
    [(info, cfg)] = parse_recipe(str(recipe))
    assert info.name == "shortv" and cfg.layers == (1, 3)
    recipe.write_text('[[pass]]\nname = "shortv"\nfoo = 1\n')
    with pytest.raises(UserError, match="unknown option 'foo'"):
        parse_recipe(str(recipe))
    recipe.write_text("[[pass]\n")
    with pytest.raises(UserError, match="bad recipe"):
        parse_recipe(str(recipe))
    with pytest.raises(UserError, match="not found"):
        parse_recipe(str(tmp_path / "missing.toml"))
