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
    assert "target onnx, device cpu, dtype float32, decode cache growing)" in text
    assert f"{after['reference_text_tokens']}-text-token prompt" in text  # the KV cache line
