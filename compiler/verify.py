"""Verify: a compiled artifact against the eager oracle (HF model + each pass's reference hooks).

The oracle is the Hugging Face model itself, run with `model.generate` (its own KV cache), with
the eager reference of every pass in the artifact active (e.g. ShortV's frozen-row hooks). The
engine runs the same image and prompt through its own numpy preprocessing; so a pass, the export,
the ONNX conversion and the runtime's preprocessing are all checked at once.

The engine decodes greedily first; the oracle is then fed the engine's own tokens (teacher
forcing), so every step compares both sides on the same prefix, whatever the tokens do. At each
step every logit must lie within tol x max(1, max |eager logit|) of eager's, and where the
engine's token is not eager's greedy choice, eager's margin between the two must be a near-tie
(<= 2 x that bound, the most a within-bound engine can flip); each such divergence is reported.
The oracle runs in the artifact's dtype and is held to the tolerance its manifest records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mllmc.compiler.core.capture import load_processor, processor_inputs
from mllmc.runtime.errors import UserError
from mllmc.runtime.manifest import FLOAT32_TOL

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mllmc.compiler.core.pass_types import PassRecord
    from mllmc.runtime.manifest import Manifest

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe the image."
LOGIT_TOL = FLOAT32_TOL


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


@dataclass(frozen=True)
class Divergence:
    """A step where the engine's token is not eager's greedy choice on the same prefix.

    `gap` is eager's logit for its own token minus its logit for the engine's (eager's top-2 gap
    when the engine picked eager's runner-up). With every logit within the bound, the engine's
    argmax can differ from eager's only where that gap is <= 2 x bound: a near-tie, allowed;
    a larger gap fails."""

    step: int
    engine_token: int
    eager_token: int
    gap: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class VerifyReport:
    tokens_engine: list[int]
    tokens_eager: list[int]  # eager's greedy choice at each compared step, on the engine's prefix
    step_diffs: list[float]  # max |Δlogit| per compared step
    tol: float = LOGIT_TOL
    # rounding grows with the logits' size: the bound is tol × max(1, max |eager logit|), so a
    # model whose logits reach 20 is held to 20 × tol, a random-init one (|logits| < 1) to tol
    scale: float = 1.0
    divergences: list[Divergence] = field(default_factory=list)
    steps: int = 0  # the steps the comparison must cover (every step the engine ran)
    dtype: str | None = None  # what the eager reference ran in, when known
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs_logit_diff(self) -> float:
        return max(self.step_diffs) if self.step_diffs else float("nan")

    @property
    def complete(self) -> bool:
        """Every step compared: eager ran on the engine's tokens all the way."""
        return 0 < self.steps == len(self.step_diffs)

    @property
    def tokens_match(self) -> bool:
        return self.complete and not self.divergences

    @property
    def bound(self) -> float:
        return self.tol * self.scale

    @property
    def ok(self) -> bool:
        logits_ok = self.complete and self.max_abs_logit_diff <= self.bound
        return logits_ok and all(d.gap <= 2 * self.bound for d in self.divergences)

    def _divergence(self, d: Divergence) -> str:
        verdict = "a near-tie" if d.gap <= 2 * self.bound else "not a near-tie"
        return (
            f"step {d.step} engine {d.engine_token} / eager {d.eager_token}, eager's gap "
            f"{d.gap:.2e} {'<=' if d.gap <= 2 * self.bound else '>'} 2 x bound: {verdict}"
        )

    def line(self) -> str:
        scale = f" x logit scale {self.scale:.1f}" if self.scale > 1 else ""
        dtype = f", {self.dtype}" if self.dtype else ""
        if not self.divergences:
            tokens = "identical" if self.complete else "identical so far"
        else:
            shown = "; ".join(self._divergence(d) for d in self.divergences[:3])
            more = f"; {len(self.divergences) - 3} more" if len(self.divergences) > 3 else ""
            tokens = f"differ at {len(self.divergences)} step(s) ({shown}{more})"
        notes = "".join(f"; {n}" for n in self.notes)
        return (
            f"{'PASS' if self.ok else 'FAIL'}: max |Δlogit| {self.max_abs_logit_diff:.2e} "
            f"(tol {self.tol:.3g}{scale}{dtype}) over {len(self.step_diffs)} of {self.steps} "
            f"steps, tokens {tokens}{notes}"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "tol": self.tol,
            "logit_scale": self.scale,
            "dtype": self.dtype,
            "steps": len(self.step_diffs),
            "tokens_match": self.tokens_match,
            "divergences": [d.to_json() for d in self.divergences],
        }


class _ForceTokens:
    """A logits processor that makes `generate` pick `tokens[i]` at step i (teacher forcing).
    It returns new scores: the raw logits `generate` reports stay the model's own."""

    def __init__(self, tokens: Sequence[int], prompt_len: int) -> None:
        self.tokens = list(tokens)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[input_ids.shape[1] - self.prompt_len]] = 0.0
        return forced


