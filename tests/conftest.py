"""Shared fixtures: preset model directories are written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllmc.compiler.presets import write_preset

    return write_preset("tiny-llava", tmp_path_factory.mktemp("models") / "tiny-llava", seed=0)


@pytest.fixture(scope="session")
def sample_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-square RGB PNG with shapes on it (exercises resize + center crop)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (120, 90), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    draw.ellipse((10, 10, 60, 60), fill=(220, 30, 30))
    draw.rectangle((65, 20, 110, 80), fill=(30, 60, 200))
    path = tmp_path_factory.mktemp("images") / "shapes.png"
    img.save(path)
    return path
