"""`mllmc plan`: the layer plan and prefill FLOPs from a config.json alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.compiler.tools.test_cli import mllmc, user_error
from tests.conftest import TINY_SHORTV_LAYERS

# LLaVA-NeXT-13B's config.json (llava-hf/llava-v1.6-vicuna-13b-hf), the fields mllmc reads
LLAVA_NEXT_13B = {
    "model_type": "llava_next",
    "image_token_id": 32000,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "text_config": {
        "model_type": "llama",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
    },
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
    },
}


def test_llava_next_13b_shortv_plan_from_the_config_alone(tmp_path: Path):
    """The published LLaVA-NeXT-13B list at ShortV's ratio 0.6 cuts ~50% of the prefill at one
    672 x 672 image (2,928 visual rows), as the paper reports; no weights exist here."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAVA_NEXT_13B))
    out = json.loads(mllmc("plan", str(cfg), "--pass", "shortv", "--json").stdout)
    assert out["reference_prompt"] == {"visual_rows": 2928, "text_tokens": 64}
    frozen = [p["index"] for p in out["layers"] if not p["visual_computed"]]
    assert len(frozen) == 24 and "published list for llava-next-13b" in out["passes"][0]
    assert 0.45 < out["prefill_flops"]["cut"] < 0.55
    text = mllmc("plan", str(tmp_path), "--pass", "shortv").stdout
    assert "2928 visual rows" in text and "% cut" in text


def _plan_matches(model: Path, art: Path, passes: list[str]) -> None:
    """`mllmc plan` with `passes` states the FLOPs and visual rows of the artifact `art`
    compiled from `model` with them, at the reference prompt."""
    manifest = json.loads((art / "manifest.json").read_text())
    out = json.loads(mllmc("plan", str(model), *passes, "--json").stdout)
    assert out["prefill_flops"]["before"] == manifest["flops"]["before"]["prefill"]
    assert out["prefill_flops"]["after"] == manifest["flops"]["after"]["prefill"]
    visual = [p["visual_tokens"] for p in out["layers"]]
    assert visual == [p["visual_tokens"] for p in manifest["layers"]]


def test_plan_flops_equal_the_shared_shortv_artifact(tiny_model_dir, tiny_shortv_artifact):
    """The formula's counts equal the FLOPs counted on the rewritten graphs (the session's
    shortv artifact: no compile of its own)."""
    _plan_matches(
        tiny_model_dir, tiny_shortv_artifact, ["--pass", f"shortv:layers={TINY_SHORTV_LAYERS}"]
    )


@pytest.mark.slow  # a compile of its own (~30 s); shortv alone runs in the default suite
@pytest.mark.parametrize("specs", [["fastv:k=2,ratio=0.5", "shortv:layers=[0,3]"]])
def test_plan_flops_equal_the_compiled_graphs(tmp_path: Path, tiny_model_dir, specs):
    """The same with row pruning before the freezing: an artifact compiled with the passes."""
    passes = [a for s in specs for a in ("--pass", s)]
    art = tmp_path / "art"
    mllmc("compile", str(tiny_model_dir), "-o", str(art), "--no-validate", *passes)
    _plan_matches(tiny_model_dir, art, passes)


def test_plan_bad_input(tmp_path: Path):
    user_error("plan", str(tmp_path / "missing"), match="no config.json")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**LLAVA_NEXT_13B, "model_type": "blip"}))
    user_error("plan", str(cfg), match="unsupported architecture 'blip'")
    cfg.write_text(json.dumps(LLAVA_NEXT_13B))
    user_error("plan", str(cfg), "--pass", "nope", match="unknown pass")
    small = {
        **LLAVA_NEXT_13B,
        "text_config": {**LLAVA_NEXT_13B["text_config"], "hidden_size": 2560},
    }
    cfg.write_text(json.dumps(small))
    user_error("plan", str(cfg), "--pass", "shortv", match="needs a published layer list")


def test_plan_refuses_what_compile_refuses(tiny_model_dir):
    """The option checks compile runs against config.json run here too; vte needs its k."""
    user_error("plan", str(tiny_model_dir), "--pass", "fastv:k=99", match="k=99 out of range")
    user_error("plan", str(tiny_model_dir), "--pass", "shortv:layers=[0,9]", match="out of range")
    user_error("plan", str(tiny_model_dir), "--pass", "vte", match="vte needs k=")
    user_error(
        "plan", str(tiny_model_dir), "--pass", "shortv:layers=[0]", "--pass", "fastv",
        match="pass order refused",
    )  # fmt: skip


def test_plan_at_another_image_size_is_qwen_only(tiny_model_dir):
    """A LLaVA image always makes the tower's rows: asking for another count is refused, as is
    a count or a text length below 1 (one line, exit 2)."""
    match = "only a Qwen2-VL image's rows follow its size"
    user_error("plan", str(tiny_model_dir), "--visual-rows", "3", match=match)
    user_error("plan", str(tiny_model_dir), "--visual-rows", "0", match="visual rows must be")
    user_error("plan", str(tiny_model_dir), "--text-tokens", "0", match="text tokens must be")


def test_plan_cli_at_another_qwen_image_size(qwen_dirs):
    """`mllmc plan --visual-rows N --text-tokens T` states the counts for that prompt: the
    API's, with FastV keeping its ratio of the N rows."""
    from mllmc.compiler.tools.plan import plan

    model = qwen_dirs["tiny-qwen2.5-vl"]
    args = ["--pass", "fastv:k=1,ratio=0.5", "--visual-rows", "40", "--text-tokens", "9"]
    out = json.loads(mllmc("plan", str(model), *args, "--json").stdout)
    assert out["reference_prompt"] == {"visual_rows": 40, "text_tokens": 9}
    assert [p["visual_tokens"] for p in out["layers"]][1:] == [20] * (len(out["layers"]) - 1)
    want = plan(model, ["fastv:k=1,ratio=0.5"], visual_rows=40, text_tokens=9)
    assert out["prefill_flops"] == want["prefill_flops"]
