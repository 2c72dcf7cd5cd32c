"""What every graph pass does around its rewrite: open one segment's graph, locate the decoder
layers and the graph inputs, and afterwards check the graph, re-export the segment and record in
the layer plan what the rewritten layers now hold.

    edit = GraphEdit.open(segments, "prefill")
    ...  # change edit.graph, using edit.layers and edit.inputs
    segments = replan(edit.finish(), range(k, num_layers), visual_tokens=kept)

A pass file then holds its rewrite, its config and its eager reference.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import fx

    from mllmc.compiler.core.capture import Segment, Segments
    from mllmc.compiler.core.locator import LayerAnatomy


@dataclasses.dataclass
class GraphEdit:
    """One segment of `segments` opened for rewriting: `graph` is the graph of `module`, an
    unlifted copy of the segment's program; `finish` re-exports it."""

    segments: Segments
    segment: Segment
    module: fx.GraphModule

    @classmethod
    def open(cls, segments: Segments, name: str) -> GraphEdit:
        """Open segment `name` ("vision", "prefill") of `segments` for rewriting."""
        segment = getattr(segments, name)
        return cls(segments, segment, segment.program.module())

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph

    @functools.cached_property
    def layers(self) -> list[LayerAnatomy]:
        """The located decoder layers, in order."""
        from mllmc.compiler.core.locator import locate_layers

        return locate_layers(self.graph)

    @functools.cached_property
    def inputs(self) -> dict[str, fx.Node]:
        """The graph's input nodes by the segment's input names."""
        from mllmc.compiler.core.locator import placeholders

        return dict(zip(self.segment.input_names, placeholders(self.graph), strict=True))

    @property
    def last_input(self) -> fx.Node:
        """The graph's last input node: what a node computed from the inputs is inserted after."""
        return list(self.inputs.values())[-1]

    def add_output(self, node: fx.Node, name: str) -> None:
        """Make `node` one more output of the segment, named `name`."""
        from torch.fx.graph import CodeGen

        output = next(n for n in self.graph.nodes if n.op == "output")
        output.args = ((*output.args[0], node),)
        # a plain tuple out (the unlifted module's pytree spec names the old outputs only)
        spec = self.graph._codegen.pytree_info
        codegen = CodeGen()
        codegen.pytree_info = spec._replace(out_spec=None) if spec is not None else None
        self.graph._codegen = codegen
        names = [*self.segment.output_names, name]
        self.segment = dataclasses.replace(self.segment, output_names=names)

    def require_visual_rows(self, count: int) -> None:
        """Re-export the prefill for prompts of >= `count` visual rows (what the rewrite needs),
        and record it in `Segments.min_visual_rows`."""
        from mllmc.compiler.core.capture import prefill_dynamic_shapes
        from mllmc.compiler.core.qwen_vl import is_mrope

        count = max(count, self.segments.min_visual_rows)
        dyn = prefill_dynamic_shapes(min_visual=count, mrope=is_mrope(self.segments.info))
        self.segment = dataclasses.replace(self.segment, dynamic_shapes=dyn)
        self.segments = dataclasses.replace(self.segments, min_visual_rows=count)

    def finish(self) -> Segments:
        """Check the rewritten graph and return `segments` with this segment re-exported from it
        (every shape and dtype derived again)."""
        from mllmc.compiler.core.capture import reexport

        self.graph.lint()
        self.module.recompile()
        return self.segments.replace_segment(reexport(self.segment, self.module))


def replan(segments: Segments, layers: Iterable[int], **changes: int | bool | str) -> Segments:
    """`segments` with the layer-plan entries of `layers` replaced by copies with `changes`
    (`visual_tokens`, `kv_visual_tokens`, `kv_visual_keep`, `visual_computed`)."""
    plan = list(segments.layer_plan)
    for i in layers:
        plan[i] = dataclasses.replace(plan[i], **changes)
    return dataclasses.replace(segments, layer_plan=plan)


def uniform_visual_tokens(segments: Segments, name: str) -> int:
    """The visual rows every decoder layer holds; UserError naming pass `name` when an in-LLM
    pass already made them differ or stopped computing them."""
    from mllmc.runtime.errors import UserError

    plan = segments.layer_plan
    count = plan[0].visual_tokens
    if any(p.visual_tokens != count or not p.visual_computed for p in plan):
        raise UserError(f"{name}: the layer plan is not uniform (another in-LLM pass ran first)")
    return count
