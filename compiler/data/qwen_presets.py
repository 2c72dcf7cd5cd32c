"""Random-init Qwen2-VL and Qwen2.5-VL model directories for tests and benchmarks.

`build_qwen(spec, seed)` gives the model (`Qwen2VLForConditionalGeneration` or
`Qwen2_5_VLForConditionalGeneration`), its image processor (`Qwen2VLImageProcessorPil`) and its
tokenizer (`Qwen2Tokenizer`: a byte-level BPE with Qwen's pre-tokenizer and special tokens,
`<|im_start|>`, `<|im_end|>`, `<|vision_start|>`, `<|image_pad|>`, `<|vision_end|>`, ...);
`save_qwen` writes them as the files a released checkpoint ships: config.json (nested
text_config / vision_config, as transformers 5 saves it), model.safetensors,
generation_config.json, tokenizer.json + tokenizer_config.json, preprocessor_config.json (with
`min_pixels` / `max_pixels`) and the chat template, in chat_template.jinja or in the legacy
chat_template.json (`spec.template_file`), so both of the places a checkpoint keeps it are
exercised. The processor class itself is not saved: `Qwen2VLProcessor` needs torchvision for its
video processor, and the released checkpoints' files load without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Qwen2-VL-Instruct's chat template (Qwen2.5-VL-Instruct ships the same one).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen's special tokens, in the order the released vocabulary numbers them
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_CORPUS = """
system You are a helpful assistant. user assistant
Describe the image. What is in the picture? What colour is the shape? Compare the two images.
The image shows a red circle, a blue square and a green triangle on a white background.
There is a cat sitting on a chair next to a window. A dog runs across the grass in a park.
Count the objects in the scene. Is there any text in the image? Read the sign aloud.
left right top bottom center large small yellow orange purple black white gray brown pink
one two three four five six seven eight nine ten many few some none yes no maybe
"""

FAMILY_CLASSES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
}


@dataclass(frozen=True)
class QwenVLSpec:
    """Shapes of a preset Qwen2-VL (`family` "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") model.

    Vision tower: `vision_layers` blocks of width `vision_hidden` over patches of `patch_size`
    px (temporal patch 2, merged 2 x 2 into one LLM token); Qwen2-VL's MLP is `vision_mlp` wide
    (its config states mlp_ratio = vision_mlp / vision_hidden), Qwen2.5-VL's gated MLP too.
    Qwen2.5-VL attends within windows of `window_size` px except in `fullatt_blocks`.
    Decoder: Qwen2 with 3-D rotary positions split by `mrope_section` (sums to head_dim / 2).
    Images are resized to between `min_pixels` and `max_pixels` pixels."""

    description: str
    family: str
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    patch_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab_size: int
    mrope_section: tuple[int, int, int]
    min_pixels: int
    max_pixels: int
    window_size: int = 0
    fullatt_blocks: tuple[int, ...] = ()
    tokenizer_vocab: int = 600
    template_file: str = "jinja"  # "jinja": chat_template.jinja; "json": chat_template.json
    init_std: float = 0.02
    dtype: str = "float32"
    weights: None = None  # random init only (the CLI lists presets by this)

    def __post_init__(self) -> None:
        if self.family not in FAMILY_CLASSES:
            raise ValueError(f"unknown family {self.family!r}; one of {', '.join(FAMILY_CLASSES)}")
        if 2 * sum(self.mrope_section) != self.hidden // self.heads:
            raise ValueError("mrope_section must sum to half the decoder's head_dim")
        if (self.family == "qwen2_5_vl") != (self.window_size > 0):
            raise ValueError("window_size is given exactly when family is 'qwen2_5_vl'")
        if any(not 0 <= b < self.vision_layers for b in self.fullatt_blocks):
            raise ValueError(f"fullatt_blocks must be blocks 0..{self.vision_layers - 1}")
        if self.template_file not in ("jinja", "json"):
            raise ValueError("template_file is 'jinja' or 'json'")


QWEN_PRESETS: dict[str, QwenVLSpec] = {
    "tiny-qwen2-vl": QwenVLSpec(
        description="Qwen2-VL, random init: vision 2 blocks, patch 16, 32..128 px a side "
        "(1 to 16 tokens an image); Qwen2 decoder 3 layers, hidden 64, GQA 4:2, M-RoPE [2, 3, 3]",
        family="qwen2_vl",
        vision_hidden=32,
        vision_layers=2,
        vision_heads=2,
        vision_mlp=64,
        patch_size=16,
        hidden=64,
        layers=3,
        heads=4,
        kv_heads=2,
        mlp=128,
        vocab_size=640,
        mrope_section=(2, 3, 3),
        min_pixels=32 * 32,
        max_pixels=128 * 128,
        template_file="json",
        init_std=0.05,
    ),
    "tiny-qwen2.5-vl": QwenVLSpec(
        description="Qwen2.5-VL, random init: vision 3 blocks (block 1 full attention, the "
        "others in 56 px windows), patch 14, 56..168 px a side (4 to 36 tokens an image); "
        "Qwen2 decoder 3 layers, hidden 96, GQA 6:2, M-RoPE [2, 3, 3]",
        family="qwen2_5_vl",
        vision_hidden=48,
        vision_layers=3,
        vision_heads=3,
        vision_mlp=96,
        patch_size=14,
        window_size=56,
        fullatt_blocks=(1,),
        hidden=96,
        layers=3,
        heads=6,
        kv_heads=2,
        mlp=192,
        vocab_size=640,
        mrope_section=(2, 3, 3),
        min_pixels=56 * 56,
        max_pixels=168 * 168,
        template_file="jinja",
        init_std=0.05,
    ),
    # the vision tower of Qwen2.5-VL (hidden 1280, 16 heads, patch 14, 112 px windows) with 8
    # of its 32 blocks, before a 16-layer decoder of hidden 1024
    "small-qwen2.5-vl": QwenVLSpec(
        description="Qwen2.5-VL, random init, ~440M params: vision 8 blocks of Qwen2.5-VL's "
        "shape (hidden 1280, 16 heads, 112 px windows, full attention in blocks 3 and 7), "
        "patch 14, up to 896x896 px (1,024 tokens); Qwen2 decoder 16 layers, hidden 1024, "
        "GQA 8:2, M-RoPE [16, 24, 24]",
        family="qwen2_5_vl",
        vision_hidden=1280,
        vision_layers=8,
        vision_heads=16,
        vision_mlp=3420,
        patch_size=14,
        window_size=112,
        fullatt_blocks=(3, 7),
        hidden=1024,
        layers=16,
        heads=8,
        kv_heads=2,
        mlp=2816,
        vocab_size=32064,
        mrope_section=(16, 24, 24),
        min_pixels=56 * 56,
        max_pixels=896 * 896,
        tokenizer_vocab=1000,
    ),
}


def build_tokenizer(vocab_size: int) -> Any:
    """A `Qwen2Tokenizer` whose byte-level BPE (Qwen's pre-tokenizer regex, NFC, no BOS) is
    trained on a small corpus, with Qwen's special tokens: `<|im_end|>` ends a turn (eos),
    `<|endoftext|>` pads, `<|image_pad|>` is the image token."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(m) for m in trained["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": list(SPECIAL_TOKENS[1:])},
        replace_extra_special_tokens=False,
    )
    return tokenizer


