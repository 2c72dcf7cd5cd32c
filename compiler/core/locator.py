"""Locator: where each decoder layer's parts sit in a captured graph.

The one module that knows decoder-layer anatomy. It reads `nn_module_stack` (kept by
`torch.export`, e.g. `layers.3.self_attn.q_proj`) and the data flow between those nodes, never
node names, and hands each pass a `LayerAnatomy` per layer:

    h ─┬─ input_layernorm ─ norm_out ─┬─ q_proj ─ (view, transpose, RoPE) ─┐
       │                              ├─ k_proj ─ ... ─────────────────────┼─ attention ─ o_proj ─┐
       │                              └─ v_proj ─ ... ─────────────────────┘                      │
       └───────────────────────────────────────────────────────────── attn_residual (h + o) ◀─────┘
                        attn_residual ─ post_attention_layernorm ─ mlp ─ mlp_residual (layer output)

`query_rope_operands` lists, for every multiply on the query path between q_proj and the
attention call, the operand that comes from outside that path (the cos/sin tables): a pass that
computes fewer query rows must gather those rows of them too. `key_rope_operands` is the same on
the key path (a pass that drops rows from a layer's input gathers both), and `post_rope_key` is
the key after RoPE, before any cache concatenation or head repeat (B, kvh, T, hd): with the
attention call's query input (`post_rope_query`, (B, H, T, hd)) it gives a pass one row of
attention probabilities (FastV's score) without un-fusing the attention.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx

from . import int4_linear

_LAYER_PATH = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.(.*))?$")
_ATTENTION_OPS = (torch.ops.aten.scaled_dot_product_attention.default,)
# a Linear, or one with int4 weights (`int4_linear`): either reads its input as args[0]
LINEAR_OPS = (torch.ops.aten.linear.default, int4_linear.OP)
_ADD_OPS = (torch.ops.aten.add.Tensor,)
_MUL_OPS = (torch.ops.aten.mul.Tensor,)


class LocatorError(RuntimeError):
    """The graph does not have the decoder anatomy a pass expects (a bug, not a user error)."""


def module_path(node: fx.Node) -> str:
    """Innermost module path of a node (`layers.3.self_attn.q_proj`), '' if none."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def layer_of(node: fx.Node) -> tuple[int, str] | None:
    """(layer index, path inside the layer) of a node, or None outside the decoder layers."""
    m = _LAYER_PATH.search(module_path(node))
    if m is None:
        return None
    return int(m.group(1)), m.group(2) or ""


@dataclass
class LayerAnatomy:
    index: int
    norm_out: fx.Node  # input_layernorm(h) (B, T, d): input of q/k/v
    q_proj: fx.Node
    k_proj: fx.Node
    v_proj: fx.Node
    attention: fx.Node  # scaled_dot_product_attention(q, k, v, mask)
    o_proj: fx.Node
    attn_residual: fx.Node  # h + o_proj(...)
    mlp_residual: fx.Node  # attn_residual + mlp(...): the layer output
    query_rope_operands: list[tuple[fx.Node, int]] = field(default_factory=list)
    key_rope_operands: list[tuple[fx.Node, int]] = field(default_factory=list)
    post_rope_key: fx.Node | None = None  # (B, kvh, T, hd)

    @property
    def post_rope_query(self) -> fx.Node:
        """The query the attention call reads, after RoPE (B, H, T, hd)."""
        return self.attention.args[0]

    @property
    def layer_input(self) -> fx.Node:
        """h entering the layer (B, T, d), as the residual add reads it *now*: derived, not
        stored, because rewriting the layer before (ShortV freezing it, say) replaces the node
        that feeds this one."""
        return next(a for a in self.attn_residual.args if a is not self.o_proj)

    @property
    def attention_mask(self) -> fx.Node | None:
        args = self.attention.args
        mask = args[3] if len(args) > 3 else self.attention.kwargs.get("attn_mask")
        return mask if isinstance(mask, fx.Node) else None


