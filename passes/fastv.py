"""fastv — prune visual tokens after layer K by the last token's attention (FastV, arXiv 2403.06764).

Contract (docs/passes.md): at layer K-1 take the attention probabilities of the last prompt token over
the visual span, averaged over heads; keep the top round(N_v·(1-R)) visual tokens in their original
order; layers >= K run on the shorter sequence and their KV cache holds only the kept rows; kept
tokens keep their original position ids; decode continues at position n (the unpruned length).

Graph change on the prefill segment (decode is unchanged; its per-layer cache lengths are dynamic):

    layer K-1:  post-RoPE q (1, H, n, hd), k (1, kvh, n, hd)  ->  + one score row:
                softmax(q[-1] k^T · scale) head-mean over the span (N_v,) -> TopK(kept) -> sort
                -> keep index (n',) = text rows + kept visual rows, n' = n - N_v + kept
    layers >= K: h, cos/sin, causal mask gathered at keep (passes/row_pruning.py)
                 (1, n, d) -> (1, n', d); present K/V (1, kvh, n', hd)

The attention call of layer K-1 stays fused: the score is one extra query row against the
post-RoPE keys the locator exposes (`LayerAnatomy.post_rope_key`).

Which detail follows which source:
- head mean, last-token row, columns of the image span, `round(N_v·(1-R))` kept, TopK then
  sorting the kept indices so the order is the original one, text rows all kept: pkunlp-icler/FastV
  (`src/transformers/.../modeling_llama.py`, FastV inplace mode: `keep_indexs` = arange before the
  image, top-k image positions, arange after, sorted; `position_ids = keep_indexs`).
- defaults K=2, R=0.5: the paper's main setting (lmms-eval's FastV uses K=3).
- decode at position n with per-layer caches: FastV's KV-cache mode keeps the original position
  ids of the kept tokens, so the next token continues after the unpruned prompt.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from mllmc.compiler.core.pass_types import PassInfo, PassResult
from mllmc.runtime.errors import UserError
from mllmc.runtime.manifest import keep_count

from .rewrite import GraphEdit, replan, uniform_visual_tokens
from .row_pruning import drop_rows, fastv_keep_index, pruned_forward, refuse_sliding_window

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

    from mllmc.compiler.core.capture import Segments
    from mllmc.compiler.core.model_dir import ModelShape
    from mllmc.runtime.manifest import ModelInfo

SUMMARY = "prune visual tokens after layer K by the last token's attention (FastV)"


@dataclass(frozen=True)
class FastVConfig:
    """k: the first layer that runs on the pruned sequence (the score comes from layer k-1);
    ratio: the fraction of visual tokens dropped (0 keeps all: the identity)."""

    k: int = 2
    ratio: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"k must be an integer layer index >= 1, got {self.k!r}")
        if (
            isinstance(self.ratio, bool)
            or not isinstance(self.ratio, (int, float))
            or not 0.0 <= float(self.ratio) < 1.0
        ):
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio!r}")


def keep_rule(ratio: float) -> str:
    """The visual rows kept of V as a keep rule "p/q" = 1 - R (`mllmc.runtime.manifest.keep_count`
    evaluates round(V·p/q); R is taken as the fraction it is written as, e.g. 0.3 = 3/10). The
    official code's Python round takes a half to the even neighbour, this one up: they differ
    only when V·(1-R) is exactly a half (never at LLaVA's 576 with R = 0.5)."""
    keep = 1 - Fraction(str(ratio))
    return f"{keep.numerator}/{keep.denominator}"


def kept_count(num_visual: int, ratio: float) -> int:
    """Visual tokens kept of `num_visual`: round(N_v·(1-R))."""
    return keep_count(num_visual, keep_rule(ratio))


def min_visual_rows(rule: str) -> int:
    """The fewest visual rows the rewritten graph takes: enough to keep 2 (a graph traced for a
    kept count of 0 or 1 would fix its shape)."""
    return next(v for v in range(2, 1 << 20) if keep_count(v, rule) >= 2)


def check_k(k: int, num_layers: int) -> None:
    if not 1 <= k <= num_layers - 1:
        raise UserError(
            f"fastv: k={k} out of range; the score comes from layer k-1 and layers >= k are "
            f"pruned, so k must be in 1..{num_layers - 1} for this {num_layers}-layer model"
        )


def check(cfg: FastVConfig, shape: ModelShape) -> None:
    if shape.num_layers is not None:
        check_k(cfg.k, shape.num_layers)


def prepare(cfg: FastVConfig, model: LlavaForConditionalGeneration, info: ModelInfo) -> FastVConfig:
    check_k(cfg.k, info.num_layers)
    refuse_sliding_window("fastv", model, cfg.k)
    return cfg


def fastv(segments: Segments, cfg: FastVConfig) -> PassResult:
    """Prune the visual rows of prefill layers >= cfg.k to the top-scored ones."""
    info = segments.info
    check_k(cfg.k, info.num_layers)
    num_visual = uniform_visual_tokens(segments, "fastv")
    rule = keep_rule(cfg.ratio)
    kept = keep_count(num_visual, rule)

    edit = GraphEdit.open(segments, "prefill")
    scorer = edit.layers[cfg.k - 1]
    if scorer.post_rope_key is None:
        raise RuntimeError(f"fastv cannot score layer {cfg.k - 1}: no post-RoPE key found")
    scale = scorer.attention.kwargs.get("scale") or info.head_dim**-0.5
    with edit.graph.inserting_before(scorer.attention):
        keep = edit.graph.call_function(
            fastv_keep_index,
            (
                scorer.post_rope_query,
                scorer.post_rope_key,
                edit.inputs["visual_rows"],
                rule,
                float(scale),
            ),
        )
    gathers = drop_rows(edit.graph, edit.layers, cfg.k, keep)
    edit.require_visual_rows(min_visual_rows(rule))
    pruned = range(cfg.k, info.num_layers)
    plan = {"visual_tokens": kept, "kv_visual_tokens": kept, "kv_visual_keep": rule}
    return PassResult(
        replan(edit.finish(), pruned, **plan),
        {
            "score_layer": cfg.k - 1,
            "pruned_layers": [cfg.k, info.num_layers - 1],
            "visual_tokens": num_visual,
            "kept_visual_tokens": kept,
            "keep": rule,
            "gathers": gathers,
        },
    )


def reference(
    model: LlavaForConditionalGeneration, info: ModelInfo, cfg: FastVConfig
) -> contextlib.AbstractContextManager[None]:
    return pruned_forward(model, cfg.k, lambda n: kept_count(n, cfg.ratio))


# the registry entry: the rewrite, its config, preparation, option check and eager reference
PASS = PassInfo(
    "fastv", fastv, FastVConfig, SUMMARY, "in_llm", prepare, check, reference, prunes=True
)
