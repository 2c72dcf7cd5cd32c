"""Dropping visual rows from the decoder's sequence at layer K: the machinery FastV and VTE share.

Graph side (`drop_rows`): one keep index (n',) of the rows that layers >= K hold, in their
original order, gathers everything those layers read that has a row axis:

    layer K's input h          (1, n, d)       -> index_select(h, 1, keep)          (1, n', d)
    RoPE cos/sin of layers >= K (1, 1, n, hd)  -> index_select(., 2, keep)          (1, 1, n', hd)
    causal mask of layers >= K  (1, 1, n, n)   -> rows and columns at keep          (1, 1, n', n')

so kept tokens keep their original positions (the cos/sin rows are theirs; gaps are allowed), the
mask stays causal in the original positions, and the present K/V of layers >= K come out with n'
rows. n' = n - V + kept, computed in the graph from the prompt's n and V (both dynamic): the
keep index is built with a running count and a scatter-add (`rows_where`; TopK for FastV's
selection), never NonZero. With K = L (no layer after the exit) the final
hidden state is gathered instead, which leaves the last row, and so the logits, unchanged.

Decode needs nothing: the decode graph takes one dynamic cache length per layer, and the next
position is the prompt layout's next position (n, the unpruned prompt length), as FastV's
official code continues it.

Eager side (`pruned_forward`): hooks on the Hugging Face model that compute the same thing with HF's
own modules: the selection from layer K-1's q/k projections and HF's RoPE / repeat_kv, then
HF decoder layers >= K fed the gathered hidden state, position embeddings and mask. It shares
nothing with the graph rewrite. `kept_rows(model)` tells other references (ShortV's frozen-row
hooks) which original rows layers >= K hold, so composed references stay consistent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import fx, nn
    from transformers import LlavaForConditionalGeneration

    from mllmc.compiler.core.locator import LayerAnatomy


# ----------------------------------------------------------------------------------------------
# Keep indices (traced into the prefill graph; dynamic counts, no NonZero).


def visual_mask(n: int | torch.SymInt, visual_rows: torch.Tensor) -> torch.Tensor:
    """(n,) bool: True at the prompt's visual rows `visual_rows` (V,)."""
    import torch

    marks = torch.zeros(n, dtype=torch.int64, device=visual_rows.device)
    return marks.index_copy(0, visual_rows, torch.ones_like(visual_rows)) > 0


def rows_where(mask: torch.Tensor, count: int | torch.SymInt) -> torch.Tensor:
    """The indices of the `count` True entries of `mask` (n,), ascending: (count,) int64. Built
    from a running count and one scatter-add (the False entries all land in a spare slot), so
    the graph has no NonZero and its output size is the symbolic `count`."""
    import torch

    slot = torch.cumsum(mask.to(torch.int64), 0) - 1  # (n,) rank among the True entries
    slot = torch.where(mask, slot, torch.full_like(slot, count))
    rows = torch.arange(mask.shape[0], device=mask.device)
    out = torch.zeros(count + 1, dtype=torch.int64, device=mask.device)
    return out.scatter_add(0, slot, rows)[:count]


def text_rows(
    input_ids: torch.Tensor, visual_rows: torch.Tensor, held: torch.Tensor | None = None
) -> torch.Tensor:
    """The text rows of an (1, n) prompt with visual rows `visual_rows` (V,): (n - V,) int64, in
    order. With `held` (n',): the original rows a layer holds after a pruning pass, the text
    rows' indices within those (every text row is held)."""
    n, v = input_ids.shape[1], visual_rows.shape[0]
    is_visual = visual_mask(n, visual_rows)
    if held is not None:
        is_visual = is_visual.index_select(0, held)
    return rows_where(~is_visual, n - v)


