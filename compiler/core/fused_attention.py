"""The static-cache decode step's attention as one fused operator: onnxruntime's
`com.microsoft.GroupQueryAttention`, which rotates the new query and key, appends the key and
value rows to the cache buffers in place and attends over them.

A decode step on the CPU is bound by weight bytes and by the number of operators it launches. Op
by op, a layer's rotary embedding and attention are some forty small nodes (split, negate and
concatenate for each rotation, the scores over the buffer, the mask, the softmax, the new row).
onnxruntime-genai's decoders run them as one GroupQueryAttention node; this module gives mllmc's
ONNX decode the same operator:

- `group_query_attention` is a torch custom op (`mllmc::group_query_attention`) with the
  operator's semantics in its eager implementation, so the captured program runs and is checked in
  torch like any other;
- `onnx_translations` maps it to the ONNX node for `torch.onnx.export` (the schema is registered
  with onnx once: onnx ships none for onnxruntime's contrib operators);
- its `present_key` / `present_value` are the segment's `inplace.<l>.key` / `.value` outputs.
  Bound to the memory of the `past.*` inputs they come from (runtime/inplace_cache.py binds both
  to one numpy buffer), the operator writes the new row in place and reads only the rows that
  hold the cache: share-buffer mode, as genai runs it. Unbound, they are new buffers with the
  row written: the same values.

The contract, for this use (one query row per sample): query (B, 1, H*hd), key / value
(B, 1, kvh*hd) this token's rows before rotation, past_key / past_value (B, kvh, C, hd) buffers,
seqlens_k (B,) int32 the row the new key goes to (the rows before it are the cache),
total_sequence_length () int32 = C, cos_cache / sin_cache (R, hd/2) rotary tables with R >= C
and position_ids (B, 1) int64 each sample's row of them (the decode step passes this step's own
angles, one row a sample, then C zero rows: so positions of any kind, M-RoPE's included, rotate
as the caller computed them), attention_bias (B, 1, 1, C) added to the scores (left padding and
sliding windows are -inf-like there; entries past seqlens_k are not read). Outputs (B, 1, H*hd)
and the two buffers (B, kvh, C, hd). Query head h reads kv head h // (H / kvh), as HF's repeat_kv
does; the rotation is HF's rotate_half form (GroupQueryAttention's rotary_interleaved = 0).
"""

from __future__ import annotations

from typing import Any

import torch

DOMAIN = "com.microsoft"
OP = "GroupQueryAttention"
INPLACE_PREFIX = "inplace"  # the graph outputs that alias the past.* buffers
HEAD_DIM_MULTIPLE = 16  # onnxruntime's CPU kernel takes head sizes that are multiples of 16


