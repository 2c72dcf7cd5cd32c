"""Capture of Qwen2-VL and Qwen2.5-VL: the vision segment, the 3-D rotary positions (M-RoPE)
of the decoder, and the model's record.

    vision : pixel_values        (N, C·tp·p·p) float32  the patches of every image, as
                                                         Qwen2VLImageProcessor lays them out
             vision_position_ids (N, 2) int64           each patch's (row, column) in its image
             cu_seqlens          (I + 1,) int32         where each image's patches start and end
             window_index        (N / 4,) int64         Qwen2.5-VL: the merged tokens in window
             cu_window_seqlens   (W + 1,) int32         order, and where each window's patches
                                                         start and end
          -> image_features      (N / 4, d)             one row per 2 x 2 patches, image order

The data-dependent inputs are what `transformers.vision_utils` computes from `image_grid_thw`
(`get_vision_position_ids`, `get_vision_cu_seqlens`, `get_vision_window_index`), which the HF
model also accepts precomputed; the runtime computes the same in numpy. Inside the graph:
attention within each image is a block-diagonal mask built from the boundaries (each patch's
segment is the count of boundaries at or before it: a comparison and a sum, no NonZero, no
split). Qwen2.5-VL's windowed blocks attend window by window, as HF does: the patches are
gathered into windows padded to the most a window can hold (`WindowLayout.rows`: 64 patches
for 112 px windows of 14 px patches), one batched attention runs over the windows with the
padding masked, and a gather puts the rows back (`WindowLayout`). Attending under an N x N
block-diagonal mask instead would compute the whole N x N score matrix: at 672 x 672 px
(2,304 patches, 36 windows) 36 times the windowed FLOPs; small-qwen2.5-vl's vision segment took
6.4 s that way on a 2-core VM, 5.2 s window by window.
The windowed blocks and the full-attention ones (`fullatt_block_indexes`) are chosen per
block, and the inverse of the window order is a scatter of the positions (what HF's argsort of
`window_index` gives). N, I and W are dynamic: one graph serves any number of images of any
size.

The decoder's rotary embedding takes position ids (3, B, T) (temporal, height, width) and
gives cos/sin (B, 1, T, hd) as HF's `Qwen2VLRotaryEmbedding` does (`mrope_section` chunks of
the frequencies from the three axes in turn), so the decoder layers and every pass that
gathers cos/sin rows are the same as for 1-D positions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllmc.runtime.errors import UserError
from mllmc.runtime.manifest import ModelInfo

# the side of the square image the layer plan and FLOPs are stated for (clamped to what the
# checkpoint's processor allows)
REFERENCE_IMAGE_SIDE = 448
VISION_INPUTS = ["pixel_values", "vision_position_ids", "cu_seqlens"]
WINDOW_INPUTS = ["window_index", "cu_window_seqlens"]


# ----------------------------------------------------------------------------------------------
# M-RoPE


class MRope(nn.Module):
    """cos/sin tables for 3-D position ids from HF's Qwen2-VL rotary embedding: its inverse
    frequencies, attention scaling and `mrope_section`."""

    def __init__(self, rotary_emb: nn.Module):
        super().__init__()
        self.register_buffer("inv_freq", rotary_emb.inv_freq.detach().clone(), persistent=False)
        self.attention_scaling = float(getattr(rotary_emb, "attention_scaling", 1.0))
        self.section = [int(s) for s in rotary_emb.mrope_section]

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (3, B, T) int64 -> cos, sin: (B, 1, T, hd), angles in fp32 as HF's
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (3, B, T, hd/2)
        cos = self._recompose(freqs.cos() * self.attention_scaling)
        sin = self._recompose(freqs.sin() * self.attention_scaling)
        return cos.to(dtype), sin.to(dtype)

    def _recompose(self, freq: torch.Tensor) -> torch.Tensor:
        # (3, B, T, hd/2) -> (B, 1, T, hd): section i of the frequencies from axis i % 3
        parts = freq.split(self.section, dim=-1)
        freq = torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1)
        return torch.cat((freq, freq), dim=-1)[:, None]


def is_mrope(info: ModelInfo) -> bool:
    """Whether the model's rotary positions are 3-D (Qwen2-VL, Qwen2.5-VL)."""
    return bool(info.mrope_section)


