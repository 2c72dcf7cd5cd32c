"""Prompts with several images: `load(...).generate([image_a, image_b], prompt)` against HF's
`LlavaForConditionalGeneration.generate` for two images of different sizes, with the prompt
through HF's chat template (two image entries) or with its own two placeholders; a prompt whose
placeholders and images do not pair up is one line, through the API and `mllmc run`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mllmc.runtime import Engine, UserError, load
from tests.runtime.test_engine import one_line_error, run_cli

STEPS = 16
QUESTION = "What differs between the pictures?"
PLACED = "USER: <image>\n<image>\nWhat differs between the pictures? ASSISTANT:"


@pytest.fixture(scope="module")
def engine(tiny_base_artifact: Path) -> Engine:
    return load(tiny_base_artifact)


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(tiny_model_dir)


def hf_inputs(processor: Any, images: list[Image.Image], prompt: str) -> Any:
    """HF's own inputs: the chat template with one image entry per image for a prompt without
    placeholders (tokenized by apply_chat_template), else the processor on the prompt as is."""
    if processor.image_token in prompt:
        return processor(images=images, text=prompt, return_tensors="pt")
    content = [{"type": "image", "image": image} for image in images]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def hf_generate(model: Any, inputs: Any, steps: int) -> tuple[list[int], np.ndarray]:
    """HF greedy generation of `steps` tokens (EOS does not stop it) -> (tokens, logits)."""
    config = model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = None  # generate() would stop at EOS; the engine runs all the steps
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=steps,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
    finally:
        config.eos_token_id = saved
    n = inputs["input_ids"].shape[1]
    return out.sequences[0, n:].tolist(), torch.cat(out.logits).float().numpy()


@pytest.mark.parametrize("prompt", [QUESTION, PLACED], ids=["chat-template", "placeholders"])
def test_two_images_match_hf_generate(
    engine: Engine, hf: tuple[Any, Any], sample_image: Path, tall_image: Path, prompt: str
):
    model, processor = hf
    images = [Image.open(sample_image).convert("RGB"), Image.open(tall_image).convert("RGB")]
    assert images[0].size != images[1].size
    inputs = hf_inputs(processor, images, prompt)
    assert inputs["pixel_values"].shape[0] == 2
    want_tokens, want_logits = hf_generate(model, inputs, STEPS)

    got = engine.generate([sample_image, tall_image], prompt, STEPS, stop_at_eos=False)
    layout = engine.encode_prompt(prompt, engine.image_rows([sample_image, tall_image]))
    np.testing.assert_array_equal(layout.input_ids, inputs["input_ids"].numpy())
    assert len(layout.image_spans) == 2 and got.prompt_tokens == layout.n
    assert got.logits.shape == want_logits.shape == (STEPS, engine.manifest.model.vocab_size)
    assert got.token_ids == want_tokens
    assert float(np.abs(got.logits - want_logits).max()) <= 1e-4

    # the images are read in prompt order: swapped, the first step's logits move
    swapped = engine.generate([tall_image, sample_image], prompt, 1)
    assert float(np.abs(swapped.logits[0] - got.logits[0]).max()) > 1e-3


@pytest.mark.parametrize(
    ("prompt", "count", "match"),
    [
        ("USER: <image>\nWhat differs? ASSISTANT:", 2, "1 <image> placeholder but 2 images were"),
        ("USER: <image><image><image> Hi ASSISTANT:", 2, "3 <image> placeholders but 2 images"),
        ("USER: <image>\n<image>\nHi ASSISTANT:", 1, "2 <image> placeholders but 1 image was"),
    ],
)
def test_placeholders_that_do_not_pair_with_the_images(
    engine: Engine, sample_image: Path, tall_image: Path, prompt: str, count: int, match: str
):
    images = [sample_image, tall_image][:count]
    with pytest.raises(UserError, match=match) as err:
        engine.generate(images, prompt, 2)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=match):
        engine.encode_prompt(prompt, engine.image_rows(images))


def test_run_with_two_images(
    tiny_base_artifact: Path, engine: Engine, sample_image: Path, tall_image: Path
):
    """`mllmc run --image A --image B`: the tokens the API generates; a prompt with one
    placeholder for the two images: exit 2, one line."""
    images = ["--image", sample_image, "--image", tall_image]
    proc = run_cli("run", tiny_base_artifact, *images, "--prompt", QUESTION, "--max-new-tokens", 6)
    assert proc.returncode == 0, proc.stderr
    printed = re.search(r"^tokens: \[([\d, ]+)\]$", proc.stdout, re.MULTILINE)
    assert printed, proc.stdout
    want = engine.generate([sample_image, tall_image], QUESTION, 6).token_ids
    assert [int(t) for t in printed.group(1).split(",")] == want

    one = "USER: <image>\nWhat differs? ASSISTANT:"
    proc = run_cli("run", tiny_base_artifact, *images, "--prompt", one)
    one_line_error(proc, "the prompt has 1 <image> placeholder but 2 images were given")


def test_more_images_than_the_context_or_a_vision_call_holds(tiny_base_artifact: Path):
    """Too many images is one line: past the tiles one vision call takes, or past the model's
    positions (here a context of 40 positions: three 16-row images and the template's text)."""
    import dataclasses

    engine = load(tiny_base_artifact)
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(UserError, match="257 images make 257 vision tiles; one prompt takes at"):
        engine.generate([image] * 257, "Hi", max_new_tokens=1)
    model = dataclasses.replace(engine.manifest.model, max_position_embeddings=40)
    engine.manifest = dataclasses.replace(engine.manifest, model=model)
    with pytest.raises(UserError, match=r"the prompt takes \d+ tokens with its images, more than"):
        engine.generate([image] * 3, "Hi", max_new_tokens=1)
    assert len(engine.generate([image], "Hi", max_new_tokens=1).token_ids) == 1


def test_golden_and_hf_eval_refuse_images_that_do_not_fit(
    tiny_base_artifact: Path, tiny_model_dir: Path, sample_image: Path, tall_image: Path, tmp_path
):
    """A golden file records one image: two are one line, not the last one kept; HF eager's eval
    refuses placeholders that do not pair with the images as the runtime does."""
    golden = ["golden", "record", tiny_base_artifact, "--image", sample_image]
    proc = run_cli(*golden, "--image", tall_image, "--prompt", "Hi", "-o", tmp_path / "g.json")
    one_line_error(proc, "golden record takes one --image, got 2")
    assert not (tmp_path / "g.json").exists()
    data = tmp_path / "d.jsonl"
    row = '{"image": "%s", "prompt": "USER: <image><image> Hi ASSISTANT:", "answer": "x"}\n'
    data.write_text(row % sample_image)
    proc = run_cli("eval", tiny_model_dir, "--data", data, "-q")
    one_line_error(proc, "the prompt has 2 <image> placeholders but 1 image was given")
