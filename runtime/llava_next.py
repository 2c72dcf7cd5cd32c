"""LLaVA-NeXT's host side, without torch: anyres tiling, image-token count, feature packing.

The vision tower and projector run as a graph over a batch of square tiles; everything about
LLaVA-NeXT's "anyres" scheme that depends on the image's size happens here, in numpy, with the
arithmetic copied from transformers (LlavaNextImageProcessorPil, LlavaNextProcessor,
LlavaNextModel.pack_image_features) so that results agree to float32 rounding:

    cfg = read_image_processor_config(model_dir)                     # has image_grid_pinpoints
    tiles, size = AnyresPreprocessor(cfg)("cat.png")                 # (T, 3, S, S), (h, w)
    n = image_token_count(*size, image_size=336, patch_size=14, grid_pinpoints=pinpoints)
    feats = tower_and_projector(tiles)                               # (T, P, d), P = (S/14)**2
    rows = pack_image_features(feats, size, image_size_px=336, patch_size=14,
                               grid_pinpoints=pinpoints, image_newline=newline)  # (n, d)

Tower geometry comes from the model's config.json: `image_size` / `image_size_px` is
vision_config.image_size (a tile's side in pixels), `patch_size` is vision_config.patch_size,
`grid_pinpoints` is image_grid_pinpoints ([[height, width], ...]) and `strategy` is
vision_feature_select_strategy. Image sizes are (height, width) throughout.

Imports numpy and PIL only: never torch or transformers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError
from .preprocess import ImagePreprocessor, check_pixels, to_rgb_array

Pinpoints = Sequence[Sequence[int]]


def select_best_resolution(
    original_size: tuple[int, int], possible_resolutions: Pinpoints
) -> tuple[int, int]:
    """transformers' select_best_resolution: of the (height, width) `possible_resolutions`, the one
    that keeps most of the (height, width) `original_size`'s pixels when the image is scaled into
    it, and among those the one that wastes fewest pixels (the first on a tie)."""
    original_height, original_width = original_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width = int(original_width * scale)
        downscaled_height = int(original_height * scale)
        effective_resolution = min(
            downscaled_width * downscaled_height, original_width * original_height
        )
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution
            and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (height, width)
    if best_fit is None:
        raise ValueError(f"no resolution fits the image {original_size}: {possible_resolutions}")
    return int(best_fit[0]), int(best_fit[1])


def anyres_grid_shape(
    image_size: tuple[int, int], grid_pinpoints: Pinpoints, tile_size: int
) -> tuple[int, int]:
    """transformers' get_anyres_image_grid_shape: (rows, cols) of `tile_size` tiles that cover the
    pinpoint chosen for an image of (height, width) `image_size`."""
    height, width = select_best_resolution(image_size, grid_pinpoints)
    return height // tile_size, width // tile_size


def _patch_output_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """transformers' get_patch_output_size: (height, width) of a (height, width) image scaled to
    fit inside `target` (height, width) with its aspect ratio kept (rounded up, capped)."""
    target_height, target_width = target
    scale_w = target_width / width
    scale_h = target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def _unpadded_box(
    current_height: int, current_width: int, original_size: tuple[int, int]
) -> tuple[slice, slice]:
    """transformers' unpad_image as (row slice, column slice) of a (current_height, current_width)
    feature grid: the part that shows the (height, width) `original_size` image, not its padding."""
    original_height, original_width = original_size
    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = int(round(original_height * scale_factor, 7))
        padding = (current_height - new_height) // 2
        return slice(padding, current_height - padding), slice(0, current_width)
    scale_factor = current_height / original_height
    new_width = int(round(original_width * scale_factor, 7))
    padding = (current_width - new_width) // 2
    return slice(0, current_height), slice(padding, current_width - padding)


def _slice_len(s: slice, n: int) -> int:
    return len(range(*s.indices(n)))


def image_token_count(
    height: int,
    width: int,
    *,
    image_size: int,
    patch_size: int,
    grid_pinpoints: Pinpoints,
    strategy: str = "default",
    num_additional_image_tokens: int = 1,
) -> int:
    """The number of image tokens LlavaNextProcessor writes for a (height, width) image: the whole
    image's patches, then the unpadded grid's patches with one newline per row.

    `image_size` is the tower's tile side in pixels, `patch_size` its patch side; `strategy` is
    vision_feature_select_strategy ("default" drops the tower's `num_additional_image_tokens`
    extra tokens, e.g. CLIP's CLS, "full" keeps them on the whole-image tile). With "default"
    this is the number of rows `pack_image_features` gives.
    """
    if strategy not in ("default", "full"):
        raise UserError(
            f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}"
        )
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    best_height, best_width = select_best_resolution((height, width), grid_pinpoints)
    side = image_size // patch_size  # patches along a tile's side
    current_height = side * (best_height // image_size)
    current_width = side * (best_width // image_size)
    rows, cols = _unpadded_box(current_height, current_width, (height, width))
    unpadded_height = _slice_len(rows, current_height)
    unpadded_width = _slice_len(cols, current_width)
    base = side * side + (num_additional_image_tokens if strategy == "full" else 0)
    return base + unpadded_height * (unpadded_width + 1)


def pack_image_features(
    tile_features: np.ndarray,
    image_size: tuple[int, int],
    *,
    image_size_px: int,
    patch_size: int,
    grid_pinpoints: Pinpoints,
    image_newline: np.ndarray | None,
) -> np.ndarray:
    """LlavaNextModel.pack_image_features for one image of (height, width) `image_size`.

    tile_features (T, P, d): the projected features of the tiles `AnyresPreprocessor` made, the
    whole image first, P = (image_size_px // patch_size) ** 2 (no CLS: strategy "default").
    image_newline (d,) or None. Returns (V, d) in tile_features' dtype: the whole image's P rows,
    then the grid's rows of patches with the padding cut off, each row followed by image_newline.
    """
    if tile_features.ndim != 3:
        raise ValueError(f"tile_features must be (T, P, d), got shape {tile_features.shape}")
    num_tiles, num_patches, dim = tile_features.shape
    newline = None if image_newline is None else np.asarray(image_newline, tile_features.dtype)
    if num_tiles == 1:  # the whole image alone
        extra = [] if newline is None else [newline[None]]
        return np.concatenate([tile_features[0], *extra], axis=0)
    side = image_size_px // patch_size
    rows, cols = anyres_grid_shape(image_size, grid_pinpoints, image_size_px)
    if num_patches != side * side or num_tiles - 1 != rows * cols:
        raise ValueError(
            f"tile_features {tile_features.shape} do not fit a {rows}x{cols} grid of tiles of "
            f"{side}x{side} patches plus the whole image"
        )
    grid = tile_features[1:].reshape(rows, cols, side, side, dim)
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(rows * side, cols * side, dim)  # (H, W, d)
    row_slice, col_slice = _unpadded_box(rows * side, cols * side, image_size)
    grid = grid[row_slice, col_slice]  # (h, w, d)
    if newline is not None:
        column = np.broadcast_to(newline, (grid.shape[0], 1, dim))
        grid = np.concatenate([grid, column], axis=1)  # (h, w + 1, d)
    return np.concatenate([tile_features[0], grid.reshape(-1, dim)], axis=0)


def _resize(array: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 by a PIL resize, as transformers' PIL backend."""
    return np.array(Image.fromarray(array).resize((width, height), resample=resample))


def _tile_and_base_size(cfg: dict[str, Any]) -> tuple[int, tuple[int, int]]:
    """LlavaNextImageProcessorPil's grid tile side (crop_size's height, else size's) and the
    (height, width) the whole image is resized to (size, or shortest_edge squared)."""
    size, crop = cfg["size"], cfg["crop_size"]
    base = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    tile = crop["height"] if crop else size.get("height", size.get("shortest_edge"))
    return tile, base


class AnyresPreprocessor:
    """LlavaNextImageProcessorPil in numpy: the image resized whole, then cut into a grid of tiles
    at the best pinpoint resolution, every tile processed as CLIP's processor does."""

    def __init__(self, config: dict[str, Any]):
        """`config` from `read_image_processor_config` of a LLaVA-NeXT model (image_grid_pinpoints)."""
        pinpoints = config.get("image_grid_pinpoints")
        if not pinpoints:
            raise UserError(
                "the image processor config has no image_grid_pinpoints: not LLaVA-NeXT"
            )
        self.config = config
        self.grid_pinpoints = [(int(h), int(w)) for h, w in pinpoints]
        self.tile_size, self.base_size = _tile_and_base_size(config)
        for h, w in self.grid_pinpoints:
            if h % self.tile_size or w % self.tile_size:
                raise UserError(
                    f"image_grid_pinpoints {[h, w]} is not a multiple of the {self.tile_size}-pixel "
                    "tile size: LLaVA-NeXT's grid needs whole tiles"
                )
        self._tile = ImagePreprocessor({**config, "do_pad": False, "pad_size": None})

    def grid_tiles(self, array: np.ndarray) -> list[np.ndarray]:
        """(H, W, 3) uint8 -> the grid's tiles, row by row, each (tile, tile, 3) uint8: the image
        scaled into the best pinpoint with its aspect ratio kept, centred on black."""
        best = select_best_resolution(array.shape[:2], self.grid_pinpoints)
        new_h, new_w = _patch_output_size(array.shape[0], array.shape[1], best)
        resized = _resize(array, new_h, new_w, self.config["resample"])
        top, left = (best[0] - new_h) // 2, (best[1] - new_w) // 2
        padded = np.zeros((best[0], best[1], 3), dtype=np.uint8)
        padded[top : top + new_h, left : left + new_w] = resized
        t = self.tile_size
        return [
            padded[i : i + t, j : j + t] for i in range(0, best[0], t) for j in range(0, best[1], t)
        ]

    def __call__(
        self, image: str | os.PathLike | Image.Image | np.ndarray
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """image (path, PIL image or HxWx3 uint8 array) -> (pixel tiles (T, 3, S, S) float32, the
        whole image first, then the grid row by row; the image's (height, width))."""
        array = to_rgb_array(image, self.config["do_convert_rgb"])  # (H, W, 3) uint8
        height, width = array.shape[:2]
        base_h, base_w = self.base_size
        check_pixels(base_w, base_h, f"the image resized from {width}x{height}")
        tiles = [_resize(array, base_h, base_w, self.config["resample"]), *self.grid_tiles(array)]
        pixels = np.concatenate([self._tile(np.ascontiguousarray(t)) for t in tiles])
        return np.ascontiguousarray(pixels, dtype=np.float32), (int(height), int(width))
