"""shortv — freeze visual tokens in ineffective layers (ShortV, arXiv 2504.00502).

Contract (docs/passes.md): in a frozen layer l the visual rows of the hidden state pass through
unchanged. The input norm, keys and values are computed for all n rows (text still attends to the
visual tokens, and the KV cache is that of the un-updated visual hidden state); queries (q_proj +
RoPE), attention, o_proj, the post-attention norm and the MLP run on the n_text text rows only.

Graph change on the prefill segment, per frozen layer (decode is unchanged: new tokens are text):

    before: q_proj(norm_out)            (1, n, d)      after: q_proj(norm_out[text_idx])   (1, n_text, d)
            rope(q, cos, sin)           (1, H, n, hd)         rope(q, cos[text_idx], sin[...]) (1, H, n_text, hd)
            sdpa(q, k, v, mask)         mask (n × n)          sdpa(q_t, k, v, mask[text_idx])  (n_text × n)
            h + o_proj(...)             (1, n, d)             h[text_idx] + o_proj(...)        (1, n_text, d)
            h1 + mlp(norm(h1))          (1, n, d)             index_copy(h (n, d), text_idx, out_t) (1, n, d)

`text_idx` is built once per graph from the runtime input `visual_rows` (V,): the rows that are
not visual, found by a running count and a scatter-add (`row_pruning.rows_where`; no NonZero, V
and n dynamic). The frozen layers' visual-row FLOPs are gone from the
graph, not masked.

Which layers: `layers=[...]` explicitly; otherwise the `ratio` of layers with the lowest Layer
Contribution (LC), the order taken from `lc=FILE.json` (`mllmc calibrate`), from the paper's
published lists when the model matches LLaVA-1.5-7B/13B, or from a calibration run on built-in data
(calibration.DEFAULT_SAMPLES generated images, visual LC only; the log says how many and how long).

Composition: after a pruning pass (fastv, vte; the pipeline refuses them after shortv) a frozen
layer freezes whatever visual rows it still holds (its text index is taken within the pruning
pass's keep index); a frozen layer after a vte exit holds none, so it is skipped and the stats say so
(`skipped_layers`). After fastervlm the image span is simply shorter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mllmc.compiler.core.pass_types import PassInfo, PassResult
from mllmc.runtime.errors import UserError

from .rewrite import GraphEdit, replan
from .row_pruning import kept_rows, pruning_index, text_rows

if TYPE_CHECKING:
    from torch import fx
    from transformers import LlavaForConditionalGeneration

    from mllmc.compiler.core.capture import Segments
    from mllmc.compiler.core.locator import LayerAnatomy
    from mllmc.compiler.core.model_dir import ModelShape
    from mllmc.runtime.manifest import ModelInfo

log = logging.getLogger(__name__)

SUMMARY = "freeze visual tokens in the lowest-Layer-Contribution layers (ShortV)"


@dataclass(frozen=True)
class ShortVConfig:
    """layers: frozen layers (0-based); if None, the `ratio` of layers with the lowest LC
    (DEFAULT_RATIO when not given). lc: an LC file from `mllmc calibrate` giving the layer
    order. `layers` is refused together with `ratio` or `lc` (they choose the layers it names).
    order_from: filled in by compile with where the frozen list came from."""

    layers: tuple[int, ...] | None = None
    ratio: float | None = None
    lc: str | None = None
    order_from: str = ""

    def __post_init__(self) -> None:
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, int):
                layers = (layers,)
            if not isinstance(layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):
                raise ValueError(f"layers must be a list of layer indices, got {self.layers!r}")
            if len(set(layers)) != len(layers):
                dup = sorted({i for i in layers if list(layers).count(i) > 1})
                raise ValueError(f"duplicate layers {dup} in layers={list(layers)}")
            if any(i < 0 for i in layers):
                raise ValueError(f"layer indices must be >= 0, got {list(layers)}")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        if self.ratio is not None and (
            isinstance(self.ratio, bool)
            or not isinstance(self.ratio, (int, float))
            or not 0.0 <= float(self.ratio) < 1.0
        ):
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio!r}")
        if self.layers is not None and not self.order_from:
            given = [name for name in ("ratio", "lc") if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"give layers or {given[0]}, not both ({given[0]} chooses the frozen layers "
                    "that layers lists)"
                )


DEFAULT_RATIO = 0.6  # the fraction of layers frozen when neither layers nor ratio is given


# Published frozen lists (0-based, most-ineffective first), ShortV's official release.
PUBLISHED_ORDERS: dict[str, tuple[int, ...]] = {
    "llava-1.5-7b": (31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19),
    "llava-1.5-13b": (
        39,
        32,
        28,
        36,
        27,
        37,
        29,
        30,
        1,
        38,
        25,
        31,
        2,
        26,
        23,
        34,
        0,
        33,
        35,
        22,
        24,
        21,
        20,
        17,
    ),
    "llava-next-7b": (31, 29, 30, 28, 26, 27, 22, 24, 21, 23, 25, 20, 19, 17, 18, 15, 12, 0, 2),
    "llava-next-13b": (
        39,
        32,
        29,
        36,
        27,
        30,
        37,
        23,
        25,
        31,
        26,
        2,
        28,
        22,
        33,
        35,
        34,
        24,
        38,
        21,
        20,
        18,
        1,
        17,
    ),
}
# (model_type, decoder hidden, decoder layers, vision image size) -> published list
_PUBLISHED_MATCH = {
    ("llava", 4096, 32, 336): "llava-1.5-7b",
    ("llava", 5120, 40, 336): "llava-1.5-13b",
    ("llava_next", 4096, 32, 336): "llava-next-7b",
    ("llava_next", 5120, 40, 336): "llava-next-13b",
}


def published_order(model_type: str, info: ModelInfo) -> tuple[str, tuple[int, ...]] | None:
    key = (model_type, info.hidden_size, info.num_layers, info.image_size)
    name = _PUBLISHED_MATCH.get(key)
    return (name, PUBLISHED_ORDERS[name]) if name else None


def frozen_count(ratio: float, num_layers: int) -> int:
    return int(round(ratio * num_layers))


def check_layers(layers: Sequence[int], num_layers: int) -> None:
    bad = [i for i in layers if i >= num_layers]
    if bad:
        raise UserError(
            f"shortv: layers {bad} out of range; the model has layers 0..{num_layers - 1}"
        )


def check_not_every_layer(layers: Sequence[int], num_layers: int) -> None:
    """Refuse a frozen list naming every layer, as `ratio` < 1 does: the language model would
    never update the visual tokens."""
    if num_layers > 0 and set(layers) >= set(range(num_layers)):
        raise UserError(
            f"shortv: layers freezes all {num_layers} layers; leave at least one layer "
            "unfrozen (ratio < 1 does the same)"
        )


def check(cfg: ShortVConfig, shape: ModelShape) -> None:
    if cfg.layers is not None and shape.num_layers is not None:
        check_layers(cfg.layers, shape.num_layers)
        check_not_every_layer(cfg.layers, shape.num_layers)


def prepare(
    cfg: ShortVConfig, model: LlavaForConditionalGeneration, info: ModelInfo
) -> ShortVConfig:
    """Resolve the frozen layer list (explicit, LC file, published list, or calibration)."""
    L = info.num_layers
    if getattr(info, "visual_tokens", 1) < 1:
        raise UserError("shortv: the model puts no visual tokens in the prompt; nothing to freeze")
    if cfg.layers is not None:
        check_layers(cfg.layers, L)
        check_not_every_layer(cfg.layers, L)
        return dataclasses.replace(cfg, order_from="explicit")
    ratio = DEFAULT_RATIO if cfg.ratio is None else cfg.ratio
    k = frozen_count(ratio, L)
    if cfg.lc is not None:
        from mllmc.passes.calibration import read_lc_file

        order = read_lc_file(cfg.lc, info)
        source = f"lc file {cfg.lc}"
    elif (match := published_order(model.config.model_type, info)) is not None:
        name, order = match
        if k > len(order):
            raise UserError(
                f"shortv: ratio {ratio} freezes {k} layers; the published {name} list has "
                f"{len(order)}: use ratio <= {len(order) / L:.2f} or calibrate"
            )
        source = f"published list for {name}"
        log.warning("shortv: model matches %s; using the published layer order", name)
    else:
        from mllmc.passes.calibration import default_order

        order, source = default_order(model, info)
        log.warning("shortv: %s", source)
    layers = tuple(sorted(order[:k]))
    return dataclasses.replace(cfg, layers=layers, ratio=ratio, order_from=source)


# ----------------------------------------------------------------------------------------------
# The rewrite: locator -> check -> replacement.


def _insert(
    graph: fx.Graph, like: fx.Node, target: Callable[..., object], args: tuple[object, ...]
) -> fx.Node:
    node = graph.call_function(target, args)
    node.meta["nn_module_stack"] = dict(like.meta.get("nn_module_stack", {}))
    return node


def check_frozen_rewrite(layer: LayerAnatomy) -> str | None:
    """Reason the frozen-layer rewrite may not fire on this layer, or None if it may."""
    if layer.attention_mask is None:
        return "attention has no explicit mask to restrict to the text rows"
    if not layer.query_rope_operands:
        return "no RoPE multiplies found on the query path"
    return None


def freeze_layer(
    graph: fx.Graph,
    layer: LayerAnatomy,
    text_idx: fx.Node,
    shared: dict[tuple[fx.Node, int], fx.Node],
) -> None:
    """Rewrite one located decoder layer so that only its text rows are computed.

    `shared` holds the text-row gathers of tensors every layer reads (the cos/sin tables, the
    causal mask), made once at their first use: layers must be rewritten in ascending order."""
    import torch

    select = torch.ops.aten.index_select.default

    def rows_of(table: fx.Node, dim: int, before: fx.Node) -> fx.Node:
        if (table, dim) not in shared:
            with graph.inserting_before(before):
                shared[table, dim] = _insert(graph, table, select, (table, dim, text_idx))
        return shared[table, dim]

    with graph.inserting_before(layer.q_proj):
        x_t = _insert(graph, layer.q_proj, select, (layer.norm_out, 1, text_idx))
    layer.q_proj.replace_input_with(layer.norm_out, x_t)
    for mul, i in layer.query_rope_operands:  # cos/sin (1, 1, n, hd) -> (1, 1, n_text, hd)
        mul.update_arg(i, rows_of(mul.args[i], 2, mul))
    mask = layer.attention_mask  # (1, 1, n, n) -> (1, 1, n_text, n)
    layer.attention.replace_input_with(mask, rows_of(mask, 2, layer.attention))
    h_in = layer.layer_input  # read before the residual add is rewired to the text rows
    with graph.inserting_before(layer.attn_residual):
        h_t = _insert(graph, layer.attn_residual, select, (h_in, 1, text_idx))
    layer.attn_residual.replace_input_with(h_in, h_t)
    out_t = layer.mlp_residual  # (1, n_text, d)
    # the text rows written back into h as rows of its (n, d) view (a prefill holds one prompt):
    # onnxruntime scatters into h's own memory when this is h's last reader, where the copy on
    # dim 1 transposes h out and back
    aten = torch.ops.aten
    with graph.inserting_before(out_t.next):  # right after out_t, in this order
        rows_t = _insert(graph, out_t, aten.flatten.using_ints, (out_t, 0, 1))
        rows = _insert(graph, out_t, aten.flatten.using_ints, (h_in, 0, 1))
        written = _insert(graph, out_t, aten.index_copy.default, (rows, 0, text_idx, rows_t))
        out = _insert(graph, out_t, aten.unsqueeze.default, (written, 0))
    out_t.replace_all_uses_with(out, delete_user_cb=lambda user: user is not rows_t)


def shortv(segments: Segments, cfg: ShortVConfig) -> PassResult:
    """Freeze the visual tokens of `cfg.layers` in the prefill segment."""
    if cfg.layers is None:
        raise ValueError("shortv: resolve cfg.layers with prepare() before the rewrite")
    info = segments.info
    check_layers(cfg.layers, info.num_layers)
    if not cfg.layers:
        return PassResult(segments, {"frozen_layers": [], "order_from": cfg.order_from})

    edit = GraphEdit.open(segments, "prefill")
    graph, inputs = edit.graph, edit.inputs
    anatomy = {layer.index: layer for layer in edit.layers}
    # after a pruning pass (fastv, vte) layers >= its k hold the rows of its keep index: one
    # text index for the full rows and one for those; a layer with no visual rows left (after a
    # vte exit) has nothing to freeze and is skipped (recorded in the stats)
    held = {i: segments.layer_plan[i].visual_tokens for i in cfg.layers}
    skipped = [i for i in cfg.layers if held[i] == 0]
    pruned_from = next(
        (p.index for p in segments.layer_plan if p.visual_tokens != segments.reference_rows),
        None,
    )
    text_idx: dict[bool, fx.Node] = {}
    for pruned in sorted({pruned_from is not None and i >= pruned_from for i in cfg.layers}):
        keep = pruning_index(edit.layers, pruned_from) if pruned else None
        with graph.inserting_after(keep if keep is not None else edit.last_input):
            text_idx[pruned] = graph.call_function(
                text_rows, (inputs["input_ids"], inputs["visual_rows"], keep)
            )
    shared: dict[tuple[fx.Node, int], fx.Node] = {}
    for i in sorted(set(cfg.layers) - set(skipped)):
        reason = check_frozen_rewrite(anatomy[i])
        if reason:
            raise RuntimeError(f"shortv cannot rewrite layer {i}: {reason}")
        pruned = pruned_from is not None and i >= pruned_from
        freeze_layer(graph, anatomy[i], text_idx[pruned], shared)
    frozen = sorted(set(cfg.layers) - set(skipped))
    return PassResult(
        replan(edit.finish(), frozen, visual_computed=False),
        {
            "frozen_layers": frozen,
            "order_from": cfg.order_from,
            "visual_tokens": sorted({held[i] for i in cfg.layers}),
            **(
                {"skipped_layers": skipped, "skipped_why": "no visual rows left (after an exit)"}
                if skipped
                else {}
            ),
        },
    )


# ----------------------------------------------------------------------------------------------
# Eager reference: the HF model with hooks (used by tests, `mllmc verify` and calibration).


@contextlib.contextmanager
def keep_rows(
    model: LlavaForConditionalGeneration, layers: Sequence[int], rows: str = "visual"
) -> Iterator[None]:
    """Make HF decoder layers `layers` pass their `rows` ("visual" or "text") through unchanged
    during prefill: layer output = layer input on those rows. With rows="visual" this is ShortV's
    frozen layer (text rows, keys and values are computed exactly as in a full layer); it is also
    Layer Contribution's ablation ("zero the residual updates at those positions")."""
    import torch

    image_token_id = model.config.image_token_id
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def capture_ids(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["mask"] = None if ids is None else (ids[0] == image_token_id)  # (n,) bool

    def restore(_module, args, kwargs, output):
        h_in = kwargs.get("hidden_states", args[0] if args else None)
        h_out = output[0] if isinstance(output, tuple) else output
        mask = state["mask"]
        kept = kept_rows(model)  # a pruning pass's reference dropped rows before this layer
        if mask is not None and h_in is not None and kept is not None:
            if h_in.shape[1] == kept.shape[0] != mask.shape[0]:
                mask = mask.index_select(0, kept)
        if mask is None or h_in is None or h_in.shape[1] != mask.shape[0] or h_in.shape[1] == 1:
            return output  # decode step or no image: nothing to keep
        keep = mask if rows == "visual" else ~mask
        new = torch.where(keep[None, :, None], h_in, h_out)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    decoder_layers = model.model.language_model.layers
    handles = [model.register_forward_pre_hook(capture_ids, with_kwargs=True)]
    handles += [decoder_layers[i].register_forward_hook(restore, with_kwargs=True) for i in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def reference(
    model: LlavaForConditionalGeneration, info: ModelInfo, cfg: ShortVConfig
) -> contextlib.AbstractContextManager[None]:
    return keep_rows(model, cfg.layers or (), rows="visual")


# the registry entry: the rewrite, its config, preparation, option check and eager reference
PASS = PassInfo("shortv", shortv, ShortVConfig, SUMMARY, "in_llm", prepare, check, reference)
