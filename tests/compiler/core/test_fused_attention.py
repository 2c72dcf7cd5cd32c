"""The fused decode attention (compiler/core/fused_attention.py): the torch op's eager
implementation against HF's rotary embedding and a plain softmax-attention reference, and the
ONNX operator it exports to (onnxruntime's GroupQueryAttention) against the torch op, with the
cache written in place through bound buffers: left padding, a sliding window, grouped heads,
each sample at its own position, the operator's small inputs computed as the runtime computes
them (runtime/step_inputs.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from mllmc.compiler.core.capture import apply_rope
from mllmc.compiler.core.fused_attention import (
    DOMAIN,
    OP,
    check_inplace_outputs,
    group_query_attention,
    onnx_translations,
)
from mllmc.runtime.manifest import StepInputs
from mllmc.runtime.step_inputs import HostStepInputs

B, H, KVH, HD, C = 3, 8, 2, 16, 24
SCALE = HD**-0.5


POSITIONS = [30, 17, 44]


INV_FREQ = 1.0 / (10000 ** (torch.arange(0, HD, 2).float() / HD))  # HF's default frequencies
WINDOW = 6


def angles() -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, hd/2) of each sample's position."""
    a = torch.tensor(POSITIONS).float()[:, None] * INV_FREQ[None]
    return a.cos(), a.sin()


class Attend(torch.nn.Module):
    """The fused decode step's attention as capture's StaticCacheDecodeSegment calls it: one
    layer's write rows, the capacity, the rotary tables and rows, and the layer's bias."""

    def forward(self, q, k, v, past_k, past_v, seqlens, total, cos, sin, rows, bias):
        return group_query_attention(
            q, k, v, past_k, past_v, seqlens, total, cos, sin, rows, bias, H, KVH, SCALE
        )


def step_inputs(length: int, pads: list[int]) -> tuple[torch.Tensor, ...]:
    """One layer of a 6-token window at cache length `length`, sample b left-padded by pads[b]
    rows and at position POSITIONS[b]: the operator's inputs as the runtime computes them."""
    spec = StepInputs(inv_freq=tuple(float(f) for f in INV_FREQ), windows=(WINDOW,))
    host = HostStepInputs(spec, 1, B, C, np.dtype(np.float32))
    positions = np.array(POSITIONS)[:, None]
    host.fill(np.zeros((B, 1), np.int64), positions, np.array([length]), np.array([pads]))
    arrays = (host.seqlens[0], host.total, host.cos, host.sin, host.rows, host.bias[0])
    return tuple(torch.from_numpy(a.copy()) for a in arrays)


