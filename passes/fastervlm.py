"""fastervlm — prune visual tokens before the LLM by [CLS] attention (FasterVLM, arXiv 2412.01818).

Contract (METHODS.md): score each patch by the vision tower's [CLS] -> patch attention at the
feature layer (LLaVA's vision_feature_layer, -2), averaged over heads; keep the top-k (`keep=N`,
or `ratio=R`: keep = round(N_v·(1-R))) in spatial order; only the kept tokens enter the LLM, so
the prefill shrinks everywhere (every layer, every KV cache) and decode positions follow the
shorter prompt.

Graph change (passes/cls_attention.py): the vision segment gains one [CLS] score row and outputs
(1, keep, d) instead of (1, N_v, d); the prefill is re-captured for an image span of `keep` rows
(the graph is otherwise the unmodified one); the manifest's `visual_tokens` = keep, so the
runtime expands `<image>` to `keep` placeholders. Pre-LLM: it must precede in-LLM passes.

Which detail follows which source: head mean of the [CLS] row over the patches, TopK, kept
patches in spatial order through a boolean index mask, pruning after the projector, and the
shorter input embeddings with compact positions: Theia-4869/FasterVLM
(`llava/model/llava_arch.py`, `encode_images` and `prepare_inputs_labels_for_multimodal`); the
attention taken at the same layer as the features (select_layer = -2): FasterVLM's CLIP tower.
Towers without [CLS] (SigLIP) or `vision_feature_select_strategy: full` are refused with a
UserError rather than given another scorer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

from mllmc.compiler.core.pass_types import PassInfo, PassResult
from mllmc.runtime.errors import UserError

from .cls_attention import check_tower, cls_pruned_forward, keep_top_patches
from .cls_attention import vision_layer_of_feature as feature_layer_index


def check_keep_options(keep: Any, ratio: Any) -> None:
    """ValueError for a keep / ratio pair that cannot be valid whatever the model."""
    if keep is not None and ratio is not None:
        raise ValueError("give keep=N or ratio=R, not both")
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    if ratio is not None and (
        isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1
    ):
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")


def resolve_keep(name: str, keep: int | None, ratio: float | None, num_visual: int) -> int:
    """Tokens kept out of `num_visual`: keep, or round(N_v·(1-R)); UserError if impossible."""
    kept = keep if keep is not None else int(round(num_visual * (1 - (ratio or 0.0))))
    if not 1 <= kept <= num_visual:
        raise UserError(
            f"{name}: keep={kept} out of range; the vision tower gives {num_visual} visual "
            f"tokens, so keep must be in 1..{num_visual}"
        )
    return kept


@dataclass(frozen=True)
class FasterVLMConfig:
    """keep: visual tokens kept, or ratio: the fraction dropped (default 0.75: 576 -> 144).
    layer: the vision layer scored (filled in: the feature layer)."""

    keep: int | None = None
    ratio: float | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        check_keep_options(self.keep, self.ratio)

    def kept(self, num_visual: int) -> int:
        ratio = 0.75 if self.keep is None and self.ratio is None else self.ratio
        return resolve_keep("fastervlm", self.keep, ratio, num_visual)


def check(cfg: FasterVLMConfig, shape: Any) -> None:
    if shape.num_visual_tokens is not None:
        cfg.kept(shape.num_visual_tokens)


def prepare(cfg: FasterVLMConfig, model: Any, info: Any) -> FasterVLMConfig:
    check_tower(model, "fastervlm")
    kept = cfg.kept(info.num_visual_tokens)
    layer = feature_layer_index(model.config.vision_feature_layer, info.vision_layers)
    return dataclasses.replace(cfg, keep=kept, ratio=None, layer=layer)


def fastervlm(segments: Any, cfg: FasterVLMConfig) -> PassResult:
    """Vision segment outputs the top-`keep` patches; prefill re-captured for them."""
    if cfg.layer is None:
        raise ValueError("fastervlm: resolve the config with prepare() before the rewrite")
    num_visual = segments.num_visual_tokens
    if num_visual != segments.info.num_visual_tokens:
        raise UserError("fastervlm: the visual tokens were already pruned by another pass")
    kept = cfg.kept(num_visual)
    segments = keep_top_patches(segments, [cfg.layer], kept)
    segments.layer_plan[:] = [
        dataclasses.replace(p, visual_tokens=kept, kv_visual_tokens=kept)
        for p in segments.layer_plan
    ]
    return PassResult(
        segments,
        {"vision_layer": cfg.layer, "visual_tokens": num_visual, "kept_visual_tokens": kept},
    )


def reference(model: Any, info: Any, cfg: FasterVLMConfig) -> contextlib.AbstractContextManager:
    if cfg.layer is None or cfg.keep is None:
        raise ValueError("fastervlm: resolve the config with prepare() before the reference")
    return cls_pruned_forward(model, [cfg.layer], cfg.keep)


PASS = PassInfo(
    name="fastervlm",
    fn=fastervlm,
    config_cls=FasterVLMConfig,
    summary="keep the top-k patches by the vision tower's [CLS] attention (FasterVLM)",
    stage="pre_llm",
    check=check,
    prepare=prepare,
    reference=reference,
    prunes=True,
)
