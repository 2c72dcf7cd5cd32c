"""A Hugging Face model directory and the limits of what capture accepts, checked before
anything heavy is imported.

`read_config` is the first thing `mllmc compile` does with a model directory: a missing or
corrupt directory, or an architecture capture does not support, is one line before torch and
transformers load (seconds), so bad input is refused at once."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllmc.runtime.errors import UserError
from mllmc.runtime.jsonfile import JSONError, read_json

from .families import FAMILIES, family

# model_type of config.json -> what it is; the only architectures capture accepts.
SUPPORTED_ARCHITECTURES = {k: f.description for k, f in FAMILIES.items()}
SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2")
SUPPORTED_VISION_MODELS = ("clip_vision_model",)
# the longest sequence (prompt, or prompt + cache) a captured graph accepts
MAX_SEQ = 8192


def supported_text() -> str:
    return ", ".join(f"{k} = {v}" for k, v in SUPPORTED_ARCHITECTURES.items())


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a model dir, checked for a supported architecture (UserError otherwise)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise UserError(f"model directory {root} not found")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{root} is not a Hugging Face model directory: config.json is missing")
    try:
        cfg = read_json(cfg_path)  # NaN and Infinity refused: no size or epsilon may be one
    except JSONError as e:
        raise UserError(f"corrupt {cfg_path}: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"corrupt {cfg_path}: not a JSON object")
    model_type = _field(cfg, "model_type", str, cfg_path)
    if model_type is None:
        raise UserError(f"{cfg_path} has no model_type; supported: {supported_text()}")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {model_type!r} in {cfg_path}; supported: {supported_text()}"
        )
    if family(model_type).mrope:
        check_qwen_config(cfg, cfg_path)
        return _check_weights(root, cfg)
    text = _field(cfg, "text_config", dict, cfg_path) or {}
    vision = _field(cfg, "vision_config", dict, cfg_path) or {}
    text_type = _field(text, "model_type", str, cfg_path, "text_config.") or "llama"
    if text_type not in SUPPORTED_TEXT_MODELS:
        raise UserError(
            f"unsupported LLaVA decoder {text_type!r}; supported decoders: "
            f"{', '.join(SUPPORTED_TEXT_MODELS)}"
        )
    vision_type = (
        _field(vision, "model_type", str, cfg_path, "vision_config.") or "clip_vision_model"
    )
    if vision_type not in SUPPORTED_VISION_MODELS:
        raise UserError(
            f"unsupported LLaVA vision tower {vision_type!r}; supported: "
            f"{', '.join(SUPPORTED_VISION_MODELS)}"
        )
    check_sizes(cfg, cfg_path)
    family(model_type).check_config(cfg, cfg_path)
    return _check_weights(root, cfg)


def _check_weights(root: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg`, once `root` holds weight files (UserError otherwise)."""
    if not any(root.glob("*.safetensors")) and not any(root.glob("*.bin")):
        raise UserError(f"{root} has no weights (*.safetensors)")
    return cfg


# The size fields of config.json mllmc reads, each with the largest value it accepts: past
# these no LLaVA checkpoint goes, and the model would not fit any machine. A missing required
# field would leave Hugging Face to fill in its default (a 7B Llama), so each must be stated.
TEXT_SIZES = {
    "hidden_size": 65536,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "intermediate_size": 2**20,
    "vocab_size": 2**22,
}
VISION_SIZES = {
    "hidden_size": 65536,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "intermediate_size": 2**20,
    "image_size": 8192,
    "patch_size": 8192,
}
# optional size fields (Hugging Face derives them from the required ones when absent)
OPTIONAL_SIZES = {"num_key_value_heads": 1024, "head_dim": 65536, "max_position_embeddings": 2**24}
# epsilons that, when stated, must be finite and > 0
EPSILONS = ("rms_norm_eps", "layer_norm_eps")