def inputs(length: int, pads: list[int]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(length)
    past_k = torch.randn(B, KVH, C, HD, generator=gen)
    past_v = torch.randn(B, KVH, C, HD, generator=gen)
    past_k[:, :, length:] = 0
    past_v[:, :, length:] = 0
    q = torch.randn(B, 1, H * HD, generator=gen)
    k = torch.randn(B, 1, KVH * HD, generator=gen)
    v = torch.randn(B, 1, KVH * HD, generator=gen)
    return q, k, v, past_k, past_v, *step_inputs(length, pads)


def reference(q, k, v, past_k, past_v, length: int, pads: list[int], window: int):
    """Per sample and head: HF's rotary embedding on q and k, then softmax over the rows
    pad..length (the new row at `length`) within the window, query head h reading kv head
    h // (H / KVH). Returns the output (B, 1, H*hd) and the rotated new keys (B, kvh, hd)."""
    cos, sin = (torch.cat((t, t), -1)[:, None, None] for t in angles())  # (B, 1, 1, hd)
    q = apply_rope(q.reshape(B, 1, H, HD), cos, sin).reshape(B, 1, H * HD)
    k = apply_rope(k.reshape(B, 1, KVH, HD), cos, sin).reshape(B, 1, KVH * HD)
    out = torch.zeros(B, H, HD)
    for b in range(B):
        keys = torch.cat((past_k[b, :, :length], k[b].reshape(KVH, 1, HD)), 1)
        values = torch.cat((past_v[b, :, :length], v[b].reshape(KVH, 1, HD)), 1)
        first = max(pads[b], length - window + 1)
        for h in range(H):
            g = h // (H // KVH)
            scores = keys[g, first:] @ q[b, 0, h * HD : (h + 1) * HD] * SCALE
            out[b, h] = scores.softmax(-1) @ values[g, first:]
    return out.reshape(B, 1, H * HD), k.reshape(B, KVH, HD)


@pytest.mark.parametrize("length, pads", [(10, [0, 3, 9]), (C - 1, [0, 0, 20])])
def test_torch_op_is_grouped_softmax_attention(length, pads):
    args = inputs(length, pads)
    got, keys, values = Attend()(*args)
    want, new_keys = reference(*args[:5], length, pads, window=WINDOW)
    assert float((got - want).abs().max()) <= 1e-5
    assert float((keys[:, :, length] - new_keys).abs().max()) <= 1e-6
    assert torch.equal(values[:, :, length], args[2].reshape(B, KVH, HD))
    for buf, past in ((keys, args[3]), (values, args[4])):  # no other row changes
        assert torch.equal(
            torch.cat((buf[:, :, :length], buf[:, :, length + 1 :]), 2),
            torch.cat((past[:, :, :length], past[:, :, length + 1 :]), 2),
        )


def test_onnx_operator_equals_the_torch_op_and_writes_the_cache_in_place(tmp_path):
    """The exported node is onnxruntime's GroupQueryAttention; bound to the numpy buffers, it
    gives the torch op's output and writes the new key/value row at `length`, nothing else."""
    import onnxruntime as ort

    args = inputs(10, [0, 3, 9])
    names = ["q", "k", "v", "past.0.key", "past.0.value", "seqlens", "total", "cos", "sin"]
    names += ["rows", "bias"]
    ep = torch.export.export(Attend(), args, strict=False)
    program = torch.onnx.export(
        ep,
        args,
        input_names=names,
        output_names=["out", "inplace.0.key", "inplace.0.value"],
        custom_translation_table=onnx_translations(),
        dynamo=True,
    )
    model = program.model_proto
    assert check_inplace_outputs(model) == 1
    assert [n.op_type for n in model.graph.node if n.domain == DOMAIN] == [OP]
    path = tmp_path / "attend.onnx"
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    arrays = [a.numpy().copy() for a in args]
    before = [arrays[3].copy(), arrays[4].copy()]
    binding = session.io_binding()
    binding.bind_output("out")  # bound first: get_outputs()[0]
    for name, a in zip(names, arrays, strict=True):
        if name.startswith("past."):
            value = ort.OrtValue.ortvalue_from_numpy(a)
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output("inplace" + name[len("past") :], value)
        else:
            binding.bind_cpu_input(name, a)
    session.run_with_iobinding(binding)
    out = binding.get_outputs()[0].numpy()
    want, keys, values = Attend()(*args)
    assert float(np.abs(out - want.numpy()).max()) <= 1e-5
    for buf, old, rows in zip(arrays[3:5], before, (keys, values), strict=True):
        assert float(np.abs(buf[:, :, 10] - rows[:, :, 10].numpy()).max()) <= 1e-6
        assert np.array_equal(np.delete(buf, 10, axis=2), np.delete(old, 10, axis=2))


def test_an_inplace_output_must_alias_its_past_input():
    """A graph whose inplace.* output is not the operator's buffer of the matching past.* input
    is refused: bound to that input's memory, it would not be written in place."""
    spec = onnx.helper.make_tensor_value_info
    past = [spec(f"past.0.{kv}", onnx.TensorProto.FLOAT, [1]) for kv in ("key", "value")]
    node = onnx.helper.make_node(
        OP,
        ["q", "k", "v", "past.0.value", "past.0.key"],
        ["o", "inplace.0.key", "b"],
        domain=DOMAIN,
    )
    out = spec("inplace.0.key", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([node], "g", past, [out])
    with pytest.raises(ValueError, match="does not alias the graph input past.0.key"):
        check_inplace_outputs(onnx.helper.make_model(graph))


@pytest.mark.parametrize(
    "module, cls",
    [
        ("llama", "LlamaRMSNorm"),
        ("mistral", "MistralRMSNorm"),
        ("qwen2", "Qwen2RMSNorm"),
        ("qwen2_vl", "Qwen2VLRMSNorm"),
        ("qwen2_5_vl", "Qwen2_5_VLRMSNorm"),
    ],
)
def test_rms_norm_in_onnxruntime_fusable_form_equals_hf(module, cls):
    """capture.RMSNorm (a division, the form onnxruntime fuses into one node) computes HF's
    RMSNorm with the same weight, for every class it stands in for."""
    import importlib

    from mllmc.compiler.core.capture import RMS_NORMS, RMSNorm, fusable_norm

    assert cls in RMS_NORMS
    hf_cls = getattr(
        importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls
    )
    norm = hf_cls(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    ours = fusable_norm(norm)
    assert isinstance(ours, RMSNorm) and ours.weight is norm.weight
    x = torch.randn(2, 5, 64) * 3
    assert float((ours(x) - norm(x)).abs().max()) <= 1e-6
    assert fusable_norm(torch.nn.LayerNorm(64)).__class__ is torch.nn.LayerNorm
