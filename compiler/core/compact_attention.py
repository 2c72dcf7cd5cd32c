"""The ONNX form of `F.scaled_dot_product_attention` with an additive float mask (or none):
softmax(q @ kᵀ · scale + mask) @ v, written the way onnxruntime fuses it.

torch.onnx's own lowering (onnxscript's `aten_scaled_dot_product_attention`) swaps the key's
last two axes through a reshape to 3-D, a `Transpose(perm=[0, 2, 1])` and a reshape back (with a
Shape / Slice / Concat chain for each shape), and scales q and k by √scale each. onnxruntime
cannot fold that transpose into the MatMul, so every attention copies its keys once more; on a
pruned or frozen prefill, where the GEMMs have shrunk, these copies and the shape operators are
a visible share of the time (a 300 ms Qwen2.5-VL prefill spent ~5 ms in them).

This translation emits `MatMul(q, Transpose(k, swap the last two axes)) · scale + mask`, which
onnxruntime's graph optimizer turns into one `FusedMatMul` (transB = 1, alpha = scale) followed
by the Add and the Softmax: the key is read in place and no shape operator is left. It handles
the calls mllmc's programs make (a float mask or none, no dropout, not causal, no GQA flag, a
static head size or an explicit scale); any other call gets onnxscript's lowering unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _onnx_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                    scale=None, enable_gqa=False):  # fmt: skip
    from onnxscript import ir
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops import nn

    head = query.shape[-1] if query.shape is not None else None
    compact = (
        not is_causal
        and not dropout_p
        and not enable_gqa
        and (attn_mask is None or attn_mask.dtype != ir.DataType.BOOL)
        and key.shape is not None
        and (scale is not None or isinstance(head, int))
    )
    if not compact:
        return nn.aten_scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
        )
    if scale is None:
        scale = 1.0 / math.sqrt(head)
    rank = len(key.shape)
    key_t = op.Transpose(key, perm=[*range(rank - 2), rank - 1, rank - 2])
    # the scale after the product, as onnxruntime folds it into the MatMul (torch.onnx scales q
    # and k by √scale each first, which keeps q·kᵀ smaller: for float16 graphs, were the ONNX
    # target to export them, that product could overflow before the scale)
    scores = op.Mul(op.MatMul(query, key_t), op.CastLike(op.Constant(value_float=scale), query))
    if attn_mask is not None:
        scores = op.Add(scores, op.CastLike(attn_mask, scores))
    return op.MatMul(op.Softmax(scores, axis=-1), value)


def onnx_translations() -> dict[Any, Any]:
    """`custom_translation_table` for torch.onnx.export."""
    return {torch.ops.aten.scaled_dot_product_attention.default: _onnx_attention}