def eager_generate(
    model: Any,
    model_dir: str | Path,
    image: Any,
    prompt: str,
    max_new_tokens: int,
    records: Sequence[PassRecord] = (),
    stop_at_eos: bool = False,
    tokens: Sequence[int] | None = None,
) -> tuple[list[int], np.ndarray]:
    """Greedy HF generation with every pass's eager reference active -> (tokens, logits (S, V)).

    With stop_at_eos=False (the default for verification) both sides run all `max_new_tokens`
    steps, so a random model that emits EOS early still exercises every decode step. With
    `tokens` (one per step), step i is fed `tokens[:i]` instead of eager's own choices (teacher
    forcing): the logits are eager's on that prefix, whatever eager itself would have picked."""
    import copy

    if tokens is not None and len(tokens) != max_new_tokens:
        raise ValueError(f"tokens: {len(tokens)} given for {max_new_tokens} steps; give one a step")
    processor = load_processor(model_dir)
    inputs = processor_inputs(processor, image, prompt).to(model.device)
    n = inputs["input_ids"].shape[1]
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
    forcing = [_ForceTokens(tokens, n)] if tokens is not None else []
    with contextlib.ExitStack() as stack, torch.no_grad():
        for r in records:
            stack.enter_context(r.reference(model, None))
        try:
            out = model.generate(**inputs, generation_config=config, logits_processor=forcing)
        finally:
            model.generation_config.eos_token_id = saved_eos
    generated = out.sequences[0, n:].tolist()
    logits = torch.cat(out.logits, 0).float().cpu().numpy()  # (S, V)
    return generated, logits


