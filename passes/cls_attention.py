"""[CLS] -> patch attention in the CLIP vision tower: the scorer FasterVLM and VTC-CLS share.

Graph side (`keep_top_patches`): in the vision segment, the [CLS] query row of encoder layer l
is scored against that layer's keys, from the layer's own q/k projections (the attention call
stays fused):

    q_proj(x_l)[:, :1], k_proj(x_l)   (B, 1, dv), (B, 1 + P, dv)   B tiles
    -> softmax(q_cls k^T · hd^-0.5) head-mean, patch columns        (B, P)   summed over the layers
    -> TopK(kept) per tile -> sort -> gather the projected features  (B, P, d) -> (B, kept, d)

so only each tile's kept tokens, in spatial (row-major patch) order, leave the vision segment.
The prefill takes any number of visual rows as it is; the manifest's `visual_tokens` tells the
runtime how many rows a tile now gives. For a family that packs tiles on their grid on the host
(LLaVA-NeXT) the segment also outputs the kept patch indices (B, kept) (`patch_index`), and the
host packs the kept patches at their places, every newline kept, as FasterVLM does.

Options (`check_keep_options`, `resolve_keep`): both passes keep `keep=N` tokens, or drop the
fraction `ratio=R` (keep round(N_v·(1-R)); R = 0.75 when neither is given).

Eager side (`cls_pruned_forward`): hooks on the HF model: the same scores from HF's CLIP encoder
layer (layer_norm1, q_proj, k_proj), the projector output gathered at each tile's top-k patches
(LLaVA-NeXT: HF's packing applied to the features and to a kept-patch mask, the kept rows
taken), and each image's span in the prompt shortened to its kept rows (positions compacted,
as the official code builds the shorter input embeddings), decode positions following the
shorter prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from mllmc.compiler.core.families import family
from mllmc.compiler.core.model_dir import visual_token_count
from mllmc.compiler.core.pass_types import PassResult
from mllmc.runtime.errors import UserError

from .rewrite import GraphEdit, replan

if TYPE_CHECKING:
    import torch
    from torch import fx, nn
    from transformers import LlavaForConditionalGeneration

    from mllmc.compiler.core.capture import Segments

DEFAULT_DROP_RATIO = 0.75  # 576 -> 144 visual tokens on LLaVA-1.5


def check_keep_options(keep: object, ratio: object) -> None:
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
    """Tokens kept out of `num_visual`: keep, or round(N_v·(1-R)) (R = DEFAULT_DROP_RATIO when
    neither is given); UserError if impossible."""
    if keep is None and ratio is None:
        ratio = DEFAULT_DROP_RATIO
    kept = keep if keep is not None else int(round(num_visual * (1 - (ratio or 0.0))))
    if not 1 <= kept <= num_visual:
        raise UserError(
            f"{name}: keep={kept} out of range; the vision tower gives {num_visual} visual "
            f"tokens, so keep must be in 1..{num_visual}"
        )
    return kept


def vision_layer_of_feature(feature_layer: int, vision_layers: int) -> int:
    """The encoder layer whose output LLaVA takes as image features (hidden_states[f]):
    f = -2 -> layer L_v - 2; f >= 1 -> layer f - 1."""
    index = vision_layers + feature_layer if feature_layer < 0 else feature_layer - 1
    if not 0 <= index < vision_layers:
        raise UserError(
            f"vision_feature_layer {feature_layer} is the patch embedding, not an encoder layer: "
            "no [CLS] attention to score patches with"
        )
    return index


# the pre-LLM pass that scores visual tokens without a [CLS] token (Qwen2-VL's towers have none)
NO_CLS_PASS = "vispruner"


def refuse_without_cls(name: str, has_cls: bool) -> None:
    """UserError (one line naming the scorer that needs no [CLS]) for a tower without one."""
    if not has_cls:
        raise UserError(
            f"{name}: this model's vision tower has no [CLS] token to score patches with; "
            f"use {NO_CLS_PASS} (it scores the merged tokens without one)"
        )


def check_tower(model: LlavaForConditionalGeneration, name: str) -> None:
    """UserError unless the tower has a [CLS] token that LLaVA drops (the scorer needs both)."""
    cfg = model.config
    vision_type = getattr(cfg.vision_config, "model_type", "")
    refuse_without_cls(name, not vision_type.startswith(("qwen2_vl", "qwen2_5_vl")))
    if vision_type != "clip_vision_model":
        raise UserError(
            f"{name}: the vision tower {vision_type!r} has no [CLS] token to score patches with; "
            "this pass needs a CLIP tower"
        )
    if cfg.vision_feature_select_strategy != "default":
        raise UserError(
            f"{name}: vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} "
            "feeds the [CLS] token itself to the LLM; this pass scores patches by [CLS] "
            "attention and needs the 'default' strategy (patches only)"
        )


def cls_patch_scores(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """[CLS] row of one layer's attention over the patches, head-mean, per tile.
    q, k: (B, 1 + P, dv) projections -> (B, P) float32."""
    import torch

    b, t, dv = k.shape
    hd = dv // heads
    q_cls = q[:, :1].reshape(b, 1, heads, hd).transpose(1, 2)  # (B, Hv, 1, hd)
    keys = k.reshape(b, t, heads, hd).transpose(1, 2)  # (B, Hv, 1 + P, hd)
    probs = (torch.matmul(q_cls, keys.transpose(-1, -2)) * scale).float().softmax(-1)
    return probs.mean(dim=1)[:, 0, 1:]  # (B, P)


def top_patches(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """scores (B, P) -> each tile's top-`kept` patch indices in spatial order (B, kept) int64."""
    import torch

    return torch.sort(torch.topk(scores, kept, dim=1).indices, dim=1).values


