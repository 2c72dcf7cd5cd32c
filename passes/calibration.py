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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllmc.compiler.evaluate import calibration_samples
from mllmc.runtime.errors import UserError

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
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = []
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
        images.append(img)
    return images


def builtin_samples(info: Any, n: int = 40, seed: int = 0) -> list[tuple[Any, str]]:
    images = builtin_images(n, size=max(info.image_size, 64), seed=seed)
    return [(img, BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]) for i, img in enumerate(images)]


def load_samples(
    images: str | None,
    prompts: str | None,
    n: int,
    info: Any,
    task: str | None = None,
    data: str | None = None,
) -> list[tuple[Any, str]]:
    """Calibration samples: the train split of a built-in task (`task`, e.g. shapes-qa), the
    images and prompts of a JSONL file (`data`, as `mllmc eval --data` reads), or an image
    directory and a prompts file (either may be built-in)."""
    from PIL import Image, UnidentifiedImageError

    if n < 1:
        raise UserError(f"--num-samples must be >= 1, got {n}")
    if task is not None or data is not None:
        if images is not None or prompts is not None:
            raise UserError("give --task or --data, or --images/--prompts, not both")
        return calibration_samples(task, data, n)
    if prompts is not None:
        p = Path(prompts)
        if not p.is_file():
            raise UserError(
                f"prompts file {p} " + ("is a directory" if p.is_dir() else "not found")
            )
        prompt_list = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        if not prompt_list:
            raise UserError(f"prompts file {p} has no prompts")
    else:
        prompt_list = list(BUILTIN_PROMPTS)
    if images is None:
        imgs = builtin_images(n, size=max(info.image_size, 64))
    else:
        d = Path(images)
        if not d.is_dir():
            raise UserError(f"image directory {d} " + ("is a file" if d.exists() else "not found"))
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[:n]
        if not files:
            raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {d}")
        imgs = []
        for f in files:
            try:
                imgs.append(Image.open(f).convert("RGB"))
            except (OSError, UnidentifiedImageError) as e:
                raise UserError(f"cannot read image {f}: {e}") from None
    return [(img, prompt_list[i % len(prompt_list)]) for i, img in enumerate(imgs[:n])]


def _kl(ablated: torch.Tensor, orig: torch.Tensor) -> float:
    # KL(p_ablated ‖ p_orig) = Σ p_a (log p_a − log p_o); logits (V,)
    log_a, log_o = torch.log_softmax(ablated.double(), -1), torch.log_softmax(orig.double(), -1)
    return float((log_a.exp() * (log_a - log_o)).sum())


def layer_contribution(
    model: Any, info: Any, samples: list[tuple[Any, str]], progress: bool = False
) -> dict[str, Any]:
    """Per-layer visual and text LC averaged over `samples`, and the ascending visual order."""
    from tqdm.auto import tqdm
    from transformers import AutoProcessor

    from mllmc.compiler.verify import processor_inputs
    from mllmc.passes.shortv import keep_rows

    processor = AutoProcessor.from_pretrained(info.model_dir)
    L = info.num_layers
    lc_visual = np.zeros(L)
    lc_text = np.zeros(L)
    t0 = time.perf_counter()
    for image, prompt in tqdm(samples, desc="calibrate", disable=not progress, unit="sample"):
        inputs = processor_inputs(processor, image, prompt).to(model.device)
        with torch.no_grad():
            orig = model(**inputs).logits[0, -1]
            for layer in range(L):
                for rows, acc in (("visual", lc_visual), ("text", lc_text)):
                    with keep_rows(model, [layer], rows=rows):
                        acc[layer] += _kl(model(**inputs).logits[0, -1], orig)
    lc_visual /= len(samples)
    lc_text /= len(samples)
    order = sorted(range(L), key=lambda i: (round(lc_visual[i], 12), i))
    return {
        "model_config_hash": info.config_hash,
        "num_layers": L,
        "samples": len(samples),
        "lc_visual": lc_visual.tolist(),
        "lc_text": lc_text.tolist(),
        "order": order,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def read_lc_file(path: str | Path, info: Any) -> list[int]:
    """The layer order (ascending LC) of an LC file, checked against the model."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"shortv: LC file {p} not found (make one with: mllmc calibrate MODEL -o {p})"
        )
    try:
        data = json.loads(p.read_text())
        order = [int(i) for i in data["order"]]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"shortv: corrupt LC file {p}: {e}") from None
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


def plot_lc(lc: dict[str, Any], path: Path) -> None:
    import matplotlib

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
    fig.savefig(path, dpi=100)
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
) -> dict[str, Any]:
    from mllmc.compiler.capture import load_model

    model, info = load_model(model_dir)
    samples = load_samples(images, prompts, n, info, task=task, data=data)
    lc = layer_contribution(model, info, samples, progress=progress)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(lc, indent=2))
    print(format_table(lc))
    print(f"order (freeze first): {lc['order']}")
    print(f"wrote {out} ({lc['samples']} samples, {lc['seconds']} s)")
    if plot:
        png = out.with_suffix(".png")
        plot_lc(lc, png)
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
    try:
        data = json.loads(p.read_text())
        k, threshold, layers = int(data["k"]), float(data["threshold"]), int(data["num_layers"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"vte: corrupt exit file {p}: {e}") from None
    if layers != info.num_layers or not 0 <= k <= layers:
        raise UserError(
            f"vte: exit file {p} is for a {layers}-layer model; this model has "
            f"{info.num_layers} layers"
        )
    return k, threshold


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
) -> dict[str, Any]:
    """`mllmc calibrate MODEL --pass vte --threshold T`: the exit file `vte:calib=FILE` reads."""
    from mllmc.compiler.capture import load_model

    if not threshold > 0:
        raise UserError(f"--threshold must be > 0, got {threshold}")
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
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print("exit K  mean KL(exit ‖ full)")
    for i, v in enumerate(kl):
        print(f"{i:6d}  {v:10.3e}{'  <- chosen' if i == k else ''}")
    print(f"wrote {out}: vte exit at layer {k} (threshold {threshold}, {len(samples)} samples)")
    return data