def rope_positions(info: ModelInfo, positions: torch.Tensor) -> torch.Tensor:
    """1-D positions (B, T) as the decoder takes them: (3, B, T), every axis equal, for M-RoPE
    (a text row's three positions are the same); unchanged otherwise."""
    return positions[None].expand(3, -1, -1).contiguous() if is_mrope(info) else positions


# ----------------------------------------------------------------------------------------------
# The vision segment


def segment_of(cu_seqlens: torch.Tensor, n: Any) -> torch.Tensor:
    """(n,) int64: each row's segment, for segments [cu_seqlens[i], cu_seqlens[i + 1]) with
    cu_seqlens[0] = 0: the number of boundaries at or before the row, less one (a comparison
    and a sum: no NonZero, no split)."""
    rows = torch.arange(n, device=cu_seqlens.device)
    return (rows[:, None] >= cu_seqlens[None, :].to(rows.dtype)).sum(-1) - 1


def segment_mask(cu_seqlens: torch.Tensor, n: Any, dtype: torch.dtype) -> torch.Tensor:
    """(n, n) additive mask: 0 between rows of one segment (`segment_of`), the most negative
    float elsewhere."""
    segment = segment_of(cu_seqlens, n)
    same = segment[:, None] == segment[None, :]
    return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill(
        ~same, torch.finfo(dtype).min
    )


def vision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's `apply_rotary_pos_emb_vision` on one tensor: x (N, H, hd), cos/sin (N, hd), in fp32."""
    dtype = x.dtype
    x = x.float()
    cos, sin = cos[:, None].float(), sin[:, None].float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(dtype)


class WindowLayout(nn.Module):
    """Where each patch sits when the N patches (in window order) are laid out as windows of
    `rows` rows, each window padded at its end: cu_window_seqlens (W + 1,) ->
    `index` ((W + 1) * rows,) the patch each slot reads (a padding slot reads its window's
    first patch, or the last patch), `bias` (W + 1, 1, 1, rows) 0 on a window's patches and the
    most negative float on its padding (the attention's mask), `slot` (N,) the slot of each
    patch (to gather the rows back). Window w holds patches cu[w] <= r < cu[w + 1], at most
    `rows` of them (HF's `get_vision_window_index` makes none larger, for any grid: a test
    holds it so); a patch's window is its `segment_of` the boundaries.
    The layout has one window more than `cu_window_seqlens` describes, empty (it starts and
    ends at N): sizes of W + 1 >= 2 rows keep the exported graph valid for a single window (a
    size-W tensor would make the tracer assume W >= 2). FLOPs counted on the graph include the
    padding slots and that window."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows

    def forward(self, cu_window_seqlens: torch.Tensor, n: Any, dtype: torch.dtype):
        starts = cu_window_seqlens.to(torch.int64)  # (W + 1,)
        bounds = torch.arange(starts.shape[0], device=starts.device)
        ends = starts.index_select(0, (bounds + 1).clamp(max=starts.shape[0] - 1))
        j = torch.arange(self.rows, device=starts.device)
        valid = j[None, :] < (ends - starts)[:, None]  # (W + 1, rows)
        last = (starts[-1:] - 1).clamp(min=0)  # a padding slot of the empty window reads a patch
        index = torch.where(valid, starts[:, None] + j[None, :], starts.clamp(max=last)[:, None])
        bias = torch.zeros(valid.shape, dtype=dtype, device=starts.device).masked_fill(
            ~valid, torch.finfo(dtype).min
        )
        window = segment_of(starts, n)  # (N,)
        patches = torch.arange(n, device=starts.device)
        slot = window * self.rows + patches - starts.index_select(0, window)
        return index.reshape(-1), bias[:, None, None, :], slot


class VisionBlock(nn.Module):
    """One Qwen2-VL / Qwen2.5-VL vision block over HF's own submodules: h (N, D), cos/sin
    (N, hd), and either mask (N, N) additive (attention over all N rows under it) or
    windows = `WindowLayout`'s (index, bias, slot) (attention within each window) -> h (N, D)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1 = block.norm1
        self.attn = block.attn  # its qkv and proj
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.num_heads = int(block.attn.num_heads)
        self.scaling = float(block.attn.scaling)

    def forward(self, h, cos, sin, mask=None, windows=None):
        n = h.shape[0]
        qkv = self.attn.qkv(self.norm1(h)).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3)
        q, k, v = qkv.unbind(0)  # (N, H, hd) each
        q, k = vision_rope(q, cos, sin), vision_rope(k, cos, sin)
        if windows is None:
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, N, hd)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)[0]
            o = o.transpose(0, 1)  # (N, H, hd)
        else:
            index, bias, slot = windows
            rows = bias.shape[-1]
            q, k, v = (  # (W + 1, H, rows, hd)
                t.index_select(0, index).reshape(-1, rows, self.num_heads, t.shape[-1])
                .transpose(1, 2)
                for t in (q, k, v)
            )  # fmt: skip
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scaling)
            o = o.transpose(1, 2).reshape(-1, self.num_heads, o.shape[-1]).index_select(0, slot)
        h = h + self.attn.proj(o.reshape(n, -1))
        return h + self.mlp(self.norm2(h))


