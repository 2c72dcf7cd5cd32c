"""FLOPs: measured on the (rewritten) graphs, and the analytic formula they must agree with.

`segment_flops` runs a segment's graph under torch's FlopCounterMode at a reference prompt
(REFERENCE_TEXT_TOKENS text tokens + the N_v visual tokens the vision segment outputs), so
whatever a pass removed from the graph is absent from the count. `analytic_prefill_flops` is
the per-layer formula written out with GQA, generic over the layer plan (rows in each
layer's input and KV cache, whether its visual rows are computed); tests check one against the
other for every pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from mllmc.runtime.manifest import LayerPlan

from . import int4_linear

REFERENCE_TEXT_TOKENS = 64


def reference_prefill_inputs(
    info: Any, n_text: int = REFERENCE_TEXT_TOKENS, num_visual: int | None = None
) -> tuple[torch.Tensor, ...]:
    """A prompt of n_text text rows and `num_visual` visual rows (default: one image's)."""
    from .capture import example_prefill_inputs

    num_visual = (
        (info.reference_visual_rows or info.visual_tokens) if num_visual is None else num_visual
    )
    return example_prefill_inputs(info, n_text=n_text, num_visual=num_visual)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_val=None, **kwargs) -> int:
    # torch's counter knows the CUDA attention kernels but not the CPU one that SDPA dispatches
    # to here; count it with torch's own SDPA formula: QK^T and AV, 2 FLOPs per multiply-add.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# keyed by op packet, as FlopCounterMode looks them up; it hands the formula shapes, not tensors
_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.mllmc.int4_linear: int4_linear.flops,  # an int4 Linear counts as a Linear
}


def count_flops(program: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...]) -> int:
    """FLOPs of running the graph on `inputs` (matmuls and attention, as torch counts them);
    float inputs are cast to the dtype of the program's weights (a bf16 capture counts the same)."""
    weights = [t for t in program.state_dict.values() if t.is_floating_point()]
    if weights:
        inputs = tuple(t.to(weights[0].dtype) if t.is_floating_point() else t for t in inputs)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        program.module()(*inputs)
    return int(counter.get_total_flops())


def segment_flops(segments: Any, n_text: int = REFERENCE_TEXT_TOKENS) -> dict[str, Any]:
    """FLOPs of each segment at the reference prompt (decode: one step after that prompt, each
    layer's cache holding the rows the plan says it keeps)."""
    from .capture import example_decode_inputs

    info = segments.info
    num_visual = segments.reference_rows
    n = n_text + num_visual
    prefill = count_flops(
        segments.prefill.program, reference_prefill_inputs(info, n_text, num_visual)
    )
    if info.mrope_section:  # Qwen2-VL: the reference image's patches, not a batch of tiles
        from .qwen_vl import reference_vision_inputs

        vision = count_flops(segments.vision.program, reference_vision_inputs(info))
    else:
        one_tile = tuple(x[:1] for x in segments.vision.example_inputs)
        vision = info.reference_tiles * count_flops(segments.vision.program, one_tile)
    past = [n_text + p.kv_visual_tokens for p in segments.layer_plan]
    decode = count_flops(segments.decode.program, example_decode_inputs(info, past_lens=past))
    return {
        "reference_text_tokens": n_text,
        "reference_prompt_tokens": n,
        "vision": vision,
        "prefill": prefill,
        "decode_step": decode,
    }


def analytic_prefill_flops(
    info: Any,
    n_text: int,
    frozen_layers: set[int] | frozenset = frozenset(),
    *,
    plan: Sequence[LayerPlan] | None = None,
    scored_layers: Sequence[int] = (),
) -> int:
    """2·(multiply-adds) of the decoder prefill for a prompt of n_text text tokens.

    Per layer l (from `plan`, default: every layer holds and computes the tower's N_v rows):
    the layer's input has n_l = n_text + plan[l].visual_tokens rows, all of which get keys and
    values; queries, attention rows, o_proj and the MLP are computed for all n_l rows, or for the
    n_text text rows only when plan[l].visual_computed is False (ShortV; `frozen_layers` is the
    same thing without a plan). A layer in `scored_layers` also scores one query row (the last
    token) against its n_l keys (FastV's selection: QK^T of one row)."""
    if plan is None:
        reference = info.reference_visual_rows or info.visual_tokens
        plan = [
            LayerPlan(i, reference, reference, i not in frozen_layers)
            for i in range(info.num_layers)
        ]
    d, m = info.hidden_size, info.intermediate_size
    q_dim = info.num_heads * info.head_dim
    kv_dim = info.num_kv_heads * info.head_dim
    total = 0
    for layer in plan:
        n = n_text + layer.visual_tokens  # rows entering the layer
        rows = n if layer.visual_computed else n_text  # rows whose queries / MLP are computed
        total += 2 * rows * d * q_dim  # q_proj
        total += 2 * 2 * n * d * kv_dim  # k_proj, v_proj (all rows)
        total += 2 * 2 * rows * n * q_dim  # QK^T and AV
        total += 2 * rows * q_dim * d  # o_proj
        total += 3 * 2 * rows * d * m  # gate, up, down
        if layer.index in scored_layers:
            total += 2 * n * q_dim  # the last query row against every key
    total += 2 * d * info.vocab_size  # lm_head on the last position
    return total