def supported(head_dim: int) -> bool:
    """Whether onnxruntime's GroupQueryAttention takes heads of `head_dim` (every released
    decoder's 64 or 128 does; a model whose heads it does not take decodes op by op)."""
    return head_dim % HEAD_DIM_MULTIPLE == 0


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, heads, hd); cos/sin (B, hd/2): HF's x * cos + rotate_half(x) * sin
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None], sin[:, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@torch.library.custom_op("mllmc::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_sequence_length: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    position_ids: torch.Tensor,
    attention_bias: torch.Tensor,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupQueryAttention for one query row per sample (see the module docstring): the output
    and the buffers with this token's rows written. Functional: the inputs are not written (in
    ONNX the operator writes the buffers in place when its outputs are bound to them)."""
    b, _, width = query.shape
    hd = width // num_heads
    cos, sin = cos_cache[position_ids[:, 0]], sin_cache[position_ids[:, 0]]  # (B, hd/2)
    q = _rotate(query.reshape(b, num_heads, hd), cos, sin)
    k_new = _rotate(key.reshape(b, kv_num_heads, hd), cos, sin)[:, :, None]  # (B, kvh, 1, hd)
    v_new = value.reshape(b, kv_num_heads, 1, hd)
    rows = torch.arange(past_key.shape[2], device=query.device)
    new_row = (rows[None, :] == seqlens_k[:, None].long())[:, None, :, None]  # (B, 1, C, 1)
    keys = torch.where(new_row, k_new, past_key)  # (B, kvh, C, hd)
    values = torch.where(new_row, v_new, past_value)
    g = q.reshape(b, kv_num_heads, num_heads // kv_num_heads, hd)  # the heads of a kv head
    scores = torch.matmul(g, keys.transpose(2, 3)).float() * scale + attention_bias.float()
    beyond = rows[None, :] > seqlens_k[:, None].long()  # rows past the new one: not the cache
    scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(query.dtype)
    return torch.matmul(probs, values).reshape(b, 1, width), keys, values


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, *args):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def _register_schema() -> None:
    """onnx's schema for the operator (onnx knows none of onnxruntime's contrib operators; the
    exporter and onnx.checker need one). Only the inputs this module uses are typed strictly."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP, domain=DOMAIN):
        return
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    # key and value are empty where query holds q, k and v side by side (the packed decode graph,
    # compiler/backends/packing.py)
    inputs = [
        param("query", "T"),
        param("key", "T", param_option=optional),
        param("value", "T", param_option=optional),
        param("past_key", "T"),
        param("past_value", "T"),
    ] + [
        param("seqlens_k", "M"),
        param("total_sequence_length", "M"),
        param("cos_cache", "T", param_option=optional),
        param("sin_cache", "T", param_option=optional),
        param("position_ids", "P", param_option=optional),
        param("attention_bias", "T", param_option=optional),
    ]
    attr = OpSchema.Attribute

    def default(name: str, value: Any) -> Any:
        return attr(name, onnx.helper.make_attribute(name, value), "")

    onnx.defs.register_schema(
        OpSchema(
            OP,
            DOMAIN,
            1,
            inputs=inputs,
            outputs=[param(n, "T") for n in ("output", "present_key", "present_value")],
            type_constraints=[
                ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                ("M", ["tensor(int32)"], ""),
                ("P", ["tensor(int64)"], ""),
            ],
            attributes=[
                attr("num_heads", OpSchema.AttrType.INT, ""),
                attr("kv_num_heads", OpSchema.AttrType.INT, ""),
                default("scale", 0.0),
                default("do_rotary", 0),
                default("local_window_size", -1),
            ],
        )
    )


def _onnx_group_query_attention(q, k, v, past_k, past_v, seqlens, total, cos, sin, pos, bias,
                                 heads, kv_heads, scale):  # fmt: skip
    import onnxscript

    msft = onnxscript.values.Opset(DOMAIN, 1)
    inputs = (q, k, v, past_k, past_v, seqlens, total, cos, sin, pos, bias)
    return msft.GroupQueryAttention(
        *inputs, num_heads=heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1
    )


def onnx_translations() -> dict[Any, Any]:
    """`custom_translation_table` for torch.onnx.export (registers the onnx schema first)."""
    _register_schema()
    return {torch.ops.mllmc.group_query_attention.default: _onnx_group_query_attention}


def check_inplace_outputs(model: Any) -> int:
    """Check that each `inplace.*` output of a graph is a GroupQueryAttention node's present
    buffer whose past input is the matching `past.*` graph input (a runner binds the two to one
    memory); returns how many such nodes. ValueError otherwise."""
    producers = {out: node for node in model.graph.node for out in node.output}
    inputs = {vi.name for vi in model.graph.input}
    nodes = set()
    for out in model.graph.output:
        if not out.name.startswith(INPLACE_PREFIX + "."):
            continue
        node = producers.get(out.name)
        past = "past" + out.name[len(INPLACE_PREFIX) :]
        if node is None or node.op_type != OP or node.domain != DOMAIN:
            raise ValueError(f"graph output {out.name} is not written by a {OP} node")
        slot = list(node.output).index(out.name)
        if slot not in (1, 2) or node.input[2 + slot] != past or past not in inputs:
            raise ValueError(f"graph output {out.name} does not alias the graph input {past}")
        nodes.add(node.name)
    return len(nodes)