class QwenVisionSegment(nn.Module):
    """The Qwen2-VL / Qwen2.5-VL vision tower and merger over every image's patches (module
    docstring). HF's `patch_embed`, block norms, projections, MLPs and `merger` are used as
    they are; the attention (under explicit masks, or window by window: `WindowLayout`) and
    the rotary tables are written out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        visual = model.model.visual
        self.patch_embed = visual.patch_embed
        self.blocks = nn.ModuleList(VisionBlock(b) for b in visual.blocks)
        self.merger = visual.merger
        rotary = visual.rotary_pos_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone(), persistent=False)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.unit = int(visual.spatial_merge_size) ** 2
        self.windowed = hasattr(visual, "fullatt_block_indexes")
        self.full_blocks = set(getattr(visual, "fullatt_block_indexes", None) or ())
        if self.windowed:  # HF's get_window_index: windows of this many merged tokens a side
            side = (
                int(visual.window_size) // int(visual.spatial_merge_size) // int(visual.patch_size)
            )
            self.window_layout = WindowLayout(side * side * self.unit)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (N, 2) (row, column) -> cos, sin (N, hd) in fp32, as HF's vision rotary."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # (N, 2, hd/4)

        def recompose(f: torch.Tensor) -> torch.Tensor:
            hw = torch.cat((f[:, 0], f[:, 1]), dim=-1)
            return torch.cat((hw, hw), dim=-1)

        cos, sin = freqs.cos() * self.rope_scaling, freqs.sin() * self.rope_scaling
        return recompose(cos), recompose(sin)

    def in_windows(self, x: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        """Rows of x (N, k) grouped by merged token (`unit` rows each) in window order."""
        n = x.shape[0]
        return x.reshape(n // self.unit, self.unit, -1).index_select(0, window_index).reshape(n, -1)

    def forward(
        self,
        pixel_values,
        vision_position_ids,
        cu_seqlens,
        window_index=None,
        cu_window_seqlens=None,
    ):
        h = self.patch_embed(pixel_values)  # (N, D)
        n = h.shape[0]
        cos, sin = self.rope_tables(vision_position_ids)
        full = segment_mask(cu_seqlens, n, h.dtype)
        windows = None
        if self.windowed:
            h = self.in_windows(h, window_index)
            cos, sin = self.in_windows(cos, window_index), self.in_windows(sin, window_index)
            windows = self.window_layout(cu_window_seqlens, n, h.dtype)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if not self.windowed or i in self.full_blocks:
                h = block(h, cos, sin, full)
            elif i == last:
                # the last block's attention is what the pre-LLM scorer reads (passes/vispruner.py:
                # the attention each patch receives, under an N x N mask); released Qwen2.5-VL
                # checkpoints attend fully there, so this form costs them nothing
                h = block(h, cos, sin, segment_mask(cu_window_seqlens, n, h.dtype))
            else:
                h = block(h, cos, sin, windows=windows)
        features = self.merger(h)  # (N / unit, d)
        if not self.windowed:
            return features
        order = torch.arange(window_index.shape[0], device=window_index.device)
        inverse = torch.zeros_like(window_index).index_copy(0, window_index, order)
        return features.index_select(0, inverse)


def vision_inputs(
    info: ModelInfo, grids: list[tuple[int, int, int]], seed: int = 2
) -> tuple[torch.Tensor, ...]:
    """Random patches for images of (t, h, w) patch grids `grids` and the vision segment's
    other inputs for them, as `transformers.vision_utils` computes them."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    grid = torch.tensor(grids, dtype=torch.int64)
    n = int(grid.prod(-1).sum())
    width = 3 * info.temporal_patch_size * info.vision_patch_size**2
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, width, generator=gen)
    inputs = [pixels, get_vision_position_ids(grid, info.spatial_merge_size).to(torch.int64)]
    inputs.append(get_vision_cu_seqlens(grid).to(torch.int32))
    if info.vision_window_size:
        index, cu_windows = get_vision_window_index(
            grid, info.spatial_merge_size, info.vision_window_size, info.vision_patch_size
        )
        inputs += [index.to(torch.int64), cu_windows.to(torch.int32)]
    return tuple(inputs)