def build_image_processor(spec: QwenVLSpec) -> Any:
    """Qwen2-VL's image processor (PIL backend) for `spec`'s patch and pixel bounds."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        patch_size=spec.patch_size,
        temporal_patch_size=2,
        merge_size=2,
    )


def _vision_config(spec: QwenVLSpec) -> dict[str, Any]:
    common = {
        "depth": spec.vision_layers,
        "num_heads": spec.vision_heads,
        "patch_size": spec.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "initializer_range": spec.init_std,
    }
    if spec.family == "qwen2_vl":  # hidden_size is the merger's output (the decoder's width)
        return {
            **common,
            "embed_dim": spec.vision_hidden,
            "hidden_size": spec.hidden,
            "mlp_ratio": spec.vision_mlp // spec.vision_hidden,
            "hidden_act": "quick_gelu",
        }
    return {
        **common,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_mlp,
        "out_hidden_size": spec.hidden,
        "window_size": spec.window_size,
        "fullatt_block_indexes": list(spec.fullatt_blocks),
        "tokens_per_second": 2,
        "hidden_act": "silu",
    }


def qwen_config(spec: QwenVLSpec, tokenizer: Any) -> Any:
    """The Qwen2VLConfig (Qwen2_5_VLConfig) of `spec`, token ids from `tokenizer`."""
    import transformers

    ids = dict(
        zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)), strict=True)
    )
    text = {
        "hidden_size": spec.hidden,
        "intermediate_size": spec.mlp,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "vocab_size": max(spec.vocab_size, len(tokenizer)),
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": list(spec.mrope_section),
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "initializer_range": spec.init_std,
    }
    config_class = getattr(transformers, FAMILY_CLASSES[spec.family][0])
    return config_class(
        text_config=text,
        vision_config=_vision_config(spec),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_qwen(spec: QwenVLSpec, seed: int = 0, device: str = "cpu") -> tuple[Any, Any, Any]:
    """(model in eval mode, image processor, tokenizer) of `spec`, weights drawn from `seed`."""
    import torch
    import transformers

    tokenizer = build_tokenizer(spec.tokenizer_vocab)
    config = qwen_config(spec, tokenizer)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, spec.dtype))
    try:
        with torch.device(device):
            model = getattr(transformers, FAMILY_CLASSES[spec.family][1])(config).eval()
        # HF initializes every Linear bias to zero; a released checkpoint's are not (Qwen2's
        # q/k/v biases are large), and an engine may not skip them
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_(0.0, spec.init_std)
    finally:
        torch.set_default_dtype(default_dtype)
    ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.generation_config.eos_token_id = ids  # as the Instruct checkpoints end a turn
    model.generation_config.pad_token_id = ids[1]
    return model, build_image_processor(spec), tokenizer


def save_qwen(
    spec: QwenVLSpec, model: Any, image_processor: Any, tokenizer: Any, out: Path
) -> None:
    """Write the model directory's files into `out` (an existing, empty directory)."""
    model.save_pretrained(out, safe_serialization=True)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if spec.template_file == "json":
        text = json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}, indent=2)
        (out / "chat_template.json").write_text(text + "\n")
        _released_preprocessor_config(out / "preprocessor_config.json", spec)
    else:
        (out / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)


def _released_preprocessor_config(path: Path, spec: QwenVLSpec) -> None:
    """Rewrite preprocessor_config.json as the released Qwen2-VL checkpoints state it: the
    bounds as `min_pixels` / `max_pixels`, which override `size` (left at the class defaults
    here, so a reader that ignores the override gets other bounds), and the torchvision
    processor's type (transformers loads its PIL backend where torchvision is missing)."""
    data = json.loads(path.read_text())
    data.update(
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
        image_processor_type="Qwen2VLImageProcessor",
        processor_class="Qwen2VLProcessor",
    )
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
