"""LLaVA-NeXT's host side in numpy equals transformers' own classes: anyres tiles and image sizes
equal LlavaNextImageProcessorPil's to 1e-6, token counts equal LlavaNextProcessor's, packed
features equal LlavaNextModel.pack_image_features' to 1e-6 (alone and after a tiny random
LlavaNextModel's tower); bad images and configs give one-line UserErrors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mllmc.runtime.errors import UserError
from mllmc.runtime.llava_next import (
    AnyresPreprocessor,
    anyres_grid_shape,
    image_token_count,
    pack_image_features,
    select_best_resolution,
)
from mllmc.runtime.preprocess import read_image_processor_config

torch = pytest.importorskip("torch")

TINY = dict(
    image_size=56,
    patch_size=14,
    pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 56]],
)
REAL = dict(
    image_size=336,
    patch_size=14,
    pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
)
GEOMETRIES = {"tiny": TINY, "real": REAL}

# (width, height): square, 2:1, 1:3, tiny, large 4:1, and odd ones
IMAGE_SIZES = [(100, 100), (200, 100), (60, 180), (10, 10), (2000, 500), (37, 91)]
# (height, width) for the counts: every aspect ratio from 1:4 to 4:1, tiny to huge
COUNT_SIZES = [
    (1, 1), (10, 10), (13, 52), (52, 13), (56, 56), (100, 400), (400, 100), (336, 336),
    (336, 1344), (1344, 336), (480, 640), (640, 480), (672, 672), (720, 1280), (1280, 720),
    (999, 1001), (1001, 999), (1000, 3000), (3000, 1000), (2000, 500), (500, 2000),
    (4000, 4000), (8000, 2000), (2000, 8000), (333, 777), (1, 300), (300, 1),
    (47, 188), (49, 147), (44, 55), (47, 376),  # where unpad's round(x, 7) is not int(x)
]  # fmt: skip


def _config(geometry: dict, **extra) -> dict:
    """A llava-hf style preprocessor_config.json for `geometry`."""
    side = geometry["image_size"]
    return {
        "image_processor_type": "LlavaNextImageProcessor",
        "size": {"shortest_edge": side},
        "crop_size": {"height": side, "width": side},
        "image_grid_pinpoints": geometry["pinpoints"],
        "do_pad": True,
        "resample": 3,
        "rescale_factor": 1 / 255,
        **extra,
    }


def _both(config: dict, tmp_path: Path):
    """(HF's LlavaNextImageProcessorPil, mllmc's AnyresPreprocessor) from the same config file."""
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    return LlavaNextImageProcessorPil(**config), AnyresPreprocessor(
        read_image_processor_config(tmp_path)
    )


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A noisy RGB image with a shape on it, so that resampling differences would show."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    array[height // 4 : height // 2, width // 3 :] = (200, 30, 30)
    return Image.fromarray(array)


def _assert_same(hf, ours, image, hf_image=None) -> None:
    out = hf(hf_image if hf_image is not None else image, return_tensors="np")
    pixels, size = ours(image)
    ref = out["pixel_values"][0]
    assert pixels.dtype == np.float32 and pixels.shape == ref.shape
    assert np.abs(pixels - ref).max() <= 1e-6
    assert size == tuple(int(v) for v in out["image_sizes"][0])


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_select_best_resolution_and_grid_shape_match_hf(geometry):
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    g = GEOMETRIES[geometry]
    for size in COUNT_SIZES:
        assert select_best_resolution(size, g["pinpoints"]) == tuple(
            hf_select(size, g["pinpoints"])
        )
        assert anyres_grid_shape(size, g["pinpoints"], g["image_size"]) == tuple(
            get_anyres_image_grid_shape(list(size), g["pinpoints"], g["image_size"])
        )


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("wh", IMAGE_SIZES, ids=lambda wh: f"{wh[0]}x{wh[1]}")
def test_tiles_match_hf(geometry, wh, tmp_path):
    hf, ours = _both(_config(GEOMETRIES[geometry]), tmp_path)
    _assert_same(hf, ours, _image(*wh))


def test_tiles_match_hf_for_every_input_kind(tmp_path, sample_image):
    hf, ours = _both(_config(TINY), tmp_path)
    rgba = Image.fromarray(
        np.random.default_rng(1).integers(0, 256, (70, 130, 4), dtype=np.uint8), "RGBA"
    )
    _assert_same(hf, ours, rgba)  # transparency composited onto white
    _assert_same(hf, ours, _image(90, 40).convert("L"))
    _assert_same(hf, ours, np.asarray(_image(45, 150)))
    _assert_same(hf, ours, sample_image, str(sample_image))  # a path: loaded as HF loads it
    png = tmp_path / "rgba.png"
    rgba.save(png)
    _assert_same(hf, ours, png, str(png))


@pytest.mark.parametrize(
    "extra",
    [
        {"resample": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": 0.25},
        {"size": {"height": 56, "width": 56}, "do_center_crop": False},
        {"do_normalize": False, "do_convert_rgb": False},
        {"crop_size": 56, "size": 56, "do_pad": False},
    ],
)
def test_config_variants_match_hf(extra, tmp_path):
    hf, ours = _both(_config(TINY, **extra), tmp_path)
    for wh in [(100, 60), (30, 170)]:
        _assert_same(hf, ours, _image(*wh))


def test_class_default_pinpoints_and_round_trip(tmp_path):
    """A config without image_grid_pinpoints takes the class default; the normalised dict (what an
    artifact stores in image_processor.json) reads back the same, still as LLaVA-NeXT."""
    config = _config(REAL)
    del config["image_grid_pinpoints"]
    hf, ours = _both(config, tmp_path)
    assert ours.grid_pinpoints == [tuple(p) for p in REAL["pinpoints"]]
    _assert_same(hf, ours, _image(500, 300))
    cfg = read_image_processor_config(tmp_path)
    assert cfg["do_pad"] is False and cfg["pad_size"] is None
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "image_processor.json").write_text(json.dumps(cfg))
    assert read_image_processor_config(artifact) == cfg


def _hf_token_count(height: int, width: int, g: dict, strategy: str) -> int:
    """LlavaNextProcessor.replace_image_token's count, on a processor without a tokenizer."""
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    proc = object.__new__(LlavaNextProcessor)
    proc.image_processor = SimpleNamespace(image_grid_pinpoints=g["pinpoints"])
    proc.patch_size = g["patch_size"]
    proc.num_additional_image_tokens = 1  # CLIP's CLS, as llava-hf processors say
    proc.vision_feature_select_strategy = strategy
    proc.image_token = "<image>"
    side = g["image_size"]
    inputs = {"image_sizes": [[height, width]], "pixel_values": [np.zeros((1, 3, side, side))]}
    return len(proc.replace_image_token(inputs, 0)) // len("<image>")


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_image_token_count_matches_hf(geometry, strategy):
    g = GEOMETRIES[geometry]
    sizes = COUNT_SIZES + [tuple(p) for p in g["pinpoints"]]
    for h, w in sizes:
        n = image_token_count(
            h,
            w,
            image_size=g["image_size"],
            patch_size=g["patch_size"],
            grid_pinpoints=g["pinpoints"],
            strategy=strategy,
        )
        assert n == _hf_token_count(h, w, g, strategy), (h, w)
    assert (
        image_token_count(672, 672, image_size=336, patch_size=14, grid_pinpoints=REAL["pinpoints"])
        == 2928
    )
    with pytest.raises(UserError, match="vision_feature_select_strategy"):
        image_token_count(
            9, 9, image_size=56, patch_size=14, grid_pinpoints=[[56, 56]], strategy="x"
        )


