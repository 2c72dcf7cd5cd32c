"""The Python API's arguments: a mistake is one UserError that says what is wrong, never an
AttributeError, a ZeroDivisionError or a raw onnxruntime error from inside."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mllmc.runtime import Engine, UserError, load
from mllmc.runtime.layout import expand_placeholders


@pytest.fixture(scope="module")
def engine(tiny_base_artifact: Path) -> Engine:
    return load(tiny_base_artifact)


def test_prompt_and_image_arguments(engine: Engine, sample_image: Path):
    for call, match in [
        (lambda: engine.generate(sample_image, None), "prompt must be a string, got NoneType"),
        (lambda: engine.encode_prompt(None), "prompt must be a string, got NoneType"),
        (lambda: engine.encode_prompt(["Hi"]), "prompt must be a string, got list"),
        (lambda: engine.encode_prompt("Hi", 16), r"counts must be a list of integers >= 1 \("),
        (lambda: engine.encode_prompt("Hi", [16, 0]), r"counts must be .*, got \[16, 0\]"),
        (lambda: engine.generate([], "Hi"), "no image given: pass an image or a list of images"),
        (lambda: engine.generate(Image.new("RGB", (0, 0)), "Hi"), r"image is empty \(0x0"),
        (lambda: engine.encode_image(np.zeros((0, 5, 3), np.uint8)), r"image is empty \(5x0"),
        (
            lambda: engine.encode_pixels(np.zeros((1, 3, 64, 80), np.float32)),
            r"vision segment takes pixel_values of shape \['tiles', 3, 64, 64\], "
            r"got \[1, 3, 64, 80\]",
        ),
    ]:
        with pytest.raises(UserError, match=match):
            call()


def test_prefill_and_decode_step_arguments(engine: Engine, sample_image: Path):
    layout = engine.encode_prompt("Describe the image.")
    features = engine.encode_image(sample_image)
    n, span, vocab = layout.n, engine.visual_tokens, engine.manifest.model.vocab_size
    ids, positions = layout.input_ids, layout.position_ids
    logits, cache = engine.prefill(layout, features)
    good: dict[str, Any] = {"token_id": 1, "position": layout.next_position, "cache": cache}
    image = engine.manifest.model.image_token_id
    image_only = expand_placeholders([1, image, 13], image, [span])  # 2 text rows
    no_image = expand_placeholders([1, 5, 6, 13], image, [])
    prefill_cases = [
        (
            (ids, features),
            r"layout must be the PromptLayout encode_prompt\(\) returned, got ndarray",
        ),
        ((None, features), r"the PromptLayout encode_prompt\(\) returned, got NoneType"),
        ((replace(layout, image_spans=((10**6, span),)), features), f"inside the {n}-row prompt"),
        ((replace(layout, image_spans=((-1, span),)), features), r"image span 0 \(-1, 16\)"),
        ((replace(layout, image_spans=((1.0, span),)), features), "a \\(first row, count\\) pair"),
        (
            (replace(layout, input_ids=ids.astype(np.float32)), features),
            r"input_ids must be a \(1, n\) int64 array, got float32",
        ),
        (
            (replace(layout, input_ids=ids[0]), features),
            r"input_ids must be a \(1, n\) int64 array",
        ),
        (
            (replace(layout, input_ids=ids * 0 + vocab), features),
            f"token id {vocab} is outside the vocabulary \\(0 to {vocab - 1}\\)",
        ),
        (
            (replace(layout, position_ids=positions.astype(np.int32)), features),
            r"position_ids must be an int64 array of shape \(1, " + str(n),
        ),
        (
            (replace(layout, attention_mask=positions[:, :-1]), features),
            "attention_mask must be an int64 array",
        ),
        ((layout, features[:, :3]), rf"image_features must be \(1, {span}, d\) for the layout's"),
        ((layout, features[0]), rf"image_features must be \(1, {span}, d\)"),
        ((layout, features[..., :5]), "prefill segment takes image_features of shape"),
        ((image_only, features), "the prompt has 2 text tokens besides its images; mllmc needs"),
        ((no_image, features[:, :0]), "the prompt has 0 visual rows; this artifact's passes"),
    ]
    for args, match in prefill_cases:
        with pytest.raises(UserError, match=match):
            engine.prefill(*args)
    decode_cases = [
        ({"token_id": 10**9}, "token_id: 1000000000 is not a token id of this model"),
        ({"token_id": -1}, "token_id: -1 is not a token id"),
        ({"token_id": "a"}, "token_id must be an integer token id, got 'a'"),
        ({"position": -1}, "position must be an integer >= 0"),
        ({"cache": None}, f"cache must be the list of {len(cache)} arrays"),
        ({"cache": cache[:-1]}, f"got {len(cache) - 1} values"),
        ({"cache": [c[:, :1] for c in cache]}, "decode segment takes past.0.key of shape"),
    ]
    for change, match in decode_cases:
        with pytest.raises(UserError, match=match):
            engine.decode_step(**{**good, **change})
    step_logits, _ = engine.decode_step(**good)  # the arguments themselves are fine
    assert step_logits.shape == logits.shape == (vocab,)