def last_row_visual_scores(
    q: torch.Tensor, k: torch.Tensor, visual_rows: torch.Tensor, scale: float
) -> torch.Tensor:
    """FastV's score: the last query row's attention probabilities over the visual rows,
    averaged over heads. q (1, H, n, hd) and k (1, kvh, n, hd) after RoPE -> (V,) float32.
    The last row sees every key, so no mask is needed."""
    import torch

    b, heads, _, hd = q.shape
    kv_heads = k.shape[1]
    q_last = q[:, :, -1:, :].reshape(b, kv_heads, heads // kv_heads, hd)  # (1, kvh, rep, hd)
    logits = torch.matmul(q_last, k.transpose(-1, -2)) * scale  # (1, kvh, rep, n)
    probs = logits.float().softmax(-1).mean(dim=(1, 2))[0]  # (n,)
    return probs.index_select(0, visual_rows)


def fastv_keep_index(
    q: torch.Tensor, k: torch.Tensor, visual_rows: torch.Tensor, keep: str, scale: float
) -> torch.Tensor:
    """Keep index (n - V + kept,): the text rows and the top-`kept` scored visual rows, in
    original order; kept = keep_count(V, keep), computed in the graph from V."""
    import torch

    from mllmc.runtime.manifest import keep_count

    n, v = k.shape[2], visual_rows.shape[0]
    kept = keep_count(v, keep)  # <= v for every rule p/q <= 1
    scores = last_row_visual_scores(q, k, visual_rows, scale)  # (V,) probabilities, >= 0
    # TopK over the scores and `kept` entries of -1 that never win: the same top `kept`, and k
    # <= V + kept holds on its face (the tracer cannot prove kept <= V from the rule's floor)
    padded = torch.cat((scores, scores.new_full((kept,), -1.0)))
    top_rows = visual_rows.index_select(0, torch.topk(padded, kept).indices)  # (kept,)
    held = (~visual_mask(n, visual_rows)).to(torch.int64)
    held = held.index_copy(0, top_rows, torch.ones_like(top_rows))
    return rows_where(held > 0, n - v + kept)


def pruning_index(layers: list[LayerAnatomy], k: int) -> fx.Node:
    """The keep index a pruning pass (`drop_rows`) gathered layer `k`'s input with: the rows
    (n',) that layers >= k hold. RuntimeError when layer k's input is not such a gather."""
    import torch

    node = layers[k].layer_input if k < len(layers) else None
    if node is None or node.target is not torch.ops.aten.index_select.default or node.args[1] != 1:
        raise RuntimeError(f"layer {k}'s input is not the row gather of a pruning pass")
    return node.args[2]


def refuse_sliding_window(name: str, model: LlavaForConditionalGeneration, k: int) -> None:
    """UserError when a decoder layer >= k of `model` has a sliding attention window that
    positions the model accepts can exceed: after the prompt, those layers' caches hold rows at
    gapped original positions, and the decode step's window counts cache rows."""
    from mllmc.compiler.core.capture import layer_windows
    from mllmc.runtime.errors import UserError

    tc = model.config.text_config
    limit = int(getattr(tc, "max_position_embeddings", 0) or 0)
    windows = [w for w in layer_windows(tc)[k:] if w is not None and (limit == 0 or w < limit)]
    if windows:
        raise UserError(
            f"{name}: layers >= {k} use a {windows[0]}-token sliding attention window, which "
            f"{name} does not support (it drops cache rows); compile this model without {name}"
        )


# ----------------------------------------------------------------------------------------------
# The graph rewrite.


def drop_rows(graph: fx.Graph, layers: list[LayerAnatomy], k: int, keep: fx.Node) -> int:
    """Make decoder layers >= k of `graph` (located `layers`) run on the rows `keep` (n',).
    Returns how many gathers were inserted. `keep` must be defined before layer k's input
    (FastV computes it in layer k-1, VTE from the graph inputs)."""
    import torch

    select = torch.ops.aten.index_select.default
    count = 0
    if k == len(layers):  # no layer after the exit: gather the final hidden state
        h = layers[-1].mlp_residual
    else:
        h = layers[k].layer_input
    with graph.inserting_after(h):
        h_kept = graph.call_function(select, (h, 1, keep))  # (1, n', d)
    h.replace_all_uses_with(h_kept, delete_user_cb=lambda user: user is not h_kept)
    count += 1
    shared: dict[tuple[fx.Node, int], fx.Node] = {}

    def rows(table: fx.Node, dim: int, before: fx.Node) -> fx.Node:
        nonlocal count
        if (table, dim) not in shared:
            with graph.inserting_before(before):
                shared[table, dim] = graph.call_function(select, (table, dim, keep))
            count += 1
        return shared[table, dim]

    for layer in layers[k:]:
        for mul, i in [*layer.query_rope_operands, *layer.key_rope_operands]:
            mul.update_arg(i, rows(mul.args[i], 2, mul))  # cos/sin (1, 1, n', hd)
        mask = layer.attention_mask
        if mask is not None:  # (1, 1, n, n) -> (1, 1, n', n')
            mask_rows = rows(mask, 2, layer.attention)
            layer.attention.replace_input_with(mask, rows(mask_rows, 3, layer.attention))
    return count


# ----------------------------------------------------------------------------------------------
# Eager reference on the Hugging Face model.

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, _PromptRows] = weakref.WeakKeyDictionary()


def kept_rows(model: nn.Module) -> torch.Tensor | None:
    """Original row indices (n',) that the pruned layers of `model` hold for the prompt being run
    under `pruned_forward`, or None when no rows were dropped."""
    state = _ACTIVE.get(model)
    return None if state is None else state.index


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import rotate_half

    return rotate_half(x)