def _forward_closure(start: fx.Node, stop: fx.Node) -> set[fx.Node]:
    """Nodes on some path start -> stop (both included)."""
    reach: set[fx.Node] = set()
    todo = [start]
    while todo:
        n = todo.pop()
        if n in reach:
            continue
        reach.add(n)
        if n is not stop:
            todo.extend(n.users)
    on_path: set[fx.Node] = set()
    todo = [stop]
    while todo:
        n = todo.pop()
        if n in on_path or n not in reach:
            continue
        on_path.add(n)
        todo.extend(a for a in n.all_input_nodes)
    return on_path


def _outside_operands(path: set[fx.Node]) -> list[tuple[fx.Node, int]]:
    """(multiply, argument index) of each multiply on `path` whose operand comes from outside
    it (the RoPE cos/sin tables), in graph order."""
    found = [
        (n, i)
        for n in path
        if n.target in _MUL_OPS
        for i, a in enumerate(n.args)
        if isinstance(a, fx.Node) and a not in path
    ]
    order = {n: i for i, n in enumerate(next(iter(path)).graph.nodes)} if path else {}
    return sorted(found, key=lambda t: (order[t[0]], t[1]))


def _one(nodes: Iterable[fx.Node], what: str, layer: int) -> fx.Node:
    found = list(nodes)
    if len(found) != 1:
        raise LocatorError(f"layer {layer}: expected one {what}, found {len(found)}")
    return found[0]


def locate_layers(graph: fx.Graph) -> list[LayerAnatomy]:
    """Anatomy of every decoder layer in `graph`, in layer order."""
    by_layer: dict[int, list[tuple[str, fx.Node]]] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        where = layer_of(node)
        if where is not None:
            by_layer.setdefault(where[0], []).append((where[1], node))

    layers = []
    for index in sorted(by_layer):
        nodes = by_layer[index]

        def linear(suffix: str, nodes=nodes, index=index) -> fx.Node:
            return _one(
                (n for p, n in nodes if p == suffix and n.target in LINEAR_OPS), suffix, index
            )

        q, k, v, o = (linear(f"self_attn.{p}_proj") for p in "qkvo")
        attention = _one((n for _, n in nodes if n.target in _ATTENTION_OPS), "attention", index)
        down = linear("mlp.down_proj")
        attn_residual = _one(
            (n for n in o.users if n.target in _ADD_OPS), "residual add after o_proj", index
        )
        mlp_residual = _one(
            (n for n in down.users if n.target in _ADD_OPS), "residual add after the MLP", index
        )
        norm_out = k.args[0]  # keys and values always read every row; q_proj may read a subset
        if not isinstance(norm_out, fx.Node) or v.args[0] is not norm_out:
            raise LocatorError(f"layer {index}: k_proj and v_proj do not share their input")
        q_path = _forward_closure(q, attention.args[0])
        k_path = _forward_closure(k, attention.args[1])
        rope_operands = _outside_operands(q_path)
        key_rope = _outside_operands(k_path)
        # RoPE's sum x·cos + rotate_half(x)·sin: the one add on the key path reading the multiplies
        key_muls = {mul for mul, _ in key_rope}
        rope_adds = [
            n
            for n in k_path
            if n.target in _ADD_OPS and any(a in key_muls for a in n.all_input_nodes)
        ]
        layers.append(
            LayerAnatomy(
                index=index,
                norm_out=norm_out,
                q_proj=q,
                k_proj=k,
                v_proj=v,
                attention=attention,
                o_proj=o,
                attn_residual=attn_residual,
                mlp_residual=mlp_residual,
                query_rope_operands=rope_operands,
                key_rope_operands=key_rope,
                post_rope_key=rope_adds[0] if len(rope_adds) == 1 else None,
            )
        )
    if sorted(by_layer) != list(range(len(layers))):
        raise LocatorError(f"decoder layers are not numbered 0..L-1: {sorted(by_layer)}")
    return layers


def placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]
