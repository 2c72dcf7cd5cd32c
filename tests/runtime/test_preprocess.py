"""The runtime's torch-free preprocessing equals Hugging Face's AutoProcessor: pixel values to 1e-6
for every kind of image input and both config layouts, input ids exactly (with and without the
chat template, and for a Llama-style tokenizer.json), and bad inputs give one-line UserErrors."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllmc.runtime.errors import UserError
from mllmc.runtime.preprocess import ImagePreprocessor, PromptEncoder, read_image_processor_config

PROMPTS_WITH_IMAGE = [
    "USER: <image>\nDescribe the image. ASSISTANT:",
    "<image>What colour is the shape?",
    "USER: Count the objects <image> in the scene.  ASSISTANT:",
]
PROMPTS_WITHOUT_IMAGE = [
    "Describe the image.",
    "What is in the picture? Answer the question using a single word or phrase.",
    "  leading spaces, a tab\tand a newline\nCafé 🙂",
    "",
]


def _processor(model_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def _hf_pixels(proc, image) -> np.ndarray:
    return proc(images=image, text="USER: <image>\nhi ASSISTANT:", return_tensors="np")[
        "pixel_values"
    ]


def _num_visual_tokens(model_dir: Path, pixel_values: np.ndarray) -> int:
    """LlavaProcessor.replace_image_token's count, from the processed image's shape."""
    cfg = json.loads((model_dir / "processor_config.json").read_text())
    h, w = pixel_values.shape[-2:]
    n = (h // cfg["patch_size"]) * (w // cfg["patch_size"]) + cfg.get(
        "num_additional_image_tokens", 0
    )
    return n - 1 if cfg.get("vision_feature_select_strategy") == "default" else n


def _copy_model_dir(src: Path, dst: Path) -> Path:
    """The preset's preprocessing files (no weights: AutoProcessor does not read them)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def images(tmp_path_factory, sample_image) -> dict[str, object]:
    """Image inputs of every kind: paths, PIL images of several modes, numpy arrays."""
    from PIL import ImageDraw

    d = tmp_path_factory.mktemp("preprocess-images")
    rgb = Image.open(sample_image).convert("RGB")  # 120x90
    tall = Image.new("RGB", (70, 131), (10, 200, 40))
    ImageDraw.Draw(tall).ellipse((5, 20, 60, 110), fill=(240, 240, 20))
    rgba = rgb.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgb.width, dtype=np.uint8), (rgb.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.info["transparency"] = 0
    rgba.save(d / "rgba.png")
    palette.save(d / "palette.png")
    tall.save(d / "tall.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rgb.save(d / "exif-rotated.jpg", exif=exif)
    return {
        "png_path": sample_image,
        "rgba_png_path": d / "rgba.png",
        "palette_png_path": d / "palette.png",
        "jpeg_path_tall": d / "tall.jpg",
        "jpeg_path_exif_rotated": d / "exif-rotated.jpg",  # paths get EXIF orientation applied
        "pil_rgb": rgb,
        "pil_tall": tall,
        "pil_gray": rgb.convert("L"),
        "pil_rgba": rgba,
        "pil_palette_transparent": Image.open(d / "palette.png"),
        "numpy_rgb": np.array(rgb),
        "numpy_rgba": np.array(rgba),
    }


def _check_pixels(model_dir: Path, images: dict[str, object]) -> tuple[int, int]:
    proc = _processor(model_dir)
    pre = ImagePreprocessor(read_image_processor_config(model_dir))
    shapes = set()
    for name, image in images.items():
        ref = _hf_pixels(proc, str(image) if isinstance(image, Path) else image)
        ours = pre(image)
        assert ours.dtype == np.float32 and ours.flags.c_contiguous, name
        assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
        diff = float(np.abs(ours - ref).max())
        assert diff <= 1e-6, f"{name}: max |diff| {diff}"
        shapes.add(ours.shape[-2:])
    assert len(shapes) == 1
    return shapes.pop()


# -- image ------------------------------------------------------------------------------------


def test_config_from_processor_config(tiny_model_dir, tmp_path):
    cfg = read_image_processor_config(tiny_model_dir)
    assert cfg == {
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": 64},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 64, "width": 64},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_pad": False,
        "pad_size": None,
    }
    # normalising is idempotent: an artifact's image_processor.json (this dict) reads back the same
    (tmp_path / "image_processor.json").write_text(json.dumps(cfg))
    assert read_image_processor_config(tmp_path) == cfg


def test_pixel_values_match_hf(tiny_model_dir, images):
    assert _check_pixels(tiny_model_dir, images) == (64, 64)


# Rewrites of the preset's image settings: the other file layout, legacy int/list sizes, a crop
# that is not the resize (and one larger than it, which pads), no crop, other filters and stats.
VARIANTS = {
    "preprocessor_config-int-size-rect-crop": (
        "preprocessor_config.json",
        {"size": 80, "crop_size": [72, 56], "resample": 2},
        (72, 56),
    ),
    "processor_config-crop-larger-than-resize": (
        "processor_config.json",
        {
            "size": {"shortest_edge": 40},
            "crop_size": 48,
            "image_mean": 0.5,
            "image_std": [0.2, 0.3, 0.4],
            "rescale_factor": 0.0039,
        },
        (48, 48),
    ),
    "preprocessor_config-height-width-no-crop": (
        "preprocessor_config.json",
        {"size": {"height": 50, "width": 70}, "do_center_crop": False, "resample": 1},
        (50, 70),
    ),
    # an explicit null is not a missing key: transformers keeps None (a false flag, an unused value)
    "preprocessor_config-nulls-no-rescale": (
        "preprocessor_config.json",
        {"do_rescale": None, "rescale_factor": None, "do_pad": None, "pad_size": None},
        (64, 64),
    ),
    "processor_config-pad": (
        "processor_config.json",
        {"do_pad": True, "pad_size": {"height": 70, "width": 72}},
        (70, 72),
    ),
    "preprocessor_config-no-convert-no-normalize": (
        "preprocessor_config.json",
        {"do_convert_rgb": False, "do_normalize": False, "image_mean": None},
        (64, 64),
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pixel_values_match_hf_for_config_variants(variant, tiny_model_dir, tmp_path, images):
    layout, changes, shape = VARIANTS[variant]
    model_dir = _copy_model_dir(tiny_model_dir, tmp_path / "model")
    proc_cfg = json.loads((model_dir / "processor_config.json").read_text())
    image_cfg = {**proc_cfg["image_processor"], **changes}
    if layout == "preprocessor_config.json":  # as llava-hf checkpoints keep it
        del proc_cfg["image_processor"]
        (model_dir / "preprocessor_config.json").write_text(json.dumps(image_cfg))
    else:
        proc_cfg["image_processor"] = image_cfg
    (model_dir / "processor_config.json").write_text(json.dumps(proc_cfg))

    if image_cfg.get("do_convert_rgb") is False:  # then only 3-channel inputs make model inputs
        rgb = ("png_path", "rgba_png_path", "jpeg_path_tall", "pil_rgb", "pil_tall", "numpy_rgb")
        images = {k: images[k] for k in rgb}  # (a path is always read as RGB)
        with pytest.raises(UserError, match="RGB"):
            ImagePreprocessor(read_image_processor_config(model_dir))(
                Image.open(images["png_path"]).convert("L")
            )
    assert _check_pixels(model_dir, images) == shape

    # the visual-token count follows the image size; the ids still equal the processor's
    proc = _processor(model_dir)
    pixels = ImagePreprocessor(read_image_processor_config(model_dir))(images["pil_rgb"])
    n = _num_visual_tokens(model_dir, pixels)
    ids, start = PromptEncoder.from_dir(model_dir).encode(PROMPTS_WITH_IMAGE[0], n)
    ref = proc(images=images["pil_rgb"], text=PROMPTS_WITH_IMAGE[0], return_tensors="np")[
        "input_ids"
    ]
    np.testing.assert_array_equal(ids, ref)
    assert ids[0, start : start + n].tolist() == [proc.image_token_id] * n


def test_processor_config_block_wins_over_preprocessor_config(tiny_model_dir, tmp_path):
    """transformers reads processor_config.json's image_processor block before preprocessor_config.json."""
    model_dir = _copy_model_dir(tiny_model_dir, tmp_path / "model")
    (model_dir / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 99}}))
    assert read_image_processor_config(model_dir)["size"] == {"shortest_edge": 64}
    assert _processor(model_dir).image_processor.size["shortest_edge"] == 64


# -- text -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_processor(tiny_model_dir):
    return _processor(tiny_model_dir)


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return PromptEncoder.from_dir(tiny_model_dir)


def _chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


@pytest.mark.parametrize("prompt", PROMPTS_WITHOUT_IMAGE)
def test_chat_template_text_matches_hf(prompt, encoder, tiny_processor):
    ref = tiny_processor.apply_chat_template(_chat(prompt), add_generation_prompt=True)
    assert encoder.apply_chat_template(prompt) == ref


@pytest.mark.parametrize("prompt", PROMPTS_WITH_IMAGE + PROMPTS_WITHOUT_IMAGE)
def test_input_ids_match_hf(prompt, encoder, tiny_processor, sample_image):
    image = Image.open(sample_image)
    n = 16  # tiny-llava: (64 / 16)^2 patches
    text = (
        prompt
        if "<image>" in prompt
        else tiny_processor.apply_chat_template(_chat(prompt), add_generation_prompt=True)
    )
    ref = tiny_processor(images=image, text=text, return_tensors="np")["input_ids"]
    ids, start = encoder.encode(prompt, n)
    assert ids.dtype == np.int64 and ids.shape == ref.shape
    np.testing.assert_array_equal(ids, ref)
    assert start == int(np.flatnonzero(ref[0] == tiny_processor.image_token_id)[0])
    assert (ids[0, start : start + n] == encoder.image_token_id).all()
    assert encoder.image_token_id == tiny_processor.image_token_id


def test_qwen_placeholder_in_a_llava_prompt_is_text_with_a_warning(
    tiny_model_dir, tiny_processor, sample_image, caplog
):
    """Qwen2-VL's <|image_pad|> in a LLaVA prompt: kept as text, as LlavaProcessor keeps it
    (the chat template puts the image first), with a warning naming LLaVA's <image>."""
    encoder = PromptEncoder.from_dir(tiny_model_dir)  # its own: an encoder warns once
    prompt = "<|image_pad|> What is it?"
    text = tiny_processor.apply_chat_template(_chat(prompt), add_generation_prompt=True)
    ref = tiny_processor(images=Image.open(sample_image), text=text, return_tensors="np")
    with caplog.at_level(logging.WARNING, logger="mllmc.runtime.preprocess"):
        ids, _ = encoder.encode(prompt, 16)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warned) == 1
        and "<|image_pad|> is not this model's image placeholder (<image>)" in warned[0]
    )


