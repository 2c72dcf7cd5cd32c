"""vtc_cls — prune visual tokens before the LLM by [CLS] attention summed over vision layers
(VTC-CLS, THU-MIG/VTC-CLS).

Contract: as fastervlm (docs/passes.md, "Pruning and early exit"), except that each patch's
score is its [CLS] attention (head-mean) summed over a range of vision encoder layers
`layers=[a, b]` (inclusive, 0-based), instead of taken at the feature layer alone. Keep the
top `keep=N` (or round(N_v·(1-R)) for `ratio=R`, default 0.75) in spatial order; only those
enter the LLM.

Graph change: the vision segment outputs (B, keep, d) for B tiles (one [CLS] score row per
scored layer, a sum, TopK, sort, gather: passes/cls_attention.py, shared with fastervlm); the
prefill takes them as it is; manifest `visual_tokens` = keep.

Which detail follows which source: the [CLS]-attention ensemble over layers, head mean, top-k in
spatial order: the VTC-CLS paper (THU-MIG/VTC-CLS); the default range, every encoder layer up to
and including the feature layer, is this pass's choice (the layers that produce the features).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mllmc.compiler.core.pass_types import PassInfo, PassResult
from mllmc.runtime.errors import UserError

from . import cls_attention

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

    from mllmc.compiler.core.capture import Segments
    from mllmc.compiler.core.model_dir import ModelShape
    from mllmc.runtime.manifest import ModelInfo

SUMMARY = "keep the top-k patches by [CLS] attention summed over vision layers (VTC-CLS)"


@dataclass(frozen=True)
class VTCClsConfig:
    """layers: [a, b], the vision layers whose [CLS] attention is summed (default: 0 to the
    feature layer); keep: visual tokens kept, or ratio: the fraction dropped (default 0.75)."""

    layers: tuple[int, ...] | None = None
    keep: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        cls_attention.check_keep_options(self.keep, self.ratio)
        if self.layers is not None:
            layers = self.layers
            if (
                not isinstance(layers, (list, tuple))
                or len(layers) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
                or not 0 <= layers[0] <= layers[1]
            ):
                raise ValueError(f"layers must be [a, b] with 0 <= a <= b, got {layers!r}")
            object.__setattr__(self, "layers", tuple(layers))

    def kept(self, num_visual: int) -> int:
        return cls_attention.resolve_keep("vtc_cls", self.keep, self.ratio, num_visual)


def check_layers(layers: Sequence[int], vision_layers: int) -> None:
    if layers[1] >= vision_layers:
        raise UserError(
            f"vtc_cls: layers {list(layers)} out of range; the vision tower has layers "
            f"0..{vision_layers - 1}"
        )


def check(cfg: VTCClsConfig, shape: ModelShape) -> None:
    cls_attention.refuse_without_cls("vtc_cls", shape.cls_token)
    if shape.visual_tokens is not None:
        cfg.kept(shape.visual_tokens)
    if cfg.layers is not None and shape.vision_layers is not None:
        check_layers(cfg.layers, shape.vision_layers)


def prepare(
    cfg: VTCClsConfig, model: LlavaForConditionalGeneration, info: ModelInfo
) -> VTCClsConfig:
    cls_attention.check_tower(model, "vtc_cls")
    kept = cfg.kept(info.visual_tokens)
    layers = cfg.layers
    if layers is None:
        layers = (
            0,
            cls_attention.vision_layer_of_feature(
                model.config.vision_feature_layer, info.vision_layers
            ),
        )
    check_layers(layers, info.vision_layers)
    return dataclasses.replace(cfg, layers=layers, keep=kept, ratio=None)


def vtc_cls(segments: Segments, cfg: VTCClsConfig) -> PassResult:
    """Vision segment outputs the top-`keep` patches by summed [CLS] attention."""
    if cfg.layers is None:
        raise ValueError("vtc_cls: resolve the config with prepare() before the rewrite")
    scored = list(range(cfg.layers[0], cfg.layers[1] + 1))
    stats = {"vision_layers": scored}
    return cls_attention.keep_top_patches(segments, "vtc_cls", scored, cfg.keep, cfg.ratio, stats)


def reference(
    model: LlavaForConditionalGeneration, info: ModelInfo, cfg: VTCClsConfig
) -> contextlib.AbstractContextManager[None]:
    if cfg.layers is None or cfg.keep is None:
        raise ValueError("vtc_cls: resolve the config with prepare() before the reference")
    return cls_attention.cls_pruned_forward(
        model, range(cfg.layers[0], cfg.layers[1] + 1), cfg.keep
    )


# the registry entry: the rewrite, its config, preparation, option check and eager reference
PASS = PassInfo(
    "vtc_cls", vtc_cls, VTCClsConfig, SUMMARY, "pre_llm", prepare, check, reference, prunes=True
)
