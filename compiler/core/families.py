"""Model families: what differs between the multimodal architectures mllmc compiles, in one
place. Capture, passes and the CLI ask `family(model_type)`; the runtime's counterpart (image
tiles, row counts, feature packing) is `mllmc.runtime.images`.

    llava       LLaVA-1.5: one CLIP tile per image, its patches are the image's rows
    llava_next  LLaVA-NeXT: the image whole plus an anyres grid of tiles; the rows are the whole
                image's patches, then the unpadded grid with one image_newline per grid row
                (packed on the host, so the vision segment is the same tower + projector over
                a batch of tiles, and the prefill the same graph)
    qwen2_vl    Qwen2-VL: the image at its own size (a multiple of 28 px) as one sequence of
                patches; each 2 x 2 patches merge into one row; 3-D rotary positions (M-RoPE)
    qwen2_5_vl  Qwen2.5-VL: as Qwen2-VL, with window attention in the tower

The LLaVA families share the decoder (Llama, Mistral or Qwen2) and its 1-D rotary positions;
the Qwen families' decoder is Qwen2 with M-RoPE, whose position ids (3, 1, n) the host lays
out. The layer loop is the same, so every in-LLM pass does not depend on the family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllmc.runtime.errors import UserError


def _no_checks(cfg: dict[str, Any], path: Path) -> None:
    return None


def _check_llava_next(cfg: dict[str, Any], path: Path) -> None:
    """image_grid_pinpoints: [height, width] pairs of whole tiles; the "default" strategy."""
    vision = cfg.get("vision_config") or {}
    tile = vision.get("image_size")
    pinpoints = cfg.get("image_grid_pinpoints")
    if pinpoints is None:
        raise UserError(f"{path}: a llava_next config needs image_grid_pinpoints")
    if not isinstance(pinpoints, list) or not pinpoints or len(pinpoints) > 256:
        raise UserError(
            f"{path}: image_grid_pinpoints must be a list of 1 to 256 [height, width] pairs"
        )
    for pair in pinpoints:
        ok = isinstance(pair, list) and len(pair) == 2
        ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
        if not ok or not all(0 < x <= 8192 for x in pair):
            raise UserError(f"{path}: image_grid_pinpoints holds {pair!r}, not [height, width]")
        if isinstance(tile, int) and tile > 0 and (pair[0] % tile or pair[1] % tile):
            raise UserError(
                f"{path}: image_grid_pinpoints {pair} is not a multiple of the {tile}-pixel tile"
            )
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise UserError(
            f"{path}: LLaVA-NeXT with vision_feature_select_strategy {strategy!r} is not "
            "supported (Hugging Face's own model packs only the 'default' strategy's patches)"
        )


def _tile_side(config: Any) -> int:
    """The side (px) of the vision tower's square tile."""
    return int(config.vision_config.image_size)


def _llava_next_side(config: Any) -> int:
    """LLaVA-NeXT's largest square pinpoint (672 px on the released checkpoints)."""
    pinpoints = [tuple(p) for p in config.image_grid_pinpoints]
    return max((h for h, w in pinpoints if h == w), default=config.vision_config.image_size)


def _qwen_side(config: Any) -> int:
    """Qwen2-VL's reference image side (448 px; the processor resizes it within its bounds)."""
    from .qwen_vl import REFERENCE_IMAGE_SIDE

    return REFERENCE_IMAGE_SIDE


def _llava_next_reference(config: Any) -> tuple[int, int]:
    """(rows, tiles) of an image at LLaVA-NeXT's largest square pinpoint (672 x 672 on the
    released checkpoints: 2,928 rows from 5 tiles), counted as its processor counts them."""
    from mllmc.runtime.llava_next import image_token_count

    vc = config.vision_config
    pinpoints = [tuple(p) for p in config.image_grid_pinpoints]
    side = _llava_next_side(config)
    rows = image_token_count(
        side, side, image_size=vc.image_size, patch_size=vc.patch_size, grid_pinpoints=pinpoints
    )
    return rows, 1 + (side // vc.image_size) ** 2


@dataclass(frozen=True)
class Family:
    """One architecture: its config.json `model_type`, its name, the transformers class that
    loads it, and the config checks beyond the shared ones."""

    model_type: str
    name: str
    hf_class: str
    check_config: Callable[[dict[str, Any], Path], None] = _no_checks
    # whether the host packs an image's tiles on their patch grid (then a pre-LLM pass also
    # outputs which patches each tile kept, and the host packs those, as FasterVLM does)
    packs_tiles: bool = False
    # (visual rows, vision tiles) of the image the layer plan and FLOPs are stated for, from the
    # HF config ((0, 1): one tile, its rows whatever a pre-LLM pass leaves of them)
    reference: Callable[[Any], tuple[int, int]] = lambda config: (0, 1)
    # Qwen2-VL style: 3-D rotary positions (3, 1, n) and a vision segment over a sequence of
    # patches of any image size (compiler/core/qwen_vl.py); its tower has no [CLS] token
    mrope: bool = False
    # the side (px) of the square image that is the reference above, from the HF config (what
    # `mllmc bench` times, so that its rows are the ones the plan and FLOPs are stated for)
    reference_side: Callable[[Any], int] = _tile_side

    @property
    def description(self) -> str:
        return f"{self.name} ({self.hf_class})"

    def model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.hf_class)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llava", "LLaVA-1.5", "LlavaForConditionalGeneration"),
        Family(
            "llava_next",
            "LLaVA-NeXT",
            "LlavaNextForConditionalGeneration",
            _check_llava_next,
            packs_tiles=True,
            reference=_llava_next_reference,
            reference_side=_llava_next_side,
        ),
        Family(
            "qwen2_vl",
            "Qwen2-VL",
            "Qwen2VLForConditionalGeneration",
            mrope=True,
            reference_side=_qwen_side,
        ),
        Family(
            "qwen2_5_vl",
            "Qwen2.5-VL",
            "Qwen2_5_VLForConditionalGeneration",
            mrope=True,
            reference_side=_qwen_side,
        ),
    )
}


def supported_families() -> str:
    return ", ".join(f"{k} = {f.description}" for k, f in FAMILIES.items())


def family(model_type: str) -> Family:
    """The family of a config.json `model_type` (UserError naming the supported ones)."""
    if model_type not in FAMILIES:
        raise UserError(
            f"unsupported architecture {model_type!r}; supported: {supported_families()}"
        )
    return FAMILIES[model_type]
