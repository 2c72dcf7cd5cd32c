"""The LLaVA-NeXT presets: `mllmc preset tiny-llava-next` writes a directory that Hugging Face's
own LlavaNextForConditionalGeneration and AutoProcessor load and generate from, and whose
processor gives every image as many `<image>` tokens as the model has features for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from mllmc.compiler.data.presets import (
    PRESETS,
    PresetSpec,
    _llava_config,
    build_model,
    build_processor,
    write_preset,
)

MLLMC = str(Path(sys.executable).parent / "mllmc")
TINY_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
PROMPT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in it?"}]}
]


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llava-next written by the console script, seed 0."""
    out = tmp_path_factory.mktemp("models") / "tiny-llava-next"
    cmd = [MLLMC, "preset", "tiny-llava-next", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def shapes_image(width: int, height: int) -> Image.Image:
    """An RGB image of `width` x `height` with a red disc and a blue box on it."""
    img = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    draw.ellipse((2, 2, width // 2, height - 2), fill=(220, 30, 30))
    draw.rectangle((width // 2 + 2, 4, width - 3, height - 5), fill=(30, 60, 200))
    return img


def image_token_count(processor, inputs) -> int:
    return int((inputs["input_ids"] == processor.image_token_id).sum())


def feature_count(model, inputs) -> int:
    """Rows of image features the model merges into the prompt for `inputs`' images."""
    out = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    return sum(f.shape[0] for f in out.pooler_output)


def test_directory_has_the_files_and_fields_of_a_llava_next_checkpoint(next_dir: Path):
    cfg = json.loads((next_dir / "config.json").read_text())
    assert cfg["model_type"] == "llava_next"
    assert cfg["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert cfg["image_grid_pinpoints"] == TINY_PINPOINTS
    assert cfg["vision_feature_select_strategy"] == "default"
    assert cfg["vision_feature_layer"] == -2
    vocab = json.loads((next_dir / "tokenizer.json").read_text())["added_tokens"]
    assert cfg["image_token_index"] == next(t["id"] for t in vocab if t["content"] == "<image>")
    assert (cfg["vision_config"]["image_size"], cfg["vision_config"]["patch_size"]) == (56, 14)
    assert cfg["text_config"]["num_hidden_layers"] == PRESETS["tiny-llava"].layers
    proc_cfg = json.loads((next_dir / "processor_config.json").read_text())
    assert proc_cfg["processor_class"] == "LlavaNextProcessor"
    assert proc_cfg["image_processor"]["image_grid_pinpoints"] == TINY_PINPOINTS
    assert proc_cfg["num_additional_image_tokens"] == 1
    for name in ("generation_config.json", "model.safetensors", "chat_template.jinja"):
        assert (next_dir / name).is_file(), name
    listing = " ".join(
        subprocess.run([MLLMC, "preset", "--help"], capture_output=True, text=True).stdout.split()
    )
    assert (
        "tiny-llava-next (random init)" in listing and "small-llava-next (random init)" in listing
    )


def test_hf_loads_it_and_generates_from_a_chat_prompt(next_dir: Path):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration, LlavaNextProcessor

    model = LlavaNextForConditionalGeneration.from_pretrained(next_dir).eval()
    processor = AutoProcessor.from_pretrained(next_dir)
    assert isinstance(processor, LlavaNextProcessor)
    assert type(processor.image_processor).__name__.startswith("LlavaNextImageProcessor")
    built, _ = build_model(PRESETS["tiny-llava-next"], seed=0)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in built.state_dict().items())

    prompt = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is in it? ASSISTANT:"
    inputs = processor(images=shapes_image(112, 56), text=prompt, return_tensors="pt")
    assert image_token_count(processor, inputs) == feature_count(model, inputs) == 52
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        n = inputs["input_ids"].shape[1]
        assert out.shape == (1, n + 4) and torch.equal(out[:, :n], inputs["input_ids"])
        # the cached decode agrees with one teacher-forced forward over the whole sequence
        full = model(
            input_ids=out,
            attention_mask=torch.ones_like(out),
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
        ).logits
    assert torch.equal(full[0, n - 1 : n + 3].argmax(-1), out[0, n:])


def test_processor_token_count_equals_model_features(next_dir: Path):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(next_dir).eval()
    processor = AutoProcessor.from_pretrained(next_dir)
    sizes = [(112, 56), (56, 112), (112, 112), (168, 56), (56, 168), (200, 60), (30, 90)]
    with torch.no_grad():
        for width, height in sizes:
            inputs = processor(
                images=shapes_image(width, height), text="<image>", return_tensors="pt"
            )
            n_tokens = image_token_count(processor, inputs)
            assert n_tokens == feature_count(model, inputs), (width, height)
            assert 16 < n_tokens <= 88, (width, height)
        two = [shapes_image(112, 56), shapes_image(56, 168)]
        inputs = processor(images=two, text="<image><image>", return_tensors="pt")
        assert image_token_count(processor, inputs) == feature_count(model, inputs) == 52 + 76


def test_small_llava_next_gives_2928_tokens_for_672x672():
    """The benchmark preset's processor and model (built on the meta device: no weights) agree
    on LLaVA-NeXT's 2,928 tokens for a 672x672 image; its tower and decoder are small-llava's."""
    spec = PRESETS["small-llava-next"]
    processor = build_processor(spec)
    assert processor.image_processor.image_grid_pinpoints == NEXT_PINPOINTS
    inputs = processor(images=shapes_image(672, 672), text="<image>", return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 5, 3, 336, 336)  # base + 2x2 tiles
    model, _ = build_model(spec, device="meta")
    pixels = inputs["pixel_values"].to("meta")
    features = model.get_image_features(pixels, inputs["image_sizes"]).pooler_output
    assert image_token_count(processor, inputs) == features[0].shape[0] == 2928
    tok = processor.tokenizer.backend_tokenizer
    small = _llava_config(PRESETS["small-llava"], tok)
    assert model.config.vision_config.to_dict() == small.vision_config.to_dict()
    assert model.config.text_config.to_dict() == small.text_config.to_dict()
    assert (model.config.model_type, model.config.image_seq_length) == ("llava_next", 576)


def test_spec_rejects_pinpoints_that_do_not_fit_the_family_or_the_tile():
    fields = {**PRESETS["tiny-llava-next"].__dict__}
    with pytest.raises(ValueError, match="multiples of image_size 56"):
        PresetSpec(**{**fields, "grid_pinpoints": ((56, 100),)})
    with pytest.raises(ValueError, match="exactly when family"):
        PresetSpec(**{**fields, "grid_pinpoints": ()})
    with pytest.raises(ValueError, match="exactly when family"):
        PresetSpec(**{**fields, "family": "llava"})
    with pytest.raises(ValueError, match="unknown family"):
        PresetSpec(**{**fields, "family": "qwen2_vl"})


@pytest.mark.slow
def test_small_llava_next_writes_and_hf_generates(tmp_path: Path):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    out = write_preset("small-llava-next", tmp_path / "small-llava-next")
    model = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    inputs = processor(images=shapes_image(672, 672), text=prompt, return_tensors="pt")
    assert image_token_count(processor, inputs) == 2928
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert gen.shape == (1, inputs["input_ids"].shape[1] + 2)