def test_hf_inputs_warn_of_another_familys_placeholder_once(tiny_processor, sample_image, caplog):
    """`mllmc eval`'s HF path (capture.processor_inputs) says what the runtime says, once for
    every prompt it is given with the same `warned` set."""
    from mllmc.compiler.core.capture import processor_inputs

    image, warned = Image.open(sample_image), set()
    with caplog.at_level(logging.WARNING, logger="mllmc.runtime.preprocess"):
        for prompt in ("<|image_pad|> What is it?", "<|image_pad|> And now?", "Plain."):
            processor_inputs(tiny_processor, image, prompt, warned)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and "<|image_pad|> is not this model's image placeholder" in said[0]
    assert warned == {"<|image_pad|>"}


def test_input_ids_match_hf_chat_template_tokenize(
    encoder, tiny_processor, tiny_model_dir, sample_image
):
    """The processor's own templating + tokenizing path gives the same ids and pixels."""
    image = Image.open(sample_image).convert("RGB")
    prompt = "Describe the image."
    chat = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}],
        }
    ]
    ref = tiny_processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np"
    )
    ids, _ = encoder.encode(prompt, 16)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    pixels = ImagePreprocessor(read_image_processor_config(tiny_model_dir))(image)
    assert float(np.abs(pixels - ref["pixel_values"]).max()) <= 1e-6


