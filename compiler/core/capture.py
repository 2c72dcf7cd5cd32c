"""Capture: a Hugging Face LLaVA / LLaVA-NeXT directory -> three `torch.export` segments.

    vision  : pixel_values (T, 3, S, S) tiles            -> image_features (T, K, d)
                                                          (+ image_newline (d,): LLaVA-NeXT)
    prefill : input_ids (1, n), image_features (1, V, d), visual_rows (V,), position_ids (1, n),
              attention_mask (1, n)                    -> logits (1, vocab), present K/V per layer
    decode  : input_ids (B, 1), position_ids (B, 1), cache_pad (L, B), past K/V per layer
              (B, kvh, P_l, hd), B samples each left-padded by cache_pad[l, b] zero rows
                                                       -> logits (B, vocab), present K/V per layer

and, on demand, the same decode step over fixed-capacity cache buffers
(`export_static_cache_decode`: the shapes a CUDA graph needs, and rows a runner writes in place,
run by runtime/static_cache.py and runtime/inplace_cache.py behind the decode contract above).

The model is loaded with the same code a user's real model goes through
(`LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration.from_pretrained`), and every weight stays an HF module: the
segments below only re-write the *forward* of the decoder, op by op, so that the exported graph is
static (no data-dependent image-token search, no DynamicCache object, no NonZero), and so that each
node keeps an `nn_module_stack` entry that says which layer and which projection it belongs to
(`layers.3.self_attn.q_proj`): `compiler/core/locator.py` reads that to find what a pass rewrites.

What we take from transformers and what we write ourselves:
- taken: config parsing, weight loading, the vision tower (CLIPVisionModel, exported as is), the
  projector, RMSNorm, the MLP modules, the rotary inverse frequencies (`rotary_emb.inv_freq` and
  `attention_scaling`, so every static rope scaling type HF knows is honoured).
- written here: the decoder layer loop, attention with an explicit KV cache in tensors, the causal
  mask from positions (with the sliding window HF's Mistral and Qwen2 apply, per layer, see
  `layer_windows`), the splice of image features at the prompt's `visual_rows`. `transformers.exporters`
  (5.13+) exports a language model with its DynamicCache patched for export, but its graphs
  carry HF's mask machinery and cache classes, which a pass would have to see through, and it has
  no vision component; the explicit forward here is ~60 lines and gives the passes a graph whose
  anatomy is plain (docs/architecture.md, "Data flow").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mllmc.runtime.errors import UserError
from mllmc.runtime.images import MAX_TILES
from mllmc.runtime.layout import MIN_TEXT_ROWS, placeholder_mismatch
from mllmc.runtime.manifest import STATIC_DECODE_INPUTS, LayerPlan, ModelInfo, StepInputs
from mllmc.runtime.step_inputs import HostStepInputs, fused_input_names

from .families import family
from .fused_attention import INPLACE_PREFIX, group_query_attention
from .fused_attention import supported as fused_attention_supported
from .fused_norm import rms_norm, skip_rms_norm
from .model_dir import (  # noqa: F401  (also importable from capture)
    MAX_SEQ,
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_TEXT_MODELS,
    SUPPORTED_VISION_MODELS,
    config_hash,
    read_config,
    supported_text,
    visual_token_count,
)
from .qwen_vl import (
    MRope,
    export_qwen_vision,
    is_mrope,
    qwen_model_info,
    rope_positions,
)

log = logging.getLogger(__name__)

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def layer_windows(text_config: Any) -> list[int | None]:
    """Per decoder layer, the sliding attention window W of the parsed text config (a query sees
    itself and the W - 1 keys before it), or None for full causal attention; what HF's modeling
    code for the decoder applies:

    - mistral: `config.sliding_window` in every layer (MistralConfig's default is 4096 when
      config.json has no such key; None disables it);
    - qwen2: `config.sliding_window` in the layers `config.layer_types` marks
      "sliding_attention" (Qwen2Config derives them from `use_sliding_window` and
      `max_window_layers`, and sets the window to None unless `use_sliding_window`);
    - llama: none."""
    num_layers = int(text_config.num_hidden_layers)
    model_type = getattr(text_config, "model_type", "llama")
    window = getattr(text_config, "sliding_window", None)
    if model_type == "mistral":
        sliding = [True] * num_layers
    elif model_type in ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text"):
        types = list(getattr(text_config, "layer_types", None) or ["full_attention"] * num_layers)
        sliding = [t == "sliding_attention" for t in types]
        if any(sliding) and window is None:
            raise UserError(
                "the qwen2 config marks layers as sliding_attention but sets no sliding_window "
                "(set use_sliding_window: true and sliding_window, or drop layer_types)"
            )
    else:
        return [None] * num_layers
    if window is None or not any(sliding):
        return [None] * num_layers
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UserError(
            f"sliding_window must be an integer >= 1 in the text config, got {window!r}"
        )
    return [window if s else None for s in sliding]


def load_model(model_dir: str | Path) -> tuple[nn.Module, ModelInfo]:
    """Load a model directory of a supported family in fp32 eval mode, with the transformers
    class a user would load it with; returns (model, info)."""
    cfg = read_config(model_dir)
    model_class = family(cfg["model_type"]).model_class()
    try:
        model = model_class.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    except Exception as e:  # corrupt weights raise safetensors', torch's or HF's own errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model from {model_dir}: {first}") from None
    return model, model_info(model, model_dir)


def model_info(model: nn.Module, model_dir: str | Path) -> ModelInfo:
    cfg = model.config
    if family(cfg.model_type).mrope:
        return qwen_model_info(model, model_dir)
    tc, vc = cfg.text_config, cfg.vision_config
    rope = getattr(tc, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in STATIC_ROPE_TYPES:
        raise UserError(
            f"rope type {rope.get('rope_type')!r} is not supported; supported: "
            f"{', '.join(STATIC_ROPE_TYPES)}"
        )
    if isinstance(cfg.vision_feature_layer, (list, tuple)):
        raise UserError("multi-layer vision_feature_layer is not supported yet; use one layer")
    strategy = cfg.vision_feature_select_strategy
    num_visual = visual_token_count(vc.image_size, vc.patch_size, strategy)
    if num_visual is None:
        raise UserError(f"vision_feature_select_strategy {strategy!r} is not supported")
    reference_rows, reference_tiles = family(cfg.model_type).reference(cfg)
    return ModelInfo(
        **decoder_fields(model, model_dir),
        visual_tokens=num_visual,
        image_size=vc.image_size,
        vision_hidden_size=vc.hidden_size,
        vision_layers=vc.num_hidden_layers,
        vision_patch_size=vc.patch_size,
        vision_feature_select_strategy=strategy,
        reference_visual_rows=reference_rows,
        reference_tiles=reference_tiles,
    )


def decoder_fields(model: nn.Module, model_dir: str | Path) -> dict[str, Any]:
    """The ModelInfo fields every family takes alike: its files, its decoder's shape, its
    image token and end-of-sequence ids. Refuses a sliding window HF itself cannot apply."""
    cfg = model.config
    tc = cfg.text_config
    layer_windows(tc)  # a window HF itself cannot apply is refused here, before capture
    eos = model.generation_config.eos_token_id if model.generation_config else tc.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    return {
        "model_dir": str(Path(model_dir).resolve()),
        "config_hash": config_hash(model_dir),
        "model_type": cfg.model_type,
        "num_layers": tc.num_hidden_layers,
        "hidden_size": tc.hidden_size,
        "num_heads": tc.num_attention_heads,
        "num_kv_heads": tc.num_key_value_heads or tc.num_attention_heads,
        "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
        "intermediate_size": tc.intermediate_size,
        "vocab_size": tc.vocab_size,
        "image_token_id": cfg.image_token_id,
        "eos_token_ids": tuple(int(e) for e in eos_ids),
        "text_model_type": tc.model_type,
        "max_position_embeddings": int(getattr(tc, "max_position_embeddings", 0) or 0),
    }


# ----------------------------------------------------------------------------------------------
# Segment modules. They hold the HF submodules (same parameters, same names under `layers.i`).


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, T, hd); cos/sin: (B, 1, T, hd)
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (B, kv_heads, S, hd) -> (B, kv_heads * n_rep, S, hd), head h reading kv head h // n_rep as
    # HF's repeat_kv does. A gather rather than HF's expand + reshape: torch.export cannot
    # prove the stride guard that reshape of the expanded view adds (Min(hd*S, n_rep*hd*S)) for a
    # dynamic S, and the copy costs the same
    if n_rep == 1:
        return x
    heads = torch.arange(x.shape[1] * n_rep, device=x.device) // n_rep
    return x.index_select(1, heads)


# HF's Llama-style RMSNorm classes: weight * x / sqrt(mean(x^2) + eps), computed in fp32
RMS_NORMS = frozenset(
    {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen2VLRMSNorm", "Qwen2_5_VLRMSNorm"}
)


class RMSNorm(nn.Module):
    """HF's RMSNorm (the same weight, the same function) written with a division: onnxruntime
    fuses this form into one SimplifiedLayerNormalization node, where HF's rsqrt-and-multiply
    stays seven nodes per norm (a decode step launches two norms a layer)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight  # the same Parameter, under the same name
        self.eps = float(norm.variance_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def fusable_norm(norm: nn.Module) -> nn.Module:
    """`RMSNorm` in place of one of HF's float32 `RMS_NORMS` (the ONNX target's dtype, where
    onnxruntime fuses it); any other norm, or one in another dtype, as it is (in half precision
    a division and HF's rsqrt can round the last bit apart)."""
    fusable = type(norm).__name__ in RMS_NORMS and norm.weight.dtype == torch.float32
    return RMSNorm(norm) if fusable else norm


class Rope(nn.Module):
    """cos/sin tables for explicit positions from HF's inverse frequencies (static rope types)."""

    def __init__(self, rotary_emb: nn.Module):
        super().__init__()
        self.register_buffer("inv_freq", rotary_emb.inv_freq.detach().clone(), persistent=False)
        self.attention_scaling = float(getattr(rotary_emb, "attention_scaling", 1.0))

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, T) int64 -> cos, sin: (B, 1, T, hd) in `dtype`; the angles are
        # computed in fp32 whatever the model's dtype, as HF's rotary embedding does
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        cos = (emb.cos() * self.attention_scaling)[:, None]
        sin = (emb.sin() * self.attention_scaling)[:, None]
        return cos.to(dtype), sin.to(dtype)


