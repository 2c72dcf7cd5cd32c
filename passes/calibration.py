"""ShortV Layer Contribution (LC) calibration.

LC_l = KL(p_ablated ‖ p_orig) of the next-token distribution at the last prompt token, where
p_ablated comes from the same forward with layer l's residual updates (attention and MLP outputs)
zeroed at the visual positions only — i.e. layer l's visual rows pass through unchanged, the same
hook as ShortV's eager reference. As the official code: `KLDivLoss(log_softmax(orig),
softmax(ablated))`, batch 1, averaged over the samples. The text-position LC is computed the same
way, for reference. Layers sorted by ascending visual LC (ties by index) give the freeze order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image
    from torch import nn
    from transformers import LlavaForConditionalGeneration

    from mllmc.runtime.manifest import ModelInfo

from mllmc.compiler.data.calib_images import builtin_samples
from mllmc.runtime.errors import UserError
from mllmc.runtime.jsonfile import JSONError, read_json

log = logging.getLogger(__name__)


def _kl(ablated: torch.Tensor, orig: torch.Tensor) -> float:
    # KL(p_ablated ‖ p_orig) = Σ p_a (log p_a − log p_o); logits (V,)
    log_a, log_o = torch.log_softmax(ablated.double(), -1), torch.log_softmax(orig.double(), -1)
    return float((log_a.exp() * (log_a - log_o)).sum())


class DecoderTail:
    """One forward of an HF LLaVA model, kept so that the decoder can be rerun from any layer:
    `logits` is the last position's, and `ablated(layer, keep)` reruns layers layer..L-1 with
    `layer`'s output replaced by its input on the rows `keep` marks (the Layer Contribution
    ablation, as `shortv.keep_rows` does in a full forward). The layers before `layer` and the
    vision tower are not rerun: their outputs do not change."""

    def __init__(
        self, model: LlavaForConditionalGeneration, inputs: Mapping[str, torch.Tensor]
    ) -> None:
        self.model = model
        self.layers = model.model.language_model.layers
        self.calls: list[tuple[torch.Tensor, tuple, dict[str, Any]]] = []

        def grab(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if "hidden_states" in kwargs:
                self.calls.append((kwargs["hidden_states"], args, dict(kwargs)))
            else:
                self.calls.append((args[0], args[1:], dict(kwargs)))

        handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in self.layers]
        try:
            out = model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        self.logits = out.logits[0, -1]
        self.image_rows = inputs["input_ids"][0] == model.config.image_token_id

    def _run(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        _, args, kwargs = self.calls[i]
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        out = self.layers[i](hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def ablated(self, layer: int, keep: torch.Tensor) -> torch.Tensor:
        """Last-position logits with `layer` passing the rows `keep` marks through unchanged."""
        h_in = self.calls[layer][0]
        hidden = torch.where(keep[None, :, None], h_in, self._run(layer, h_in))
        for i in range(layer + 1, len(self.calls)):
            hidden = self._run(i, hidden)
        hidden = self.model.model.language_model.norm(hidden[:, -1:])
        return self.model.lm_head(hidden)[0, -1]


def layer_contribution(
    model: LlavaForConditionalGeneration,
    info: ModelInfo,
    samples: Iterable[tuple[Image.Image, str]],
    progress: bool | None = False,
    text: bool = True,
) -> dict[str, Any]:
    """Per-layer visual LC (and text LC unless `text=False`: then "lc_text" is None) averaged
    over `samples`, and the ascending visual order. Each sample runs the model once and then,
    per layer and row kind, the decoder from that layer on (`DecoderTail`). `progress`: a
    progress bar (None: where stderr is a terminal)."""
    from tqdm.auto import tqdm

    from mllmc.compiler.core.capture import load_processor, processor_inputs

    processor = load_processor(info.model_dir)
    L = info.num_layers
    lc_visual = np.zeros(L)
    lc_text = np.zeros(L)
    count = 0
    t0 = time.perf_counter()
    bar = tqdm(samples, desc="calibrate", disable=None if progress is None else not progress)
    for image, prompt in bar:
        inputs = processor_inputs(processor, image, prompt).to(model.device)
        with torch.no_grad():
            tail = DecoderTail(model, inputs)
            kinds = [(tail.image_rows, lc_visual)] + ([(~tail.image_rows, lc_text)] if text else [])
            for layer in range(L):
                for keep, acc in kinds:
                    acc[layer] += _kl(tail.ablated(layer, keep), tail.logits)
        count += 1
    lc_visual /= max(count, 1)
    lc_text /= max(count, 1)
    order = sorted(range(L), key=lambda i: (round(lc_visual[i], 12), i))
    return {
        "model_config_hash": info.config_hash,
        "num_layers": L,
        "samples": count,
        "lc_visual": lc_visual.tolist(),
        "lc_text": lc_text.tolist() if text else None,
        "order": order,
        "seconds": round(time.perf_counter() - t0, 2),
    }


DEFAULT_SAMPLES = 2  # built-in samples of the calibration a shortv pass runs without an order


def default_order(model: LlavaForConditionalGeneration, info: ModelInfo) -> tuple[list[int], str]:
    """The layer order of ShortV's built-in calibration (DEFAULT_SAMPLES generated images,
    visual LC only; under a minute on small-llava's 16 layers and 576 visual tokens on a few
    CPU cores), with a progress bar where stderr is a terminal; and a line saying what it was."""
    log.warning(
        "shortv: no layer list, LC file or published list: calibrating on %d built-in samples "
        "(for a better order: mllmc calibrate MODEL -o lc.json, then shortv:lc=lc.json)",
        DEFAULT_SAMPLES,
    )
    lc = layer_contribution(
        model, info, builtin_samples(info, n=DEFAULT_SAMPLES), progress=None, text=False
    )
    return lc["order"], f"calibration on {lc['samples']} built-in samples ({lc['seconds']:.1f} s)"


def _read_calibration_file(p: Path, what: str, info: ModelInfo, make: str) -> dict[str, Any]:
    """A calibration file's JSON object, refused when it is corrupt, has no recorded config
    hash, or was made for another model than `info`'s (another config hash or layer count).
    `make`: the command that writes a good one, named in the refusals."""
    try:
        data = read_json(p)
        if not isinstance(data, dict):
            raise JSONError("not a JSON object")
    except JSONError as e:
        raise UserError(f"{what} {p} is corrupt: {e}") from None
    recorded = data.get("model_config_hash")
    if not isinstance(recorded, str):
        raise UserError(
            f"{what} {p} records no model_config_hash, so it cannot be checked against the "
            f"model: recalibrate with: {make}"
        )
    if recorded != info.config_hash:
        raise UserError(
            f"{what} {p} was made for another model (config hash {recorded}); "
            f"{info.model_dir} has config hash {info.config_hash}: recalibrate on this model"
        )
    layers = data.get("num_layers")
    if isinstance(layers, bool) or not isinstance(layers, int):
        raise UserError(f"{what} {p} is corrupt: num_layers {layers!r} is not an integer")
    if layers != info.num_layers:
        raise UserError(
            f"{what} {p} is for a {layers}-layer model; this model has {info.num_layers} "
            f"layers: recalibrate with: {make}"
        )
    return data


def _layer_index(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer layer index")
    return value


def read_lc_file(path: str | Path, info: ModelInfo) -> list[int]:
    """The layer order (ascending LC) of an LC file, checked against the model: the file's
    config hash and layer count must be the model's, and its order a permutation of the
    model's layer indices."""
    p = Path(path)
    make = f"mllmc calibrate MODEL -o {p}"
    if not p.is_file():
        raise UserError(f"shortv: LC file {p} not found (make one with: {make})")
    data = _read_calibration_file(p, "shortv: LC file", info, make)
    raw = data.get("order")
    L = info.num_layers
    if not isinstance(raw, list):
        raise UserError(
            f"shortv: LC file {p} is corrupt: 'order' must be a list of the {L} layer indices, "
            f"got {raw!r:.60}"
        )
    try:
        order = [_layer_index(i) for i in raw]
    except TypeError as e:
        raise UserError(f"shortv: LC file {p} is corrupt: 'order': {e}") from None
    if sorted(order) != list(range(L)):
        bad = [i for i in order if not 0 <= i < L]
        why = (
            f"layer {bad[0]} is out of range 0..{L - 1}"
            if bad
            else f"it has {len(order)} entries"
            if len(order) != L
            else "a layer appears twice"
        )
        raise UserError(
            f"shortv: LC file {p} is corrupt: 'order' must list each of layers 0..{L - 1} once "
            f"({why}): recalibrate with: {make}"
        )
    return order