def _hf_pack(features: np.ndarray, size: tuple[int, int], g: dict, newline) -> np.ndarray:
    """LlavaNextModel.pack_image_features itself, on a stand-in `self` holding only its config."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    vision = SimpleNamespace(image_size=g["image_size"], patch_size=g["patch_size"])
    self = SimpleNamespace(
        config=SimpleNamespace(vision_config=vision, image_grid_pinpoints=g["pinpoints"])
    )
    nl = None if newline is None else torch.from_numpy(newline)
    packed, lens = LlavaNextModel.pack_image_features(
        self, [torch.from_numpy(features)], torch.tensor([size]), "default", nl
    )
    assert int(lens[0]) == packed[0].shape[0]
    return packed[0].numpy()


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_pack_image_features_matches_hf(geometry):
    g = GEOMETRIES[geometry]
    rng = np.random.default_rng(0)
    dim, side = 6, g["image_size"] // g["patch_size"]
    for h, w in COUNT_SIZES[:: 2 if geometry == "real" else 1]:
        rows, cols = anyres_grid_shape((h, w), g["pinpoints"], g["image_size"])
        feats = rng.standard_normal((1 + rows * cols, side * side, dim)).astype(np.float32)
        newline = rng.standard_normal(dim).astype(np.float32)
        kwargs = dict(
            image_size_px=g["image_size"], patch_size=g["patch_size"], grid_pinpoints=g["pinpoints"]
        )
        packed = pack_image_features(feats, (h, w), image_newline=newline, **kwargs)
        assert packed.shape == _hf_pack(feats, (h, w), g, newline).shape
        assert np.abs(packed - _hf_pack(feats, (h, w), g, newline)).max() <= 1e-6
        assert np.array_equal(
            pack_image_features(feats, (h, w), image_newline=None, **kwargs),
            _hf_pack(feats, (h, w), g, None),
        )
        count = image_token_count(
            h,
            w,
            image_size=g["image_size"],
            patch_size=g["patch_size"],
            grid_pinpoints=g["pinpoints"],
        )
        assert packed.shape[0] == count, (h, w)
    with pytest.raises(ValueError, match="do not fit"):
        pack_image_features(feats[:, 1:], (h, w), image_newline=newline, **kwargs)
    base_only = feats[:1]  # one tile: HF appends one newline
    assert np.array_equal(
        pack_image_features(base_only, (h, w), image_newline=newline, **kwargs),
        _hf_pack(base_only, (h, w), g, newline),
    )


def test_tiles_through_a_tiny_llava_next_equal_hf_image_features(tmp_path):
    """Our tiles -> the tower and projector (the graph's part, run by HF here) -> our packing equals
    a tiny random LlavaNextModel's get_image_features on HF's own preprocessing."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextModel

    vision = CLIPVisionConfig(
        image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=TINY["pinpoints"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_id=63,
    )
    torch.manual_seed(0)
    model = LlavaNextModel(config).eval()
    hf, ours = _both(_config(TINY), tmp_path)
    for wh in [(200, 100), (60, 180), (100, 100)]:
        image = _image(*wh, seed=wh[0])
        ref = hf(image, return_tensors="pt")
        tiles, size = ours(image)
        with torch.no_grad():
            expected = model.get_image_features(
                pixel_values=ref["pixel_values"], image_sizes=ref["image_sizes"]
            ).pooler_output[0]
            hidden = model.vision_tower(torch.from_numpy(tiles), output_hidden_states=True)
            feats = model.multi_modal_projector(hidden.hidden_states[-2][:, 1:]).numpy()
        packed = pack_image_features(
            feats,
            size,
            image_size_px=56,
            patch_size=14,
            grid_pinpoints=TINY["pinpoints"],
            image_newline=model.image_newline.detach().numpy(),
        )
        assert packed.shape == tuple(expected.shape)
        assert np.abs(packed - expected.numpy()).max() <= 1e-6


def _one_line(e: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(e.value) and str(e.value)


def test_bad_images_raise_user_error(tmp_path, monkeypatch):
    _, ours = _both(_config(TINY), tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UserError, match="not an image file") as e:
        ours(text)
    _one_line(e)
    big = tmp_path / "big.png"
    _image(100, 100).save(big)
    monkeypatch.setenv("MLLMC_MAX_IMAGE_PIXELS", "5000")
    for image in (big, np.zeros((100, 100, 3), np.uint8)):
        with pytest.raises(UserError, match="more than the limit of 5000") as e:
            ours(image)
        _one_line(e)
    with pytest.raises(UserError, match="must be a path, a PIL image or a numpy array"):
        ours(42)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"image_grid_pinpoints": [[56, 0]]}, "image_grid_pinpoints must be"),
        ({"image_grid_pinpoints": "56x56"}, "image_grid_pinpoints must be"),
        ({"image_grid_pinpoints": [[56, 100]]}, "not a multiple of the 56-pixel tile"),
        ({"image_grid_pinpoints": [[56, 56], [40000, 40000]]}, "more than the limit"),
        ({"size": None, "do_resize": False}, "size is null"),
        ({"image_processor_type": "SiglipImageProcessor"}, "SiglipImageProcessor.* not supported"),
    ],
)
def test_bad_configs_raise_user_error(extra, match, tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(_config(TINY, **extra)))
    with pytest.raises(UserError, match=match) as e:
        AnyresPreprocessor(read_image_processor_config(tmp_path))
    _one_line(e)


def test_clip_config_is_not_anyres(tmp_path):
    clip = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 56}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(clip))
    assert "image_grid_pinpoints" not in read_image_processor_config(tmp_path)
    with pytest.raises(UserError, match="no image_grid_pinpoints") as e:
        AnyresPreprocessor(read_image_processor_config(tmp_path))
    _one_line(e)


def test_llava_next_host_side_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import mllmc.runtime.llava_next\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
