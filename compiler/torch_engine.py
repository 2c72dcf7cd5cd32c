"""TorchEngine: the captured (and rewritten) segments run by PyTorch on the model's own device.

The ONNX engine (`mllmc.runtime`) is what ships; this runs the *same* exported programs that the
backends lower, before lowering, on whatever device the model was captured on. It is how the
passes are checked and timed on a GPU where neither onnxruntime-gpu nor TensorRT is installed
(tests/compiler/test_cuda.py, benchmarks/shortv_gpu.py), and the loop an AOTInductor backend
will wrap. Greedy only; batch 1, as the segments are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _runner(program: torch.export.ExportedProgram, compile: bool) -> Callable[..., Any]:
    module = program.module()
    return torch.compile(module, dynamic=False) if compile else module


class TorchEngine:
    """vision -> prefill -> decode loop over `Segments`, on the device they were captured on."""

    def __init__(self, segments: Any, compile: bool = False):
        self.info = segments.info
        self.vision = _runner(segments.vision.program, compile)
        self.prefill_fn = _runner(segments.prefill.program, compile)
        self.decode_fn = _runner(segments.decode.program, False)  # one token: launch-bound

    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, image_features: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(1, n) prompt ids with one image span + (1, N_v, d) features -> logits (1, V), cache."""
        is_image = input_ids[0] == self.info.image_token_id
        start = int(is_image.int().argmax())  # host-side, once per prompt, as the runtime does
        out = self.prefill_fn(
            input_ids, image_features, torch.tensor([start], device=input_ids.device)
        )
        return out[0], list(out[1:])

    @torch.no_grad()
    def decode_step(
        self, token: int, position: int, cache: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dev = cache[0].device
        out = self.decode_fn(
            torch.tensor([[token]], device=dev), torch.tensor([[position]], device=dev), *cache
        )
        return out[0], list(out[1:])

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, max_new_tokens: int
    ) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens and the (steps, V) logits that chose them; EOS does not stop it."""
        logits, cache = self.prefill(input_ids, self.vision(pixel_values))
        tokens, chosen = [], []
        position = input_ids.shape[1]  # passes drop no positions: decode continues at n
        for step in range(max_new_tokens):
            chosen.append(logits[0])
            tokens.append(int(logits[0].argmax()))
            if step + 1 < max_new_tokens:
                logits, cache = self.decode_step(tokens[-1], position + step, cache)
        return tokens, torch.stack(chosen)
