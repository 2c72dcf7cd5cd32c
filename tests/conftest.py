"""Shared fixtures: preset model directories are written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SHORTV_LAYERS = [0, 1, 2, 5]  # first, last and adjacent layers


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-goldens",
        action="store_true",
        help="re-record tests/goldens/*.json from the current artifacts instead of checking them",
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllmc.compiler.data.presets import write_preset

    return write_preset("tiny-llava", tmp_path_factory.mktemp("models") / "tiny-llava", seed=0)


def shapes_png(
    folder: Path, name: str, size: tuple[int, int], background: tuple[int, int, int], shapes: dict
) -> Path:
    """An RGB PNG of `size` (width, height) with `shapes` ({"ellipse" | "rectangle": (box,
    fill)}) drawn on `background`, written to folder/name."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    for kind, (box, fill) in shapes.items():
        getattr(draw, kind)(box, fill=fill)
    img.save(folder / name)
    return folder / name


@pytest.fixture(scope="session")
def sample_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-square RGB PNG with shapes on it (exercises resize + center crop)."""
    shapes = {
        "ellipse": ((10, 10, 60, 60), (220, 30, 30)),
        "rectangle": ((65, 20, 110, 80), (30, 60, 200)),
    }
    return shapes_png(
        tmp_path_factory.mktemp("images"), "shapes.png", (120, 90), (250, 250, 250), shapes
    )


@pytest.fixture(scope="session")
def tall_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A portrait RGB PNG (70x150), unlike the landscape `sample_image` (120x90)."""
    shapes = {
        "rectangle": ((5, 90, 60, 140), (240, 200, 30)),
        "ellipse": ((10, 10, 60, 60), (40, 200, 90)),
    }
    return shapes_png(
        tmp_path_factory.mktemp("images"), "tall.png", (70, 150), (20, 20, 40), shapes
    )


# A second LLaVA config with different widths, head counts, GQA ratio (8:2), head_dim, image size
# and patch size: the suite's guard against shape assumptions that only hold for tiny-llava.
OTHER_SPEC = dict(
    description="test-only LLaVA: CLIP 3 layers 84 px / patch 14 -> 36 tokens; Llama 5 layers GQA 8:2",
    image_size=84,
    patch_size=14,
    vision_hidden=48,
    vision_layers=3,
    vision_heads=3,
    vision_mlp=96,
    hidden=192,
    layers=5,
    heads=8,
    kv_heads=2,
    mlp=320,
    vocab_size=700,
    init_std=0.06,
)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllmc.compiler.data.presets import PresetSpec, write_model

    return write_model(
        PresetSpec(**OTHER_SPEC), tmp_path_factory.mktemp("models") / "other-llava", seed=1
    )


@pytest.fixture(scope="session")
def tiny_base_artifact(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllmc.compiler.pipeline import compile_model

    out = tmp_path_factory.mktemp("artifacts") / "tiny-base"
    return compile_model(tiny_model_dir, out, progress=False).out_dir


@pytest.fixture(scope="session")
def tiny_shortv_artifact(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllmc.compiler.pipeline import compile_model

    out = tmp_path_factory.mktemp("artifacts") / "tiny-shortv"
    spec = f"shortv:layers={TINY_SHORTV_LAYERS}"
    return compile_model(tiny_model_dir, out, [spec], progress=False).out_dir


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained-tiny-llava preset (shipped shapes-qa weights)."""
    from mllmc.compiler.data.presets import write_preset

    return write_preset("trained-tiny-llava", tmp_path_factory.mktemp("models") / "trained")


@pytest.fixture(scope="session")
def trained_artifact(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """trained-tiny-llava compiled without passes, validated against HF eager at compile time
    (the check's tolerance scales with the logits' size; a trained model's reach ~10)."""
    from mllmc.compiler.pipeline import compile_model

    out = tmp_path_factory.mktemp("artifacts") / "trained-base"
    return compile_model(trained_model_dir, out, progress=False).out_dir


QWEN_PRESETS = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


@pytest.fixture(scope="session")
def qwen_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two tiny Qwen presets (Qwen2-VL, Qwen2.5-VL), written once per session."""
    from mllmc.compiler.data.presets import write_preset

    root = tmp_path_factory.mktemp("qwen")
    return {name: write_preset(name, root / name, seed=0) for name in QWEN_PRESETS}


@pytest.fixture(scope="module", params=QWEN_PRESETS)
def qwen(request, qwen_dirs):
    """(model dir, eager model, ModelInfo, captured Segments) of each tiny Qwen preset."""
    from mllmc.compiler.core.capture import capture, load_model

    model_dir = qwen_dirs[request.param]
    model, info = load_model(model_dir)
    return model_dir, model, info, capture(model, info)
