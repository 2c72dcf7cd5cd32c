"""ShortV Layer Contribution (LC) calibration.

LC_l = KL(p_ablated ‖ p_orig) of the next-token distribution at the last prompt token, where
p_ablated comes from the same forward with layer l's residual updates (attention and MLP outputs)
zeroed at the visual positions only — i.e. layer l's visual rows pass through unchanged, the same
hook as ShortV's eager reference. As the official code: `KLDivLoss(log_softmax(orig),
softmax(ablated))`, batch 1, averaged over the samples. The text-position LC is computed the same
way, for reference. Layers sorted by ascending visual LC (ties by index) give the freeze order.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllmc.compiler.evaluate import Items, calibration_samples, check_count
from mllmc.runtime.errors import UserError
from mllmc.runtime.jsonfile import JSONError, read_json

log = logging.getLogger(__name__)

BUILTIN_PROMPTS = (
    "Describe the image.",
    "What shapes are in the picture?",
    "What colour is the largest shape?",
    "Is there any text in the image? Read it.",
    "How many objects are there?",
    "What is in the top left corner?",
    "Provide a short description of the photo.",
    "Answer the question using a single word or phrase. What colour is the background?",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
_WORDS = ("CAT", "STOP", "OPEN", "42", "EXIT", "MAP", "SALE", "BUS")


def builtin_images(n: int, size: int = 336, seed: int = 0) -> list[Any]:
    """n generated images: coloured shapes and a word drawn with Pillow on a tinted background."""
    return list(iter_builtin_images(n, size, seed))


def iter_builtin_images(n: int, size: int = 336, seed: int = 0) -> Iterator[Any]:
    """`builtin_images`, made one at a time as they are iterated."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for i in range(n):
        bg = tuple(int(c) for c in rng.integers(150, 256, 3))
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
            w, h = (int(v) for v in rng.integers(size // 10, size // 3, 2))
            color = tuple(int(c) for c in rng.integers(0, 200, 3))
            shape = int(rng.integers(0, 3))
            if shape == 0:
                draw.ellipse((x0, y0, x0 + w, y0 + h), fill=color)
            elif shape == 1:
                draw.rectangle((x0, y0, x0 + w, y0 + h), fill=color)
            else:
                draw.polygon([(x0, y0 + h), (x0 + w // 2, y0), (x0 + w, y0 + h)], fill=color)
        draw.text((size // 8, size - size // 6), _WORDS[i % len(_WORDS)], fill=(0, 0, 0))
        yield img


def builtin_samples(info: Any, n: int = 40, seed: int = 0) -> list[tuple[Any, str]]:
    images = builtin_images(n, size=max(info.image_size, 64), seed=seed)
    return [(img, BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]) for i, img in enumerate(images)]


MAX_PROMPTS_BYTES = 64 * 2**20  # the largest prompts file


def load_samples(
    images: str | None,
    prompts: str | None,
    n: int,
    info: Any,
    task: str | None = None,
    data: str | None = None,
) -> Items:
    """Calibration samples: the train split of a built-in task (`task`, e.g. shapes-qa), the
    images and prompts of a JSONL file (`data`, as `mllmc eval --data` reads), or an image
    directory and a prompts file (either may be built-in).

    Every file is read and checked here (image headers included); the images are decoded, or
    generated at the model's image size (`info.image_size`; 336 px when `info` is None), as
    the samples are iterated."""
    from mllmc.runtime.preprocess import load_image, open_image

    check_count(n, "--num-samples")
    if task is not None or data is not None:
        if images is not None or prompts is not None:
            raise UserError("give --task or --data, or --images/--prompts, not both")
        return calibration_samples(task, data, n)
    prompt_list = list(BUILTIN_PROMPTS) if prompts is None else read_prompts(prompts)
    if images is None:
        size = 336 if info is None else max(info.image_size, 64)
        imgs = Items(n, lambda: iter_builtin_images(n, size=size))
    else:
        d = Path(images)
        if not d.is_dir():
            raise UserError(f"image directory {d} " + ("is a file" if d.exists() else "not found"))
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[:n]
        if not files:
            raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {d}")
        for f in files:
            open_image(f).close()
        imgs = Items(len(files), lambda: (load_image(f, exif_transpose=False) for f in files))

    def make() -> Iterator[tuple[Any, str]]:
        for i, img in enumerate(imgs):
            yield img, prompt_list[i % len(prompt_list)]

    return Items(len(imgs), make)


def read_prompts(path: str | Path) -> list[str]:
    """The non-blank lines of a UTF-8 prompts file, stripped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file {p} " + ("is a directory" if p.is_dir() else "not found"))
    try:
        if p.stat().st_size > MAX_PROMPTS_BYTES:
            raise UserError(f"prompts file {p} is larger than {MAX_PROMPTS_BYTES} bytes")
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read prompts file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(
            f"prompts file {p} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    prompt_list = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompt_list:
        raise UserError(f"prompts file {p} has no prompts")
    return prompt_list


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

    def __init__(self, model: Any, inputs: Any) -> None:
        self.model = model
        self.layers = model.model.language_model.layers
        self.calls: list[tuple[torch.Tensor, tuple, dict[str, Any]]] = []

        def grab(_module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
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
    model: Any,
    info: Any,
    samples: Iterable[tuple[Any, str]],
    progress: bool | None = False,
    text: bool = True,
) -> dict[str, Any]:
    """Per-layer visual LC (and text LC unless `text=False`: then "lc_text" is None) averaged
    over `samples`, and the ascending visual order. Each sample runs the model once and then,
    per layer and row kind, the decoder from that layer on (`DecoderTail`). `progress`: a
    progress bar (None: where stderr is a terminal)."""
    from tqdm.auto import tqdm
    from transformers import AutoProcessor

    from mllmc.compiler.verify import processor_inputs

    processor = AutoProcessor.from_pretrained(info.model_dir)
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


def default_order(model: Any, info: Any) -> tuple[list[int], str]:
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


def _read_calibration_file(p: Path, what: str, info: Any) -> dict[str, Any]:
    """A calibration file's JSON object, refused when it is corrupt or was made for another
    model than `info`'s (its recorded config hash differs; a file without one is taken on its
    layer count alone)."""
    try:
        data = read_json(p)
        if not isinstance(data, dict):
            raise JSONError("not a JSON object")
    except JSONError as e:
        raise UserError(f"{what} {p} is corrupt: {e}") from None
    recorded = data.get("model_config_hash")
    if recorded is not None and recorded != info.config_hash:
        raise UserError(
            f"{what} {p} was made for another model (config hash {recorded}); "
            f"{info.model_dir} has config hash {info.config_hash}: recalibrate on this model"
        )
    return data


def _layer_index(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer layer index")
    return value


def read_lc_file(path: str | Path, info: Any) -> list[int]:
    """The layer order (ascending LC) of an LC file, checked against the model."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"shortv: LC file {p} not found (make one with: mllmc calibrate MODEL -o {p})"
        )
    data = _read_calibration_file(p, "shortv: LC file", info)
    try:
        if not isinstance(data.get("order"), list):
            raise KeyError("order")
        order = [_layer_index(i) for i in data["order"]]
    except (KeyError, TypeError) as e:
        raise UserError(f"shortv: corrupt LC file {p}: {type(e).__name__}: {e}") from None
    if sorted(order) != list(range(info.num_layers)):
        raise UserError(
            f"shortv: LC file {p} is for a {len(order)}-layer model; this model has {info.num_layers} layers"
        )
    return order


def format_table(lc: dict[str, Any]) -> str:
    rank = {layer: r for r, layer in enumerate(lc["order"])}
    rows = ["layer  LC(visual)     LC(text)   rank"]
    for i, (v, t) in enumerate(zip(lc["lc_visual"], lc["lc_text"], strict=True)):
        rows.append(f"{i:5d}  {v:10.3e}  {t:10.3e}  {rank[i]:5d}")
    return "\n".join(rows)


def plot_lc(lc: dict[str, Any], path: Path, force: bool = True) -> None:
    """The LC of every layer as a PNG chart at `path` (written through a temporary file; an
    existing file is replaced only with `force`)."""
    import matplotlib

    from mllmc.compiler.outputs import write_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = lc["num_layers"]
    fig, ax = plt.subplots(figsize=(max(6, L * 0.4), 3.5))
    x = np.arange(L)
    ax.bar(x - 0.2, lc["lc_visual"], 0.4, label="visual tokens")
    ax.bar(x + 0.2, lc["lc_text"], 0.4, label="text tokens")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("Layer Contribution (KL)")
    ax.set_title(f"ShortV Layer Contribution, {lc['samples']} samples")
    ax.legend()
    fig.tight_layout()
    try:
        write_figure(fig, path, force=force)
    finally:
        plt.close(fig)


def calibrate_cli(
    model_dir: str,
    output: str,
    images: str | None,
    prompts: str | None,
    n: int,
    plot: bool = True,
    progress: bool = True,
    task: str | None = None,
    data: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """`mllmc calibrate MODEL --pass shortv`: the LC file `shortv:lc=FILE` reads (and its chart
    beside it, .png), each replacing an existing file only with `force`."""
    from mllmc.compiler.capture import load_model
    from mllmc.compiler.outputs import write_file

    load_samples(images, prompts, n, None, task=task, data=data)  # bad samples: before the model
    model, info = load_model(model_dir)
    samples = load_samples(images, prompts, n, info, task=task, data=data)
    lc = layer_contribution(model, info, samples, progress=progress)
    out = write_file(output, json.dumps(lc, indent=2), force=force)
    print(format_table(lc))
    print(f"order (freeze first): {lc['order']}")
    print(f"wrote {out} ({lc['samples']} samples, {lc['seconds']} s)")
    if plot:
        png = out.with_suffix(".png")
        plot_lc(lc, png, force=force)
        print(f"wrote {png}")
    return lc


# ----------------------------------------------------------------------------------------------
# Visual-token exit (vte): the earliest exit layer whose output stays close to the full model's.


def exit_divergence(
    model: Any, info: Any, samples: list[tuple[Any, str]], progress: bool = False
) -> list[float]:
    """Mean over `samples` of KL(p_exit ‖ p_orig) at the last prompt token, for every exit layer
    K = 0..L (K = L is the unmodified model: 0), with the vte eager reference (layers >= K see
    the text rows only)."""
    from tqdm.auto import tqdm
    from transformers import AutoProcessor

    from mllmc.compiler.verify import processor_inputs
    from mllmc.passes.row_pruning import pruned_forward

    processor = AutoProcessor.from_pretrained(info.model_dir)
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


def read_exit_file(path: str | Path, info: Any) -> tuple[int, float]:
    """(exit layer, threshold) of a `mllmc calibrate --pass vte` file, checked against the model."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"vte: exit file {p} not found (make one with: mllmc calibrate MODEL --pass vte "
            f"--threshold T -o {p})"
        )
    data = _read_calibration_file(p, "vte: exit file", info)
    try:
        k, layers = _layer_index(data["k"]), _layer_index(data["num_layers"])
        threshold = data["threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold <= 0:
            raise TypeError(f"threshold {threshold!r} is not a number > 0")
    except (KeyError, TypeError) as e:
        raise UserError(f"vte: corrupt exit file {p}: {type(e).__name__}: {e}") from None
    if layers != info.num_layers or not 0 <= k <= layers:
        raise UserError(
            f"vte: exit file {p} is for a {layers}-layer model; this model has "
            f"{info.num_layers} layers"
        )
    return k, float(threshold)


def calibrate_exit_cli(
    model_dir: str,
    output: str,
    threshold: float,
    images: str | None,
    prompts: str | None,
    n: int,
    progress: bool = True,
    task: str | None = None,
    data: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """`mllmc calibrate MODEL --pass vte --threshold T`: the exit file `vte:calib=FILE` reads
    (an existing file is replaced only with `force`)."""
    from mllmc.compiler.capture import load_model
    from mllmc.compiler.outputs import write_file

    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise UserError(f"--threshold must be a finite number > 0, got {threshold!r}")
    load_samples(images, prompts, n, None, task=task, data=data)  # bad samples: before the model
    model, info = load_model(model_dir)
    samples = load_samples(images, prompts, n, info, task=task, data=data)
    t0 = time.perf_counter()
    kl = exit_divergence(model, info, samples, progress=progress)
    k = choose_exit(kl, threshold)
    data = {
        "pass": "vte",
        "model_config_hash": info.config_hash,
        "num_layers": info.num_layers,
        "samples": len(samples),
        "threshold": threshold,
        "kl": kl,
        "k": k,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out = write_file(output, json.dumps(data, indent=2), force=force)
    print("exit K  mean KL(exit ‖ full)")
    for i, v in enumerate(kl):
        print(f"{i:6d}  {v:10.3e}{'  <- chosen' if i == k else ''}")
    print(f"wrote {out}: vte exit at layer {k} (threshold {threshold}, {len(samples)} samples)")
    return data