def check_sizes(cfg: dict[str, Any], path: Path) -> None:
    """UserError when config.json's decoder or vision tower is not fully and sanely sized: a
    missing section or size, a size that is not a positive integer within its limit, sizes that
    do not divide as attention needs, or an image token or feature layer out of range."""
    sections = {}
    for name, required in (("text_config", TEXT_SIZES), ("vision_config", VISION_SIZES)):
        section = cfg.get(name)
        if not isinstance(section, dict):
            raise UserError(
                f"{path} has no {name} (a JSON object with model_type and "
                f"{', '.join(required)}): Hugging Face would fill in its default model "
                "(a 7B Llama decoder, a CLIP ViT-B tower); state the model's own sizes"
            )
        if "model_type" not in section:
            raise UserError(f"{path}: {name} has no model_type")
        sizes = {k: _size(section, k, limit, path, name, True) for k, limit in required.items()}
        for key, limit in OPTIONAL_SIZES.items():
            sizes[key] = _size(section, key, limit, path, name, False)
        for key in EPSILONS:
            eps = section.get(key)
            if eps is not None and (
                isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0
            ):
                raise UserError(
                    f"corrupt {path}: {name}.{key} must be a number > 0, got {eps!r:.40}"
                )
        sections[name] = sizes
        heads, kv = sizes["num_attention_heads"], sizes["num_key_value_heads"]
        if sizes["head_dim"] is None and sizes["hidden_size"] % heads:
            raise UserError(
                f"corrupt {path}: {name}.hidden_size {sizes['hidden_size']} is not divisible by "
                f"num_attention_heads {heads} (and no head_dim is given)"
            )
        if kv is not None and heads % kv:
            raise UserError(
                f"corrupt {path}: {name}.num_attention_heads {heads} is not divisible by "
                f"num_key_value_heads {kv}"
            )
    text, vision = sections["text_config"], sections["vision_config"]
    if vision["image_size"] % vision["patch_size"]:
        raise UserError(
            f"corrupt {path}: vision_config.image_size {vision['image_size']} is not divisible "
            f"by patch_size {vision['patch_size']}"
        )
    vocab = text["vocab_size"]
    token = cfg.get("image_token_index", cfg.get("image_token_id"))
    if token is not None and (
        isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab
    ):
        raise UserError(
            f"corrupt {path}: image_token_index {token!r:.40} is outside the vocabulary "
            f"0..{vocab - 1} (text_config.vocab_size {vocab})"
        )
    layer = cfg.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        raise UserError(
            f"{path}: vision_feature_layer {layer!r:.40} is a list of layers, which mllmc does "
            "not support; use one layer"
        )
    depth = vision["num_hidden_layers"]  # hidden states: the embeddings, then one per layer
    if isinstance(layer, bool) or not isinstance(layer, int) or not -(depth + 1) <= layer <= depth:
        raise UserError(
            f"corrupt {path}: vision_feature_layer {layer!r:.40} is outside the vision tower's "
            f"{depth} layers (an integer in {-(depth + 1)}..{depth}; negative counts from the end)"
        )


def _size(
    section: dict[str, Any], key: str, limit: int, path: Path, name: str, required: bool
) -> int | None:
    """`section[key]` as a positive integer <= limit (None when optional and absent or null)."""
    value = section.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise UserError(f"{path}: {name} has no {key} (a positive integer)")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise UserError(
            f"corrupt {path}: {name}.{key} must be an integer in 1..{limit}, got "
            f"{json.dumps(value)[:40]}"
        )
    return value


def check_tokenizer(model_dir: str | Path, cfg: dict[str, Any]) -> None:
    """UserError when the model directory has no tokenizer mllmc can run, or one with more
    tokens than the decoder's embedding has rows (text_config.vocab_size)."""
    from mllmc.runtime.preprocess import PromptEncoder

    root = Path(model_dir)
    if not (root / "tokenizer.json").is_file():
        raise UserError(
            f"{root} has no tokenizer.json: mllmc needs the model's fast tokenizer (copy "
            "tokenizer.json and tokenizer_config.json from the checkpoint it came from)"
        )
    encoder = PromptEncoder.from_dir(root)
    tokens = encoder.tokenizer.get_vocab_size(with_added_tokens=True)
    vocab = cfg["text_config"]["vocab_size"]
    if tokens > vocab or encoder.image_token_id >= vocab:
        raise UserError(
            f"{root / 'config.json'}: text_config.vocab_size {vocab} is smaller than the "
            f"tokenizer's {tokens} tokens (image token id {encoder.image_token_id}): use the "
            "tokenizer the model was trained with"
        )


_JSON_TYPES = {str: "a string", dict: "a JSON object"}


def _field(section: dict[str, Any], key: str, tp: type, path: Path, prefix: str = "") -> Any:
    """`section[key]` when it is absent, null or of type `tp`; UserError naming it otherwise."""
    value = section.get(key)
    if value is not None and not isinstance(value, tp):
        raise UserError(
            f"corrupt {path}: {prefix}{key} must be {_JSON_TYPES[tp]}, got "
            f"{type(value).__name__} {json.dumps(value)[:40]}"
        )
    return value