def example_grids(info: ModelInfo) -> list[tuple[int, int, int]]:
    """Two images of different, non-square grids (each side a multiple of the merge size, > 1
    merged token, several windows for Qwen2.5-VL)."""
    m = info.spatial_merge_size
    return [(1, 2 * m, 4 * m), (1, 3 * m, 2 * m)]


def vision_dynamic_shapes(windowed: bool, unit: int = 4) -> tuple[dict[int, Any], ...]:
    """N = unit·merged patches (the merger takes `unit` = 2 x 2 at a time), I + 1 image and
    W + 1 window bounds."""
    merged = torch.export.Dim("merged", min=1, max=1 << 16)
    bounds = torch.export.Dim("image_bounds", min=2, max=1 << 12)
    dyn = [{0: unit * merged}, {0: unit * merged}, {0: bounds}]
    if windowed:
        dyn += [{0: merged}, {0: torch.export.Dim("window_bounds", min=2, max=1 << 16)}]
    return tuple(dyn)


def export_qwen_vision(model: nn.Module, info: ModelInfo) -> Any:
    """The vision segment (`QwenVisionSegment`) over any number of images of any size."""
    from .capture import Segment, on_model

    seg = QwenVisionSegment(model).eval()
    args = on_model(model, vision_inputs(info, example_grids(info)))
    dyn = vision_dynamic_shapes(seg.windowed, seg.unit)
    with torch.no_grad():
        ep = torch.export.export(seg, args, dynamic_shapes=dyn, strict=False)
    names = VISION_INPUTS + (WINDOW_INPUTS if seg.windowed else [])
    return Segment("vision", ep, names, ["image_features"], args, dyn)


# ----------------------------------------------------------------------------------------------
# HF's inputs (the eager oracle's)


def chat_template(model_dir: str | Path) -> str | None:
    """The checkpoint's chat template: chat_template.json's (legacy), else chat_template.jinja,
    as transformers' processors look for it."""
    root = Path(model_dir)
    if (root / "chat_template.json").is_file():
        return json.loads((root / "chat_template.json").read_text()).get("chat_template")
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text()
    return None


