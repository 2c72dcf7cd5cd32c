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

# model_type of config.json -> what it is; the only architectures capture accepts.
SUPPORTED_ARCHITECTURES = {"llava": "LLaVA-1.5 (LlavaForConditionalGeneration)"}
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
        cfg = read_json(cfg_path, allow_nan=True)  # as transformers reads it
    except JSONError as e:
        raise UserError(f"corrupt {cfg_path}: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"corrupt {cfg_path}: not a JSON object")
    model_type = _field(cfg, "model_type", str, cfg_path)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {model_type!r} in {cfg_path}; supported: {supported_text()}"
        )
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
    if not any(root.glob("*.safetensors")) and not any(root.glob("*.bin")):
        raise UserError(f"{root} has no weights (*.safetensors)")
    return cfg


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


def model_shape(cfg: dict[str, Any]) -> ModelShape:
    """The decoder's layer count, the visual tokens per image and the vision tower's layer count
    as config.json states them (a checked config, from `read_config`)."""

    def count(section: Any, key: str) -> int | None:
        value = section.get(key) if isinstance(section, dict) else None
        return (
            value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
        )

    text, vision = cfg.get("text_config"), cfg.get("vision_config")
    image, patch = count(vision, "image_size"), count(vision, "patch_size")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    num_visual = visual_token_count(image, patch, strategy) if image and patch else None
    return ModelShape(
        count(text, "num_hidden_layers"), num_visual, count(vision, "num_hidden_layers")
    )