def check_processor(
    model_dir: str | Path, cfg: dict[str, Any], image_size: int | None = None
) -> None:
    """UserError when the model's image processor config is unreadable, or makes images of
    another size than its vision tower takes: `image_size` (the loaded model's), or before the
    model loads `vision_config.image_size` where config.json states it."""
    from mllmc.runtime.preprocess import check_image_size, read_image_processor_config

    if image_size is None:
        vision = cfg.get("vision_config") or {}
        size = vision.get("image_size")
        image_size = size if isinstance(size, int) and not isinstance(size, bool) else None
    processor = read_image_processor_config(model_dir)
    if image_size is not None and image_size > 0:
        check_image_size(processor, image_size, model_dir)
    grid = cfg.get("image_grid_pinpoints")
    tiles = processor.get("image_grid_pinpoints")
    if grid is not None and tiles is not None and [list(p) for p in tiles] != grid:
        raise UserError(
            f"{model_dir}: the image processor's image_grid_pinpoints {[list(p) for p in tiles]} "
            f"differ from config.json's {grid}: the model packs its tiles by config.json's, so "
            "make them the same"
        )


def config_hash(model_dir: str | Path) -> str:
    return hashlib.sha256(Path(model_dir, "config.json").read_bytes()).hexdigest()[:16]


VISUAL_FEATURE_STRATEGIES = ("default", "full")