class QwenProcessor:
    """What `Qwen2VLProcessor` does for images and text, from transformers' own classes (the
    image processor, `Qwen2Tokenizer`, the chat template): its class itself needs torchvision
    (for its video processor), these do not. Called as HF processors are
    (`processor(images=[...], text=..., return_tensors="pt")`): each `<|image_pad|>` in the text
    is repeated grid.prod() / merge² times for its image, and `mm_token_type_ids` marks them."""

    image_token = "<|image_pad|>"

    def __init__(self, model_dir: str | Path):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.image_processor = AutoImageProcessor.from_pretrained(str(model_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.tokenizer.chat_template = chat_template(model_dir) or self.tokenizer.chat_template
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def __call__(self, images: Any = None, text: str = "", return_tensors: str = "pt") -> Any:
        from transformers import BatchFeature

        data: dict[str, Any] = {}
        if images:
            pixels = self.image_processor(images=images, return_tensors="pt")
            data.update(pixels)
            merge = self.image_processor.merge_size**2
            counts = (pixels["image_grid_thw"].prod(-1) // merge).tolist()
            head, *tails = text.split(self.image_token)
            if len(tails) != len(counts):
                raise ValueError(
                    f"{len(tails)} {self.image_token} in the text, {len(counts)} images"
                )
            text = head + "".join(
                self.image_token * c + t for c, t in zip(counts, tails, strict=True)
            )
        ids = torch.tensor([self.tokenizer(text)["input_ids"]])
        data.update(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == self.image_token_id).int(),
        )
        return BatchFeature(data, tensor_type=return_tensors)


# ----------------------------------------------------------------------------------------------
# The model's record


def pixel_bounds(model_dir: str | Path) -> tuple[int, int]:
    """(min_pixels, max_pixels) of the checkpoint's image processor, read as transformers does:
    `size.shortest_edge` / `size.longest_edge`, overridden by `min_pixels` / `max_pixels`."""
    path = Path(model_dir, "preprocessor_config.json")
    low, high = 56 * 56, 28 * 28 * 1280  # Qwen2VLImageProcessor's defaults
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"corrupt {path}: {e}") from None
    size = data.get("size") if isinstance(data.get("size"), dict) else {}
    low = data.get("min_pixels") or size.get("shortest_edge") or low
    high = data.get("max_pixels") or size.get("longest_edge") or high
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (low, high)):
        raise UserError(f"corrupt {path}: min_pixels / max_pixels must be positive integers")
    return low, high


def reference_grid(config: Any, model_dir: str | Path) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of the reference image: REFERENCE_IMAGE_SIDE px square, resized
    as Qwen2VLImageProcessor resizes it within the checkpoint's pixel bounds."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    vc = config.vision_config
    low, high = pixel_bounds(model_dir)
    side = REFERENCE_IMAGE_SIDE
    h, w = smart_resize(side, side, vc.patch_size * vc.spatial_merge_size, low, high)
    return 1, h // vc.patch_size, w // vc.patch_size


def qwen_model_info(model: nn.Module, model_dir: str | Path) -> ModelInfo:
    """The ModelInfo of a loaded Qwen2-VL / Qwen2.5-VL model; `visual_tokens` and `image_size`
    are the reference image's rows and side (its grid's rows after the 2 x 2 merge)."""
    from .capture import decoder_fields

    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    t, h, w = reference_grid(cfg, model_dir)
    rows = t * h * w // vc.spatial_merge_size**2
    width = getattr(vc, "embed_dim", None) if cfg.model_type == "qwen2_vl" else vc.hidden_size
    return ModelInfo(
        **decoder_fields(model, model_dir),
        visual_tokens=rows,
        image_size=h * vc.patch_size,
        vision_hidden_size=int(width),
        vision_layers=vc.depth,
        vision_patch_size=vc.patch_size,
        reference_visual_rows=rows,
        reference_tiles=1,
        vision_start_token_id=int(cfg.vision_start_token_id),
        spatial_merge_size=int(vc.spatial_merge_size),
        temporal_patch_size=int(vc.temporal_patch_size),
        tokens_per_second=int(getattr(vc, "tokens_per_second", 0) or 0),
        mrope_section=tuple(int(s) for s in tc.rope_parameters.get("mrope_section", (16, 24, 24))),
        vision_window_size=int(getattr(vc, "window_size", 0) or 0),
    )


def reference_vision_inputs(info: ModelInfo) -> tuple[torch.Tensor, ...]:
    """The vision segment's inputs for the reference image (what its FLOPs are counted at)."""
    side = info.image_size // info.vision_patch_size
    return vision_inputs(info, [(1, side, side)])
