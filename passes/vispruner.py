"""vispruner — prune visual tokens before the LLM by the vision tower's own attention, for towers
without a [CLS] token (Qwen2-VL, Qwen2.5-VL).

Method: VisPruner, Q. Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for
Effective Token Pruning in VLMs" (ICCV 2025, arXiv 2412.01818; Theia-4869/VisPruner): the
visual tokens are scored by the vision encoder's attention, not the LLM's text-visual
attention, and only the top-scored ones enter the LLM. On a tower without [CLS] the score
follows LightCompress's VisPruner port for Qwen2.5-VL (ModelTC/LightCompress, its
token-reduction VisPruner module): the attention each patch receives in the LAST vision block,
averaged over heads, averaged over its 2 x 2 merge group, un-windowed back to raster order.

Score, per image (one vision call per image):

    q, k of the last block (post-RoPE)        (1, H, N, hd)   N patches, block (window) order
    mask: the block's own additive mask       (N, N)          the image, or its windows
    P = softmax(q k^T · hd^-0.5 + mask)       (H, N, N)       float32, one head at a time
    s_j = mean_h mean_{i in seg(j)} P[h, i, j]  (N,)          what patch j receives, over the
                                                              query rows of its own segment
    merged = mean of each 2 x 2 group         (N/4,)          block order
    raster = merged at the inverse window order (N/4,)        Qwen2.5-VL; Qwen2-VL as is
    kept = TopK(raster, k) -> sort            (k,) int64      ascending merged-token indices

k is computed in the graph from N/4: `keep=K` keeps min(K, N/4) tokens; `ratio=R` drops the
fraction R, keeping max(1, round(N/4·(1-R))), halves up (`runtime.manifest.keep_count`);
the default R = 0.778 is the paper's README example on LLaVA-1.5 (128 of 576 tokens kept), as
LightCompress's token-reduction configs write it. The vision segment then outputs `image_features` (k, d) (the kept rows, ascending) and
`patch_index` (k,) (which merged tokens they are): the host gives each kept row its own 3-D
M-RoPE position (`runtime.images.QwenImages.rows`), the positions after the image stay those of
the whole image, and the prefill takes any number of visual rows as it is. No NonZero: the
counts are sizes, the selection a TopK and a gather.

Which detail follows which source: the last block, the head mean, the 2 x 2 group mean and the
un-windowing: LightCompress's port (it sums the attention over the query rows; the mean over
the rows of the patch's own segment taken here ranks the same within one full-attention segment
and does not favour large windows in a windowed last block); kept tokens in ascending order,
each at its own position: the port keeps the kept rows' own position ids. The paper's second
stage (diverse tokens: repeated bipartite matching of the remaining tokens, `important_ratio`)
is not applied: its number of rounds depends on the image's token count, which is dynamic in
this graph; this is VisPruner with important_ratio = 1.

On a tower with [CLS] (LLaVA's CLIP) VisPruner's importance score is the [CLS] attention, which
is `fastervlm`: this pass refuses such a model and names it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mllmc.compiler.core.families import FAMILIES
from mllmc.compiler.core.pass_types import PassInfo, PassResult
from mllmc.runtime.errors import UserError
from mllmc.runtime.manifest import keep_count

from . import cls_attention
from .fastv import keep_rule
from .rewrite import GraphEdit, replan

if TYPE_CHECKING:
    import torch
    from torch import fx, nn

    from mllmc.compiler.core.capture import Segments
    from mllmc.compiler.core.model_dir import ModelShape
    from mllmc.runtime.manifest import ModelInfo

SUMMARY = "keep the top-k merged tokens by the last vision block's attention (VisPruner)"
DEFAULT_DROP_RATIO = 0.778  # VisPruner's example on LLaVA-1.5: 128 of 576 tokens kept


@dataclass(frozen=True)
class VisPrunerConfig:
    """keep: merged tokens kept per image (at most the image's), or ratio: the fraction dropped
    (default 0.778, halves of a token rounded up, at least 1 kept)."""

    keep: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        cls_attention.check_keep_options(self.keep, self.ratio)

    def kept(self, merged: Any) -> Any:
        """Tokens kept of an image's `merged` tokens: an int, or a traced size in the graph."""
        if self.keep is not None:
            return _smallest(self.keep, merged)
        ratio = DEFAULT_DROP_RATIO if self.ratio is None else self.ratio
        return _largest(1, keep_count(merged, keep_rule(ratio)))


def _smallest(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    import torch

    return torch.sym_min(a, b)


def _largest(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    import torch

    return torch.sym_max(a, b)


def _refuse_cls(tower: str) -> None:
    raise UserError(
        f"vispruner: {tower} has a [CLS] token, and VisPruner's score there is its [CLS] "
        "attention: use fastervlm (vispruner scores towers without [CLS]: Qwen2-VL, Qwen2.5-VL)"
    )


def refuse_with_cls(model_type: str) -> None:
    """UserError (one line naming fastervlm) unless the family's tower has no [CLS] token."""
    fam = FAMILIES.get(model_type)
    if fam is not None and not fam.mrope:
        _refuse_cls(f"the {fam.name} vision tower")


def check(cfg: VisPrunerConfig, shape: ModelShape) -> None:
    if shape.cls_token:
        _refuse_cls("this model's vision tower")


def prepare(cfg: VisPrunerConfig, model: nn.Module, info: ModelInfo) -> VisPrunerConfig:
    refuse_with_cls(info.model_type)
    return cfg


# ----------------------------------------------------------------------------------------------
# The rewrite (vision segment)


def received_attention(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q, k (1, H, N, hd) post-RoPE, mask (N, N) additive (0 within a segment) -> (N,) float32:
    the attention each patch receives, head mean, mean over the query rows of its segment.
    One head at a time (H is static): the probabilities held at once are (N, N), as the mask."""
    import torch

    heads = int(q.shape[1])
    mask = mask.float()
    received = None
    for h in range(heads):
        logits = torch.matmul(q[0, h].float(), k[0, h].float().transpose(0, 1)) * scale + mask
        column = logits.softmax(-1).sum(dim=0)  # (N,): masked entries are 0
        received = column if received is None else received + column
    rows = (mask == 0).sum(dim=0)  # (N,) query rows in each patch's segment
    return received / (rows * heads)


def merged_scores(
    patch_scores: torch.Tensor, unit: int, window_index: torch.Tensor | None
) -> torch.Tensor:
    """patch_scores (N,) in the block's row order -> (N / unit,): each merge group's mean, in
    raster order (the group in window slot s is merged token window_index[s])."""
    import torch

    merged = patch_scores.reshape(-1, unit).mean(dim=-1)
    if window_index is None:
        return merged
    return torch.zeros_like(merged).index_copy(0, window_index, merged)


def keep_index(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    unit: int,
    window_index: torch.Tensor | None,
    cfg: VisPrunerConfig,
) -> torch.Tensor:
    """The kept merged tokens of one image, ascending: (kept,) int64 (module docstring)."""
    import torch

    scores = merged_scores(received_attention(q, k, mask, scale), unit, window_index)
    merged = scores.shape[0]
    # the count as a size of its own (read from a tensor): a size computed from N/4 would be
    # assumed >= 2 by the tracer, and an image may keep one token
    kept = torch.full((), cfg.kept(merged), dtype=torch.int64).item()
    torch._check(kept >= 1)
    torch._check(kept <= merged)
    return torch.sort(torch.topk(scores, kept).indices).values


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)$")


def last_block_attention(graph: fx.Graph) -> tuple[int, fx.Node]:
    """(index, SDPA node) of the vision segment's last block's attention."""
    import torch

    from mllmc.compiler.core.locator import module_path

    found: dict[int, fx.Node] = {}
    for node in graph.nodes:
        if node.target is torch.ops.aten.scaled_dot_product_attention.default:
            m = _BLOCK.search(module_path(node))
            if m:
                found[int(m.group(1))] = node
    if not found:
        raise RuntimeError("vispruner: no vision block attention found in the vision segment")
    last = max(found)
    return last, found[last]


def vispruner(segments: Segments, cfg: VisPrunerConfig) -> PassResult:
    """The vision segment outputs each image's top-k merged tokens (ascending) and their
    indices `patch_index`; every decoder layer holds the reference image's kept rows."""
    info = segments.info
    refuse_with_cls(info.model_type)
    if segments.kept_visual_tokens is not None:
        raise UserError("vispruner: the visual tokens were already pruned by another pass")
    edit = GraphEdit.open(segments, "vision")
    graph = edit.graph
    block, attention = last_block_attention(graph)
    if block != info.vision_layers - 1:
        raise RuntimeError(f"vispruner: last attention in block {block}, not the last block")
    q, k, _v, mask = attention.args[:4]
    scale = attention.kwargs.get("scale")
    if scale is None:
        scale = int(q.meta["val"].shape[-1]) ** -0.5
    window = edit.inputs.get("window_index")
    output = next(n for n in graph.nodes if n.op == "output")
    features = output.args[0][0]  # (N / 4, d)
    unit = info.spatial_merge_size**2
    with graph.inserting_before(output):
        top = graph.call_function(keep_index, (q, k, mask, float(scale), unit, window, cfg))
        kept_features = graph.call_function(_rows, (features, top))
    output.replace_input_with(features, kept_features)
    edit.add_output(top, "patch_index")
    reference = info.reference_visual_rows or info.visual_tokens
    kept = cfg.kept(reference)
    segments = dataclasses.replace(edit.finish(), kept_visual_tokens=kept)
    every_layer = range(len(segments.layer_plan))
    stats = {"vision_block": block, "visual_tokens": reference, "kept_visual_tokens": kept}
    return PassResult(
        replan(segments, every_layer, visual_tokens=kept, kv_visual_tokens=kept), stats
    )


def _rows(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """features (M, d) at rows `index` (k,) -> (k, d)."""
    return features.index_select(0, index)


# ----------------------------------------------------------------------------------------------
# Eager reference: hooks on HF's Qwen2-VL / Qwen2.5-VL model


def _is_prefill(kwargs: dict[str, Any]) -> bool:
    past = kwargs.get("past_key_values")
    return past is None or past.get_seq_length() == 0


@dataclasses.dataclass
class _VisPruning:
    """What `vispruned_forward`'s hooks share: the last block's patch scores, each image's kept
    merged tokens, the prompt's ids and the rows it keeps, and how many rows it lost."""

    cfg: VisPrunerConfig
    image_token_id: int
    visual: nn.Module
    patch_scores: torch.Tensor | None = None
    selected: list[torch.Tensor] = dataclasses.field(default_factory=list)  # each image's
    counts: list[int] = dataclasses.field(default_factory=list)  # each image's merged tokens
    ids: torch.Tensor | None = None  # (1, n) the whole prompt
    keep: torch.Tensor | None = None  # (n,) bool: the rows that enter the LLM
    dropped: int = 0

    @property
    def unit(self) -> int:
        return int(self.visual.spatial_merge_size) ** 2

    def score(self, attn: nn.Module, args: tuple, kwargs: dict[str, Any], _out: Any) -> None:
        """Last vision block's attention (forward hook): what each patch receives, from HF's own
        qkv projection and rotary function, one softmax per segment of `cu_seqlens`."""
        import sys

        import torch

        x = args[0] if args else kwargs["hidden_states"]  # (N, D): norm1(h)
        n = x.shape[0]
        qkv = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        q, k = rope(qkv[0], qkv[1], *kwargs["position_embeddings"])  # (N, H, hd) each
        bounds = kwargs["cu_seqlens"].tolist()
        parts = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            if b > a:
                qs, ks = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1)  # (H, L, hd)
                probs = torch.softmax(torch.matmul(qs, ks.transpose(1, 2)) * attn.scaling, -1)
                parts.append(probs.float().mean(dim=0).mean(dim=0))  # (L,)
        self.patch_scores = torch.cat(parts)

    def select(self, visual: nn.Module, args: tuple, kwargs: dict[str, Any], _out: Any) -> None:
        """Vision tower (forward hook): each image's top-k merged tokens, ascending, by its
        patches' mean score in raster order."""
        import torch

        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        window = None
        if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: rows in window order
            window = kwargs.get("window_index")
            if window is None:
                from transformers.vision_utils import get_vision_window_index

                window, _ = get_vision_window_index(
                    grid, visual.spatial_merge_size, visual.window_size, visual.patch_size
                )
        scores = merged_scores(self.patch_scores, self.unit, window)
        self.counts = [int(c) for c in (grid.prod(-1) // self.unit).tolist()]
        self.selected = [
            torch.sort(torch.topk(s, self.cfg.kept(int(s.shape[0]))).indices).values
            for s in scores.split(self.counts)
        ]

    def on_prompt(self, _model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        """Model pre-hook, first of all: a prompt's images are scored (the tower run once more
        by these hooks) and the ids the other passes' references see are the rows that enter
        the LLM, as the artifact's prompt holds them; HF gets the whole prompt back below."""
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or not _is_prefill(kwargs):
            return None
        self.ids, self.keep, self.dropped = ids, None, 0
        pixels = kwargs.get("pixel_values")
        if pixels is not None:
            with torch.no_grad():
                self.visual(pixels.type(self.visual.dtype), grid_thw=kwargs["image_grid_thw"])
        elif (kwargs.get("mm_encoder_outputs") or {}).get("image") is None:
            return None  # no image
        # (else `generate` ran the tower on the images first, under these hooks, and passes
        # its outputs: `selected` is theirs)
        self.keep = self._kept_rows(ids)
        if "input_ids" in kwargs:
            kwargs["input_ids"] = ids[:, self.keep]
            return args, kwargs
        return (ids[:, self.keep], *args[1:]), kwargs

    def restore(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        """Multimodal model (pre-hook): HF's forward gets the whole prompt (its placeholders and
        3-D positions are over whole images); a decode step given no positions gets those of
        the whole prompt's rows (HF would count the shorter cache)."""
        import torch

        if _is_prefill(kwargs):
            if self.keep is None:
                return None
            if "input_ids" in kwargs or not args:
                kwargs["input_ids"] = self.ids
                return args, kwargs
            return (self.ids, *args[1:]), kwargs
        ids = kwargs.get("input_ids", args[0] if args else None)
        if kwargs.get("position_ids") is not None or kwargs.get("attention_mask") is not None:
            return None  # HF counts the positions from them, not from the cache
        if ids is None or model.rope_deltas is None or not self.dropped:
            return None
        start = kwargs["past_key_values"].get_seq_length() + self.dropped
        rows = torch.arange(start, start + ids.shape[1], device=ids.device)
        positions = rows[None, :] + model.rope_deltas.to(ids.device)  # (B, n)
        kwargs["position_ids"] = positions[None].expand(3, -1, -1)
        return args, kwargs

    def prune(self, _lm: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        """Language model (pre-hook): the prefill keeps the text rows and each image's kept
        rows, at the 3-D positions HF gave them over the whole images; decode steps follow the
        shorter cache."""
        import torch

        if not _is_prefill(kwargs):
            return self._shift_decode(args, kwargs)
        keep = self.keep
        if keep is None:
            return None
        n = int(keep.sum())
        self.dropped = keep.shape[0] - n
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"][:, keep]
        positions = kwargs["position_ids"][..., keep]
        if positions.shape[0] == 4:  # HF's text positions first: the rows' indices
            positions = positions.clone()
            positions[0] = torch.arange(n, device=positions.device)
        kwargs["position_ids"] = positions
        if isinstance(kwargs.get("attention_mask"), torch.Tensor):
            kwargs["attention_mask"] = kwargs["attention_mask"][:, keep]
        self.keep = None
        return args, kwargs

    def _kept_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(n,) bool: the prompt's text rows and each image's kept rows."""
        import torch

        is_image = ids[0] == self.image_token_id
        table = torch.zeros(sum(self.counts), dtype=torch.bool, device=is_image.device)
        start = 0
        for count, kept in zip(self.counts, self.selected, strict=True):
            table[start + kept.to(table.device)] = True
            start += count
        if int(is_image.sum()) != len(table):
            raise ValueError(f"{int(is_image.sum())} image tokens for {len(table)} merged tokens")
        rank = (torch.cumsum(is_image.long(), 0) - 1).clamp(min=0)  # each image token's
        return ~is_image | table[rank]

    def _shift_decode(self, args: tuple, kwargs: dict[str, Any]) -> tuple:
        import torch

        positions = kwargs.get("position_ids")
        if isinstance(positions, torch.Tensor) and positions.shape[0] == 4:
            positions = positions.clone()
            positions[0] -= self.dropped
            kwargs["position_ids"] = positions
        if isinstance(kwargs.get("attention_mask"), torch.Tensor):
            kwargs["attention_mask"] = kwargs["attention_mask"][:, self.dropped :]
        return args, kwargs


@contextlib.contextmanager
def vispruned_forward(model: nn.Module, cfg: VisPrunerConfig) -> Iterator[_VisPruning]:
    """Make HF Qwen2-VL / Qwen2.5-VL `model` feed its LLM only each image's top-k merged tokens
    by the attention they receive in the last vision block, each at its own 3-D position.
    The references of later passes see the prompt's ids as the LLM holds them (as fastervlm's
    do). Yields the hooks' state: `selected` holds the kept merged tokens of the last images."""
    visual = model.model.visual
    state = _VisPruning(cfg, model.config.image_token_id, visual)
    handles = [
        visual.blocks[-1].attn.register_forward_hook(state.score, with_kwargs=True),
        visual.register_forward_hook(state.select, with_kwargs=True),
        model.register_forward_pre_hook(state.on_prompt, with_kwargs=True, prepend=True),
        model.model.register_forward_pre_hook(state.restore, with_kwargs=True),
        model.model.language_model.register_forward_pre_hook(state.prune, with_kwargs=True),
    ]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


def reference(
    model: nn.Module, info: ModelInfo, cfg: VisPrunerConfig
) -> contextlib.AbstractContextManager[_VisPruning]:
    refuse_with_cls(model.config.model_type)
    return vispruned_forward(model, cfg)


# the registry entry: the rewrite, its config, preparation, option check and eager reference
PASS = PassInfo(
    "vispruner",
    vispruner,
    VisPrunerConfig,
    SUMMARY,
    "pre_llm",
    prepare,
    check,
    reference,
    prunes=True,
)
