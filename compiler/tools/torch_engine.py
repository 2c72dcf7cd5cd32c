"""TorchEngine: the captured (and rewritten) segments run by PyTorch on a device.

The runtime engines (`mllmc.runtime`) are what ships; this runs the *same* exported programs that
the backends lower, before lowering, on whatever device is given, through the runtime's one
generate loop (`mllmc.runtime.engine.SegmentLoop`) with a torch runner per segment. It is how the
passes are checked and timed on a GPU where neither onnxruntime-gpu nor TensorRT is installed
(tests/compiler/tools/test_torch_engine.py). Batch 1, as the segments are.
"""

from __future__ import annotations

from typing import Any

import torch

from mllmc.compiler.core.capture import on_device
from mllmc.compiler.core.segment_io import segment_io
from mllmc.runtime.engine import SegmentLoop
from mllmc.runtime.manifest import SegmentEntry, from_json
from mllmc.runtime.static_cache import DEFAULT_BUCKET, GraphPerShape, StaticCacheDecoder
from mllmc.runtime.torch_runner import TorchCallRunner


def segment_entry(seg: Any, file: str = "") -> SegmentEntry:
    """A segment's manifest entry (IO names, shapes, dtypes) read from its program."""
    return from_json(SegmentEntry, {"file": file, **segment_io(seg)}, f"{seg.name} segment")


class TorchEngine(SegmentLoop):
    """vision -> prefill -> decode loop over `Segments` (captured on the CPU) on `device`.

    compile: vision and prefill run through torch.compile (Inductor).
    static_cache: decode runs the static-cache program (`capture(..., static_decode=True)`) over
    buffers of `bucket`-row capacity steps (runtime/static_cache.py); same tokens and
    logits as the default decode, whose cache grows by a copy each step.
    cuda_graphs (CUDA only; implies static_cache): each decode step is one CUDA graph replay per
    capacity bucket, and vision and prefill one replay per input shape (prompt length), so no
    op is launched from the host on the critical path."""

    def __init__(
        self,
        segments: Any,
        device: str = "cpu",
        compile: bool = False,
        static_cache: bool = False,
        cuda_graphs: bool = False,
        bucket: int = DEFAULT_BUCKET,
    ):
        if cuda_graphs and torch.device(device).type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device!r}")
        static_cache = static_cache or cuda_graphs
        if static_cache and segments.static_decode is None:
            raise ValueError("static_cache needs segments captured with static_decode=True")
        if static_cache and segments.static_decode.output_names[1].startswith("inplace."):
            raise ValueError(
                "static_cache runs the static decode that returns new rows: capture with "
                "fused_attention=False (the fused one is the ONNX target's)"
            )
        self.info = segments.info
        entries = [segment_entry(seg) for seg in segments]
        modules = [on_device(seg.program, device) for seg in segments]
        if compile:
            modules[0], modules[1] = (torch.compile(m, dynamic=False) for m in modules[:2])
        self.vision, self.prefill_fn, self.decode_fn = modules
        fns: list[Any] = list(modules)
        if cuda_graphs:
            fns[0] = GraphPerShape(fns[0], device, "vision")
            fns[1] = GraphPerShape(fns[1], device, "prefill")
        runners: dict[str, Any] = {
            seg.name: TorchCallRunner(seg.name, entry, fn, device)
            for seg, entry, fn in zip(segments, entries, fns, strict=True)
        }
        if static_cache:
            self.decode_fn = on_device(segments.static_decode.program, device)
            runners["decode"] = StaticCacheDecoder(
                "decode", entries[2], self.decode_fn, device, cuda_graphs=cuda_graphs, bucket=bucket
            )
        super().__init__(runners)

    def generate(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, max_new_tokens: int
    ) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens and the (steps, vocab) float32 logits that chose them; EOS does not
        stop it. input_ids (1, n) and pixel_values (B, 3, S, S) of a LLaVA-1.5 prompt with B
        images, as its processor writes them (each image one tile)."""
        from mllmc.runtime.layout import locate_images

        def encode() -> torch.Tensor:
            features = self.encode_pixels(pixel_values)["image_features"]  # (B, K, d)
            return features.reshape(1, -1, features.shape[-1])

        per_image = (input_ids[0] == self.info.image_token_id).sum().item() // len(pixel_values)
        counts = [per_image] * len(pixel_values)
        layout = locate_images(input_ids[0].cpu().numpy(), self.info.image_token_id, counts)
        out = self.loop(layout, encode, max_new_tokens)
        return out.tokens, torch.from_numpy(out.logits)
