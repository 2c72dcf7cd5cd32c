"""Sibling projections packed into one GEMM: the decode step's q/k/v projections, and its MLP's
gate and up projections, each read the same input; this rewrite runs each such group as one
MatMul over the weights side by side, then splits the result.

A decode step on the CPU multiplies one row by every weight of the model: it is bound by weight
bytes and by the operators it launches (each MatMul is a parallel section on onnxruntime's
thread pool). Packing takes three of a layer's seven MatMuls and two of its bias Adds out of
the step (onnxruntime-genai's decoders pack q/k/v the same way).

The packed weight is a `Concat` of the initializers the unpacked graph already uses: the weights
on disk stay the ones the prefill graph shares (`onnx.share_weights`), and onnxruntime folds the
Concat into one tensor when it loads the graph, which its MatMul then prepacks as it would have
prepacked the three. A session that does not prepack (`load(..., share_weights=True)`, which maps
`weights.data` so that its graphs hold one copy of the weights) would keep that folded tensor as
a second copy of those weights: such sessions run the unpacked graph, which the artifact keeps
beside the packed one (`SegmentEntry.packed_file`).

A group: the MatMul nodes that read the same tensor, each with a 2-D float initializer as its
weight, of the same dtype; when every one of them feeds exactly one Add of a 1-D initializer
(the projections' biases, as Qwen2's q/k/v have), the biases are packed too. Where a group's
three outputs are the query, key and value of one GroupQueryAttention node and nothing else
reads them, the node takes the packed tensor as its query (key and value empty: the operator's
packed form, as genai's decoders use it) and no Split is needed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import helper

PACKED_SUFFIX = ".packed.onnx"  # decode_static.onnx -> decode_static.packed.onnx


def packed_name(file: str) -> str:
    """The packed graph's file name beside `file` (an .onnx name)."""
    return file.removesuffix(".onnx") + PACKED_SUFFIX


@dataclass
class _Graph:
    """What the rewrite reads of a graph, indexed once: its nodes (in order), initializers by
    name, the names of its outputs, and each tensor's readers (node indices)."""

    nodes: list[Any]
    inits: dict[str, Any]
    outputs: set[str]
    consumers: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def of(cls, graph: Any) -> _Graph:
        out = cls(
            list(graph.node), {i.name: i for i in graph.initializer}, {o.name for o in graph.output}
        )
        for index, node in enumerate(out.nodes):
            for name in node.input:
                out.consumers[name].append(index)
        return out


def _groups(graph: _Graph) -> list[list[int]]:
    """Node indices of MatMuls by (input, weight dtype, K), where the weight is a 2-D
    initializer; groups of two or more, in graph order."""
    by_input: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    for index, node in enumerate(graph.nodes):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        w = graph.inits.get(node.input[1])
        if w is None or len(w.dims) != 2:
            continue
        by_input[(node.input[0], w.data_type, w.dims[0])].append(index)
    return [group for group in by_input.values() if len(group) > 1]


def _bias_adds(graph: _Graph, matmuls: list[int]) -> list[int] | None:
    """Indices of each MatMul's one consumer when that is `Add(matmul, 1-D initializer)` for
    all of them, else None."""
    nodes, inits = graph.nodes, graph.inits
    adds = []
    for mm in (nodes[i] for i in matmuls):
        users = graph.consumers[mm.output[0]]
        if mm.output[0] in graph.outputs or len(users) != 1:
            return None
        add = nodes[users[0]]
        bias = inits.get(add.input[1]) if len(add.input) == 2 else None
        if add.op_type != "Add" or add.input[0] != mm.output[0] or bias is None:
            return None
        if list(bias.dims) != [inits[mm.input[1]].dims[1]]:  # one bias per output column
            return None
        adds.append(users[0])
    return adds


def _attention_taking(graph: _Graph, outputs: list[str]) -> Any | None:
    """The GroupQueryAttention node whose query, key and value are `outputs` (in that order)
    and which alone reads them (nor are they graph outputs), else None: it may take them
    packed, q, k and v side by side in its query (key and value empty)."""
    readers = {i for name in outputs for i in graph.consumers[name]}
    if len(outputs) != 3 or len(readers) != 1 or graph.outputs & set(outputs):
        return None
    node = graph.nodes[readers.pop()]
    if (node.op_type, node.domain) != ("GroupQueryAttention", "com.microsoft"):
        return None
    return node if list(node.input[:3]) == outputs else None


def _concat_then(
    prefix: str, part: str, tensors: list[str], axis: int, op: str, x: str
) -> list[Any]:
    """Concat(tensors) along `axis` as `<prefix>.<part>`, then `op(x, it)` as `<prefix>.<op>`
    (lower case): the packed weight and its MatMul, or the packed bias and its Add."""
    out = f"{prefix}.{op.lower()}"
    return [
        helper.make_node("Concat", tensors, [f"{prefix}.{part}"], name=f"{prefix}/concat_{part}",
                         axis=axis),
        helper.make_node(op, [x, f"{prefix}.{part}"], [out], name=f"{prefix}/{op.lower()}"),
    ]  # fmt: skip


def pack_projections(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place: each group of sibling MatMuls (see the module docstring)
    becomes Concat(weights) -> MatMul [-> Add(Concat(biases))] -> Split, whose outputs are the
    tensors the group's nodes wrote (or, for an attention's q/k/v, its packed query). Returns the
    number of groups packed."""
    graph = _Graph.of(model.graph)
    nodes, inits = graph.nodes, graph.inits
    replaced: dict[int, list[Any]] = {}  # index of a group's first MatMul -> the nodes in its place
    removed: set[int] = set()
    for k, group in enumerate(_groups(graph)):
        prefix = f"packed_{k}"
        matmuls = [nodes[i] for i in group]
        weights = [mm.input[1] for mm in matmuls]
        new = _concat_then(prefix, "weight", weights, 1, "MatMul", matmuls[0].input[0])
        packed, outputs = f"{prefix}.matmul", [mm.output[0] for mm in matmuls]
        bias_adds = _bias_adds(graph, group)
        if bias_adds is not None:
            adds = [nodes[i] for i in bias_adds]
            new += _concat_then(prefix, "bias", [a.input[1] for a in adds], 0, "Add", packed)
            packed, outputs = f"{prefix}.add", [a.output[0] for a in adds]
            removed.update(bias_adds)
        attention = _attention_taking(graph, outputs)
        if attention is not None:  # the operator takes q, k and v packed: no split
            attention.input[0], attention.input[1], attention.input[2] = packed, "", ""
        else:
            widths = [int(inits[w].dims[1]) for w in weights]
            sizes = helper.make_tensor(f"{prefix}.sizes", onnx.TensorProto.INT64, [len(widths)],
                                       widths)  # fmt: skip
            model.graph.initializer.append(sizes)
            new.append(
                helper.make_node(
                    "Split", [packed, sizes.name], outputs, name=f"{prefix}/split", axis=-1
                )
            )
        replaced[group[0]] = new
        removed.update(group)
    # the packed nodes go where the group's first MatMul was: its input is computed by then, and
    # every consumer of the removed nodes' outputs (the Split's now) comes after that MatMul
    order = []
    for index, node in enumerate(nodes):
        order += replaced.get(index, [])
        if index not in removed:
            order.append(node)
    del model.graph.node[:]
    model.graph.node.extend(order)
    return len(replaced)
