"""The decode step's residual add and RMSNorm as one fused operator: onnxruntime's
`com.microsoft.SkipSimplifiedLayerNormalization`, which adds a block's output to the residual
stream, normalizes the sum, and returns both.

A CPU decode step pays a fixed cost per operator it launches, and a Llama-style layer adds to
the residual stream twice, each time right before an RMSNorm. onnxruntime fuses the norm itself
(`capture.RMSNorm`), but not the add in front of it; onnxruntime-genai's decoders emit the two
as one node. `skip_rms_norm` is a torch custom op (`mllmc::skip_rms_norm`) whose eager
implementation is `rms_norm` (what `capture.RMSNorm` computes) on the sum, so the captured
program runs and is checked in torch like any other; `onnx_translations` maps it to the
onnxruntime node for `torch.onnx.export` (the schema is registered with onnx once: onnx ships
none for onnxruntime's contrib operators).

    normed, total = skip_rms_norm(residual, delta, weight, eps)
    # total = residual + delta; normed = weight * total / sqrt(mean(total^2) + eps)
"""

from __future__ import annotations

from typing import Any

import torch

DOMAIN = "com.microsoft"
OP = "SkipSimplifiedLayerNormalization"
SUM_OUTPUT = 3  # the operator's outputs: output, mean, inv_std_var, input_skip_bias_sum


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm, weight * x / sqrt(mean(x^2) + eps) with the mean in float32, written with a
    division: the form onnxruntime fuses into one SimplifiedLayerNormalization node."""
    h = x.float()
    h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@torch.library.custom_op("mllmc::skip_rms_norm", mutates_args=())
def skip_rms_norm(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(s, weight, eps), s) for s = residual + delta."""
    total = residual + delta
    return rms_norm(total, weight, eps), total


@skip_rms_norm.register_fake
def _(residual, delta, weight, eps):
    return torch.empty_like(residual), torch.empty_like(residual)


def _register_schema() -> None:
    """onnx's schema for the operator (the exporter and onnx.checker need one)."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP, domain=DOMAIN):
        return
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    onnx.defs.register_schema(
        OpSchema(
            OP,
            DOMAIN,
            1,
            inputs=[
                param("input", "T"),
                param("skip", "T"),
                param("gamma", "T"),
                param("bias", "T", param_option=optional),
            ],
            outputs=[
                param("output", "T"),
                param("mean", "U", param_option=optional),
                param("inv_std_var", "U", param_option=optional),
                param("input_skip_bias_sum", "T", param_option=optional),
            ],
            type_constraints=[
                ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                ("U", ["tensor(float)"], ""),
            ],
            attributes=[
                OpSchema.Attribute("epsilon", onnx.helper.make_attribute("epsilon", 1e-12), "")
            ],
        )
    )


def _onnx_skip_rms_norm(residual, delta, weight, eps):
    import onnxscript

    msft = onnxscript.values.Opset(DOMAIN, 1)
    outs = msft.SkipSimplifiedLayerNormalization(
        residual, delta, weight, epsilon=eps, _num_outputs=SUM_OUTPUT + 1
    )
    return outs[0], outs[SUM_OUTPUT]


def onnx_translations() -> dict[Any, Any]:
    """`custom_translation_table` for torch.onnx.export (registers the onnx schema first)."""
    _register_schema()
    return {torch.ops.mllmc.skip_rms_norm.default: _onnx_skip_rms_norm}
