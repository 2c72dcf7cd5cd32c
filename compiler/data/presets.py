"""Tiny and small LLaVA-1.5 and LLaVA-NeXT model directories for tests and benchmarks:
random-init ones, and `trained-tiny-llava`, whose weights and tokenizer were trained on the
shapes-qa task (compiler/data/shapes_qa.py) by benchmarks/train_shapes_llava.py and ship in
compiler/data/assets/.

`write_preset(name, out_dir, seed)` writes a complete Hugging Face model directory (config.json,
model.safetensors, tokenizer.json + tokenizer_config.json with the `<image>` token, the
processor and image-processor configs, a chat template) that `LlavaForConditionalGeneration`
(or `LlavaNextForConditionalGeneration`) and `AutoProcessor.from_pretrained` load exactly as
they load a real LLaVA-1.5 (LLaVA-NeXT) checkpoint; the Qwen2-VL and Qwen2.5-VL presets
(`tiny-qwen2-vl`, `tiny-qwen2.5-vl`, `small-qwen2.5-vl`) are built by qwen_presets.py. The
compiler never looks at which preset wrote a directory: it reads the same files a real one has.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from mllmc.compiler.files.outputs import check_names, check_output_dir, staged_directory
from mllmc.runtime.errors import UserError

from .qwen_presets import QWEN_PRESETS, QwenVLSpec, build_qwen, save_qwen
from .shapes_qa import tokenizer_corpus

log = logging.getLogger(__name__)

# LLaVA-1.5's conversation format, as a chat template (the llava-hf checkpoints ship the same;
# so does llava-v1.6-vicuna, the LLaVA-NeXT with a Llama-style decoder).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% else %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Text the preset tokenizer is trained on: enough words for prompts about images to tokenize
# into real sub-words rather than bytes.
_CORPUS = """
USER: ASSISTANT: Describe the image. What is in the picture? What colour is the shape?
The image shows a red circle, a blue square and a green triangle on a white background.
There is a cat sitting on a chair next to a window. A dog runs across the grass in a park.
Count the objects in the scene. Is there any text in the image? Read the sign aloud.
A person is holding an umbrella in the rain. The sky is cloudy and the street is wet.
Answer the question using a single word or phrase. Provide a short description of the photo.
left right top bottom center large small yellow orange purple black white gray brown pink
one two three four five six seven eight nine ten many few some none yes no maybe
"""


class _FamilyClasses(NamedTuple):
    """The transformers class names a model family is built from."""

    config: str
    model: str
    processor: str
    image_processor: str


_FAMILIES: dict[str, _FamilyClasses] = {
    "llava": _FamilyClasses(
        "LlavaConfig", "LlavaForConditionalGeneration", "LlavaProcessor", "CLIPImageProcessor"
    ),
    "llava_next": _FamilyClasses(
        "LlavaNextConfig",
        "LlavaNextForConditionalGeneration",
        "LlavaNextProcessor",
        "LlavaNextImageProcessorPil",
    ),
}


@dataclass(frozen=True)
class PresetSpec:
    """Shapes of a preset LLaVA-1.5 (`family` "llava") or LLaVA-NeXT (`family` "llava_next")
    model: CLIP vision tower + Llama decoder. A LLaVA-NeXT image is cut into tiles of
    `image_size` at the best fitting (height, width) of `grid_pinpoints`, plus one tile of the
    whole image resized."""

    description: str
    # vision tower (CLIP ViT)
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    # decoder (Llama)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab_size: int  # decoder embedding rows; >= tokenizer size, as in real checkpoints
    tokenizer_vocab: int = 600
    init_std: float = 0.02
    dtype: str = "float32"  # dtype the weights are built and saved in
    # words the tokenizer is trained on besides the built-in corpus
    extra_corpus: str = ""
    # trained weights (a safetensors file) and their tokenizer.json, under compiler/data/assets/;
    # None: random init and a tokenizer trained on the corpus
    weights: str | None = None
    tokenizer_file: str | None = None
    family: str = "llava"
    # LLaVA-NeXT's anyres resolutions, (height, width) multiples of image_size; () for LLaVA-1.5
    grid_pinpoints: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.family not in _FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; one of {', '.join(_FAMILIES)}")
        if (self.family == "llava_next") != bool(self.grid_pinpoints):
            raise ValueError("grid_pinpoints are given exactly when family is 'llava_next'")
        if any(side % self.image_size for hw in self.grid_pinpoints for side in hw):
            raise ValueError(f"grid_pinpoints must be multiples of image_size {self.image_size}")


PRESETS: dict[str, PresetSpec | QwenVLSpec] = {
    "tiny-llava": PresetSpec(
        description="CLIP 2 layers, 64 px / patch 16 -> 16 visual tokens; Llama 6 layers, GQA 4:2",
        image_size=64,
        patch_size=16,
        vision_hidden=64,
        vision_layers=2,
        vision_heads=4,
        vision_mlp=128,
        hidden=128,
        layers=6,
        heads=4,
        kv_heads=2,
        mlp=256,
        vocab_size=640,
        init_std=0.05,
    ),
    "small-llava": PresetSpec(
        description="~280M params: CLIP 6 layers, 336 px / patch 14 -> 576 visual tokens; "
        "Llama 16 layers, hidden 1024, GQA 16:8",
        image_size=336,
        patch_size=14,
        vision_hidden=512,
        vision_layers=6,
        vision_heads=8,
        vision_mlp=2048,
        hidden=1024,
        layers=16,
        heads=16,
        kv_heads=8,
        mlp=2816,
        vocab_size=32064,
        tokenizer_vocab=1000,
        init_std=0.02,
    ),
    # The shapes of llava-hf/llava-1.5-7b-hf (CLIP ViT-L/14-336 + Vicuna-7B), random weights:
    # for GPU benchmarks at the size ShortV's numbers were measured at. Its config matches the
    # published LLaVA-1.5-7B ShortV layer list, as the real checkpoint's does. ~14 GB on disk.
    "llava-7b-shape": PresetSpec(
        description="LLaVA-1.5-7B shapes, random init, float16 (~7.1B params, ~14 GB): CLIP "
        "24 layers, 336 px / patch 14 -> 576 visual tokens; Llama 32 layers, hidden 4096",
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        vision_mlp=4096,
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=32,
        mlp=11008,
        vocab_size=32064,
        tokenizer_vocab=1000,
        init_std=0.02,
        dtype="float16",
    ),
    # Trained on shapes-qa (benchmarks/train_shapes_llava.py reproduces the shipped weights).
    "trained-tiny-llava": PresetSpec(
        description="trained on shapes-qa: CLIP 3 layers, 128 px / patch 16 -> 64 visual tokens; "
        "Llama 6 layers, hidden 128, GQA 4:2",
        image_size=128,
        patch_size=16,
        vision_hidden=96,
        vision_layers=3,
        vision_heads=4,
        vision_mlp=256,
        hidden=128,
        layers=6,
        heads=4,
        kv_heads=2,
        mlp=256,
        vocab_size=640,
        tokenizer_vocab=640,
        init_std=0.02,
        extra_corpus=tokenizer_corpus(),
        weights="trained-tiny-llava.safetensors",
        tokenizer_file="trained-tiny-llava-tokenizer.json",
    ),
}

# LLaVA-NeXT presets: the decoders of tiny-llava and small-llava behind an anyres CLIP tower.
PRESETS["tiny-llava-next"] = replace(
    PRESETS["tiny-llava"],
    description="LLaVA-NeXT, random init: CLIP 2 layers, 56 px tiles / patch 14 (16 tokens a "
    "tile), anyres up to 112x112 or 56x168 -> up to 88 visual tokens; tiny-llava's decoder",
    image_size=56,
    patch_size=14,
    family="llava_next",
    grid_pinpoints=((56, 56), (56, 112), (112, 56), (112, 112), (56, 168), (168, 56)),
)
PRESETS["small-llava-next"] = replace(
    PRESETS["small-llava"],
    description="LLaVA-NeXT, random init, ~280M params: CLIP 6 layers, 336 px tiles / patch 14, "
    "anyres up to 672x672 or 336x1008 -> up to 2,928 visual tokens; small-llava's decoder",
    family="llava_next",
    grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
)

# Qwen2-VL and Qwen2.5-VL presets (compiler/data/qwen_presets.py)
PRESETS.update(QWEN_PRESETS)

ASSETS = Path(__file__).parent / "assets"


# Written into every preset directory: `--force` replaces a directory only when it holds this
# marker (a preset mllmc wrote) and the files a Hugging Face LLaVA directory has, or nothing.
MARKER = ".mllmc-preset"
_HF_FILES = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
    r"model\.safetensors\.index\.json|tokenizer(_config)?\.json|special_tokens_map\.json|"
    r"chat_template\.(jinja|json)|processor_config\.json|preprocessor_config\.json)$"
)


def replaceable(path: Path) -> str | None:
    """None if `path` is empty or a preset directory mllmc wrote; else why --force may not
    replace it (a real model directory has no marker and is never replaced)."""
    entries = list(path.iterdir())
    if not entries:
        return None
    if not (path / MARKER).is_file():
        return f"it is not a preset directory written by mllmc (no {MARKER} marker)"
    foreign = sorted(
        p.name
        for p in entries
        if p.name != MARKER and (not p.is_file() or not _HF_FILES.match(p.name))
    )
    if foreign:
        return f"it holds files mllmc did not write ({', '.join(foreign[:3])})"
    return None


def _build_tokenizer(vocab_size: int, extra_corpus: str = ""):
    """A byte-level BPE tokenizer with Llama-style specials and the `<image>` token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4 + [extra_corpus] * 8, trainer=trainer)
    tok.add_special_tokens(["<image>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def write_preset(
    name: str, out_dir: str | os.PathLike, seed: int = 0, force: bool = False, device: str = "cpu"
) -> Path:
    """Write preset `name` as a Hugging Face LLaVA model directory at `out_dir`; returns its path.
    A trained preset's weights do not depend on `seed`."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return write_model(PRESETS[name], out_dir, seed=seed, force=force, device=device)


def write_model(
    spec: PresetSpec | QwenVLSpec,
    out_dir: str | os.PathLike,
    seed: int = 0,
    force: bool = False,
    device: str = "cpu",
) -> Path:
    """Write a LLaVA model of shapes `spec` at `out_dir` (atomically): random init, or the
    trained weights `spec.weights` names. Random weights are drawn on `device` (a GPU draws a 7B
    model in seconds; the same seed gives other weights on another device)."""
    out = Path(out_dir)
    check_names(out)
    empty_dir = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    force = force or empty_dir  # an empty directory is there to be filled
    check_output_dir(out, force, replaceable, what="model directory")
    if isinstance(spec, QwenVLSpec):
        model, image_processor, tokenizer = build_qwen(spec, seed=seed, device=device)
    else:
        model, processor = build_model(spec, seed=seed, device=device)

    with staged_directory(out, force=force, replaceable=replaceable) as tmp:
        if isinstance(spec, QwenVLSpec):
            save_qwen(spec, model, image_processor, tokenizer, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"preset": spec.description, "seed": seed}) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    log.info("wrote %s (%.1fM params, seed %d) to %s", spec.description, n_params / 1e6, seed, out)
    return out


def build_model(spec: PresetSpec, seed: int = 0, device: str = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, processor) of shapes `spec`: LlavaForConditionalGeneration and
    LlavaProcessor, or LlavaNextForConditionalGeneration and LlavaNextProcessor for family
    "llava_next". What `write_model` saves, and what the training script trains."""
    processor = build_processor(spec)
    tok = processor.tokenizer.backend_tokenizer
    model = _build_llava(spec, _llava_config(spec, tok), seed, device)
    return model, processor


def build_processor(spec: PresetSpec) -> Any:
    """The processor of `spec` alone (tokenizer, image processor, chat template): what
    `build_model` returns beside the model, without building any weights."""
    from transformers import PreTrainedTokenizerFast

    if spec.tokenizer_file is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(ASSETS / spec.tokenizer_file))
    else:
        tok = _build_tokenizer(spec.tokenizer_vocab, spec.extra_corpus)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    return _build_processor(spec, tokenizer)


