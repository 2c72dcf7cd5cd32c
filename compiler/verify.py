"""Verify: a compiled artifact against the eager oracle (HF model + each pass's reference hooks).

The oracle is the Hugging Face model itself, run with `model.generate` (its own KV cache), with
the eager reference of every pass in the artifact active (e.g. ShortV's frozen-row hooks). The
engine runs the same image and prompt through its own numpy preprocessing; so a pass, the export,
the ONNX conversion and the runtime's preprocessing are all checked at once.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mllmc.passes import PassRecord
    from mllmc.runtime.manifest import Manifest

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe the image."
LOGIT_TOL = 1e-4


def probe_image(size: int = 96, seed: int = 0):
    """A deterministic synthetic RGB image (shapes on a gradient), not square on purpose."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    h, w = size, int(size * 1.25)
    grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    img = Image.fromarray((grad * rng.uniform(0.3, 1.0, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        r = int(rng.integers(8, 30))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.ellipse((x, y, x + r, y + r), fill=color)
    return img


@dataclass
class VerifyReport:
    tokens_engine: list[int]
    tokens_eager: list[int]
    step_diffs: list[float]  # max |Δlogit| per compared step
    tol: float = LOGIT_TOL
    # fp32 rounding grows with the logits' size: the bound is tol × max(1, max |eager logit|),
    # so a model whose logits reach 20 is held to 2e-3, a random-init one (|logits| < 1) to tol
    scale: float = 1.0
    near_tie_step: int | None = None  # where tokens diverged on a near-tie (reported, allowed)
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs_logit_diff(self) -> float:
        return max(self.step_diffs) if self.step_diffs else float("nan")

    @property
    def tokens_match(self) -> bool:
        return self.tokens_engine == self.tokens_eager

    @property
    def ok(self) -> bool:
        logits_ok = bool(self.step_diffs) and self.max_abs_logit_diff <= self.bound
        return logits_ok and (self.tokens_match or self.near_tie_step is not None)

    @property
    def bound(self) -> float:
        return self.tol * self.scale

    def line(self) -> str:
        tie = (
            f", near-tie divergence at step {self.near_tie_step}"
            if self.near_tie_step is not None
            else ""
        )
        return (
            f"{'PASS' if self.ok else 'FAIL'}: max |Δlogit| {self.max_abs_logit_diff:.2e} "
            f"(tol {self.tol:.0e}{f' x logit scale {self.scale:.1f}' if self.scale > 1 else ''}) "
            f"over {len(self.step_diffs)} steps, tokens "
            f"{'identical' if self.tokens_match else 'differ'} "
            f"({len(self.tokens_engine)} engine / {len(self.tokens_eager)} eager){tie}"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "tol": self.tol,
            "logit_scale": self.scale,
            "steps": len(self.step_diffs),
            "tokens_match": self.tokens_match,
            "near_tie_step": self.near_tie_step,
        }


def processor_inputs(processor: Any, image: Any, prompt: str) -> Any:
    """The HF processor's tensors for one image (a PIL image or a path) and a prompt; a prompt
    without the image token gets the model's chat template, as the runtime does."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        image = Image.open(image)
    if getattr(processor, "image_token", "<image>") not in prompt:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=prompt, return_tensors="pt")


def eager_generate(
    model: Any,
    model_dir: str | Path,
    image: Any,
    prompt: str,
    max_new_tokens: int,
    records: Sequence[PassRecord] = (),
    stop_at_eos: bool = False,
) -> tuple[list[int], np.ndarray]:
    """Greedy HF generation with every pass's eager reference active -> (tokens, logits (S, V)).

    With stop_at_eos=False (the default for verification) both sides run all `max_new_tokens`
    steps, so a random model that emits EOS early still exercises every decode step."""
    import copy

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    inputs = processor_inputs(processor, image, prompt).to(model.device)
    config = copy.deepcopy(model.generation_config)
    config.update(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    saved_eos = model.generation_config.eos_token_id
    if not stop_at_eos:
        config.eos_token_id = None
        model.generation_config.eos_token_id = None  # generate() falls back to it otherwise
    with contextlib.ExitStack() as stack, torch.no_grad():
        for r in records:
            stack.enter_context(r.reference(model, None))
        try:
            out = model.generate(**inputs, generation_config=config)
        finally:
            model.generation_config.eos_token_id = saved_eos
    n = inputs["input_ids"].shape[1]
    tokens = out.sequences[0, n:].tolist()
    logits = torch.cat(out.logits, 0).float().cpu().numpy()  # (S, V)
    return tokens, logits


def compare(
    tokens_engine: list[int],
    logits_engine: np.ndarray,
    tokens_eager: list[int],
    logits_eager: np.ndarray,
    tol: float = LOGIT_TOL,
) -> VerifyReport:
    diffs: list[float] = []
    near_tie = None
    scale = 1.0
    for step in range(min(len(tokens_engine), len(tokens_eager))):
        diffs.append(float(np.abs(logits_engine[step] - logits_eager[step]).max()))
        scale = max(scale, float(np.abs(logits_eager[step]).max()))
        if tokens_engine[step] != tokens_eager[step]:
            top2 = np.sort(logits_eager[step])[-2:]
            if top2[1] - top2[0] <= 10 * tol * scale:
                near_tie = step
            break
    return VerifyReport(list(tokens_engine), list(tokens_eager), diffs, tol, scale, near_tie)


def verify(
    artifact_dir: str | Path,
    model: Any,
    info: Any,
    records: Sequence[PassRecord],
    image: Any = None,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 8,
    tol: float = LOGIT_TOL,
) -> VerifyReport:
    """Run the artifact and the eager oracle on the same image + prompt and compare them."""
    from mllmc.runtime import load

    image = probe_image() if image is None else image
    engine = load(artifact_dir)
    result = engine.generate(image, prompt, max_new_tokens=max_new_tokens, stop_at_eos=False)
    tokens, logits = eager_generate(model, info.model_dir, image, prompt, max_new_tokens, records)
    report = compare(result.token_ids, result.logits, tokens, logits, tol)
    log.info("verify: %s", report.line())
    return report


def records_from_manifest(manifest: Manifest) -> list[PassRecord]:
    """Rebuild the pass records (registry entry + config) of an artifact, for `mllmc verify`."""
    from mllmc.passes import PassRecord, get_pass, make_config

    records = []
    for p in manifest.passes:
        info = get_pass(p.name)
        records.append(PassRecord(info, make_config(info, p.config), p))
    return records
