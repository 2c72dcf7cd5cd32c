"""`mllmc bench` on every family: HF eager's timed parts are HF's own forward (the LLM prefill
given the vision features equals the whole forward, the decode step equals `generate`'s), on
the family's reference image, whose rows are the ones the layer plan is stated for; and the
console script runs on Qwen2.5-VL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mllmc.compiler.tools import bench
from tests.compiler.tools.test_cli import mllmc


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir: Path, qwen_dirs: dict[str, Path], tmp_path_factory) -> dict:
    from mllmc.compiler.data.presets import write_preset

    root = tmp_path_factory.mktemp("bench-families")
    return {
        "tiny-llava": tiny_model_dir,
        "tiny-llava-next": write_preset("tiny-llava-next", root / "tiny-llava-next", seed=0),
        **qwen_dirs,
    }


@pytest.mark.parametrize(
    "preset", ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl"]
)
def test_eager_parts_are_hf_forward_on_the_reference_image(model_dirs, preset):
    from mllmc.compiler.core.capture import load_model

    model_dir = model_dirs[preset]
    model, info = load_model(model_dir)
    calls, inputs = bench.eager_calls(
        model, str(model_dir), bench.reference_image(model), bench.prompt_for(12)
    )
    rows = int((inputs["input_ids"] == info.image_token_id).sum())
    assert rows == (info.reference_visual_rows or info.visual_tokens)
    whole = calls["prefill"]()
    part = calls["llm_prefill"]()
    assert (part.logits - whole.logits).abs().max().item() <= 1e-5
    # the decode step the timer runs: one token on the prefill's cache
    with torch.no_grad():
        token = whole.logits[:, -1:].argmax(-1)
        step = model(
            input_ids=token, past_key_values=whole.past_key_values, use_cache=True, logits_to_keep=1
        )
        out = model.generate(
            **inputs,
            max_new_tokens=2,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
        )
    assert (step.logits[0, -1] - out.logits[1][0]).abs().max().item() <= 1e-4


@pytest.mark.slow  # compiles an artifact (~20 s)
def test_bench_console_script_on_qwen(model_dirs, tmp_path):
    from mllmc.compiler.core.capture import load_model

    model_dir = model_dirs["tiny-qwen2.5-vl"]
    out = tmp_path / "bench.json"
    proc = mllmc(
        "bench", model_dir, "--repeats", "1", "--decode-tokens", "2", "--threads", "1", "-o", out
    )
    report = json.loads(out.read_text())
    _, info = load_model(model_dir)
    assert report["visual_tokens"] == info.reference_visual_rows
    assert set(report["rows"]) == {"hf_eager", "mllmc_onnx"}
    for name, row in report["rows"].items():
        assert row["prompt_tokens"] == report["prompt_tokens"], name
        assert row["vision_s"] > 0 and row["llm_prefill_s"] > 0, name
        assert row["decode_s_per_token"] > 0, name
    assert "mllmc_onnx" in proc.stdout