def compare(
    tokens_engine: Sequence[int],
    logits_engine: np.ndarray,
    tokens_eager: Sequence[int],
    logits_eager: np.ndarray,
    tol: float = LOGIT_TOL,
    steps: int | None = None,
) -> VerifyReport:
    """Compare the engine with eager step by step: every logit within tol x the logits' scale,
    and the engine's token against eager's greedy choice (argmax of eager's logits) at that step.

    `tokens_eager` are the tokens eager was fed: the engine's own under teacher forcing
    (`eager_generate(..., tokens=...)`), so every step compares; eager's own when it ran free,
    and then a step is compared only while both sides ran on the same prefix. A report that could
    not compare all `steps` (default: every engine step) fails."""
    steps = len(tokens_engine) if steps is None else steps
    diffs: list[float] = []
    choices: list[int] = []
    divergences: list[Divergence] = []
    notes: list[str] = []
    scale = 1.0
    available = min(len(tokens_engine), len(logits_engine), len(logits_eager), steps)
    for step in range(available):
        if step and tokens_engine[step - 1] != tokens_eager[step - 1]:
            notes.append(
                f"eager ran on other tokens than the engine from step {step} on: those steps "
                "cannot be compared (feed eager the engine's tokens)"
            )
            break
        ref = np.asarray(logits_eager[step], dtype=np.float64)
        diffs.append(float(np.abs(np.asarray(logits_engine[step], np.float64) - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        choice, token = int(np.argmax(ref)), int(tokens_engine[step])
        choices.append(choice)
        if token != choice:
            divergences.append(Divergence(step, token, choice, float(ref[choice] - ref[token])))
    else:
        if available < steps:
            notes.append(
                f"{len(tokens_engine)} engine tokens, {len(logits_engine)} engine and "
                f"{len(logits_eager)} eager logit rows for {steps} steps"
            )
    return VerifyReport(
        list(tokens_engine), choices, diffs, tol, scale, divergences, steps, notes=notes
    )


def default_prompt(engine: Any, num_images: int) -> str:
    """The prompt checks run without one: DEFAULT_PROMPT, templated by the model's chat
    template, or where the model has none, after one image placeholder per image."""
    encoder = engine.prompt_encoder
    if encoder.chat_template:
        return DEFAULT_PROMPT
    return f"{encoder.image_token * num_images}\n{DEFAULT_PROMPT}"


def verify(
    artifact_dir: str | Path,
    model: Any,
    info: Any,
    records: Sequence[PassRecord],
    image: Any = None,
    prompt: str | None = None,
    max_new_tokens: int = 8,
    tol: float = LOGIT_TOL,
) -> VerifyReport:
    """Run the artifact on an image + prompt, then the eager oracle (`model`, in the precision it
    is in; a quantized artifact's with its weights through the same quantize -> dequantize round
    trip, `backends.quantize.quantized_weights`) on the engine's own tokens (teacher forcing),
    and compare every step. Without a `prompt`, `default_prompt`'s."""
    from mllmc.runtime import load

    from .backends.quantize import quantized_weights

    image = probe_image() if image is None else image
    engine = load(artifact_dir)
    if prompt is None:
        prompt = default_prompt(engine, len(image) if isinstance(image, (list, tuple)) else 1)
    result = engine.generate(image, prompt, max_new_tokens=max_new_tokens, stop_at_eos=False)
    engine_tokens = list(result.token_ids)
    if engine_tokens:
        with quantized_weights(model, engine.manifest.precision) as oracle:
            _, logits = eager_generate(
                oracle,
                info.model_dir,
                image,
                prompt,
                len(engine_tokens),
                records,
                tokens=engine_tokens,
            )
    else:
        logits = np.zeros((0, 0), np.float32)
    report = compare(engine_tokens, result.logits, engine_tokens, logits, tol, max_new_tokens)
    report.dtype = str(getattr(model, "dtype", "")).removeprefix("torch.") or None
    log.info("verify: %s", report.line())
    return report


def verify_artifact(
    artifact_dir: str | Path,
    model_dir: str | Path,
    image: Any = None,
    prompt: str | None = None,
    max_new_tokens: int = 16,
    tol: float | None = None,
) -> VerifyReport:
    """`mllmc verify`: the artifact against the model directory it was compiled from, with the
    eager model run in the artifact's dtype and held to the tolerance its manifest records
    (`tol` overrides it)."""
    from mllmc.compiler.core.capture import load_model
    from mllmc.runtime.manifest import read_manifest

    from .backends import cast_model

    manifest = read_manifest(artifact_dir)
    images = image if isinstance(image, (list, tuple)) else [] if image is None else [image]
    for one in images:
        if not Path(one).is_file():
            raise UserError(f"cannot read image {one}: no such file")
    model, info = load_model(model_dir)
    if info.config_hash != manifest.model.config_hash:
        raise UserError(f"{artifact_dir} was compiled from a different model than {model_dir}")
    return verify(
        artifact_dir,
        cast_model(model, manifest.dtype),
        info,
        records_from_manifest(manifest),
        image=image,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        tol=manifest.tol if tol is None else tol,
    )


def records_from_manifest(manifest: Manifest) -> list[PassRecord]:
    """Rebuild the pass records (registry entry + config) of an artifact, for `mllmc verify`."""
    from mllmc.compiler.core.pass_types import PassRecord
    from mllmc.passes import get_pass, make_config

    records = []
    for p in manifest.passes:
        info = get_pass(p.name)
        records.append(PassRecord(info, make_config(info, p.config), p))
    return records
