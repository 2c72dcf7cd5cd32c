"""The ONNX form of scaled_dot_product_attention (compiler/core/compact_attention.py): equal to
torch's attention for the calls mllmc's programs make (an additive mask of every broadcast
shape they use, none, the scale given or not, 4-D and 5-D batches, a dynamic row count), and
after onnxruntime's optimizer one FusedMatMul with the key transposed in place: no Transpose,
no shape operator. Calls it does not handle keep onnxscript's lowering, and still agree."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from mllmc.compiler.core.compact_attention import onnx_translations


class Attention(torch.nn.Module):
    def __init__(self, scale: float | None = None, causal: bool = False):
        super().__init__()
        self.scale, self.causal = scale, causal

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, is_causal=self.causal
        )


def _run(module, args, names, tmp_path, dynamic=None):
    """(onnxruntime's outputs, the op types of the graph onnxruntime optimized, that graph, the
    exported one)."""
    import onnxruntime as ort

    program = torch.onnx.export(
        torch.export.export(module, args, dynamic_shapes=dynamic),
        args,
        input_names=names,
        output_names=["o"],
        custom_translation_table=onnx_translations(),
        dynamo=True,
        optimize=True,
    )
    path = tmp_path / "attention.onnx"
    onnx.save(program.model_proto, str(path))
    onnx.checker.check_model(str(path))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})[0]
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    return out, [n.op_type for n in optimized.graph.node], optimized, program.model_proto


def _mask(shape):
    """An additive mask: 0 where attended, finfo.min where not (every row keeps one key)."""
    keep = torch.rand(shape) > 0.4
    keep[..., 0] = True
    return torch.zeros(shape).masked_fill(~keep, torch.finfo(torch.float32).min)


@pytest.mark.parametrize(
    ("q_shape", "kv_rows", "mask_shape", "scale"),
    [
        ((1, 4, 7, 16), 7, (1, 1, 7, 7), 0.25),  # a prefill: one mask for every head
        ((2, 4, 3, 16), 9, (2, 1, 3, 9), None),  # fewer query rows than keys (frozen rows)
        ((3, 2, 5, 8), 5, (3, 1, 1, 5), 0.3),  # windows: a padding bias per window
        ((1, 1, 2, 4, 8), 6, (1, 1, 1, 4, 6), 0.5),  # 5-D
        ((1, 4, 7, 16), 7, None, None),  # no mask
    ],
)
def test_equals_torch_and_fuses_to_one_matmul(q_shape, kv_rows, mask_shape, scale, tmp_path):
    torch.manual_seed(0)
    q = torch.randn(q_shape)
    kv_shape = (*q_shape[:-2], kv_rows, q_shape[-1])
    k, v = torch.randn(kv_shape), torch.randn(kv_shape)
    args = (q, k, v) if mask_shape is None else (q, k, v, _mask(mask_shape))
    names = ["q", "k", "v", "mask"][: len(args)]
    module = Attention(scale)
    got, ops, optimized, _ = _run(module, args, names, tmp_path)
    with torch.no_grad():
        want = module(*args).numpy()
    assert float(np.abs(got - want).max()) <= 1e-5
    assert "Transpose" not in ops and "Shape" not in ops and "Reshape" not in ops, ops
    fused = [n for n in optimized.graph.node if n.op_type == "FusedMatMul"]
    assert len(fused) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in fused[0].attribute}
    assert attrs["transB"] == 1
    assert attrs["alpha"] == pytest.approx(scale or q_shape[-1] ** -0.5, rel=1e-6)


def test_dynamic_rows(tmp_path):
    """One graph for every row count (the prefill's prompt length is dynamic)."""
    rows = torch.export.Dim("rows", min=2, max=64)
    q, k, v = (torch.randn(1, 4, 6, 16) for _ in range(3))
    mask = _mask((1, 1, 6, 6))
    dynamic = ({2: rows}, {2: rows}, {2: rows}, {2: rows, 3: rows})
    module = Attention(0.25)
    program = torch.onnx.export(
        torch.export.export(module, (q, k, v, mask), dynamic_shapes=dynamic),
        (q, k, v, mask),
        input_names=["q", "k", "v", "mask"],
        output_names=["o"],
        custom_translation_table=onnx_translations(),
        dynamo=True,
    )
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    ops = [n.op_type for n in optimized.graph.node]
    assert "Transpose" not in ops and ops.count("FusedMatMul") == 1, ops
    for n in (3, 11):
        args = (*(torch.randn(1, 4, n, 16) for _ in range(3)), _mask((1, 1, n, n)))
        feeds = {k: a.numpy() for k, a in zip(["q", "k", "v", "mask"], args, strict=True)}
        got = session.run(None, feeds)[0]
        with torch.no_grad():
            assert float(np.abs(got - module(*args).numpy()).max()) <= 1e-5


def test_other_calls_keep_onnxscripts_lowering(tmp_path):
    """Causal calls and boolean masks are not calls mllmc's programs make: they are lowered as
    torch.onnx lowers them (its key transpose through 3-D is there), and still equal torch."""
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    keep = torch.rand(1, 1, 5, 5) > 0.4
    keep[..., 0] = True
    for module, args, names in (
        (Attention(causal=True), (q, k, v), ["q", "k", "v"]),
        (Attention(0.3), (q, k, v, keep), ["q", "k", "v", "mask"]),
    ):
        got, _, _, exported = _run(module, args, names, tmp_path)
        with torch.no_grad():
            assert float(np.abs(got - module(*args).numpy()).max()) <= 1e-5
        perms = [
            list(onnx.helper.get_attribute_value(a))
            for n in exported.graph.node
            if n.op_type == "Transpose"
            for a in n.attribute
        ]
        assert [0, 2, 1] in perms, perms  # torch.onnx's key transpose, through 3-D
