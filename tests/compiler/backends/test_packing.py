"""Sibling projections packed into one GEMM (compiler/backends/packing.py): the rewrite keeps
every output of the graph it rewrites, the ONNX target writes the static decode step packed
beside the unpacked graph, and a runner picks the packed one unless it maps the weights."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mllmc.compiler.backends.packing import pack_projections
from mllmc.runtime import UserError, load
from mllmc.runtime.manifest import STATIC_DECODE, read_manifest


def _graph() -> onnx.ModelProto:
    """x (2, 3, 8) -> q/k/v projections with biases (widths 8, 4, 4), gate/up without (6, 6)
    reading the same normed input, and one projection of another input, which stays alone."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [w("wq", 8, 8), w("wk", 8, 4), w("wv", 8, 4), w("bq", 8), w("bk", 4), w("bv", 4)]
    inits += [w("wg", 8, 6), w("wu", 8, 6), w("wo", 8, 5)]
    nodes = [helper.make_node("Neg", ["x"], ["n"])]
    for p in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}0"]),
            helper.make_node("Add", [f"{p}0", f"b{p}"], [p]),
        ]
    nodes += [helper.make_node("MatMul", ["n", f"w{p}"], [p]) for p in "gu"]
    nodes += [helper.make_node("MatMul", ["y", "wo"], ["o"])]
    outputs = [
        helper.make_tensor_value_info(p, TensorProto.FLOAT, [None, None, None]) for p in "qkvguo"
    ]
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, None, 8]) for n in ("x", "y")
    ]
    graph = helper.make_graph(nodes, "siblings", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_packed_graph_computes_the_same_outputs():
    model = _graph()
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((2, 3, 8)).astype(np.float32) for n in ("x", "y")}
    before = _run(model, feeds)
    packed = onnx.ModelProto()
    packed.CopyFrom(model)
    assert pack_projections(packed) == 2  # q/k/v with their biases, gate/up; "o" stays alone
    onnx.checker.check_model(packed)
    ops = Counter(n.op_type for n in packed.graph.node)
    assert ops["MatMul"] == 3 and ops["Add"] == 1 and ops["Split"] == 2, ops
    for a, b in zip(before, _run(packed, feeds), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert pack_projections(packed) == 0  # nothing left to pack


def test_projections_whose_outputs_leave_the_graph_keep_their_adds():
    model = _graph()
    model.graph.output.append(
        helper.make_tensor_value_info("q0", TensorProto.FLOAT, [None, None, 8])
    )
    assert pack_projections(model) == 2
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Add"] == 3, ops  # q0 is a graph output: the biases are not packed
    feeds = {n: np.ones((1, 2, 8), np.float32) for n in ("x", "y")}
    assert len(_run(model, feeds)) == 7


def test_static_decode_written_packed_and_chosen_by_the_runner(tiny_base_artifact: Path):
    entry = read_manifest(tiny_base_artifact).segments[STATIC_DECODE]
    assert entry.packed_file == "decode_static.packed.onnx"
    count = {}
    for file in (entry.file, entry.packed_file):
        model = onnx.load(str(tiny_base_artifact / file), load_external_data=False)
        count[file] = Counter(n.op_type for n in model.graph.node)
        external = {
            e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"
        }
        assert external == {"weights.data"}  # the packed graph points at the same weights
    layers = count[entry.file]["GroupQueryAttention"]
    # per layer q/k/v, o, gate/up, down: 4 MatMuls where the unpacked graph has 7 (+ lm_head)
    assert count[entry.file]["MatMul"] == 7 * layers
    assert count[entry.packed_file]["MatMul"] == 4 * layers
    # q/k/v reach the attention packed (its key and value empty), gate/up through one Split each
    assert count[entry.packed_file]["Split"] == count[entry.file]["Split"] + layers
    packed = onnx.load(str(tiny_base_artifact / entry.packed_file), load_external_data=False)
    for node in packed.graph.node:
        if node.op_type == "GroupQueryAttention":
            assert node.input[0].startswith("packed_") and list(node.input[1:3]) == ["", ""]
    assert load(tiny_base_artifact).runners["decode"].static.path.name == entry.packed_file
    shared = load(tiny_base_artifact, share_weights=True).runners["decode"].static
    assert shared.path.name == entry.file  # a mapped session would hold the folded copy too


def test_missing_packed_graph_is_a_corrupt_artifact(tiny_base_artifact: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_base_artifact, broken)
    (broken / "decode_static.packed.onnx").unlink()
    with pytest.raises(UserError, match="decode_static.packed.onnx is missing"):
        load(broken)
    # an artifact written before packing (no packed_file) loads the unpacked graph
    data = json.loads((broken / "manifest.json").read_text())
    del data["segments"][STATIC_DECODE]["packed_file"]
    (broken / "manifest.json").write_text(json.dumps(data))
    assert load(broken).runners["decode"].static.path.name == "decode_static.onnx"


def test_a_bias_that_broadcasts_is_not_packed():
    model = _graph()
    rng = np.random.default_rng(2)
    feeds = {n: rng.standard_normal((1, 2, 8)).astype(np.float32) for n in ("x", "y")}
    for init in model.graph.initializer:
        if init.name == "bk":  # one value for every column of k
            init.CopyFrom(numpy_helper.from_array(np.array([0.5], np.float32), "bk"))
    before = _run(model, feeds)
    assert pack_projections(model) == 2
    assert Counter(n.op_type for n in model.graph.node)["Add"] == 3
    for a, b in zip(before, _run(model, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _attention_graph(extra_output: str | None = None) -> onnx.ModelProto:
    """x -> q/k/v projections -> one GroupQueryAttention (not run: its structure is checked)."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, w)).astype(np.float32), f"w{p}")
        for p, w in (("q", 8), ("k", 4), ("v", 4))
    ]
    nodes = [helper.make_node("MatMul", ["x", f"w{p}"], [p]) for p in "qkv"]
    nodes.append(
        helper.make_node(
            "GroupQueryAttention", ["q", "k", "v", "past_k", "past_v"], ["o", "pk", "pv"],
            domain="com.microsoft", num_heads=2, kv_num_heads=1,
        )
    )  # fmt: skip
    names = ["o", *([extra_output] if extra_output else [])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)]
    return helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs, inits))


def test_attention_takes_q_k_v_packed_unless_one_leaves_the_graph():
    model = _attention_graph()
    assert pack_projections(model) == 1
    attention = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    assert list(attention.input[:3]) == ["packed_0.matmul", "", ""]
    assert "Split" not in {n.op_type for n in model.graph.node}
    model = _attention_graph(extra_output="k")  # k is also a graph output: it must still exist
    assert pack_projections(model) == 1
    attention = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    assert list(attention.input[:3]) == ["q", "k", "v"]
    split = next(n for n in model.graph.node if n.op_type == "Split")
    assert list(split.output) == ["q", "k", "v"]
