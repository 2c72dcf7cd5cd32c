"""The decode step's fused residual add + RMSNorm (compiler/core/fused_norm.py): the torch op
against HF's RMSNorm of the sum, and the ONNX node it exports to (onnxruntime's
SkipSimplifiedLayerNormalization) against the torch op, both outputs."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from mllmc.compiler.core.fused_norm import DOMAIN, OP, onnx_translations, skip_rms_norm


class AddNorm(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d))

    def forward(self, residual, delta):
        return skip_rms_norm(residual, delta, self.weight, 1e-6)


def test_torch_op_is_hf_rms_norm_of_the_sum():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    hf = Qwen2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        hf.weight.normal_()
    residual, delta = torch.randn(3, 1, 64) * 4, torch.randn(3, 1, 64)
    normed, total = skip_rms_norm(residual, delta, hf.weight, 1e-6)
    assert torch.equal(total, residual + delta)
    assert float((normed - hf(residual + delta)).abs().max()) <= 1e-6


def test_onnx_node_equals_the_torch_op(tmp_path):
    import onnxruntime as ort

    module = AddNorm(64)
    args = (torch.randn(3, 1, 64) * 4, torch.randn(3, 1, 64))
    program = torch.onnx.export(
        torch.export.export(module, args),
        args,
        input_names=["residual", "delta"],
        output_names=["normed", "total"],
        custom_translation_table=onnx_translations(),
        dynamo=True,
    )
    model = program.model_proto
    assert [(n.domain, n.op_type) for n in model.graph.node] == [(DOMAIN, OP)]
    path = tmp_path / "add_norm.onnx"
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"residual": args[0].numpy(), "delta": args[1].numpy()})
    with torch.no_grad():
        want = module(*args)
    for g, w in zip(got, want, strict=True):
        assert float(np.abs(g - w.numpy()).max()) <= 1e-5
