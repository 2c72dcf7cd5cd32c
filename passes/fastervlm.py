"""fastervlm — prune visual tokens before the LLM by [CLS] attention (FasterVLM, arXiv 2412.01818).

Contract (docs/passes.md): score each patch by the vision tower's [CLS] -> patch attention at the
feature layer (LLaVA's vision_feature_layer, -2), averaged over heads; keep the top-k (`keep=N`,
or `ratio=R`: keep = round(N_v·(1-R))) in spatial order; only the kept tokens enter the LLM, so
the prefill shrinks everywhere (every layer, every KV cache) and decode positions follow the
shorter prompt.

Graph change (passes/cls_attention.py): the vision segment gains one [CLS] score row per tile
and outputs (B, keep, d) instead of (B, N_v, d) for B tiles; the prefill is unchanged (it takes
any number of visual rows); the manifest's `visual_tokens` = keep, so the runtime expands each
`<image>` to the rows its image keeps (LLaVA-NeXT: its kept patches packed on the grid, as
FasterVLM's LLaVA-NeXT code packs them). Pre-LLM: it must precede in-LLM passes.

Which detail follows which source: head mean of the [CLS] row over the patches, TopK, kept
patches in spatial order through a boolean index mask, pruning after the projector, and the
shorter input embeddings with compact positions: Theia-4869/FasterVLM
(`llava/model/llava_arch.py`, `encode_images` and `prepare_inputs_labels_for_multimodal`); the
attention taken at the same layer as the features (select_layer = -2): FasterVLM's CLIP tower.
Towers without [CLS] (SigLIP, Qwen2-VL's) or `vision_feature_select_strategy: full` are
refused with a UserError rather than given another scorer (Qwen2-VL's: `vispruner`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mllmc.compiler.core.pass_types import PassInfo, PassResult

from . import cls_attention

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

    from mllmc.compiler.core.capture import Segments
    from mllmc.compiler.core.model_dir import ModelShape
    from mllmc.runtime.manifest import ModelInfo

SUMMARY = "keep the top-k patches by the vision tower's [CLS] attention (FasterVLM)"


@dataclass(frozen=True)
class FasterVLMConfig:
    """keep: visual tokens kept, or ratio: the fraction dropped (default 0.75: 576 -> 144).
    layer: the vision layer scored (filled in: the feature layer)."""

    keep: int | None = None
    ratio: float | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        cls_attention.check_keep_options(self.keep, self.ratio)

    def kept(self, num_visual: int) -> int:
        return cls_attention.resolve_keep("fastervlm", self.keep, self.ratio, num_visual)


def check(cfg: FasterVLMConfig, shape: ModelShape) -> None:
    cls_attention.refuse_without_cls("fastervlm", shape.cls_token)
    if shape.visual_tokens is not None:
        cfg.kept(shape.visual_tokens)


def prepare(
    cfg: FasterVLMConfig, model: LlavaForConditionalGeneration, info: ModelInfo
) -> FasterVLMConfig:
    cls_attention.check_tower(model, "fastervlm")
    kept = cfg.kept(info.visual_tokens)
    layer = cls_attention.vision_layer_of_feature(
        model.config.vision_feature_layer, info.vision_layers
    )
    return dataclasses.replace(cfg, keep=kept, ratio=None, layer=layer)


def fastervlm(segments: Segments, cfg: FasterVLMConfig) -> PassResult:
    """The vision segment outputs each tile's top-`keep` patches; the prefill takes them."""
    if cfg.layer is None:
        raise ValueError("fastervlm: resolve the config with prepare() before the rewrite")
    stats = {"vision_layer": cfg.layer}
    return cls_attention.keep_top_patches(
        segments, "fastervlm", [cfg.layer], cfg.keep, cfg.ratio, stats
    )


def reference(
    model: LlavaForConditionalGeneration, info: ModelInfo, cfg: FasterVLMConfig
) -> contextlib.AbstractContextManager[None]:
    if cfg.layer is None or cfg.keep is None:
        raise ValueError("fastervlm: resolve the config with prepare() before the reference")
    return cls_attention.cls_pruned_forward(model, [cfg.layer], cfg.keep)


# the registry entry: the rewrite, its config, preparation, option check and eager reference
PASS = PassInfo(
    "fastervlm",
    fastervlm,
    FasterVLMConfig,
    SUMMARY,
    "pre_llm",
    prepare,
    check,
    reference,
    prunes=True,
)
