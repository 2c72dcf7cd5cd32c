"""`mllmc calibrate`: calibration samples from a task, a JSONL file or an image directory, the LC
table, plot and printout, and the LC / exit files it writes. The measurements themselves
(layer_contribution, exit_divergence) are in mllmc.passes.calibration."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mllmc.compiler.data.calib_images import BUILTIN_PROMPTS, iter_builtin_images
from mllmc.compiler.tools.evaluate import Items, calibration_samples, check_count
from mllmc.passes.calibration import choose_exit, exit_divergence, layer_contribution
from mllmc.runtime.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
MAX_PROMPTS_BYTES = 64 * 2**20  # the largest prompts file
IMAGE_TOKEN = "<image>"  # where a prompt places the image


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
    """The non-blank lines of a UTF-8 prompts file, stripped; a line with more than one
    image token is refused (each sample has one image)."""
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
    prompt_list = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.count(IMAGE_TOKEN) > 1:
            raise UserError(
                f"prompts file {p}, line {number}: {line.count(IMAGE_TOKEN)} {IMAGE_TOKEN} "
                f"tokens; a calibration sample has one image: give at most one {IMAGE_TOKEN}"
            )
        if line.strip():
            prompt_list.append(line.strip())
    if not prompt_list:
        raise UserError(f"prompts file {p} has no prompts")
    return prompt_list


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

    from mllmc.compiler.files.outputs import write_figure

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
    write_figure(fig, path, force=force)


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
    from mllmc.compiler.core.capture import load_model
    from mllmc.compiler.files.outputs import write_file

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
    from mllmc.compiler.core.capture import load_model
    from mllmc.compiler.files.outputs import write_file

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