def visual_token_count(image_size: int, patch_size: int, strategy: str) -> int | None:
    """N_v, the visual tokens per image LLaVA puts in the prompt: the tower's patches, plus the
    [CLS] token under vision_feature_select_strategy "full"; None for a strategy capture does
    not support."""
    if strategy not in VISUAL_FEATURE_STRATEGIES:
        return None
    return (image_size // patch_size) ** 2 + (strategy == "full")


@dataclass(frozen=True)
class ModelShape:
    """What pass options are checked against, read from config.json alone, before the model
    loads: None where the file leaves a value to Hugging Face's defaults. The loaded model's
    ModelInfo has the final word (each pass's `prepare` checks again)."""

    num_layers: int | None = None
    visual_tokens: int | None = None
    vision_layers: int | None = None
    # whether the vision tower has a [CLS] token ([CLS]-attention scorers need one)
    cls_token: bool = True


def model_shape(cfg: dict[str, Any]) -> ModelShape:
    """The decoder's layer count, the visual tokens per image and the vision tower's layer count
    as config.json states them (a checked config, from `read_config`)."""

    def count(section: Any, key: str) -> int | None:
        value = section.get(key) if isinstance(section, dict) else None
        return (
            value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
        )

    text, vision = cfg.get("text_config"), cfg.get("vision_config")
    if cfg.get("model_type") in FAMILIES and family(cfg["model_type"]).mrope:
        # the rows per image depend on its size
        text = qwen_text_section(cfg)
        return ModelShape(count(text, "num_hidden_layers"), None, count(vision, "depth"), False)
    image, patch = count(vision, "image_size"), count(vision, "patch_size")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    num_visual = visual_token_count(image, patch, strategy) if image and patch else None
    return ModelShape(
        count(text, "num_hidden_layers"), num_visual, count(vision, "num_hidden_layers")
    )


# Qwen2-VL / Qwen2.5-VL: the released checkpoints state the decoder at the top level of
# config.json; transformers 5 saves it as text_config. The vision tower's widths are named per
# family: Qwen2-VL's embed_dim is its width and hidden_size the merger's output, Qwen2.5-VL's
# hidden_size its width and out_hidden_size the output.
QWEN_VISION_SIZES = {
    "qwen2_vl": {"depth": 1024, "embed_dim": 65536, "num_heads": 1024, "hidden_size": 65536},
    "qwen2_5_vl": {
        "depth": 1024,
        "hidden_size": 65536,
        "num_heads": 1024,
        "intermediate_size": 2**20,
        "out_hidden_size": 65536,
    },
}
# optional vision sizes and the defaults Hugging Face gives them
QWEN_VISION_DEFAULTS = {
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "mlp_ratio": 4,
    "window_size": 112,
}


def qwen_text_section(cfg: dict[str, Any]) -> dict[str, Any]:
    """The decoder's part of a Qwen2-VL / Qwen2.5-VL config.json: text_config, or the top level
    where the checkpoint states it flat (as the released ones do)."""
    text = cfg.get("text_config")
    return text if isinstance(text, dict) else cfg


def check_qwen_config(cfg: dict[str, Any], path: Path) -> None:
    """UserError when a Qwen2-VL / Qwen2.5-VL config.json does not state its decoder and vision
    tower fully and sanely: sizes, M-RoPE sections that fill half a head, a merger whose output
    is the decoder's width, window and full-attention blocks inside the tower, token ids inside
    the vocabulary."""
    text = qwen_text_section(cfg)
    text_type = _field(text, "model_type", str, path, "text_config.")
    if text_type not in (None, f"{cfg['model_type']}_text", cfg["model_type"]):
        want = f"{cfg['model_type']}_text"
        raise UserError(
            f"{path}: text_config.model_type {text_type!r} is not a {cfg['model_type']} "
            f"decoder (want {want!r})"
        )
    sizes = {k: _size(text, k, limit, path, "text_config", True) for k, limit in TEXT_SIZES.items()}
    kv = _size(text, "num_key_value_heads", 1024, path, "text_config", False)
    heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
    if hidden % heads or (kv is not None and heads % kv):
        raise UserError(
            f"corrupt {path}: text_config.hidden_size {hidden} must divide into "
            f"num_attention_heads {heads}, and those into num_key_value_heads {kv}"
        )
    _check_mrope(text, hidden // heads, path)
    vision = _field(cfg, "vision_config", dict, path)
    if vision is None:
        raise UserError(f"{path} has no vision_config: state the vision tower's sizes")
    vision = dict(vision)  # the defaults below fill a copy
    widths = {
        k: _size(vision, k, limit, path, "vision_config", True)
        for k, limit in QWEN_VISION_SIZES[cfg["model_type"]].items()
    }
    for key, default in QWEN_VISION_DEFAULTS.items():
        _size(vision, key, 8192, path, "vision_config", False)
        vision.setdefault(key, default)
    width = widths.get("embed_dim") or widths["hidden_size"]
    out = widths.get("out_hidden_size") or widths["hidden_size"]
    if width % widths["num_heads"] or (width // widths["num_heads"]) % 4:
        raise UserError(
            f"corrupt {path}: the vision width {width} over num_heads {widths['num_heads']} must "
            "give a head size divisible by 4 (its rotary splits it into height and width halves)"
        )
    if out != hidden:
        raise UserError(
            f"corrupt {path}: the vision merger outputs {out} features, the decoder's hidden_size "
            f"is {hidden}: they must be equal"
        )
    if cfg["model_type"] == "qwen2_5_vl":
        _check_windows(vision, widths["depth"], path)
    for key in ("image_token_id", "vision_start_token_id"):
        token = cfg.get(key)
        if token is not None and (
            isinstance(token, bool)
            or not isinstance(token, int)
            or not 0 <= token < sizes["vocab_size"]
        ):
            raise UserError(
                f"corrupt {path}: {key} {token!r:.40} is outside the vocabulary "
                f"0..{sizes['vocab_size'] - 1}"
            )


def _check_mrope(text: dict[str, Any], head_dim: int, path: Path) -> None:
    """The M-RoPE sections (temporal, height, width rotary pairs) must fill half a head."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise UserError(f"corrupt {path}: rope_parameters must be a JSON object")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise UserError(f"{path}: rope type {kind!r} is not supported for M-RoPE; use default")
    section = rope.get("mrope_section", [16, 24, 24])
    ok = isinstance(section, list) and len(section) == 3
    ok = ok and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in section)
    if not ok or 2 * sum(section) != head_dim:
        raise UserError(
            f"corrupt {path}: mrope_section {section!r:.40} must be 3 positive integers summing "
            f"to half the decoder's head size {head_dim}"
        )


def _check_windows(vision: dict[str, Any], depth: int, path: Path) -> None:
    """Qwen2.5-VL: windows of at least one merged token, full-attention blocks in the tower."""
    unit = vision["patch_size"] * vision["spatial_merge_size"]
    if vision["window_size"] < unit:
        raise UserError(
            f"corrupt {path}: vision_config.window_size {vision['window_size']} is smaller than "
            f"one merged token ({unit} px)"
        )
    blocks = vision.get("fullatt_block_indexes", [7, 15, 23, 31])
    if not isinstance(blocks, list) or not all(
        isinstance(b, int) and not isinstance(b, bool) and 0 <= b < depth for b in blocks
    ):
        raise UserError(
            f"corrupt {path}: vision_config.fullatt_block_indexes {blocks!r:.60} must list "
            f"blocks of the {depth}-block tower (0..{depth - 1})"
        )
