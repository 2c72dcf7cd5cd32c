"""TorchEngine: the captured (and rewritten) segments run by PyTorch on the model's own device.

The ONNX engine (`mllmc.runtime`) is what ships; this runs the *same* exported programs that the
backends lower, before lowering, on whatever device the model was captured on. It is how the
passes are checked and timed on a GPU where neither onnxruntime-gpu nor TensorRT is installed
(tests/compiler/test_cuda.py, benchmarks/shortv_gpu.py), and the loop an AOTInductor backend
will wrap. Greedy only; batch 1, as the segments are.
"""

from __future__ import annotations

from typing import Any

import torch


def on_device(program: torch.export.ExportedProgram, device: str) -> torch.fx.GraphModule:
    """The program as a module on `device`: its weights and the devices its graph creates
    tensors on (arange, ...) moved there. Moves the program in place; its weights are the
    model's, so move the model first and nothing is copied twice."""
    from torch.export.passes import move_to_device_pass

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        # the graph's tensor-metadata asserts compare device strings: 'cuda' != 'cuda:0'
        dev = torch.device("cuda", torch.cuda.current_device())
    return move_to_device_pass(program, dev).module()


class TorchEngine:
    """vision -> prefill -> decode loop over `Segments` (captured on the CPU) on `device`;
    `compile=True` runs vision and prefill through torch.compile (Inductor)."""

    def __init__(self, segments: Any, device: str = "cpu", compile: bool = False):
        self.info = segments.info
        modules = [on_device(seg.program, device) for seg in segments]
        if compile:
            modules[0], modules[1] = (torch.compile(m, dynamic=False) for m in modules[:2])
        self.vision, self.prefill_fn, self.decode_fn = modules

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
