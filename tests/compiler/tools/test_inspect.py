"""`mllmc inspect`'s description: the target record, FLOPs at one stated prompt, cuts to 0.1%."""

from __future__ import annotations

from pathlib import Path

from mllmc.compiler.tools.inspect_artifact import describe, percent_cut
from mllmc.runtime.manifest import read_manifest


def test_percent_cut():
    assert percent_cut(100, 61.8) == "38.2% cut"
    assert percent_cut(100, 100) == "0.0% cut"
    assert percent_cut(100, 100.01) == "0.0% cut"  # rounds to zero: never "-0.0%"
    assert percent_cut(100, 101.5) == "1.5% more"  # a pass that adds work says so
    assert percent_cut(0, 0) == "0.0% cut"


def test_inspect_states_one_prompt_and_the_target(tiny_shortv_artifact: Path):
    m = read_manifest(tiny_shortv_artifact)
    before, after = m.flops["before"], m.flops["after"]
    text = describe(tiny_shortv_artifact)
    assert "-0.0%" not in text
    assert (
        f"FLOPs      for one image + {after['reference_text_tokens']} text tokens (prompt into "
        f"the LLM: {before['reference_prompt_tokens']} tokens before the passes, "
        f"{after['reference_prompt_tokens']} after), GFLOP:"
    ) in text
    assert "target onnx, device cpu, dtype float32, decode cache static)" in text
    assert f"{after['reference_text_tokens']}-text-token prompt" in text  # the KV cache line


def test_kv_cache_bytes_for_a_prompt_of_two_images(tiny_base_artifact: Path, sample_image: Path):
    """kv_cache_bytes(m, n_text, visual) sizes the cache of a prompt whose visual rows differ
    from the reference image's: equal to the bytes of the cache the engine's prefill returns."""
    from mllmc.compiler.tools.inspect_artifact import kv_cache_bytes
    from mllmc.runtime import load

    engine = load(tiny_base_artifact)
    feats, counts = engine.encode_images([sample_image, sample_image])
    layout = engine.encode_prompt("<image><image> Compare the two pictures.", counts)
    _, cache = engine.prefill(layout, feats)
    n_text = layout.n - layout.num_visual
    kv = kv_cache_bytes(engine.manifest, n_text, layout.num_visual)
    assert layout.num_visual == 2 * engine.manifest.visual_tokens
    assert kv["prompt"] == sum(a.nbytes for a in cache)
    assert kv["prompt"] > kv_cache_bytes(engine.manifest, n_text)["prompt"]  # one image's