# Chat templates where checkpoints keep them, in the shapes they come in: llava-hf's (image items
# first, a {% generation %} block), a multi-line one that leans on trim_blocks / lstrip_blocks and
# writes BOS itself, and one only the tokenizer has.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
MULTILINE_BOS_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'user' %}
USER: {% for item in message['content'] %}
        {% if item['type'] == 'image' %}
<image>
        {% else %}
{{ item['text'] | trim }}
        {% endif %}
    {% endfor %}

    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
ASSISTANT:
{% endif %}"""
TEMPLATE_SOURCES = ["chat_template.json", "processor_config.json", "tokenizer_config.json"]


@pytest.mark.parametrize("source", TEMPLATE_SOURCES)
def test_chat_template_sources_match_hf(source, tiny_model_dir, tmp_path, sample_image):
    model_dir = _copy_model_dir(tiny_model_dir, tmp_path / "model")
    if source == "chat_template.json":  # legacy file; wins over chat_template.jinja
        (model_dir / source).write_text(json.dumps({"chat_template": LLAVA_HF_TEMPLATE}))
    elif source == "processor_config.json":  # wins over both files
        cfg = json.loads((model_dir / source).read_text())
        (model_dir / source).write_text(
            json.dumps({**cfg, "chat_template": MULTILINE_BOS_TEMPLATE})
        )
    else:  # only the tokenizer's: the HF processor has none, its tokenizer renders it
        (model_dir / "chat_template.jinja").unlink()
        cfg = json.loads((model_dir / source).read_text())
        (model_dir / source).write_text(json.dumps({**cfg, "chat_template": LLAVA_HF_TEMPLATE}))
    proc = _processor(model_dir)
    encoder = PromptEncoder.from_dir(model_dir)
    image = Image.open(sample_image).convert("RGB")
    for prompt in PROMPTS_WITHOUT_IMAGE:
        if source == "tokenizer_config.json":
            assert proc.chat_template is None
            ref_text = proc.tokenizer.apply_chat_template(
                _chat(prompt), add_generation_prompt=True, tokenize=False
            )
        else:
            ref_text = proc.apply_chat_template(_chat(prompt), add_generation_prompt=True)
        assert encoder.apply_chat_template(prompt) == ref_text
        ids, _ = encoder.encode(prompt, 16)
        if source == "tokenizer_config.json":
            ref_ids = proc(images=image, text=ref_text, return_tensors="np")["input_ids"]
        else:  # the processor's own path: no second BOS when the template writes one
            chat = [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": image},
                        {"type": "text", "text": prompt},
                    ],
                }
            ]
            ref_ids = proc.apply_chat_template(
                chat,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="np",
            )["input_ids"]
        np.testing.assert_array_equal(ids, ref_ids, err_msg=repr(prompt))
        assert (ids[0] == proc.tokenizer.bos_token_id).sum() == 1


def test_decode_matches_hf(encoder, tiny_processor):
    ids = tiny_processor.tokenizer("Describe the image. A red circle, 3 cats; Café 🙂")["input_ids"]
    ids = ids + [tiny_processor.tokenizer.eos_token_id, encoder.image_token_id]
    assert encoder.decode(ids) == tiny_processor.tokenizer.decode(ids, skip_special_tokens=True)
    assert "<image>" not in encoder.decode(ids) and "</s>" not in encoder.decode(ids)


# -- a Llama-style tokenizer, as llava-hf checkpoints ship it --------------------------------

_CORPUS = (
    "USER: ASSISTANT: Describe the image. What is in the picture? What colour is the shape?\n"
    "The image shows a red circle, a blue square and a green triangle on a white background.\n"
    "There is a cat sitting on a chair next to a window. Count the objects in the scene.\n"
)


def _write_llama_tokenizer(model_dir: Path, add_bos_token: bool) -> None:
    """A SentencePiece-converted tokenizer.json (Prepend/Replace normalizer, no pre-tokenizer, byte
    fallback, BOS post-processor) and a tokenizer_config.json naming LlamaTokenizer, as llava-1.5
    checkpoints have them."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    special = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False)
    trainer_tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = [t for _, t in sorted((i, t) for t, i in trained["vocab"].items() if t not in special)]
    vocab = {t: i for i, t in enumerate(special + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    added = [*special, "<image>", "<pad>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok.save(str(model_dir / "tokenizer.json"))
    flags = {
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    config = {
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, **flags} for t in added},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_llama_style_tokenizer_matches_hf(add_bos_token, tiny_model_dir, tmp_path, sample_image):
    model_dir = _copy_model_dir(tiny_model_dir, tmp_path / "model")
    _write_llama_tokenizer(model_dir, add_bos_token)
    proc = _processor(model_dir)
    # transformers overrides LlamaTokenizer for model_type "llava": tokenizer.json runs as it is
    assert type(proc.tokenizer).__name__ == "TokenizersBackend"
    encoder = PromptEncoder.from_dir(model_dir)
    image = Image.open(sample_image)
    for prompt in PROMPTS_WITH_IMAGE + PROMPTS_WITHOUT_IMAGE:
        text = (
            prompt
            if "<image>" in prompt
            else proc.apply_chat_template(_chat(prompt), add_generation_prompt=True)
        )
        ref = proc(images=image, text=text, return_tensors="np")["input_ids"]
        ids, start = encoder.encode(prompt, 16)
        np.testing.assert_array_equal(ids, ref, err_msg=repr(prompt))
        # with a tokenizer.json, transformers drops add_bos_token: the file's post-processor adds BOS
        assert ids[0, 0] == proc.tokenizer.bos_token_id
        tail = ref[0, start + 16 :].tolist()
        assert encoder.decode(tail) == proc.tokenizer.decode(tail, skip_special_tokens=True)


# -- errors -----------------------------------------------------------------------------------


def _one_line_user_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_bad_images_raise_user_error(tiny_model_dir, tmp_path):
    pre = ImagePreprocessor(read_image_processor_config(tiny_model_dir))
    text_file = tmp_path / "notes.png"
    text_file.write_text("this is not an image\nsecond line\n")
    truncated = tmp_path / "truncated.png"
    buf = tmp_path / "full.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf)
    truncated.write_bytes(buf.read_bytes()[:60])
    for bad in (tmp_path / "missing.png", str(text_file), truncated, tmp_path):
        with pytest.raises(UserError, match=r"^cannot read image ") as e:
            pre(bad)
        assert str(bad) in _one_line_user_error(e)
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), 42):
        with pytest.raises(UserError) as e:
            pre(bad)
        _one_line_user_error(e)


def test_bad_prompts_raise_user_error(encoder, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="one image per prompt") as e:
        encoder.encode("USER: <image> and <image> ASSISTANT:", 16)
    _one_line_user_error(e)

    model_dir = _copy_model_dir(tiny_model_dir, tmp_path / "model")
    (model_dir / "chat_template.jinja").unlink()
    no_template = PromptEncoder.from_dir(model_dir)
    assert no_template.encode("<image>hi", 16)[1] == 1
    with pytest.raises(UserError, match="placeholder") as e:
        no_template.encode("Describe the image.", 16)
    _one_line_user_error(e)


def test_missing_or_corrupt_config_raises_user_error(tiny_model_dir, tmp_path):
    model_dir = _copy_model_dir(tiny_model_dir, tmp_path / "model")
    proc_cfg = json.loads((model_dir / "processor_config.json").read_text())
    del proc_cfg["image_processor"]
    (model_dir / "processor_config.json").write_text(json.dumps(proc_cfg))
    with pytest.raises(UserError, match="no image processor config") as e:
        read_image_processor_config(model_dir)
    _one_line_user_error(e)

    (model_dir / "preprocessor_config.json").write_text('{"size": {"shortest_edge": 64,\n')
    with pytest.raises(UserError, match="corrupt .*preprocessor_config.json") as e:
        read_image_processor_config(model_dir)
    _one_line_user_error(e)

    (model_dir / "preprocessor_config.json").write_text(json.dumps({"size": {"longest_edge": 64}}))
    with pytest.raises(UserError, match="unsupported size") as e:
        read_image_processor_config(model_dir)
    _one_line_user_error(e)

    (model_dir / "preprocessor_config.json").write_text(json.dumps({"resample": None}))
    with pytest.raises(UserError, match="do_resize is true but resample is null") as e:
        read_image_processor_config(model_dir)
    _one_line_user_error(e)

    with pytest.raises(UserError, match="not found"):
        read_image_processor_config(tmp_path / "nowhere")

    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json") as e:
        PromptEncoder.from_dir(model_dir)
    _one_line_user_error(e)


def test_import_and_use_without_torch(tiny_model_dir, sample_image):
    code = (
        "import sys\n"
        "from mllmc.runtime.preprocess import ImagePreprocessor, PromptEncoder, read_image_processor_config\n"
        f"d = {str(tiny_model_dir)!r}\n"
        f"x = ImagePreprocessor(read_image_processor_config(d))({str(sample_image)!r})\n"
        "ids, start = PromptEncoder.from_dir(d).encode('Describe the image.', 16)\n"
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(x.shape, ids.shape, start, bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