def _hf_last_row_scores(
    layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Head-mean attention probabilities of the last row of HF decoder `layer` over all n keys,
    from its own input norm, q/k projections, RoPE and repeat_kv. h (1, n, d); cos/sin (1, n, hd)
    -> (n,) float32."""
    import torch
    from transformers.models.llama.modeling_llama import repeat_kv

    attn = layer.self_attn
    hd = attn.head_dim
    x = layer.input_layernorm(h)  # (1, n, d)
    q = attn.q_proj(x[:, -1:]).view(1, 1, -1, hd).transpose(1, 2)  # (1, H, 1, hd)
    keys = attn.k_proj(x).view(1, x.shape[1], -1, hd).transpose(1, 2)  # (1, kvh, n, hd)
    c, s = cos[:, None], sin[:, None]  # (1, 1, n, hd)
    q = q * c[:, :, -1:] + _rotate_half(q) * s[:, :, -1:]
    keys = keys * c + _rotate_half(keys) * s
    keys = repeat_kv(keys, q.shape[1] // keys.shape[1])  # (1, H, n, hd)
    probs = (torch.matmul(q, keys.transpose(2, 3)) * attn.scaling).float().softmax(-1)
    return probs.mean(dim=1)[0, 0]  # (n,)


@dataclasses.dataclass
class _PromptRows:
    """What `pruned_forward`'s hooks know of the prompt being run: its length n, its visual rows
    (every image's, ascending), and the rows `index` (n',) that the pruned layers hold (None until
    chosen, and when the prompt has no image)."""

    image_token_id: int
    kept_of: Callable[[int], int] | None
    n: int | None = None
    visual: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def on_prompt(self, _model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Model pre-hook: record the prompt's visual rows (a decode step keeps the prompt's);
        without a scorer (VTE) the kept rows are the text rows."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[1] == 1:
            return
        is_visual = ids[0] == self.image_token_id  # (n,)
        self.n, self.index = ids.shape[1], None
        self.visual = is_visual.nonzero()[:, 0] if bool(is_visual.any()) else None
        if self.visual is not None and self.kept_of is None:
            self.index = (~is_visual).nonzero()[:, 0]

    def select(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Pre-hook of layer k-1 during prefill: keep the text rows and the kept_of(V) visual
        rows with the highest last-row attention, in their original order."""
        import torch

        h = args[0] if args else kwargs["hidden_states"]
        if self.visual is None or self.kept_of is None or h.shape[1] != self.n:
            return
        cos, sin = kwargs["position_embeddings"]
        scores = _hf_last_row_scores(layer, h, cos, sin)  # (n,)
        visual = self.visual.to(h.device)
        top = visual[scores[visual].topk(self.kept_of(len(visual))).indices]
        text = torch.ones(self.n, dtype=torch.bool, device=h.device)
        text[visual] = False
        self.index = torch.cat((text.nonzero()[:, 0], top)).sort().values

    def prune_hook(self, layer_idx: int) -> Callable[..., tuple | None]:
        """Pre-hook of pruned layer `layer_idx`: gather its inputs at `index` during prefill; in a
        decode step, crop a materialised mask to the layer's shorter cache."""

        def hook(_layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
            if self.index is None:
                return None
            h = args[0] if args else kwargs["hidden_states"]
            cos, _ = kwargs["position_embeddings"]
            if cos.shape[-2] != self.n:
                _crop_decode_mask(kwargs, layer_idx, h.shape[1])
                return args, kwargs
            if h.shape[1] == self.n:
                h = h.index_select(1, self.index)  # (1, n', d)
            _gather_layer_inputs(kwargs, self.index)
            if args:
                return (h, *args[1:]), kwargs
            kwargs["hidden_states"] = h
            return args, kwargs

        return hook


def _crop_decode_mask(kwargs: dict[str, Any], layer_idx: int, new_rows: int) -> None:
    """A decode step's materialised mask cropped to layer `layer_idx`'s cache plus the new rows."""
    import torch

    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        length = kwargs["past_key_values"].get_seq_length(layer_idx) + new_rows
        kwargs["attention_mask"] = mask[..., -length:]


def _gather_layer_inputs(kwargs: dict[str, Any], index: torch.Tensor) -> None:
    """A pruned layer's position embeddings, mask and position ids gathered at the kept rows."""
    import torch

    cos, sin = kwargs["position_embeddings"]
    kwargs["position_embeddings"] = (cos.index_select(-2, index), sin.index_select(-2, index))
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        kwargs["attention_mask"] = mask.index_select(-2, index).index_select(-1, index)
    if isinstance(kwargs.get("position_ids"), torch.Tensor):
        kwargs["position_ids"] = kwargs["position_ids"].index_select(-1, index)


@contextlib.contextmanager
def pruned_forward(
    model: LlavaForConditionalGeneration, k: int, kept_of: Callable[[int], int] | None = None
) -> Iterator[None]:
    """Make HF LLaVA `model` run decoder layers >= k on the text rows plus kept_of(V) visual
    rows during prefill (V: the image tokens in the prompt, of every image), chosen by layer
    k-1's last-row attention (FastV's selection, as pkunlp-icler/FastV builds `keep_indexs`:
    the text rows and the top-k visual positions, sorted); with kept_of None no visual row is
    kept (VTE). Decode steps run on each layer's (shorter) cache at the unpruned positions."""
    layers = model.model.language_model.layers
    state = _PromptRows(model.config.image_token_id, kept_of)
    handles = [model.register_forward_pre_hook(state.on_prompt, with_kwargs=True)]
    if k < len(layers):
        if kept_of is not None:
            handles.append(layers[k - 1].register_forward_pre_hook(state.select, with_kwargs=True))
        for i in range(k, len(layers)):
            handles.append(
                layers[i].register_forward_pre_hook(state.prune_hook(i), with_kwargs=True)
            )
        _ACTIVE[model] = state
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _ACTIVE.pop(model, None)