class DecoderLayer(nn.Module):
    """One Llama-style decoder layer, op by op, holding the HF layer's own submodules.

    Shapes: h (B, T, d); cos/sin (B, 1, T, hd); mask (B, 1, T, S) bool or None;
    past_k/past_v (B, kvh, P, hd) or None; returns h (B, T, d), k/v (B, kvh, P + T, hd).
    With `cache_len` (1,) int64 (static-cache decode, T = 1): past_k/past_v are buffers of C rows
    of which rows cache_pad[b] <= row < cache_len hold sample b's cache (`cache_pad` (B,), None:
    from row 0), and k/v returned are this token's row only (B, kvh, 1, hd), for the caller to
    write at row cache_len (see `attend_static_cache`).
    Views use -1 for the row count, so a pass may hand a projection fewer rows.
    """

    def __init__(self, hf_layer: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.input_layernorm = fusable_norm(hf_layer.input_layernorm)
        self.self_attn = hf_layer.self_attn
        self.post_attention_layernorm = fusable_norm(hf_layer.post_attention_layernorm)
        self.mlp = hf_layer.mlp
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = float(getattr(hf_layer.self_attn, "scaling", head_dim**-0.5))
        self.window: int | None = None  # sliding window, for the static-cache decode step

    def forward(self, h, cos, sin, mask, past_k=None, past_v=None, cache_len=None, cache_pad=None):
        b = h.shape[0]
        attn = self.self_attn
        x = self.input_layernorm(h)  # (B, T, d)
        q = attn.q_proj(x).view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)  # (B, H, T, hd)
        k = apply_rope(k, cos, sin)  # (B, kvh, T, hd)
        n_rep = self.num_heads // self.num_kv_heads
        if cache_len is not None:
            o = attend_static_cache(
                q, k, v, past_k, past_v, cache_len, self.scaling, self.window, cache_pad
            )
        else:
            if past_k is not None:
                k = torch.cat((past_k, k), dim=2)  # (B, kvh, P + T, hd)
                v = torch.cat((past_v, v), dim=2)
            if past_k is not None and n_rep > 1:
                # decode (one query row; its mask, if any, is (1, 1, 1, S) and broadcasts): the
                # n_rep query heads of a kv head become rows of one group, so the cache is read
                # once per kv head instead of being copied n_rep times (the copy and its
                # transposes are a large share of a CPU decode step)
                t = q.shape[2]
                grouped = q.reshape(b, self.num_kv_heads, n_rep * t, self.head_dim)
                o = F.scaled_dot_product_attention(
                    grouped, k, v, attn_mask=mask, scale=self.scaling
                )
                o = o.reshape(b, self.num_heads, t, self.head_dim)
            else:
                o = F.scaled_dot_product_attention(
                    q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask, scale=self.scaling
                )  # (B, H, T, hd)
        o = o.transpose(1, 2).reshape(b, -1, self.num_heads * self.head_dim)  # (B, T, H*hd)
        h = h + attn.o_proj(o)
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, k, v

    def attend_fused(self, x, past_k, past_v, seqlens, total, rotary, bias):
        """The static-cache decode step's attention block (T = 1) with the rotary embedding
        and the attention as one `fused_attention.group_query_attention` operator: x (B, 1, d)
        the normed input, past_k/past_v (B, kvh, C, hd) buffers, seqlens (B,) int32 the row
        this token goes to, total () int32 = C, rotary = (cos, sin, position ids) as the
        operator takes them, bias (B, 1, 1, C) additive. Returns the block's output (o_proj's,
        before the residual add) and the buffers with this token's rows written."""
        attn = self.self_attn
        o, past_k, past_v = group_query_attention(
            attn.q_proj(x),  # (B, 1, H*hd)
            attn.k_proj(x),
            attn.v_proj(x),
            past_k,
            past_v,
            seqlens,
            total,
            *rotary,
            bias,
            self.num_heads,
            self.num_kv_heads,
            self.scaling,
        )  # (B, 1, H*hd)
        return attn.o_proj(o), past_k, past_v