def gather_top(features: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """features (B, P, d) at each tile's patches `top` (B, kept) -> (B, kept, d)."""
    import torch

    return torch.gather(features, 1, top[:, :, None].expand(-1, -1, features.shape[2]))


_VISION_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.self_attn\.([qk])_proj$")


def _projections(graph: fx.Graph) -> dict[tuple[int, str], fx.Node]:
    from mllmc.compiler.core.locator import LINEAR_OPS, module_path

    found: dict[tuple[int, str], fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_OPS:
            m = _VISION_LAYER.search(module_path(node))
            if m:
                found[int(m.group(1)), m.group(2)] = node
    return found


def keep_top_patches(
    segments: Segments,
    name: str,
    layers: Sequence[int],
    keep: int | None,
    ratio: float | None,
    stats: dict[str, object],
) -> PassResult:
    """Pass `name`'s rewrite: the vision segment outputs, for each tile, the patches kept
    (`resolve_keep`) with the highest [CLS] attention summed over vision `layers`, and every
    decoder layer holds that many visual rows per tile (the prefill takes any count as it is).
    `stats` lead the result's stats."""
    import torch

    num_visual = segments.visual_tokens
    if num_visual != segments.info.visual_tokens:
        raise UserError(f"{name}: the visual tokens were already pruned by another pass")
    kept = resolve_keep(name, keep, ratio, num_visual)
    edit = GraphEdit.open(segments, "vision")
    graph = edit.graph
    proj = _projections(graph)
    output = next(n for n in graph.nodes if n.op == "output")
    features = output.args[0][0]  # (B, P, d)
    with graph.inserting_before(output):
        total = None
        for layer in layers:
            if (layer, "q") not in proj or (layer, "k") not in proj:
                raise RuntimeError(f"vision layer {layer}: q/k projections not found")
            q = proj[layer, "q"]
            heads = next(int(u.meta["val"].shape[2]) for u in q.users if u.meta["val"].dim() == 4)
            dv = int(q.meta["val"].shape[-1])
            score = graph.call_function(
                cls_patch_scores, (q, proj[layer, "k"], heads, (dv // heads) ** -0.5)
            )
            total = score if total is None else graph.call_function(torch.add, (total, score))
        top = graph.call_function(top_patches, (total, kept))
        kept_features = graph.call_function(gather_top, (features, top))
    output.replace_input_with(features, kept_features)
    if family(segments.info.model_type).packs_tiles:
        # the host packs each image's tiles on their patch grid: it needs where the kept are
        edit.add_output(top, "patch_index")
    segments = edit.finish()
    every_layer = range(len(segments.layer_plan))
    rows = segments.reference_rows  # of the reference image, as packed after the pruning
    return PassResult(
        replan(segments, every_layer, visual_tokens=rows, kv_visual_tokens=rows),
        {**stats, "visual_tokens": num_visual, "kept_visual_tokens": kept},
    )


# ----------------------------------------------------------------------------------------------
# Eager reference.


@dataclasses.dataclass
class _ClsPruning:
    """What `cls_pruned_forward`'s hooks share: the [CLS] scores summed so far over the scored
    vision layers, and how many image placeholders the prompt being run lost."""

    image_token_id: int
    kept: int
    per_image: int
    scores: torch.Tensor | None = None
    dropped: int = 0

    def score(self, layer_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Pre-hook of a scored encoder layer: add its [CLS] row's head-mean attention over the
        patches, from HF's own modules and attributes."""
        import torch

        h = args[0] if args else kwargs["hidden_states"]  # (B, 1 + P, dv)
        attn = layer_module.self_attn
        x = layer_module.layer_norm1(h)
        b, t, heads, hd = x.shape[0], x.shape[1], attn.num_heads, attn.head_dim
        q = attn.q_proj(x).view(b, t, heads, hd).transpose(1, 2)  # (B, Hv, 1 + P, hd)
        k = attn.k_proj(x).view(b, t, heads, hd).transpose(1, 2)
        probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * attn.scale, dim=-1)
        s = probs[:, :, 0, 1:].mean(dim=1)  # (B, P)
        self.scores = s if self.scores is None else self.scores + s

    def gather(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Projector hook: each image's output at its top-`kept` patches, in spatial order."""
        top = self.scores.topk(self.kept, dim=1).indices.sort(dim=1).values  # (B, kept)
        self.scores = None
        return output.gather(1, top[:, :, None].expand(-1, -1, output.shape[2]))  # (B, kept, d)

    def shorten(
        self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]] | None:
        """Model pre-hook: the prompt keeps its first `kept` image placeholders; a decode step's
        positions follow the shorter prompt."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return None
        if ids.shape[1] > 1:
            self._shorten_prompt(ids, kwargs)
        else:
            self._shift_decode(kwargs)
        return args, kwargs

    def _shorten_prompt(self, ids: torch.Tensor, kwargs: dict[str, Any]) -> None:
        import torch

        is_image = ids[0] == self.image_token_id
        # each image's run of `per_image` placeholders keeps its first `kept`
        rank = (torch.cumsum(is_image.long(), 0) - 1) % self.per_image
        self._keep_rows(ids, ~is_image | (rank < self.kept), kwargs)

    def _keep_rows(self, ids: torch.Tensor, keep: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """The prompt's rows `keep` (n,) bool in `kwargs`' ids and mask; positions compacted."""
        import torch

        n = ids.shape[1]
        self.dropped = int((~keep).sum())
        kwargs["input_ids"] = ids[:, keep]
        if isinstance(kwargs.get("attention_mask"), torch.Tensor):
            kwargs["attention_mask"] = kwargs["attention_mask"][:, keep]
        for name in ("cache_position", "position_ids"):
            if isinstance(kwargs.get(name), torch.Tensor):
                kwargs[name] = kwargs[name][..., : n - self.dropped]

    def _shift_decode(self, kwargs: dict[str, Any]) -> None:
        import torch

        if isinstance(kwargs.get("attention_mask"), torch.Tensor):
            kwargs["attention_mask"] = kwargs["attention_mask"][:, self.dropped :]
        for name in ("cache_position", "position_ids"):
            if isinstance(kwargs.get(name), torch.Tensor):
                kwargs[name] = kwargs[name] - self.dropped


@contextlib.contextmanager
def cls_pruned_forward(
    model: LlavaForConditionalGeneration, layers: Sequence[int], kept: int
) -> Iterator[None]:
    """Make HF LLaVA `model` feed only each tile's top-`kept` patches by [CLS] attention (summed
    over vision `layers`) to its LLM, with each image's span in the prompt shortened to match.
    On a family that packs tiles (LLaVA-NeXT) the kept patches are packed at their places in the
    grid with every newline kept, as FasterVLM's LLaVA-NeXT code packs its index masks."""
    tower = model.model.vision_tower
    encoder_layers = getattr(tower, "vision_model", tower).encoder.layers
    vc = model.config.vision_config
    per_image = getattr(model.config, "image_seq_length", None) or visual_token_count(
        vc.image_size, vc.patch_size, "default"
    )
    packs = family(model.config.model_type).packs_tiles
    state = (_PackedClsPruning if packs else _ClsPruning)(
        model.config.image_token_id, kept, per_image
    )
    handles = [model.register_forward_pre_hook(state.shorten, with_kwargs=True)]
    handles += [
        encoder_layers[i].register_forward_pre_hook(state.score, with_kwargs=True) for i in layers
    ]
    handles.append(model.model.multi_modal_projector.register_forward_hook(state.gather))
    if packs:
        state.wrap_packing(model)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if packs:
            del model.model.pack_image_features  # back to the class's method


@dataclasses.dataclass
class _PackedClsPruning(_ClsPruning):
    """`_ClsPruning` for a family whose tiles are packed on their grid: the projector's output
    stays whole (the kept patches are recorded), and the packing keeps the kept patches and the
    newlines; the prompt's image spans shrink to the packed counts, found by running the image
    side first (they depend on which patches each tile keeps)."""

    top: torch.Tensor | None = None
    full_lens: list[int] = dataclasses.field(default_factory=list)
    kept_lens: list[int] = dataclasses.field(default_factory=list)
    model: Any = None

    def gather(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Projector hook: record each tile's top-`kept` patches; the output stays whole."""
        self.top = self.scores.topk(self.kept, dim=1).indices.sort(dim=1).values  # (B, kept)
        self.scores = None
        return output

    def wrap_packing(self, model: nn.Module) -> None:
        import torch

        self.model = model
        pack = type(model.model).pack_image_features.__get__(model.model)

        def packed(image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
            feats, lens = pack(
                image_features, image_sizes, vision_feature_select_strategy, image_newline
            )
            masks, start = [], 0
            for tiles in image_features:  # (T_i, P, d) each
                top = self.top[start : start + tiles.shape[0]]
                mask = torch.zeros(*tiles.shape[:2], 1, dtype=tiles.dtype, device=tiles.device)
                masks.append(mask.scatter(1, top[:, :, None], 1.0))
                start += tiles.shape[0]
            ones = torch.ones(1, dtype=feats[0].dtype, device=feats[0].device)
            packed_masks, _ = pack(masks, image_sizes, vision_feature_select_strategy, ones)
            new = [f[m[:, 0] > 0.5] for f, m in zip(feats, packed_masks, strict=True)]
            self.full_lens = [int(n) for n in lens]
            self.kept_lens = [int(f.shape[0]) for f in new]
            return new, torch.tensor(self.kept_lens, device=lens.device)

        model.model.pack_image_features = packed

    def _shorten_prompt(self, ids: torch.Tensor, kwargs: dict[str, Any]) -> None:
        import torch

        pixels, sizes = kwargs.get("pixel_values"), kwargs.get("image_sizes")
        if pixels is not None:  # the image side runs first, for its packed counts
            self.model.model.get_image_features(pixels, sizes, return_dict=True)
        elif not self.kept_lens:  # (generate ran it already: its encoder outputs are given)
            return
        is_image = ids[0] == self.image_token_id
        rank = torch.cumsum(is_image.long(), 0) - 1  # of each image token among all
        ends = torch.tensor(self.full_lens).cumsum(0)
        image = torch.bucketize(rank, ends, right=True).clamp(max=len(self.full_lens) - 1)
        starts = ends - torch.tensor(self.full_lens)
        keep = ~is_image | (rank - starts[image] < torch.tensor(self.kept_lens)[image])
        self._keep_rows(ids, keep, kwargs)
