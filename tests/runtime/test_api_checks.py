"""The Python API's arguments: a mistake is one UserError that says what is wrong, never an
AttributeError, a ZeroDivisionError or a raw onnxruntime error from inside."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mllmc.runtime import Engine, UserError, load


@pytest.fixture(scope="module")
def engine(tiny_base_artifact: Path) -> Engine:
    return load(tiny_base_artifact)


def test_prompt_and_image_arguments(engine: Engine, sample_image: Path):
    for call, match in [
        (lambda: engine.generate(sample_image, None), "prompt must be a string, got NoneType"),
        (lambda: engine.encode_prompt(None), "prompt must be a string, got NoneType"),
        (lambda: engine.encode_prompt(["Hi"]), "prompt must be a string, got list"),
        (lambda: engine.generate(Image.new("RGB", (0, 0)), "Hi"), r"image is empty \(0x0"),
        (lambda: engine.encode_image(np.zeros((0, 5, 3), np.uint8)), r"image is empty \(5x0"),
        (
            lambda: engine.encode_pixels(np.zeros((1, 3, 64, 80), np.float32)),
            r"vision segment takes pixel_values of shape \[1, 3, 64, 64\], got \[1, 3, 64, 80\]",
        ),
    ]:
        with pytest.raises(UserError, match=match):
            call()


def test_prefill_and_decode_step_arguments(engine: Engine, sample_image: Path):
    ids, start = engine.encode_prompt("Describe the image.")
    features = engine.encode_image(sample_image)
    n, span, vocab = ids.shape[1], engine.visual_tokens, engine.manifest.model.vocab_size
    logits, cache = engine.prefill(ids, features, start)
    good: dict[str, Any] = {"token_id": 1, "position": n, "cache": cache}
    prefill_cases = [
        ((ids, features, 10**6), f"visual_start must be an integer from 0 to {n - span}"),
        ((ids, features, -1), "visual_start must be an integer"),
        ((ids, features, 1.0), "visual_start must be an integer"),
        ((ids.astype(np.float32), features, start), r"input_ids must be a \(1, n\) integer"),
        ((ids[0], features, start), r"input_ids must be a \(1, n\) integer array"),
        ((ids * 0 + vocab, features, start), f"{vocab} is not a token id .*0 to {vocab - 1}"),
        ((ids, features[:, :3], start), "prefill segment takes image_features of shape"),
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