def _family_class(spec: PresetSpec, role: str) -> Any:
    """The transformers class of `spec.family` in `role` (a `_FamilyClasses` field)."""
    import transformers

    return getattr(transformers, getattr(_FAMILIES[spec.family], role))


def _pinpoint_kwargs(spec: PresetSpec) -> dict[str, Any]:
    """`image_grid_pinpoints` as the LLaVA-NeXT config and image processor take it ({} for
    LLaVA-1.5): a list of [height, width]."""
    if spec.family != "llava_next":
        return {}
    return {"image_grid_pinpoints": [list(hw) for hw in spec.grid_pinpoints]}


def _llava_config(spec: PresetSpec, tok: Any) -> Any:
    """The LlavaConfig (LlavaNextConfig) of `spec` (CLIP vision tower + Llama decoder) for
    tokenizer `tok`. `image_seq_length` is the patch count of one `image_size` tile."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vocab_size = max(spec.vocab_size, tok.get_vocab_size())
    num_patches = (spec.image_size // spec.patch_size) ** 2
    return _family_class(spec, "config")(
        vision_config=CLIPVisionConfig(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_mlp,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            projection_dim=spec.vision_hidden,
            hidden_act="quick_gelu",
            initializer_range=spec.init_std,
        ),
        text_config=LlamaConfig(
            hidden_size=spec.hidden,
            intermediate_size=spec.mlp,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            vocab_size=vocab_size,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=tok.token_to_id("<s>"),
            eos_token_id=tok.token_to_id("</s>"),
            pad_token_id=tok.token_to_id("<pad>"),
            initializer_range=spec.init_std,
            tie_word_embeddings=False,
        ),
        image_token_index=tok.token_to_id("<image>"),
        image_seq_length=num_patches,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        **_pinpoint_kwargs(spec),
    )


def _build_llava(spec: PresetSpec, config: Any, seed: int, device: str) -> Any:
    """The model of `config` in eval mode, built in `spec.dtype` on `device`: random weights
    drawn from `seed`, or the trained weights `spec.weights` names."""
    import torch

    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, spec.dtype))  # build in the saved dtype: half the RAM
    try:
        with torch.device(device):
            model = _family_class(spec, "model")(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    if spec.weights is not None:
        from safetensors.torch import load_file

        state = load_file(str(ASSETS / spec.weights))
        model_state = model.state_dict()
        model.load_state_dict({k: v.to(model_state[k].dtype) for k, v in state.items()})
    return model


def _build_processor(spec: PresetSpec, tokenizer: Any) -> Any:
    """LLaVA-1.5's (LLaVA-NeXT's) processor: CLIP preprocessing at `spec.image_size` (for
    LLaVA-NeXT, of each anyres tile, with `grid_pinpoints`), the chat template."""
    image_processor = _family_class(spec, "image_processor")(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        resample=3,  # bicubic, as in openai/clip-vit-large-patch14-336
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        **_pinpoint_kwargs(spec),
    )
    return _family_class(spec, "processor")(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>",
    )
