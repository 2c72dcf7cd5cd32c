"""Qwen2-VL / Qwen2.5-VL's host side in numpy equals transformers' own code: smart_resize and
the pixel values / grids of Qwen2VLImageProcessorPil (1e-6, tiny to large images, odd aspect
ratios, every way a config states its pixel bounds), the vision index inputs of
transformers.vision_utils (values and dtypes), the vision tower run once per image on them
against HF's one call over every image, get_rope_index's 3-D positions and rope_deltas (text
only, one image, two images of different sizes, both families) and the decode positions after
them, and a whole prompt laid out by the prompt encoder against Qwen2VLProcessor."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mllmc.compiler.data.qwen_presets import QWEN_CHAT_TEMPLATE, SPECIAL_TOKENS
from mllmc.runtime.engine import Engine
from mllmc.runtime.errors import UserError
from mllmc.runtime.images import QwenImages, encode_each, image_inputs, prompt_encoder
from mllmc.runtime.layout import PromptLayout
from mllmc.runtime.preprocess import read_image_processor_config
from mllmc.runtime.qwen2_vl import (
    ImageRows,
    QwenPreprocessor,
    decode_position_ids,
    image_token_count,
    mrope_positions,
    rope_deltas,
    smart_resize,
    vision_inputs,
)

torch = pytest.importorskip("torch")

PATCH, MERGE = 14, 2
IMAGE_ID, VIDEO_ID, START_ID, END_ID = 60, 61, 62, 63
# small bounds, so that tiny images are upscaled and large ones downscaled
BOUNDS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 24}
# (width, height): tiny, exact, odd aspect ratios both ways, large (downscaled), very narrow
IMAGE_SIZES = [(10, 10), (56, 84), (37, 91), (300, 60), (91, 37), (1000, 700), (5, 900)]


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A noisy RGB image, so that resampling differences would show."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _hf_image_processor(config: dict, tmp_path: Path):
    """HF's Qwen2VLImageProcessorPil as from_pretrained loads `config`, and mllmc's settings read
    from the same file."""
    from transformers import Qwen2VLImageProcessorPil

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    return Qwen2VLImageProcessorPil.from_pretrained(tmp_path), read_image_processor_config(tmp_path)


# -- preprocessing ----------------------------------------------------------------------------


def test_smart_resize_matches_hf():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf

    sides = [1, 5, 13, 14, 27, 28, 29, 41, 55, 56, 57, 100, 333, 448, 999, 1024, 4000]
    bounds = [(56 * 56, 28 * 28 * 1280), (28 * 28 * 4, 28 * 28 * 24), (3136, 3136 * 4)]
    for factor in (28, 32):
        for low, high in bounds:
            for h in sides:
                for w in sides:
                    if max(h, w) / min(h, w) > 200:
                        continue
                    assert smart_resize(h, w, factor, low, high) == hf(h, w, factor, low, high)
    with pytest.raises(UserError, match="aspect ratios up to 200"):
        smart_resize(1, 201)


CONFIGS = {
    "released": {"image_processor_type": "Qwen2VLImageProcessor", **BOUNDS},
    "size": {
        "image_processor_type": "Qwen2VLImageProcessorPil",
        "size": {"shortest_edge": BOUNDS["min_pixels"], "longest_edge": BOUNDS["max_pixels"]},
    },
    "both": {  # min_pixels / max_pixels override size
        "image_processor_type": "Qwen2VLImageProcessor",
        "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
        **BOUNDS,
    },
    "size_in_pixels": {
        "image_processor_type": "Qwen2VLImageProcessor",
        "size": {"min_pixels": 1, "max_pixels": 2},
        **BOUNDS,
    },
    "null_size": {"image_processor_type": "Qwen2VLImageProcessor", "size": None, **BOUNDS},
    "defaults": {"image_processor_type": "Qwen2VLImageProcessor"},
    "variants": {
        "image_processor_type": "Qwen2VLImageProcessor",
        **BOUNDS,
        "resample": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.5, 0.75],
        "rescale_factor": 0.5 / 255,
        "do_convert_rgb": None,  # null: False
    },
    "no_normalize": {
        "image_processor_type": "Qwen2VLImageProcessor",
        **BOUNDS,
        "do_normalize": None,
        "image_mean": None,
    },  # fmt: skip
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pixel_values_match_hf(name, tmp_path):
    hf, cfg = _hf_image_processor(CONFIGS[name], tmp_path)
    assert cfg["size"] == {
        "shortest_edge": hf.size.shortest_edge,
        "longest_edge": hf.size.longest_edge,
    }
    pre = QwenPreprocessor(cfg)
    sizes = IMAGE_SIZES if name in ("released", "variants") else IMAGE_SIZES[:3]
    images = [_image(w, h, seed=k) for k, (w, h) in enumerate(sizes)]
    ours = [pre(image) for image in images]
    for image, (pixels, grid) in zip(images, ours, strict=True):
        want = hf(images=image, return_tensors="np")
        assert pixels.dtype == np.float32 and grid.dtype == np.int64
        assert np.array_equal(grid, want["image_grid_thw"][0])
        assert pixels.shape == want["pixel_values"].shape
        np.testing.assert_allclose(pixels, want["pixel_values"], rtol=0, atol=1e-6)
        assert np.array_equal(pre.grid_thw(image.height, image.width), grid)
        assert image_token_count(grid, pre.merge_size) == int(grid.prod()) // MERGE**2
    both = hf(images=images[:2], return_tensors="np")  # two images: concatenated, in order
    np.testing.assert_allclose(
        np.concatenate([p for p, _ in ours[:2]]), both["pixel_values"], rtol=0, atol=1e-6
    )
    # the normalised dict (an artifact's image_processor.json) reads back the same
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert read_image_processor_config(tmp_path) == cfg


@pytest.mark.parametrize(
    "config, message",
    [
        ({"size": {"shortest_edge": 3136}}, "pixel bounds"),  # HF: ValueError at preprocess
        ({"size": {"min_pixels": 3136, "max_pixels": 9999}}, "pixel bounds"),  # likewise
        ({"min_pixels": 5000, "max_pixels": 4000}, "more than max_pixels"),
        ({"min_pixels": 0, "max_pixels": 4000}, "min_pixels"),
        ({"merge_size": 1.5}, "merge_size"),
        ({"merge_size": None}, "merge_size"),  # HF: TypeError
        ({"resample": None}, "do_resize is true but resample is null"),  # HF: ValueError
        ({"image_std": [1, 0, 1]}, "image_std"),
    ],
)
def test_bad_configs_raise_user_error(config, message, tmp_path):
    raw = {"image_processor_type": "Qwen2VLImageProcessor", **config}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=message) as e:
        read_image_processor_config(tmp_path)
    assert "\n" not in str(e.value)


def test_bad_images_raise_user_error(tmp_path):
    _, cfg = _hf_image_processor(CONFIGS["released"], tmp_path)
    pre = QwenPreprocessor(cfg)
    with pytest.raises(UserError, match="aspect ratios"):
        pre(_image(1, 300))
    with pytest.raises(UserError, match="not a multiple of 28"):
        QwenPreprocessor({**cfg, "do_resize": False})(_image(30, 28))


# -- the vision segment's index inputs --------------------------------------------------------

GRIDS = [
    [[1, 4, 6]],
    [[1, 8, 12], [1, 4, 6]],  # two images of different sizes
    [[1, 16, 8]],  # merged sides divisible by the window: HF drops the empty windows
    [[1, 2, 2], [2, 4, 4], [1, 30, 10]],  # a tiny image, two frames, a tall one
]


@pytest.mark.parametrize("grids", GRIDS, ids=lambda g: "_".join("x".join(map(str, r)) for r in g))
@pytest.mark.parametrize("window_size", [None, 56, 112])
def test_vision_inputs_match_hf(grids, window_size):
    from transformers.vision_utils import (
        get_vision_attention_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    grid = torch.tensor(grids)
    ours = vision_inputs(np.array(grids), MERGE, window_size, PATCH)
    config = SimpleNamespace(_attn_implementation="eager")
    want = {
        "vision_position_ids": get_vision_position_ids(grid, MERGE),
        "cu_seqlens": get_vision_attention_seqlens(grid, config)[0],
    }
    if window_size is not None:
        index, bounds = get_vision_window_index(grid, MERGE, window_size, PATCH)
        want.update(window_index=index, cu_window_seqlens=bounds)
    assert sorted(ours) == sorted(want)
    for name, value in want.items():
        expected = value.numpy()
        assert ours[name].dtype == expected.dtype, name
        assert np.array_equal(ours[name], expected), name


# -- the vision tower, once per image ---------------------------------------------------------

TEXT_CONFIG = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=32,
    vocab_size=64,
    bos_token_id=0,
    eos_token_id=1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
)
TOKENS = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START_ID)


def _tiny_model(family: str):
    """A tiny random Qwen2VLModel (Qwen2_5_VLModel, window 56 px, block 1 of 2 full)."""
    import transformers

    torch.manual_seed(0)
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2)
        config = transformers.Qwen2VLConfig(text_config=TEXT_CONFIG, vision_config=vision, **TOKENS)
        return transformers.Qwen2VLModel(config).eval()
    vision = dict(
        depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
        window_size=56, fullatt_block_indexes=[1],
    )  # fmt: skip
    config = transformers.Qwen2_5_VLConfig(text_config=TEXT_CONFIG, vision_config=vision, **TOKENS)
    return transformers.Qwen2_5_VLModel(config).eval()


class _TowerRunner:
    """A SegmentRunner stand-in: HF's vision tower given only the feeds (grid_thw None, so it
    must take every index input precomputed)."""

    def __init__(self, visual):
        self.visual, self.calls = visual, 0

    def __call__(self, feeds: dict) -> dict:
        self.calls += 1
        names = {"vision_position_ids": "position_ids"}
        kwargs = {names.get(k, k): torch.from_numpy(v) for k, v in feeds.items()}
        with torch.no_grad():
            out = self.visual(kwargs.pop("pixel_values"), grid_thw=None, **kwargs)
        return {"image_features": out.pooler_output}

    @staticmethod
    def to_numpy(value):
        return value.numpy()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_tower_per_image_matches_hf_over_all_images(family, tmp_path):
    model = _tiny_model(family)
    _, cfg = _hf_image_processor(CONFIGS["released"], tmp_path)
    images = QwenImages(QwenPreprocessor(cfg), 56 if family == "qwen2_5_vl" else 0)
    pictures = [_image(300, 60, 1), _image(90, 120, 2), _image(40, 40, 3)]
    tiles, metas = zip(*(images.tiles(p) for p in pictures), strict=True)
    assert ("window_index" in tiles[0]) == (family == "qwen2_5_vl")
    runner = _TowerRunner(model.visual)
    features, counts = encode_each(images, tiles, metas, runner)
    assert runner.calls == len(pictures)
    pixels = torch.from_numpy(np.concatenate([t["pixel_values"] for t in tiles]))
    grid = torch.from_numpy(np.stack([np.array(m.grid) for m in metas]))
    with torch.no_grad():
        want = torch.cat(model.get_image_features(pixels, grid).pooler_output).numpy()
    assert features.shape == (1, *want.shape)
    np.testing.assert_allclose(features[0], want, rtol=0, atol=1e-5)
    assert counts == [int(g.prod()) // MERGE**2 for g in grid.numpy()]
    assert [c.grid for c in counts] == [tuple(g) for g in grid.tolist()]
    # the engine's encode_images path (its image side and vision runner only)
    engine = SimpleNamespace(images=images, runners={"vision": runner})
    again, rows = Engine.encode_tiles(engine, *Engine.image_tiles(engine, pictures))
    assert runner.calls == 2 * len(pictures) and rows == counts
    np.testing.assert_array_equal(again, features)


def test_image_inputs_checks_the_geometry(tmp_path):
    _, cfg = _hf_image_processor(CONFIGS["released"], tmp_path)
    model = SimpleNamespace(
        model_type="qwen2_5_vl",
        vision_patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=2,
        vision_window_size=112,
    )
    images = image_inputs(SimpleNamespace(model=model), cfg)
    assert isinstance(images, QwenImages) and images.window_size == 112
    model.spatial_merge_size = 1
    with pytest.raises(UserError, match="merge_size is 2 but the model's vision tower takes 1"):
        image_inputs(SimpleNamespace(model=model), cfg)


# -- M-RoPE positions -------------------------------------------------------------------------


def _prompt(pieces: list) -> tuple[np.ndarray, list[tuple[int, int]], list[list[int]]]:
    """Token ids from text lengths (ints) and image grids (lists), each image as
    <|vision_start|> image tokens <|vision_end|> -> (ids (n,), image spans, grids)."""
    rng = np.random.default_rng(0)
    ids, spans, grids = [], [], []
    for piece in pieces:
        if isinstance(piece, int):
            ids += rng.integers(2, 50, piece).tolist()
            continue
        ids.append(START_ID)
        spans.append((len(ids), image_token_count(piece, MERGE)))
        ids += [IMAGE_ID] * spans[-1][1]
        ids.append(END_ID)
        grids.append(piece)
    return np.array(ids), spans, grids


PROMPTS = {
    "text_only": [7],
    "one_image": [5, [1, 8, 12], 4],
    "tall_image_first": [[1, 14, 4], 3],
    "two_sizes": [5, [1, 4, 6], 2, [1, 14, 4], 6],
    "ends_with_image": [3, [1, 6, 6]],
}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("name", list(PROMPTS))
def test_mrope_positions_match_get_rope_index(family, name):
    model = _tiny_model(family)
    ids, spans, grids = _prompt(PROMPTS[name])
    input_ids = torch.from_numpy(ids)[None]
    want, delta = model.get_rope_index(
        input_ids,
        mm_token_type_ids=(input_ids == IMAGE_ID).int(),
        image_grid_thw=torch.tensor(grids) if grids else None,
    )
    positions, next_position = mrope_positions(len(ids), spans, grids, MERGE)
    assert positions.dtype == np.int64 and positions.shape == (3, 1, len(ids))
    assert np.array_equal(positions, want.numpy())
    assert next_position - len(ids) == int(delta)

    # decode: HF's positions for the k-th generated token, from the rope_deltas prefill caches
    model.rope_deltas = delta
    for k in range(3):
        cache = SimpleNamespace(get_seq_length=lambda k=k: len(ids) + k)
        step = model.compute_3d_position_ids(
            input_ids=torch.zeros(1, 1, dtype=torch.long),
            inputs_embeds=torch.zeros(1, 1, 16),
            image_grid_thw=None,
            video_grid_thw=None,
            attention_mask=None,
            past_key_values=cache,
        )
        assert np.array_equal(decode_position_ids(next_position + k), step.numpy())


def test_kept_tokens_keep_their_own_positions():
    ids, spans, grids = _prompt(PROMPTS["two_sizes"])
    full, next_full = mrope_positions(len(ids), spans, grids, MERGE)
    kept = [np.array([0, 3, 5]), None]  # a pre-LLM pass keeps 3 of image 0's 6 tokens
    drop = np.array([spans[0][0] + k for k in (1, 2, 4)])
    rows = np.setdiff1d(np.arange(len(ids)), drop)
    pruned_spans = [(spans[0][0], 3), (spans[1][0] - 3, spans[1][1])]
    positions, next_position = mrope_positions(len(rows), pruned_spans, grids, MERGE, kept)
    assert np.array_equal(positions, full[:, :, rows])
    assert next_position == next_full


# -- the prompt layout ------------------------------------------------------------------------


def _qwen_tokenizer():
    """A Qwen2Tokenizer: byte-level BPE trained on a few sentences, Qwen's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = "system You are a helpful assistant. user Compare the two images. Describe it."
    bpe.train_from_iterator([corpus] * 4, trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(m) for m in trained["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """A Qwen2-VL checkpoint's preprocessing files (tokenizer, preprocessor_config.json)."""
    from transformers import Qwen2VLImageProcessorPil

    root = tmp_path_factory.mktemp("qwen")
    _qwen_tokenizer().save_pretrained(root)
    Qwen2VLImageProcessorPil(**BOUNDS).save_pretrained(root)
    return root


def _hf_processor(root: Path, monkeypatch):
    """HF's Qwen2VLProcessor over the checkpoint's tokenizer and image processor (its video
    processor needs torchvision, which the test environment lacks: there is no video here)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda *a: None)
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(root),
        tokenizer=AutoTokenizer.from_pretrained(root),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def _qwen2_vl_images(root: Path) -> QwenImages:
    """The runtime's image side for a Qwen2-VL model dir (its manifest's model numbers)."""
    model = SimpleNamespace(
        model_type="qwen2_vl", vision_patch_size=PATCH, spatial_merge_size=MERGE,
        temporal_patch_size=2, vision_window_size=0,
    )  # fmt: skip
    return image_inputs(SimpleNamespace(model=model), read_image_processor_config(root))


@pytest.mark.parametrize("template_file", ["chat_template.jinja", "chat_template.json"])
@pytest.mark.parametrize("placed", [False, True])
def test_prompt_layout_matches_qwen_processor(
    template_file, placed, qwen_dir, tmp_path, monkeypatch
):
    root = tmp_path / "model"
    root.mkdir()
    for f in qwen_dir.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    text = QWEN_CHAT_TEMPLATE
    if template_file.endswith(".json"):
        text = json.dumps({"chat_template": QWEN_CHAT_TEMPLATE})
    (root / template_file).write_text(text)
    hf = _hf_processor(root, monkeypatch)
    pictures = [_image(300, 60, 1), _image(90, 120, 2)]
    question = "Compare the two images."
    if placed:
        vision = "<|vision_start|><|image_pad|><|vision_end|>"
        prompt = hf_text = f"{vision}and {vision}{question}"
    else:
        prompt = question
        content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        hf_text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want = hf(images=pictures, text=hf_text, return_tensors="pt")
    model = _tiny_model("qwen2_vl")
    image_token_id = hf.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    positions, delta = model.get_rope_index(
        want["input_ids"], want["mm_token_type_ids"], want["image_grid_thw"]
    )

    images = _qwen2_vl_images(root)
    tiles, metas = zip(*(images.tiles(p) for p in pictures), strict=True)
    encoder = prompt_encoder(images, root)
    layout = encoder.layout(prompt, list(metas))
    layout.check(image_token_id=image_token_id)
    assert encoder.image_token == "<|image_pad|>"
    assert np.array_equal(layout.input_ids, want["input_ids"].numpy())
    assert np.array_equal(layout.position_ids, positions.numpy())
    assert rope_deltas(layout) == int(delta)
    pixels = np.concatenate([t["pixel_values"] for t in tiles])
    np.testing.assert_allclose(pixels, want["pixel_values"].numpy(), rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="give the counts encode_images"):
        encoder.layout(prompt, [int(m) for m in metas])


def test_layout_takes_mrope_positions():
    ids, spans, grids = _prompt(PROMPTS["two_sizes"])
    n = len(ids)
    positions, next_position = mrope_positions(n, spans, grids, MERGE)
    layout = PromptLayout(
        input_ids=ids[None].astype(np.int64),
        image_spans=tuple(spans),
        position_ids=positions,
        attention_mask=np.ones((1, n), dtype=np.int64),
        next_position=next_position,
    )
    layout.check(vocab_size=64, image_token_id=IMAGE_ID)
    # the first generated token follows the largest position, on every axis
    assert next_position == int(positions.max()) + 1 < n
    bad = PromptLayout(layout.input_ids, layout.image_spans, positions[:, :, :-1],
                       layout.attention_mask, next_position)  # fmt: skip
    with pytest.raises(UserError, match=rf"\(3, 1, {n}\)"):
        bad.check()
    rows = ImageRows([1, 4, 6], MERGE)
    assert rows == 6 and rows.grid == (1, 4, 6) and rows.kept is None


def test_llava_placeholder_in_a_qwen_prompt_is_text_with_a_warning(
    qwen_dir, tmp_path, monkeypatch, caplog
):
    """LLaVA's <image> is not Qwen2-VL's placeholder: Qwen2VLProcessor keeps it as text and the
    chat template puts the image first; mllmc does the same and says so in a warning."""
    root = tmp_path / "model"
    root.mkdir()
    for f in qwen_dir.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    (root / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    hf = _hf_processor(root, monkeypatch)
    picture = _image(120, 90, 3)
    question = "<image>\nWhat is in the picture?"
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    hf_text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want = hf(images=[picture], text=hf_text, return_tensors="pt")

    images = _qwen2_vl_images(root)
    _, meta = images.tiles(picture)
    encoder = prompt_encoder(images, root)
    with caplog.at_level(logging.WARNING, logger="mllmc.runtime.preprocess"):
        layout = encoder.layout(question, [meta])
    assert np.array_equal(layout.input_ids, want["input_ids"].numpy())
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "<image> is not this model's image placeholder (<|image_pad|>)" in warned[0]
    assert "<|image_pad|>" in warned[0]

    assert (
        "the images go where <|image_pad|> is, or, with none in the prompt, before it" in warned[0]
    )

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mllmc.runtime.preprocess"):
        encoder.layout("<|vision_start|><|image_pad|><|vision_end|>Describe it.", [meta])
        encoder.layout("Describe it.", [meta])
        encoder.layout(question, [meta])  # said once an engine, not once a prompt
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]

    fresh = prompt_encoder(images, root)
    with caplog.at_level(logging.WARNING, logger="mllmc.runtime.preprocess"):
        # beside the model's own placeholder (it counts; <image> stays text), and with no image
        fresh.layout("<image> and <|vision_start|><|image_pad|><|vision_end|> what?", [meta])
        prompt_encoder(images, root).layout("<image> hi there", [])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and all("<image> is not this model's" in w for w in warned)
    assert "images go where" in warned[0] and warned[1].endswith("it is kept as text")
