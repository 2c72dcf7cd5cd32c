"""Prompt layouts: the runtime's multi-image prompt encoding gives the input ids of Hugging Face's
own LlavaProcessor (with and without placeholders, one or two images, equal or different token
counts), the image spans where HF's image tokens sit, and one-line UserErrors when placeholders
and images do not pair up; `expand_placeholders` and `PromptLayout.check` on their own."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mllmc.runtime.errors import UserError
from mllmc.runtime.layout import PromptLayout, expand_placeholders, locate_images
from mllmc.runtime.preprocess import PromptEncoder

N = 16  # tiny-llava: (64 / 16)^2 patches + 1 CLS - 1 ("default" strategy)
IMG = 7  # the image token id in the unit tests


@pytest.fixture(scope="module")
def proc(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return PromptEncoder.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def two_images(sample_image) -> list[Image.Image]:
    """A wide and a tall image: without center crop they give different token counts."""
    tall = Image.new("RGB", (70, 131), (10, 200, 40))
    ImageDraw.Draw(tall).ellipse((5, 20, 60, 110), fill=(240, 240, 20))
    return [Image.open(sample_image).convert("RGB"), tall]


def _chat(prompt: str, images: list) -> list[dict]:
    """The messages HF's apply_chat_template gets: one user turn, the images first, then text
    (an image item without its image where `images` holds None)."""
    items = [{"type": "image"} if im is None else {"type": "image", "image": im} for im in images]
    return [{"role": "user", "content": [*items, {"type": "text", "text": prompt}]}]


def _hf_spans(ids: np.ndarray, image_token_id: int, counts: list[int]) -> list[tuple[int, int]]:
    """Split HF's image-token rows, in order, into one (first row, count) span per image."""
    rows = np.flatnonzero(ids[0] == image_token_id)
    starts = np.cumsum([0, *counts[:-1]])
    return [(int(rows[s]), c) for s, c in zip(starts, counts, strict=True)]


def _assert_matches_hf(layout: PromptLayout, ref_ids: np.ndarray, proc, counts: list[int]):
    assert layout.input_ids.dtype == np.int64
    np.testing.assert_array_equal(layout.input_ids, ref_ids)
    assert list(layout.image_spans) == _hf_spans(ref_ids, proc.image_token_id, counts)
    np.testing.assert_array_equal(
        layout.visual_rows, np.flatnonzero(ref_ids[0] == proc.image_token_id)
    )
    n = ref_ids.shape[1]
    np.testing.assert_array_equal(layout.position_ids, np.arange(n)[None])
    np.testing.assert_array_equal(layout.attention_mask, np.ones((1, n)))
    assert layout.next_position == layout.n == n
    layout.check(vocab_size=len(proc.tokenizer), image_token_id=proc.image_token_id)


# -- against LlavaProcessor -------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    ["USER: <image>\nDescribe the image. ASSISTANT:", "<image>What colour is the shape?"],
)
def test_one_image_with_placeholder_matches_hf(prompt, encoder, proc, two_images):
    ref = proc(images=two_images[:1], text=prompt, return_tensors="np")["input_ids"]
    _assert_matches_hf(encoder.layout(prompt, [N]), ref, proc, [N])
    ids, start = encoder.encode(prompt, N)
    np.testing.assert_array_equal(ids, ref)
    assert start == encoder.layout(prompt, [N]).image_spans[0][0]


def test_one_image_without_placeholder_matches_hf(encoder, proc, two_images):
    prompt = "Describe the image."
    ref = proc.apply_chat_template(
        _chat(prompt, two_images[:1]),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
    )["input_ids"]
    _assert_matches_hf(encoder.layout(prompt, [N]), ref, proc, [N])


def test_two_images_with_placeholders_match_hf(encoder, proc, two_images):
    prompt = "USER: <image>\nHow does it differ from <image>? ASSISTANT:"
    ref = proc(images=two_images, text=prompt, return_tensors="np")["input_ids"]
    layout = encoder.layout(prompt, [N, N])
    _assert_matches_hf(layout, ref, proc, [N, N])
    assert len(layout.image_spans) == 2 and layout.num_visual == 2 * N


