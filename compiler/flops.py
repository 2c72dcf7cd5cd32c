"""FLOPs: measured on the (rewritten) graphs, and the analytic formula they must agree with.

`segment_flops` runs a segment's graph under torch's FlopCounterMode at a reference prompt
(REFERENCE_TEXT_TOKENS text tokens + N_v visual tokens), so whatever a pass removed from the graph
is absent from the count. `analytic_prefill_flops` is METHODS.md's per-layer formula written out
with GQA; tests check one against the other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

REFERENCE_TEXT_TOKENS = 64


def reference_prefill_inputs(
    info: Any, n_text: int = REFERENCE_TEXT_TOKENS
) -> tuple[torch.Tensor, ...]:
    from .capture import example_prefill_inputs

    return example_prefill_inputs(info, n_text=n_text)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_val=None, **kwargs) -> int:
    # torch's counter knows the CUDA attention kernels but not the CPU one that SDPA dispatches
    # to here; count it with torch's own SDPA formula: QK^T and AV, 2 FLOPs per multiply-add.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# keyed by op packet, as FlopCounterMode looks them up; it hands the formula shapes, not tensors
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_flops(program: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...]) -> int:
    """FLOPs of running the graph on `inputs` (matmuls and attention, as torch counts them)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        program.module()(*inputs)
    return int(counter.get_total_flops())


def segment_flops(segments: Any, n_text: int = REFERENCE_TEXT_TOKENS) -> dict[str, Any]:
    """FLOPs of each segment at the reference prompt (decode: one step after that prompt)."""
    from .capture import example_decode_inputs

    info = segments.info
    n = n_text + info.num_visual_tokens
    prefill = count_flops(segments.prefill.program, reference_prefill_inputs(info, n_text))
    vision = count_flops(segments.vision.program, segments.vision.example_inputs)
    decode = count_flops(segments.decode.program, example_decode_inputs(info, past_len=n))
    return {
        "reference_text_tokens": n_text,
        "reference_prompt_tokens": n,
        "vision": vision,
        "prefill": prefill,
        "decode_step": decode,
    }


def analytic_prefill_flops(
    info: Any, n_text: int, frozen_layers: set[int] | frozenset = frozenset()
) -> int:
    """2·(multiply-adds) of the decoder prefill; a frozen layer computes queries, attention
    rows, o_proj and MLP for the n_text text rows only (keys/values for all n rows)."""
    n = n_text + info.num_visual_tokens
    d, m = info.hidden_size, info.intermediate_size
    q_dim = info.num_heads * info.head_dim
    kv_dim = info.num_kv_heads * info.head_dim
    total = 0
    for layer in range(info.num_layers):
        rows = n_text if layer in frozen_layers else n  # rows whose queries / MLP are computed
        total += 2 * rows * d * q_dim  # q_proj
        total += 2 * 2 * n * d * kv_dim  # k_proj, v_proj (all rows)
        total += 2 * 2 * rows * n * q_dim  # QK^T and AV
        total += 2 * rows * q_dim * d  # o_proj
        total += 3 * 2 * rows * d * m  # gate, up, down
    total += 2 * d * info.vocab_size  # lm_head on the last position
    return total
