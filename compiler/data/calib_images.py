"""The built-in calibration samples: generated images (coloured shapes and a word, drawn with Pillow)
and prompts, used when no calibration data is given (ShortV's `prepare`, `mllmc calibrate`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

BUILTIN_PROMPTS = (
    "Describe the image.",
    "What shapes are in the picture?",
    "What colour is the largest shape?",
    "Is there any text in the image? Read it.",
    "How many objects are there?",
    "What is in the top left corner?",
    "Provide a short description of the photo.",
    "Answer the question using a single word or phrase. What colour is the background?",
)
_WORDS = ("CAT", "STOP", "OPEN", "42", "EXIT", "MAP", "SALE", "BUS")


def builtin_images(n: int, size: int = 336, seed: int = 0) -> list[Any]:
    """n generated images: coloured shapes and a word drawn with Pillow on a tinted background."""
    return list(iter_builtin_images(n, size, seed))


def iter_builtin_images(n: int, size: int = 336, seed: int = 0) -> Iterator[Any]:
    """`builtin_images`, made one at a time as they are iterated."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for i in range(n):
        bg = tuple(int(c) for c in rng.integers(150, 256, 3))
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
            w, h = (int(v) for v in rng.integers(size // 10, size // 3, 2))
            color = tuple(int(c) for c in rng.integers(0, 200, 3))
            shape = int(rng.integers(0, 3))
            if shape == 0:
                draw.ellipse((x0, y0, x0 + w, y0 + h), fill=color)
            elif shape == 1:
                draw.rectangle((x0, y0, x0 + w, y0 + h), fill=color)
            else:
                draw.polygon([(x0, y0 + h), (x0 + w // 2, y0), (x0 + w, y0 + h)], fill=color)
        draw.text((size // 8, size - size // 6), _WORDS[i % len(_WORDS)], fill=(0, 0, 0))
        yield img


def builtin_samples(info: Any, n: int = 40, seed: int = 0) -> list[tuple[Any, str]]:
    images = builtin_images(n, size=max(info.image_size, 64), seed=seed)
    return [(img, BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]) for i, img in enumerate(images)]