def add_norm(
    residual: torch.Tensor, delta: torch.Tensor | None, norm: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + delta), residual + delta); delta None: nothing to add. A fusable
    `RMSNorm` makes the add and the norm one `fused_norm.skip_rms_norm` operator (onnxruntime's
    SkipSimplifiedLayerNormalization in the ONNX target)."""
    if delta is None:
        return norm(residual), residual
    if isinstance(norm, RMSNorm):
        return skip_rms_norm(residual, delta, norm.weight, norm.eps)
    total = residual + delta
    return norm(total), total


def attend_static_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    cache_len: torch.Tensor,
    scale: float,
    window: int | None = None,
    cache_pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query row over a fixed-capacity cache plus its own key: (B, H, 1, hd).

    q (B, H, 1, hd); k, v (B, kvh, 1, hd): this token's row; past_k/past_v (B, kvh, C, hd) whose
    rows >= cache_len (1,) are ignored, and with a sliding `window` W, the rows before
    cache_len - W + 1 too (the query sees itself and the W - 1 rows before it); with `cache_pad`
    (B,) int64, sample b's rows before cache_pad[b] too (its left padding in a batch whose
    caches all end at cache_len). The shapes do not depend on how many rows are valid, so
    one program (and one CUDA graph per capacity C) serves every decode step. Each cached row is
    read once and nothing is copied: the scores over the buffer and over the new row share one
    softmax (fp32, as HF's eager attention computes it), instead of writing the new row into a
    copy of the buffer; the caller writes it in place afterwards."""
    b, heads, _, hd = q.shape
    kvh = past_k.shape[1]
    g = q.reshape(b, kvh, heads // kvh, hd) * scale  # the n_rep heads of a kv head as rows
    scores_past = torch.matmul(g, past_k.transpose(2, 3)).float()  # (B, kvh, n_rep, C)
    rows = torch.arange(past_k.shape[2], device=q.device)  # (C,)
    valid = rows < cache_len
    if window is not None:
        valid = valid & (rows > cache_len - window)
    if cache_pad is not None:
        valid = (valid[None, :] & (rows[None, :] >= cache_pad[:, None]))[:, None, None]  # (B,1,1,C)
    scores_past = scores_past.masked_fill(~valid, float("-inf"))
    scores_new = torch.matmul(g, k.transpose(2, 3)).float()  # (B, kvh, n_rep, 1)
    probs = torch.cat((scores_past, scores_new), dim=-1).softmax(dim=-1).to(q.dtype)
    o = torch.matmul(probs[..., :-1], past_v) + probs[..., -1:] * v  # (B, kvh, n_rep, hd)
    return o.reshape(b, heads, 1, hd)


def window_allows(distance: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys a query attends to, from query position - key position: causal, and within
    the sliding `window` when there is one (HF's `sliding_window_overlay`: distance < W)."""
    allowed = distance >= 0
    return allowed if window is None else allowed & (distance < window)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where a query may attend, the most negative float elsewhere (a boolean mask makes the
    ONNX attention re-select -inf per layer and check for NaN rows, a
    large share of the prefill on the CPU)."""
    return torch.zeros_like(allowed, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


class _Decoder(nn.Module):
    def __init__(self, model: nn.Module, info: ModelInfo):
        super().__init__()
        lm = model.model.language_model
        self.embed_tokens = lm.embed_tokens
        self.layers = nn.ModuleList(
            DecoderLayer(layer, info.num_heads, info.num_kv_heads, info.head_dim)
            for layer in lm.layers
        )
        self.norm = fusable_norm(lm.norm)
        # Qwen2-VL's rotary embedding takes 3-D positions (M-RoPE)
        rotary = lm.rotary_emb
        self.rope = MRope(rotary) if hasattr(rotary, "mrope_section") else Rope(rotary)
        self.lm_head = model.lm_head
        self.image_token_id = info.image_token_id
        self.windows = layer_windows(model.config.text_config)
        for layer, window in zip(self.layers, self.windows, strict=True):
            layer.window = window

    def logits_last(self, h: torch.Tensor) -> torch.Tensor:
        # h: (B, T, d) -> logits at the last position (B, V)
        return self.lm_head(self.norm(h[:, -1, :]))


class PrefillSegment(_Decoder):
    """The prompt, laid out on the host (runtime/layout.py):

        input_ids      (1, n) int64, the prompt with one image token per visual row
        image_features (1, V, d)     every image's visual rows, in prompt order
        visual_rows    (V,) int64    the rows they occupy, ascending
        position_ids   (1, n) int64  each row's position (arange(n) for LLaVA)
        attention_mask (1, n) int64  1 for the rows the prompt holds
    -> logits (1, vocab) at the last row, then k_0, v_0, k_1, v_1, ... (1, kvh, n, hd).

    V is a dynamic dim like n: one program serves every image count and size. The causal mask
    is built from row indices (query row >= key row, within a layer's sliding window), so it
    does not depend on the position values; positions only feed RoPE."""

    def forward(self, input_ids, image_features, visual_rows, position_ids, attention_mask):
        n = input_ids.shape[1]
        ids = torch.where(input_ids == self.image_token_id, torch.zeros_like(input_ids), input_ids)
        # the visual rows written as rows of the (n, d) embeddings (a prefill holds one prompt):
        # a copy on dim 1 of (1, n, d) is exported as a scatter between transposes of the
        # embeddings and the features, out and back (~2 ms of a 672 px Qwen2.5-VL prefill)
        h = self.embed_tokens(ids)[0]  # (n, d)
        h = h.index_copy(0, visual_rows, image_features[0].to(h.dtype))[None]  # (1, n, d)
        cos, sin = self.rope(position_ids, h.dtype)
        # one mask per distinct window (a pass that drops rows gathers its rows and columns, so
        # it stays a mask over the original rows)
        rows = torch.arange(n, device=input_ids.device)
        distance = rows[:, None] - rows[None, :]  # (n, n) query row - key row
        present_keys = attention_mask[0][None, :] != 0  # (1, n)
        masks = {
            w: additive_mask(window_allows(distance, w) & present_keys, h.dtype)[None, None]
            for w in set(self.windows)
        }  # (1, 1, n, n) each
        present: list[torch.Tensor] = []
        for layer, window in zip(self.layers, self.windows, strict=True):
            h, k, v = layer(h, cos, sin, masks[window])
            present += [k, v]
        return (self.logits_last(h), *present)


class DecodeSegment(_Decoder):
    """One new token for each of B samples (B dynamic: iteration-level batching):

        input_ids    (B, 1) int64
        position_ids (B, 1) int64   each sample's position
        cache_pad    (L, B) int64   the zero rows sample b's cache of layer l starts with
        k_0, v_0, ... (B, kvh, P_l, hd)  every sample's cache of layer l, left-padded to P_l
    -> logits (B, V), present k_0, v_0, ... (B, kvh, P_l + 1, hd): the new row appended, so
    cache_pad stays the same from step to step.

    Sample b's query in layer l attends to the cache rows >= cache_pad[l, b] and to itself (with
    a sliding window W, to the last W - 1 of those and itself: a window counts rows back from
    the end, where padding never is). The rows it may not see get the most negative float
    (`additive_mask`): their softmax weights are exactly 0, so each sample's logits are the ones
    it gets alone, up to rounding. B = 1 with a zero pad is the single-sample step."""

    def forward(self, input_ids, position_ids, cache_pad, *past):
        h = self.embed_tokens(input_ids)  # (B, 1, d)
        cos, sin = self.rope(position_ids, h.dtype)
        present: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            rows = past[2 * i].shape[2]
            keys = torch.arange(rows + 1, device=h.device)  # (P + 1,) the cache rows, then the new
            allowed = keys[None, :] >= cache_pad[i][:, None]  # (B, P + 1)
            allowed = allowed & window_allows(rows - keys, self.windows[i])[None, :]
            mask = additive_mask(allowed, h.dtype)[:, None, None]  # (B, 1, 1, P + 1)
            h, k, v = layer(h, cos, sin, mask, past[2 * i], past[2 * i + 1])
            present += [k, v]
        return (self.logits_last(h), *present)


class StaticCacheDecodeSegment(_Decoder):
    """The decode step over fixed-capacity cache buffers (the shapes stay the same from step to
    step: what CUDA graphs need, and what lets a runner write each new row in place):

        input_ids    (B, 1) int64
        position_ids (B, 1) int64   ((3, B, 1) for M-RoPE)
        cache_len    (L,) int64     the rows layer l's buffers hold, padding included
        cache_pad    (L, B) int64   the zero rows sample b's cache of layer l starts with
        k_0, v_0, ... (B, kvh, C, hd)  buffers: sample b's cache of layer l is its rows
                                       cache_pad[l, b] <= row < cache_len[l]
    -> logits (B, V), then this token's k_0, v_0, ... rows (B, kvh, 1, hd), which the caller
    writes at row cache_len[l] of its buffers (runtime/static_cache.py, runtime/inplace_cache.py).
    Left padding makes every sample's cache of a layer end at the same row, so one write row a
    layer serves the batch.

    `fused`: each layer's rotary embedding and attention are one
    `fused_attention.group_query_attention` operator (onnxruntime's GroupQueryAttention in the
    ONNX target), and the step takes what those operators take instead of position_ids,
    cache_len and cache_pad (`fused_input_names`: the rotary angles, each layer's write row and
    attention bias, which the host computes from those three with `step_inputs()`,
    runtime/step_inputs.py), so that no small op runs before the first layer. Its outputs after
    the logits are the buffers with this token's rows written, `inplace.<l>.key` / `.value`
    (B, kvh, C, hd): a runner that binds them to the `past.*` buffers has the operator write the
    rows in place (runtime/inplace_cache.py)."""

    def __init__(self, model: nn.Module, info: ModelInfo, fused: bool = False):
        super().__init__(model, info)
        self.fused = fused

    def forward(self, input_ids, *inputs):
        h = self.embed_tokens(input_ids)  # (B, 1, d)
        if self.fused:
            return self._forward_fused(h, inputs)
        position_ids, cache_len, cache_pad, *past = inputs
        cos, sin = self.rope(position_ids, h.dtype)
        rows: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            h, k, v = layer(
                h, cos, sin, None, past[2 * i], past[2 * i + 1], cache_len[i : i + 1], cache_pad[i]
            )
            rows += [k, v]
        return (self.logits_last(h), *rows)

    def step_inputs(self) -> StepInputs:
        """How the host computes the fused step's inputs (`fused_input_names`): this model's
        rotary frequencies, scaling and M-RoPE axes, and its layers' sliding windows."""
        axes: tuple[int, ...] = ()
        if isinstance(self.rope, MRope):
            axes = tuple(i % 3 for i, size in enumerate(self.rope.section) for _ in range(size))
        return StepInputs(
            inv_freq=tuple(float(f) for f in self.rope.inv_freq.float()),
            rope_scaling=self.rope.attention_scaling,
            rope_axes=axes,
            windows=tuple(self.windows),
        )

    def _forward_fused(self, h, inputs):
        # the inputs `fused_input_names` lists: rotary tables (B + C, hd/2) and each sample's
        # row of them (B, 1), the capacity () int32, then each layer's write rows (B,) int32 and
        # bias (B, 1, 1, C), then the buffers
        n = len(self.layers)
        cos, sin, rotary_rows, total = inputs[:4]
        seqlens, bias, past = inputs[4 : 4 + n], inputs[4 + n : 4 + 2 * n], inputs[4 + 2 * n :]
        rotary = (cos, sin, rotary_rows)
        # the residual stream is `h + delta`: each block's output is added by the norm after it
        # (one SkipSimplifiedLayerNormalization where it is fusable)
        rows: list[torch.Tensor] = []
        delta = None
        for i, layer in enumerate(self.layers):
            x, h = add_norm(h, delta, layer.input_layernorm)
            out, k, v = layer.attend_fused(
                x, past[2 * i], past[2 * i + 1], seqlens[i], total, rotary, bias[i]
            )
            x, h = add_norm(h, out, layer.post_attention_layernorm)
            delta = layer.mlp(x)
            rows += [k, v]
        x, _ = add_norm(h, delta, self.norm)
        return (self.lm_head(x[:, -1, :]), *rows)


def fused_step_args(
    seg: StaticCacheDecodeSegment,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cache_len: torch.Tensor,
    cache_pad: torch.Tensor,
    *past: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The fused step's arguments after input_ids, for the unfused step's: the host's inputs
    (runtime/step_inputs.py, computed as a runner computes them) before the same buffers."""
    batch, capacity = past[0].shape[0], past[0].shape[2]
    dtype = past[0].dtype
    host = HostStepInputs(seg.step_inputs(), len(seg.layers), batch, capacity, np.float32)
    host.fill(input_ids.numpy(), position_ids.numpy(), cache_len.numpy(), cache_pad.numpy())
    named = host.arrays()
    args = []
    for name in fused_input_names(len(seg.layers))[1:]:
        t = torch.from_numpy(named[name].copy())
        if name.startswith("bias."):  # the floor of the buffers' dtype, as the graph's mask
            t = torch.zeros_like(t).masked_fill(t < 0, torch.finfo(dtype).min)
        args.append(t.to(dtype) if t.is_floating_point() else t)
    return (*args, *past)


class VisionSegment(nn.Module):
    """pixel_values (B, 3, S, S): B tiles (LLaVA: one per image; LLaVA-NeXT: the base image and
    its grid tiles) -> projected features (B, N, d), N the visual tokens per tile; B is dynamic.
    LLaVA-NeXT's packing of tiles into an image's rows (unpadding, one image_newline per grid
    row) is index work on the host (runtime/llava_next.py), so its segment also outputs the
    model's `image_newline` (d,) for it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.multi_modal_projector = model.model.multi_modal_projector
        self.feature_layer = model.config.vision_feature_layer
        self.drop_cls = model.config.vision_feature_select_strategy == "default"
        self.image_newline = getattr(model.model, "image_newline", None)

    def forward(self, pixel_values):
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer]  # (B, 1 + patches, dv)
        if self.drop_cls:
            feats = feats[:, 1:]
        feats = self.multi_modal_projector(feats)  # (B, N, d)
        if self.image_newline is None:
            return feats
        return feats, self.image_newline.to(feats.dtype)


# ----------------------------------------------------------------------------------------------
# Export


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


@dataclass
class Segment:
    """One exported segment: its program, IO names, and the example inputs + dynamic shapes it was
    exported with (a rewritten graph is re-exported with the same)."""

    name: str
    program: torch.export.ExportedProgram
    input_names: list[str]
    output_names: list[str]
    example_inputs: tuple[torch.Tensor, ...]
    dynamic_shapes: Any
    # a fused static decode's: how the host computes its inputs (written to the manifest entry)
    step_inputs: StepInputs | None = None


@dataclass
class Segments:
    """The captured model: three segments plus what passes record about each decoder layer.

    layer_plan[l]: what layer l holds (`LayerPlan`: visual rows in its input and KV cache,
    whether it computes its visual rows); passes replace entries, they never mutate them.
    model: the eager model the segments were captured from (they share its parameters); a
    pre-LLM pass that changes the image-span length re-captures the prefill from it.
    static_decode: the decode step over fixed-capacity cache buffers (`capture(...,
    static_decode=True)`), for engines that run decode as CUDA graphs; passes leave it as is.
    """

    info: ModelInfo
    vision: Segment
    prefill: Segment
    decode: Segment
    layer_plan: list[LayerPlan]
    model: nn.Module | None = None
    static_decode: Segment | None = None  # `export_static_cache_decode`, when asked for
    min_visual_rows: int = 1  # the fewest visual rows a prompt may have (a pass may need more)
    # Qwen2-VL: the reference image's rows a pre-LLM pass keeps (the vision segment's row count
    # depends on the image, so its graph cannot say); None: every merged token
    kept_visual_tokens: int | None = None

    def __iter__(self):
        return iter((self.vision, self.prefill, self.decode))

    @property
    def visual_tokens(self) -> int:
        """Visual tokens per image entering the LLM: the rows the vision segment outputs (for
        Qwen2-VL, whose rows depend on the image's size, the reference image's)."""
        if is_mrope(self.info):
            kept = self.kept_visual_tokens
            return self.info.visual_tokens if kept is None else kept
        out = next(n for n in self.vision.program.graph.nodes if n.op == "output").args[0][0]
        return int(out.meta["val"].shape[1])

    @property
    def reference_rows(self) -> int:
        """The visual rows of the reference image entering the LLM (what the layer plan's counts
        and the FLOPs are stated for): one tile's rows, or the family's reference image's."""
        info = self.info
        full = info.reference_visual_rows or info.visual_tokens
        # rows that are not a tile's patches (LLaVA-NeXT's newlines) stay; patches as kept
        return (
            self.visual_tokens * info.reference_tiles
            + full
            - info.visual_tokens * info.reference_tiles
        )

    @property
    def visual_tokens_per_layer(self) -> list[int]:
        return [p.visual_tokens for p in self.layer_plan]

    def replace_segment(self, seg: Segment) -> Segments:
        """A copy with one segment replaced (passes return new Segments, never mutate inputs)."""
        import copy

        new = copy.copy(self)
        new.layer_plan = list(self.layer_plan)
        setattr(new, seg.name, seg)
        return new


def reexport(seg: Segment, gm: torch.fx.GraphModule) -> Segment:
    """Re-export a rewritten (unlifted) graph module of `seg` with the same inputs and dynamic
    shapes: this re-derives every shape and dtype, and keeps `nn_module_stack` on the nodes."""
    with torch.no_grad():
        ep = torch.export.export(
            gm, seg.example_inputs, dynamic_shapes=seg.dynamic_shapes, strict=False
        )
    return replace(seg, program=ep)


def example_prefill_inputs(
    info: ModelInfo, n_text: int = 8, num_visual: int = 7
) -> tuple[torch.Tensor, ...]:
    """A prompt of n_text text tokens and two images of `num_visual` rows (at rows 2.. and after
    one text row), laid out as the runtime lays out prompts."""
    n = n_text + num_visual
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, info.image_token_id), (1, n), generator=gen)
    first = num_visual // 2
    rows = torch.cat((torch.arange(2, 2 + first), torch.arange(3 + first, 3 + num_visual)))
    ids[0, rows] = info.image_token_id
    feats = torch.randn(1, num_visual, info.hidden_size, generator=gen)
    positions = rope_positions(info, torch.arange(n)[None, :])
    return ids, feats, rows, positions, torch.ones(1, n, dtype=torch.int64)


def on_model(model: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Example inputs with float ones cast to the model's dtype (a model loaded in bf16 is
    captured in bf16)."""
    dtype = next(model.parameters()).dtype
    return tuple(a.to(dtype) if a.is_floating_point() else a for a in args)


def prefill_feeds(
    input_ids: torch.Tensor,
    image_features: torch.Tensor,
    image_token_id: int,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """The prefill's inputs for a prompt whose image tokens are already expanded (as an HF
    processor writes it, or as the runtime lays it out): input_ids (1, n), the features of its
    image-token rows (B, K, d) per tile or (1, V, d) -> (input_ids, image_features (1, V, d),
    visual_rows (V,), position_ids, attention_mask (1, n) of ones). `position_ids` default to
    arange(n) (1, n); an M-RoPE model's (3, 1, n) are the caller's (HF's `get_rope_index`)."""
    if position_ids is not None:
        *feeds, _, mask = prefill_feeds(input_ids, image_features, image_token_id)
        return (*feeds, position_ids, mask)
    n = input_ids.shape[1]
    rows = (input_ids[0] == image_token_id).nonzero()[:, 0]
    feats = image_features.reshape(1, -1, image_features.shape[-1])
    if feats.shape[1] != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} image tokens in the prompt, {feats.shape[1]} features")
    positions = torch.arange(n, device=input_ids.device)[None]
    return input_ids, feats, rows, positions, torch.ones_like(input_ids)


