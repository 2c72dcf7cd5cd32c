"""The captured and ShortV-rewritten programs run by PyTorch on each device there is (CPU always,
CUDA where a GPU is present): 16 greedy tokens and their logits against HF `generate` with the
pass's eager reference, on the device the model was loaded on. On a GPU this is the parity check
of the capture and of the rewrite; the ONNX engine's own checks are in test_compile.py."""

from __future__ import annotations

import pytest
import torch

from mllmc.compiler.core.capture import capture, model_info, processor_inputs
from mllmc.compiler.core.pass_types import PassRecord
from mllmc.compiler.tools.torch_engine import TorchEngine
from mllmc.compiler.verify import DEFAULT_PROMPT, LOGIT_TOL, compare, eager_generate
from mllmc.passes import get_pass
from mllmc.passes.shortv import ShortVConfig, shortv

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not torch.cuda.is_available(), reason="no CUDA device on this machine"
            ),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        # fp32 parity at 1e-4 needs true fp32 matmuls, not TF32
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield "cuda"
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield "cpu"


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "other_model_dir"])
def test_torch_engine_matches_hf_generate(request, model_fixture, device, sample_image):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir = request.getfixturevalue(model_fixture)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    info = model_info(model, model_dir)
    segments = capture(model, info)  # on the CPU, and the rewrite too; then everything moves
    frozen = (0, 1, 2, info.num_layers - 1)
    variants = [((), segments), (frozen, shortv(segments, ShortVConfig(layers=frozen)).segments)]
    model = model.to(device)
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor_inputs(processor, sample_image, DEFAULT_PROMPT).to(device)
    shortv_info = get_pass("shortv")
    for layers, segs in variants:
        cfg = ShortVConfig(layers=layers)
        engine = TorchEngine(segs, device=device)
        assert next(engine.prefill_fn.parameters()).device.type == device
        tokens, logits = engine.generate(
            inputs["input_ids"], inputs["pixel_values"], max_new_tokens=16
        )
        records = [PassRecord(shortv_info, cfg)] if layers else []
        ref_tokens, ref_logits = eager_generate(
            model, model_dir, sample_image, DEFAULT_PROMPT, 16, records
        )
        report = compare(tokens, logits.float().cpu().numpy(), ref_tokens, ref_logits)
        assert len(report.step_diffs) == 16, report.line()
        assert report.tokens_match and report.max_abs_logit_diff <= LOGIT_TOL, report.line()
