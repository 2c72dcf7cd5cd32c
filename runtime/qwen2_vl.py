"""Qwen2-VL / Qwen2.5-VL's host side, without torch: preprocessing, the vision segment's
index inputs, and the 3-D (M-RoPE) positions of a prompt.

Everything of these models that depends on an image's size is computed here, in numpy, with the
arithmetic copied from transformers 5 (`Qwen2VLImageProcessorPil`, `transformers.vision_utils`,
`Qwen2VLModel.get_rope_index` / `Qwen2_5_VLModel.get_rope_index`), so that the graphs take it as
inputs and one vision graph and one prefill graph serve every image size:

    cfg = read_image_processor_config(model_dir)           # Qwen2VLImageProcessor settings
    pre = QwenPreprocessor(cfg)
    pixels, grid = pre("cat.png")                           # (N, C*tp*p*p) float32, (3,) int64
    feeds = vision_inputs(grid[None], pre.merge_size, window_size=112, patch_size=14)
    # feeds: vision_position_ids (N, 2) int64, cu_seqlens (I*t + 1,) int32, and with a window
    # size (Qwen2.5-VL) window_index (N/m^2,) int64, cu_window_seqlens (W + 1,) int32
    rows = ImageRows(grid, pre.merge_size)                  # t*h*w/m^2 prompt rows
    positions, next_position = mrope_positions(n, layout.image_spans, [grid], pre.merge_size)

Grids are `image_grid_thw` rows as HF writes them: (t, h, w) in patches (t = 1 for an image),
before the m x m merge (m = `merge_size`, 2). An image takes t*h*w/m^2 prompt rows.

Imports numpy and PIL only: never torch or transformers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError
from .layout import PromptLayout
from .preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocessor,
    _channel_list,
    check_pixels,
    to_rgb_array,
)

# the image processors of both families (Qwen2.5-VL checkpoints name Qwen2-VL's)
QWEN_IMAGE_PROCESSOR_TYPES = frozenset(
    {"Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil"}
)
# Qwen2VLProcessor's image token when the tokenizer names none; its chat template writes
# <|vision_start|><|image_pad|><|vision_end|> per image
IMAGE_TOKEN = "<|image_pad|>"
# smart_resize refuses images whose long side is more than this many times the short side
MAX_ASPECT_RATIO = 200

# Qwen2VLImageProcessorPil's class defaults: what a key the config leaves out takes
_QWEN_DEFAULTS: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_resize": True,
    "resample": 3,  # PIL.Image.BICUBIC
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}
_QWEN_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
_FLAGS = ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize")


# -- settings ---------------------------------------------------------------------------------


def _positive_int(value: Any, name: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{path}: {name} must be an integer >= 1, got {value!r}")
    return int(value)


def _pixel_bounds(raw: dict[str, Any], path: Path) -> dict[str, int]:
    """`size` as Qwen2VLImageProcessorPil.__init__ reads it: the class default when missing or
    null, `min_pixels` / `max_pixels` overriding its shortest_edge / longest_edge (and replacing
    a min_pixels / max_pixels key of its own); it must end as {shortest_edge, longest_edge}."""
    size = raw.get("size")
    size = dict(_QWEN_SIZE) if size is None else size
    if not isinstance(size, dict):
        raise UserError(
            f"{path}: size must be {{'shortest_edge': MIN_PIXELS, 'longest_edge': MAX_PIXELS}}, "
            f"got {size!r}"
        )
    size = dict(size)
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if raw.get(key) is not None:
            size[edge] = raw[key]
            size.pop(key, None)
    if set(size) != {"shortest_edge", "longest_edge"}:
        raise UserError(
            f"{path}: the pixel bounds must be size {{'shortest_edge', 'longest_edge'}} or "
            f"min_pixels and max_pixels, got size keys {sorted(size)}"
        )
    low = _positive_int(size["shortest_edge"], "min_pixels (size.shortest_edge)", path)
    high = _positive_int(size["longest_edge"], "max_pixels (size.longest_edge)", path)
    if low > high:
        raise UserError(f"{path}: min_pixels {low} is more than max_pixels {high}")
    return {"shortest_edge": low, "longest_edge": high}


def read_qwen_processor_config(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """A Qwen2-VL image-processor config (the dict of `path`) with every key explicit, as
    Qwen2VLImageProcessorPil reads it: a missing key takes the class default, an explicit null
    stays None (a flag then is False; a value a step needs is an error, as in HF), and `size`
    comes back as {"shortest_edge": min_pixels, "longest_edge": max_pixels}. The dict keeps
    `image_processor_type`, so reading it again gives the same dict; `do_center_crop` and
    `do_pad` are False (the output size depends on the image)."""
    cfg = {k: (raw[k] if k in raw else d) for k, d in _QWEN_DEFAULTS.items()}
    for k in _FLAGS:
        cfg[k] = bool(cfg[k])
    for k in ("patch_size", "temporal_patch_size", "merge_size"):
        cfg[k] = _positive_int(cfg[k], k, path)
    for flag, keys in (
        ("do_resize", ("resample",)),
        ("do_rescale", ("rescale_factor",)),
        ("do_normalize", ("image_mean", "image_std")),
    ):
        for k in keys:
            if cfg[flag] and cfg[k] is None:
                raise UserError(f"{path}: {flag} is true but {k} is null")
    resample = 3 if cfg["resample"] is None else cfg["resample"]  # None: unused
    if resample not in (0, 1, 2, 3, 4, 5) or isinstance(resample, bool):
        raise UserError(f"{path}: resample must be a PIL filter code 0-5, got {resample!r}")
    cfg["resample"] = int(resample)
    factor = cfg["rescale_factor"]
    if factor is not None:
        if not isinstance(factor, (int, float)) or isinstance(factor, bool):
            raise UserError(f"{path}: rescale_factor must be a number, got {factor!r}")
        cfg["rescale_factor"] = float(factor)
    for k in ("image_mean", "image_std"):
        if cfg[k] is not None:
            cfg[k] = _channel_list(cfg[k], k, path)
    cfg["size"] = _pixel_bounds(raw, path)
    cfg.update(
        image_processor_type="Qwen2VLImageProcessor",
        do_center_crop=False,
        crop_size=None,
        do_pad=False,
        pad_size=None,
    )
    return cfg


# -- preprocessing ----------------------------------------------------------------------------


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """transformers' Qwen2-VL smart_resize: (height, width) rounded to multiples of `factor`,
    scaled to hold between `min_pixels` and `max_pixels` pixels with the aspect ratio kept as
    closely as can be. UserError for an aspect ratio over MAX_ASPECT_RATIO (HF's ValueError)."""
    if height < 1 or width < 1:
        raise UserError(f"image is empty ({width}x{height} pixels)")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise UserError(
            f"image {width}x{height} is too narrow: Qwen2-VL takes aspect ratios up to "
            f"{MAX_ASPECT_RATIO}:1"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(
    image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int
) -> np.ndarray:
    """Qwen2VLImageProcessorPil.patchify: (C, H, W) float32 -> (H/p * W/p, C*tp*p*p) float32, the
    patches of each m x m merge group together, the image repeated over the tp frames."""
    c, height, width = image.shape
    gh, gw = height // patch_size, width // patch_size
    patches = image.astype(np.float32).reshape(
        c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size
    )
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    patches = np.broadcast_to(
        patches[:, :, :, :, :, None], (*patches.shape[:5], temporal_patch_size, *patches.shape[5:])
    )
    return np.ascontiguousarray(
        patches.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size)
    )


class QwenPreprocessor:
    """Qwen2VLImageProcessorPil in numpy: convert to RGB, resize to `smart_resize`'s size (PIL,
    the config's filter), rescale, normalize, patchify."""

    def __init__(self, config: dict[str, Any]):
        """`config` from `read_image_processor_config` of a Qwen2-VL / Qwen2.5-VL model."""
        if config.get("image_processor_type") not in QWEN_IMAGE_PROCESSOR_TYPES:
            raise UserError(
                "the image processor config is not a Qwen2-VL one (Qwen2VLImageProcessor)"
            )
        self.config = config
        self.patch_size: int = config["patch_size"]
        self.merge_size: int = config["merge_size"]
        self.temporal_patch_size: int = config["temporal_patch_size"]
        self.min_pixels: int = config["size"]["shortest_edge"]
        self.max_pixels: int = config["size"]["longest_edge"]

    @property
    def factor(self) -> int:
        """The side every processed image is a multiple of: patch_size * merge_size."""
        return self.patch_size * self.merge_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of that size is processed at."""
        if not self.config["do_resize"]:
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid_thw(self, height: int, width: int) -> np.ndarray:
        """(3,) int64: the (t, h, w) patch grid of an image of (height, width), without its pixels."""
        h, w = self.resized_size(height, width)
        if h % self.factor or w % self.factor:
            raise UserError(
                f"image {width}x{height} is not a multiple of {self.factor} pixels and do_resize "
                "is false: Qwen2-VL patchifies whole merge groups"
            )
        return np.array([1, h // self.patch_size, w // self.patch_size], dtype=np.int64)

    def __call__(
        self, image: str | os.PathLike | Image.Image | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """image (path, PIL image or HxWx3 uint8 array) -> (pixel_values (t*h*w, C*tp*p*p)
        float32, grid_thw (3,) int64), as `Qwen2VLImageProcessorPil` gives them for the image."""
        cfg = self.config
        array = to_rgb_array(image, cfg["do_convert_rgb"])  # (H, W, 3) uint8
        grid = self.grid_thw(*array.shape[:2])
        h, w = int(grid[1]) * self.patch_size, int(grid[2]) * self.patch_size
        check_pixels(w, h, f"the image resized from {array.shape[1]}x{array.shape[0]}")
        # CLIP's steps (a PIL resize of the uint8 image, rescale, normalize), at (h, w)
        steps = ImagePreprocessor(
            {**cfg, "size": {"height": h, "width": w}, "do_center_crop": False, "do_pad": False}
        )
        x = steps(array)[0]  # (3, h, w) float32
        pixels = patchify(x, self.patch_size, self.merge_size, self.temporal_patch_size)
        return pixels, grid


def image_token_count(grid_thw: Sequence[int] | np.ndarray, merge_size: int) -> int:
    """Qwen2VLProcessor.replace_image_token's count: the image's <|image_pad|> tokens (its
    prompt rows), t*h*w / merge_size^2."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // merge_size**2


class ImageRows(int):
    """An image's prompt-row count that also carries what its rows' 3-D positions need: its
    grid (t, h, w) in patches and, after a pre-LLM pass, which merged tokens it kept ((K,)
    int64 indices into the t*h/m*w/m merged grid, ascending; None: all)."""

    grid: tuple[int, int, int]
    kept: np.ndarray | None

    def __new__(
        cls, grid_thw: Sequence[int] | np.ndarray, merge_size: int, kept: np.ndarray | None = None
    ) -> ImageRows:
        grid = tuple(int(v) for v in grid_thw)
        count = image_token_count(grid, merge_size) if kept is None else int(np.size(kept))
        rows = super().__new__(cls, count)
        rows.grid = grid  # type: ignore[misc]
        rows.kept = None if kept is None else np.asarray(kept, dtype=np.int64).reshape(-1)
        return rows


# -- the vision segment's index inputs (transformers.vision_utils) ----------------------------


def _grids(grid_thw: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    if (grids < 1).any():
        raise ValueError(f"grid_thw must hold positive (t, h, w) rows, got {grids.tolist()}")
    return grids


def vision_position_ids(
    grid_thw: Sequence[Sequence[int]] | np.ndarray, merge_size: int
) -> np.ndarray:
    """get_vision_position_ids: (sum t*h*w, 2) int64, each patch's (row, column) in its image,
    in merge-group order (the m x m patches of a group together), repeated over t."""
    out = []
    for t, h, w in _grids(grid_thw).tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge_size, merge_size, w // merge_size, merge_size)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(out).astype(np.int64)


def vision_cu_seqlens(grid_thw: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """get_vision_cu_seqlens: (sum t + 1,) int32, where each frame's patches start and end (every
    frame attends within itself)."""
    grids = _grids(grid_thw)
    seqlens = np.repeat(grids[:, 1] * grids[:, 2], grids[:, 0])
    return np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)


def vision_window_index(
    grid_thw: Sequence[Sequence[int]] | np.ndarray,
    merge_size: int,
    window_size: int,
    patch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """get_vision_window_index (Qwen2.5-VL): (window_index (sum t*h*w/m^2,) int64, the merged
    tokens in window order, window after window; cu_window_seqlens (W + 1,) int32, where each
    window's patches start and end, repeated boundaries (empty windows) dropped)."""
    side = window_size // merge_size // patch_size  # merged tokens per window side
    if side < 1:
        raise ValueError(
            f"window_size {window_size} is smaller than a merge group ({merge_size}x{patch_size})"
        )
    index, cu, offset = [], [0], 0
    for t, h, w in _grids(grid_thw).tolist():
        gh, gw = h // merge_size, w // merge_size
        pad_h, pad_w = side - gh % side, side - gw % side
        nh, nw = (gh + pad_h) // side, (gw + pad_w) // side
        padded = np.full((t, gh + pad_h, gw + pad_w), -100, dtype=np.int64)
        padded[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        padded = padded.reshape(t, nh, side, nw, side).transpose(0, 1, 3, 2, 4)
        padded = padded.reshape(t, nh * nw, side, side)
        seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * merge_size**2 + cu[-1]).tolist())
        offset += t * gh * gw
    bounds = np.array(cu, dtype=np.int32)
    keep = np.concatenate([[True], bounds[1:] != bounds[:-1]])
    return np.concatenate(index).astype(np.int64), bounds[keep]


def vision_inputs(
    grid_thw: Sequence[Sequence[int]] | np.ndarray,
    merge_size: int,
    window_size: int | None = None,
    patch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """The vision segment's index inputs for the images of `grid_thw` ((I, 3), concatenated in
    this order): `vision_position_ids` (N, 2) int64 and `cu_seqlens` (I*t + 1,) int32; with a
    `window_size` (Qwen2.5-VL, pixels; `patch_size` then needed) also `window_index` (N/m^2,)
    int64 and `cu_window_seqlens` (W + 1,) int32."""
    feeds = {
        "vision_position_ids": vision_position_ids(grid_thw, merge_size),
        "cu_seqlens": vision_cu_seqlens(grid_thw),
    }
    if window_size is not None:
        if patch_size is None:
            raise ValueError("window_size needs patch_size")
        index, bounds = vision_window_index(grid_thw, merge_size, window_size, patch_size)
        feeds.update(window_index=index, cu_window_seqlens=bounds)
    return feeds


# -- M-RoPE positions (get_rope_index) ---------------------------------------------------------


def image_positions(
    grid_thw: Sequence[int], merge_size: int, start: int, time_interval: float = 1.0
) -> np.ndarray:
    """get_vision_position_ids of Qwen2VLModel: (3, t*h/m*w/m) int64, each merged token's
    (temporal, height, width) position: floor(index_t * time_interval) + start, row + start,
    column + start. Images take time_interval 1 (HF scales only videos' by tokens_per_second)."""
    t, h, w = (int(v) for v in grid_thw)
    temporal = np.floor(np.arange(t) * time_interval).astype(np.int64)
    tt, hh, ww = np.meshgrid(
        temporal, np.arange(h // merge_size), np.arange(w // merge_size), indexing="ij"
    )
    return np.stack([tt, hh, ww]).reshape(3, -1).astype(np.int64) + start


def mrope_positions(
    n: int,
    image_spans: Sequence[tuple[int, int]],
    grids: Sequence[Sequence[int]],
    merge_size: int,
    kept: Sequence[np.ndarray | None] | None = None,
) -> tuple[np.ndarray, int]:
    """get_rope_index for one prompt of n rows whose k-th image occupies rows image_spans[k]
    (first row, count) with patch grid grids[k]: (position_ids (3, 1, n) int64, next_position).

    Text rows count on from the last position on all three axes; an image's tokens take
    `image_positions` from there, and the text after it resumes at start + max(h, w)/m.
    next_position = the largest position + 1 (= n + rope_deltas): the first generated token's
    position on all three axes, each later one 1 more. With `kept[k]` (a pre-LLM pass's kept
    merged tokens of image k) the image's rows are those tokens, each at its own position, and
    the positions after it are those of the whole image."""
    if len(image_spans) != len(grids):
        raise ValueError(f"{len(image_spans)} image spans but {len(grids)} grids")
    kept = list(kept) if kept is not None else [None] * len(grids)
    pos = np.empty((3, n), dtype=np.int64)
    row = current = upper = 0
    for (start, count), grid, keep in zip(image_spans, grids, kept, strict=True):
        pos[:, row:start] = np.arange(start - row) + current
        current += start - row
        image = image_positions(grid, merge_size, current)
        upper = max(upper, int(image.max()) + 1)
        if keep is not None:
            image = image[:, np.asarray(keep, dtype=np.int64)]
        if image.shape[1] != count:
            raise ValueError(
                f"image span ({start}, {count}) does not hold the {image.shape[1]} tokens of "
                f"grid {tuple(int(v) for v in grid)}"
            )
        pos[:, start : start + count] = image
        current += max(int(grid[1]), int(grid[2])) // merge_size
        row = start + count
    pos[:, row:n] = np.arange(n - row) + current
    upper = max(upper, current + n - row)
    return pos.reshape(3, 1, n), upper


def rope_deltas(layout: PromptLayout) -> int:
    """HF's rope_deltas of the prompt: next_position - n (0 for 1-D rope)."""
    return int(layout.next_position) - layout.n


def decode_position_ids(position: int) -> np.ndarray:
    """(3, 1, 1) int64: a decode token's M-RoPE position ids, `position` on all three axes
    (the layout's next_position for the first generated token, +1 per step after it)."""
    return np.full((3, 1, 1), position, dtype=np.int64)


def mrope_layout(layout: PromptLayout, counts: Sequence[Any], merge_size: int) -> PromptLayout:
    """`layout` (1-D positions) with Qwen's M-RoPE positions: position_ids (3, 1, n) and the
    next position from `mrope_positions`. `counts` are the images' `ImageRows` (what the
    engine's encode_images returns for these models); UserError for plain counts."""
    if not all(isinstance(c, ImageRows) for c in counts):
        raise UserError(
            "this model's image rows have 2-D positions: give the counts encode_images() "
            "returned (each carries its image's grid), not plain integers"
        )
    grids = [c.grid for c in counts]
    positions, next_position = mrope_positions(
        layout.n, layout.image_spans, grids, merge_size, [c.kept for c in counts]
    )
    return replace(layout, position_ids=positions, next_position=next_position)