PREFILL_INPUTS = ["input_ids", "image_features", "visual_rows", "position_ids", "attention_mask"]


def min_visual_rows(info: ModelInfo) -> int:
    """The fewest visual rows the captured prefill takes: 0 (text-only prompts) for the M-RoPE
    families, whose prompts need not hold an image; 1 for LLaVA's."""
    return 0 if is_mrope(info) else 1


def prefill_dynamic_shapes(min_visual: int = 1, mrope: bool = False) -> tuple[dict[int, Any], ...]:
    """The prefill's dynamic dims: n rows, V visual rows, for prompts of >= MIN_TEXT_ROWS text
    rows (what the graphs' index arithmetic is traced for; the runtime refuses fewer). A pass
    whose graph holds only for
    V >= some count (FastV needs >= 2 kept rows) re-exports with that `min_visual`, and the
    manifest records it (`Manifest.min_visual_rows`) for the runtime to check. With `mrope` the
    position ids are (3, 1, n). n >= 4 also where V may be 0 (a text-only prompt): the passes'
    row gathers are traced for that many rows (every chat-templated prompt has more)."""
    n = torch.export.Dim("n", min=max(min_visual, 1) + MIN_TEXT_ROWS, max=MAX_SEQ)
    v = torch.export.Dim("visual", min=min_visual, max=MAX_SEQ - MIN_TEXT_ROWS)
    return ({1: n}, {1: v}, {0: v}, {2 if mrope else 1: n}, {1: n})


