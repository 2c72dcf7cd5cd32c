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
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"corrupt {cfg_path}: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"corrupt {cfg_path}: not a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {model_type!r} in {cfg_path}; supported: {supported_text()}"
        )
    text_type = (cfg.get("text_config") or {}).get("model_type", "llama")
    if text_type not in SUPPORTED_TEXT_MODELS:
        raise UserError(
            f"unsupported LLaVA decoder {text_type!r}; supported decoders: "
            f"{', '.join(SUPPORTED_TEXT_MODELS)}"
        )
    vision_type = (cfg.get("vision_config") or {}).get("model_type", "clip_vision_model")
    if vision_type not in SUPPORTED_VISION_MODELS:
        raise UserError(
            f"unsupported LLaVA vision tower {vision_type!r}; supported: "
            f"{', '.join(SUPPORTED_VISION_MODELS)}"
        )
    if not any(root.glob("*.safetensors")) and not any(root.glob("*.bin")):
        raise UserError(f"{root} has no weights (*.safetensors)")
    return cfg


def config_hash(model_dir: str | Path) -> str:
    return hashlib.sha256(Path(model_dir, "config.json").read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelShape:
    """What pass options are checked against, read from config.json alone, before the model
    loads: None where the file leaves a value to Hugging Face's defaults. The loaded model's
    ModelInfo has the final word (each pass's `prepare` checks again)."""

    num_layers: int | None = None
    num_visual_tokens: int | None = None
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
    num_visual = None
    if image and patch and strategy in ("default", "full"):
        num_visual = (image // patch) ** 2 + (strategy == "full")  # "full" keeps [CLS]
    return ModelShape(
        count(text, "num_hidden_layers"), num_visual, count(vision, "num_hidden_layers")
    )