# ----------------------------------------------------------------------------------------------
# Visual-token exit (vte): the earliest exit layer whose output stays close to the full model's.


def exit_divergence(
    model: LlavaForConditionalGeneration,
    info: ModelInfo,
    samples: list[tuple[Image.Image, str]],
    progress: bool = False,
) -> list[float]:
    """Mean over `samples` of KL(p_exit ‖ p_orig) at the last prompt token, for every exit layer
    K = 0..L (K = L is the unmodified model: 0), with the vte eager reference (layers >= K see
    the text rows only)."""
    from tqdm.auto import tqdm

    from mllmc.compiler.core.capture import load_processor, processor_inputs
    from mllmc.passes.row_pruning import pruned_forward

    processor = load_processor(info.model_dir)
    L = info.num_layers
    kl = np.zeros(L + 1)
    for image, prompt in tqdm(samples, desc="calibrate", disable=not progress, unit="sample"):
        inputs = processor_inputs(processor, image, prompt).to(model.device)
        with torch.no_grad():
            orig = model(**inputs).logits[0, -1]
            for k in range(L):
                with pruned_forward(model, k):
                    kl[k] += _kl(model(**inputs).logits[0, -1], orig)
    return (kl / len(samples)).tolist()


def choose_exit(kl: list[float], threshold: float) -> int:
    """The earliest K whose mean KL is below `threshold` (K = L, no exit, always is)."""
    return next(k for k, v in enumerate(kl) if v < threshold or k == len(kl) - 1)


def read_exit_file(path: str | Path, info: ModelInfo) -> tuple[int, float]:
    """(exit layer, threshold) of a `mllmc calibrate --pass vte` file, checked against the model."""
    p = Path(path)
    make = f"mllmc calibrate MODEL --pass vte --threshold T -o {p}"
    if not p.is_file():
        raise UserError(f"vte: exit file {p} not found (make one with: {make})")
    data = _read_calibration_file(p, "vte: exit file", info, make)
    layers = info.num_layers
    missing = [key for key in ("k", "threshold") if key not in data]
    if missing:
        raise UserError(
            f"vte: exit file {p} is corrupt: no {missing[0]!r}: recalibrate with: {make}"
        )
    try:
        k = _layer_index(data["k"])
        threshold = data["threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold <= 0:
            raise TypeError(f"threshold {threshold!r} is not a number > 0")
    except TypeError as e:
        raise UserError(f"vte: corrupt exit file {p}: {e}") from None
    if not 0 <= k <= layers:
        raise UserError(
            f"vte: exit file {p} is corrupt: exit layer {k} is not in 0..{layers}: "
            f"recalibrate with: {make}"
        )
    return k, float(threshold)