def export_prefill(model: nn.Module, info: ModelInfo) -> Segment:
    """The prefill over any prompt of n rows of which V are visual (both dynamic; for M-RoPE
    models V may be 0: a text-only prompt)."""
    seg = PrefillSegment(model, info).eval()
    args = on_model(model, example_prefill_inputs(info))
    dyn = prefill_dynamic_shapes(min_visual_rows(info), is_mrope(info))
    with torch.no_grad():
        ep = torch.export.export(seg, args, dynamic_shapes=dyn, strict=False)
    return Segment(
        "prefill",
        ep,
        list(PREFILL_INPUTS),
        ["logits", *kv_names(info.num_layers, "present")],
        args,
        dyn,
    )


def example_decode_inputs(
    info: ModelInfo, past_len: int = 12, past_lens: list[int] | None = None, batch: int = 1
) -> tuple[torch.Tensor, ...]:
    """`batch` samples, one token each at position past_len after a cache of past_len rows per
    layer, or of past_lens[l] rows in layer l (pruning passes leave layers with different cache
    lengths), no padding: (input_ids, position_ids, cache_pad, k_0, v_0, ...)."""
    lens = past_lens if past_lens is not None else [past_len] * info.num_layers
    gen = torch.Generator().manual_seed(1)
    past = [
        torch.randn(batch, info.num_kv_heads, lens[i // 2], info.head_dim, generator=gen)
        for i in range(2 * info.num_layers)
    ]
    ids = torch.full((batch, 1), 5, dtype=torch.int64)
    pos = rope_positions(info, torch.full((batch, 1), past_len, dtype=torch.int64))
    pad = torch.zeros(info.num_layers, batch, dtype=torch.int64)
    return (ids, pos, pad, *past)


DECODE_INPUTS = ["input_ids", "position_ids", "cache_pad"]


def export_decode(model: nn.Module, info: ModelInfo) -> Segment:
    """The decode step over a dynamic batch B of samples (`DecodeSegment`), traced at B = 2 (a
    size-1 example would be specialised to 1)."""
    seg = DecodeSegment(model, info).eval()
    args = on_model(model, example_decode_inputs(info, batch=2))
    batch = torch.export.Dim("batch", min=1)
    # one dynamic cache length per layer: passes may leave layers with different lengths
    dims = [torch.export.Dim.DYNAMIC for _ in range(info.num_layers)]
    past_dyn = [{0: batch, 2: dims[i // 2]} for i in range(2 * info.num_layers)]
    dyn = {
        "input_ids": {0: batch},
        "position_ids": {1 if is_mrope(info) else 0: batch},  # (3, B, 1) for M-RoPE
        "cache_pad": {1: batch},
        "past": tuple(past_dyn),
    }
    with torch.no_grad():
        ep = torch.export.export(seg, args, dynamic_shapes=dyn, strict=False)
    return Segment(
        "decode",
        ep,
        [*DECODE_INPUTS, *kv_names(info.num_layers, "past")],
        ["logits", *kv_names(info.num_layers, "present")],
        args,
        dyn,
    )


def export_static_cache_decode(model: nn.Module, info: ModelInfo, fused: bool = False) -> Segment:
    """The decode step over cache buffers of a capacity C that is dynamic in the program and
    fixed while a runner uses one set of buffers (`StaticCacheDecodeSegment`), for a dynamic
    batch B (traced at B = 2: a size-1 example would be specialised to 1). It depends on the
    model alone: no pass rewrites decode. `fused`: the fused attention's step, which takes the
    host's inputs (`fused_input_names`; the segment's `step_inputs` says how to compute them)."""
    seg = StaticCacheDecodeSegment(model, info, fused).eval()
    capacity, valid = 16, 12
    ids, pos, pad, *past = example_decode_inputs(info, past_len=capacity, batch=2)
    pad[:, 1] = 3  # the second sample left-padded
    cache_len = torch.full((info.num_layers,), valid, dtype=torch.int64)
    cap = torch.export.Dim("capacity", min=2)  # no upper bound, as the growing decode's
    batch = torch.export.Dim("batch", min=1)
    buffers = tuple({0: batch, 2: cap} for _ in range(2 * info.num_layers))
    if fused:
        args = on_model(model, (ids, *fused_step_args(seg, ids, pos, cache_len, pad, *past)))
        n = info.num_layers
        tables = {0: torch.export.Dim("rotary_len", min=3)}  # B + C rows
        rest = (tables, tables, {0: batch}, None, *({0: batch},) * n)
        rest += (*({0: batch, 3: cap},) * n, *buffers)
        dyn: dict[str, Any] = {"input_ids": {0: batch}, "inputs": rest}
        names = [*fused_input_names(n), *kv_names(n, "past")]
    else:
        args = on_model(model, (ids, pos, cache_len, pad, *past))
        position = {1 if is_mrope(info) else 0: batch}
        dyn = {"input_ids": {0: batch}, "inputs": (position, None, {1: batch}, *buffers)}
        names = [*STATIC_DECODE_INPUTS, *kv_names(info.num_layers, "past")]
    with torch.no_grad():
        ep = torch.export.export(seg, args, dynamic_shapes=dyn, strict=False)
    return Segment(
        "decode_static",
        ep,
        names,
        ["logits", *kv_names(info.num_layers, INPLACE_PREFIX if fused else "new")],
        args,
        dyn,
        seg.step_inputs() if fused else None,
    )


def export_vision(model: nn.Module, info: ModelInfo) -> Segment:
    """The vision segment over a dynamic batch of tiles (`VisionSegment`; Qwen2-VL's over a
    sequence of patches: `qwen_vl.export_qwen_vision`)."""
    if is_mrope(info):
        return export_qwen_vision(model, info)
    seg = VisionSegment(model).eval()
    gen = torch.Generator().manual_seed(2)
    size = info.image_size
    args = on_model(model, (torch.randn(2, 3, size, size, generator=gen),))
    dyn = ({0: torch.export.Dim("tiles", min=1, max=MAX_TILES)},)
    with torch.no_grad():
        ep = torch.export.export(seg, args, dynamic_shapes=dyn, strict=False)
    outputs = ["image_features"] + (["image_newline"] if seg.image_newline is not None else [])
    return Segment("vision", ep, ["pixel_values"], outputs, args, dyn)


def capture(
    model: nn.Module, info: ModelInfo, static_decode: bool = False, fused_attention: bool = False
) -> Segments:
    """Export the three segments of a loaded LLaVA model, in its dtype, on the CPU (and, with
    `static_decode`, the static-cache decode step beside them).

    Capture and rewrites run on the CPU, where the traced graph does not depend on which GPU
    attention kernel the fake tensors would pick (on CUDA, torch.export adds a guard on
    the memory-efficient kernel's mask padding that it then cannot prove for a dynamic length).
    The programs share the model's parameters: move the model, then the programs
    (`TorchEngine(segments, device=...)`), once every rewrite is done. `fused_attention`: the
    static-cache decode step's attention is one fused operator (`StaticCacheDecodeSegment`), for
    the ONNX target, where the operator takes the model's head size."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(
            f"capture runs on the CPU (model is on {device}); move it to the device afterwards"
        )
    reference = info.reference_visual_rows or info.visual_tokens
    return Segments(
        info=info,
        vision=export_vision(model, info),
        prefill=export_prefill(model, info),
        decode=export_decode(model, info),
        layer_plan=[LayerPlan(i, reference, reference) for i in range(info.num_layers)],
        model=model,
        static_decode=(
            export_static_cache_decode(
                model, info, fused_attention and fused_attention_supported(info.head_dim)
            )
            if static_decode
            else None
        ),
        min_visual_rows=min_visual_rows(info),
    )


def load_processor(model_dir: str | Path) -> Any:
    """The model's HF processor: `AutoProcessor`'s, or for Qwen2-VL / Qwen2.5-VL the same
    steps from transformers' image processor and tokenizer (`qwen_vl.QwenProcessor`: the
    processor class needs torchvision)."""
    from mllmc.runtime.jsonfile import read_json

    if family(read_json(Path(model_dir, "config.json"))["model_type"]).mrope:
        from .qwen_vl import QwenProcessor

        return QwenProcessor(model_dir)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_dir))


def processor_inputs(
    processor: Any, image: Any, prompt: str, warned: set[str] | None = None
) -> Any:
    """The HF processor's tensors for an image or a list of images (PIL images or paths) and a
    prompt; a prompt without the image token gets the model's chat template with the images
    first, as the runtime does, and another family's placeholder in it is warned about as the
    runtime warns (`warned`: the placeholders already warned about, updated)."""
    from mllmc.runtime.preprocess import load_image, warn_foreign_placeholder

    images = list(image) if isinstance(image, (list, tuple)) else [image]
    # a path is opened as transformers' `load_image` (and the runtime) open a file: EXIF
    # orientation applied, alpha dropped; a PIL image is the processor's to convert
    images = [load_image(i) if isinstance(i, (str, Path)) else i for i in images]
    token = getattr(processor, "image_token", "<image>")
    warn_foreign_placeholder(prompt, token, len(images), warned)
    found = prompt.count(token)
    if found and found != len(images):
        raise placeholder_mismatch(found, len(images), token, "put one where each image goes")
    if not found:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=images, text=prompt, return_tensors="pt")


def on_device(program: torch.export.ExportedProgram, device: str) -> torch.fx.GraphModule:
    """The program as a module on `device`: its weights and the devices its graph creates
    tensors on (arange, ...) moved there. Moves the program in place; its weights are the
    model's, so move the model first and nothing is copied twice."""
    from torch.export.passes import move_to_device_pass

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        # the graph's tensor-metadata asserts compare device strings: 'cuda' != 'cuda:0'
        dev = torch.device("cuda", torch.cuda.current_device())
    return move_to_device_pass(program, dev).module()