def test_two_images_without_placeholders_match_hf(encoder, proc, two_images):
    prompt = "Which image has more shapes?"
    text = proc.apply_chat_template(_chat(prompt, [None, None]), add_generation_prompt=True)
    assert encoder.apply_chat_template(prompt, num_images=2) == text
    assert text.count("<image>") == 2
    ref = proc.apply_chat_template(
        _chat(prompt, two_images),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
    )["input_ids"]
    _assert_matches_hf(encoder.layout(prompt, [N, N]), ref, proc, [N, N])


def test_images_of_different_sizes_match_hf(encoder, proc, two_images):
    """Without center crop HF gives each image its own token count (from its pixel shape)."""
    prompt = "USER: <image> then <image>\nCompare them. ASSISTANT:"
    out = proc(images=two_images, text=prompt, do_center_crop=False)
    extra = proc.num_additional_image_tokens - (proc.vision_feature_select_strategy == "default")
    patch = proc.patch_size
    counts = [(p.shape[-2] // patch) * (p.shape[-1] // patch) + extra for p in out["pixel_values"]]
    assert counts[0] != counts[1]
    ref = np.asarray(out["input_ids"], dtype=np.int64)
    _assert_matches_hf(encoder.layout(prompt, counts), ref, proc, counts)
    swapped = encoder.layout(prompt, counts[::-1])
    assert [c for _, c in swapped.image_spans] == counts[::-1]


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize(
    ("prompt", "counts", "expected"),
    [
        ("USER: <image>\nhi ASSISTANT:", [N, N], "1 <image> placeholder but 2 images were given"),
        ("USER: <image> <image> ASSISTANT:", [N], "2 <image> placeholders but 1 image was given"),
        ("<image> hi", [], "1 <image> placeholder but 0 images were given"),
    ],
)
def test_placeholder_count_mismatch_is_one_line(
    prompt, counts, expected, encoder, proc, two_images
):
    with pytest.raises(UserError) as e:
        encoder.layout(prompt, counts)
    assert expected in _one_line(e)
    with pytest.raises(ValueError, match="<image> tokens"):  # HF refuses it too
        proc(images=two_images[: len(counts)] or None, text=prompt)


def test_encode_is_layout_for_one_image(encoder):
    for prompt in ("Describe the image.", "<image>\nWhat colour?"):
        ids, start = encoder.encode(prompt, N)
        layout = encoder.layout(prompt, [N])
        np.testing.assert_array_equal(ids, layout.input_ids)
        assert layout.image_spans == ((start, N),)
    with pytest.raises(UserError, match="2 <image> placeholders but 1 image") as e:
        encoder.encode("<image> and <image>", N)
    assert "one image per prompt" in _one_line(e)
    with pytest.raises(ValueError):
        encoder.encode("hi", 0)


def test_expand_placeholders_equals_layout(encoder):
    """Tokenizing one placeholder per image then expanding ids gives the processor's ids."""
    prompt = "USER: <image>\nand <image>\nCompare. ASSISTANT:"
    short = encoder.tokenizer.encode(prompt).ids
    counts = [5, 11]
    expanded = expand_placeholders(short, encoder.image_token_id, counts)
    layout = encoder.layout(prompt, counts)
    np.testing.assert_array_equal(expanded.input_ids, layout.input_ids)
    assert expanded.image_spans == layout.image_spans


# -- expand_placeholders / PromptLayout on their own ------------------------------------------


def test_expand_placeholders_spans_rows_and_positions():
    layout = expand_placeholders([1, IMG, 20, 21, IMG, IMG, 22], IMG, [3, 2, 1])
    expected = [1, IMG, IMG, IMG, 20, 21, IMG, IMG, IMG, 22]
    np.testing.assert_array_equal(layout.input_ids, [expected])
    assert layout.input_ids.shape == (1, 10) and layout.input_ids.dtype == np.int64
    assert layout.image_spans == ((1, 3), (6, 2), (8, 1))  # adjacent images stay separate
    assert layout.n == 10 and layout.num_visual == 6
    np.testing.assert_array_equal(layout.visual_rows, [1, 2, 3, 6, 7, 8])
    np.testing.assert_array_equal(layout.text_rows, [0, 4, 5, 9])
    assert layout.visual_rows.dtype == layout.text_rows.dtype == np.int64
    np.testing.assert_array_equal(layout.position_ids, [np.arange(10)])
    assert layout.position_ids.dtype == layout.attention_mask.dtype == np.int64
    np.testing.assert_array_equal(layout.attention_mask, np.ones((1, 10)))
    assert layout.next_position == 10
    layout.check(vocab_size=23, image_token_id=IMG)


def test_expand_placeholders_without_images():
    layout = expand_placeholders(np.array([1, 2, 3]), IMG, [])
    assert layout.image_spans == () and layout.num_visual == 0
    assert layout.visual_rows.shape == (0,) and layout.visual_rows.dtype == np.int64
    np.testing.assert_array_equal(layout.text_rows, [0, 1, 2])
    assert layout.next_position == 3


def test_expand_placeholders_refuses_bad_input():
    with pytest.raises(UserError) as e:
        expand_placeholders([1, IMG, 2], IMG, [4, 4])
    assert "has 1 image (token 7) placeholder but 2 images were given" in _one_line(e)
    with pytest.raises(UserError) as e:
        expand_placeholders([IMG, IMG], IMG, [4])
    assert "2 image (token 7) placeholders but 1 image was given" in _one_line(e)
    for bad in ([0], [2, -1], [1.5], [True], ["3"]):
        with pytest.raises(ValueError, match="integer >= 1"):
            expand_placeholders([IMG] * len(bad), IMG, bad)
    with pytest.raises(UserError, match="no tokens"):
        expand_placeholders([], IMG, [])


def test_locate_images_refuses_runs_that_do_not_fit():
    ids = [1, IMG, IMG, 5, IMG, 2]
    assert locate_images(ids, IMG, [2, 1]).image_spans == ((1, 2), (4, 1))
    for counts in ([1, 2], [3], [1, 1]):
        with pytest.raises(UserError, match="did not tokenize") as e:
            locate_images(ids, IMG, counts, "<image>")
        assert "<image>" in _one_line(e)


def test_check_refuses_bad_layouts():
    good = expand_placeholders([1, IMG, 2, IMG, 3], IMG, [2, 2])  # spans (1, 2), (4, 2); n = 7
    good.check(vocab_size=8, image_token_id=IMG)
    bad = {
        "token id 9 is outside": replace(good, input_ids=good.input_ids + 2),
        "(1, n) int64": replace(good, input_ids=good.input_ids.astype(np.int32)),
        "image span 1 (2, 2)": replace(good, image_spans=((1, 2), (2, 2))),  # overlaps
        "image span 1 (1, 2)": replace(good, image_spans=((4, 2), (1, 2))),  # not ascending
        "inside the 7-row prompt": replace(good, image_spans=((1, 2), (6, 2))),
        "image span 1 (4, 0)": replace(good, image_spans=((1, 2), (4, 0))),
        "position_ids": replace(good, position_ids=np.arange(7)),
        "attention_mask": replace(good, attention_mask=np.ones((1, 6), np.int64)),
        "next_position": replace(good, next_position=-1),
        "image token (id 7) is on 4 rows": replace(good, image_spans=((1, 2),)),
    }
    for expected, layout in bad.items():
        with pytest.raises(UserError) as e:
            layout.check(vocab_size=8, image_token_id=IMG)
        assert expected in _one_line(e), expected
    mrope = replace(good, position_ids=np.zeros((3, 1, 7), np.int64))
    mrope.check(vocab_size=8, image_token_id=IMG)
