"""A model family's image side on the host: image -> tiles for the vision segment, how many
prompt rows the image takes, and the packing of its tiles' features into those rows.

    images = image_inputs(manifest, processor_config)        # ImageInputs for the family
    tiles, meta = images.tiles("cat.png")                   # (T, 3, S, S) float32
    features = images.pack(vision_outputs, meta)            # (rows, d): the image's rows

- llava (LLaVA-1.5): one tile per image, CLIP's preprocessing; rows = the vision segment's
  tokens per tile (after a pre-LLM pass, the ones it keeps); packing is the tile itself.
- llava_next (LLaVA-NeXT): the whole image plus a grid of tiles at the best pinpoint
  (`runtime/llava_next.py`, equal to LlavaNextImageProcessorPil); packing is LLaVA-NeXT's
  unpad + one image_newline per grid row, done here in numpy, as TensorRT-LLM does it: the
  grid shape depends on the image, and on the host it is index work, so one vision graph serves
  every aspect ratio. After a pre-LLM pass each tile holds only its kept patches, and the
  vision segment says which (`patch_index`); they are packed at their places in the grid, the
  newlines all kept, as FasterVLM packs them: an image's row count is then known once its tiles
  have been scored.
- qwen2_vl, qwen2_5_vl (Qwen2-VL, Qwen2.5-VL): the image at its own size (`smart_resize`) as one
  sequence of patches; its "tiles" are the vision segment's feeds (`pixel_values` and the index
  inputs of `runtime/qwen2_vl.py`), and the engine runs the vision segment once per image
  (`per_image`, `encode_each`): the graph's attention is a block-diagonal mask over the call's
  patches, so a call per image costs the sum of the images' squares, not the square of their
  sum, and needs no index offsets. Rows are the merged tokens as they come; each image's count
  is an `ImageRows` carrying its grid, from which the prompt encoder's position hook
  (`QwenImages.positions`) gives the prompt's M-RoPE positions.

The family is the manifest's `model.model_type`; nothing else in the runtime branches on it.
Imports numpy and PIL only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
from PIL import Image

from .errors import UserError
from .layout import PromptLayout
from .llava_next import AnyresPreprocessor, pack_image_features
from .manifest import Manifest, ModelInfo
from .preprocess import ImagePreprocessor, PromptEncoder
from .qwen2_vl import IMAGE_TOKEN, ImageRows, QwenPreprocessor, mrope_layout, vision_inputs

Image_ = str | os.PathLike | Image.Image | np.ndarray
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
FAMILIES = ("llava", "llava_next", *QWEN_FAMILIES)
# the most tiles one vision call takes (a LLaVA-NeXT image at 672 px is 5; a prompt holds many)
MAX_TILES = 256


class ImageInputs(Protocol):
    """What the engine asks of a family about one image."""

    def tiles(self, image: Image_) -> tuple[Any, Any]:
        """image -> (pixel tiles (T, 3, S, S) float32, what `pack` needs of it); for a family
        with `per_image` set, the vision segment's feeds for the image (a dict)."""
        ...

    def pack(self, outputs: dict[str, np.ndarray], meta: Any) -> np.ndarray:
        """The vision segment's outputs for the image's tiles (`image_features` (T, K, d), and
        `image_newline` (d,), `patch_index` (T, K) where the model has them) -> its prompt rows
        (rows, d)."""
        ...


@dataclass
class LlavaImages:
    """LLaVA-1.5: one CLIP tile per image, its rows as they are."""

    preprocess: ImagePreprocessor

    def tiles(self, image: Image_) -> tuple[np.ndarray, None]:
        return self.preprocess(image), None  # (1, 3, S, S)

    def pack(self, outputs: dict[str, np.ndarray], meta: None) -> np.ndarray:
        features = outputs["image_features"]
        return features.reshape(-1, features.shape[-1])  # (K, d)


@dataclass
class LlavaNextImages:
    """LLaVA-NeXT: the whole image and its anyres grid; rows as LlavaNextProcessor counts them
    (fewer after a pre-LLM pass)."""

    preprocess: AnyresPreprocessor
    image_size: int
    patch_size: int

    def tiles(self, image: Image_) -> tuple[np.ndarray, tuple[int, int]]:
        return self.preprocess(image)  # (1 + grid, 3, S, S), (height, width)

    def pack(self, outputs: dict[str, np.ndarray], meta: tuple[int, int]) -> np.ndarray:
        features, newline = outputs["image_features"], outputs.get("image_newline")
        kept = outputs.get("patch_index")
        if kept is None:
            return self._pack(features, meta, newline)
        # pack the tiles' patch numbers (-1: a newline), then take the kept patches' rows
        tiles, per_tile = features.shape[0], (self.image_size // self.patch_size) ** 2
        numbers = np.arange(tiles * per_tile, dtype=np.float64).reshape(tiles, per_tile, 1)
        packed = self._pack(numbers, meta, np.array([-1.0]))[:, 0].astype(np.int64)  # (V,)
        row_of = np.full(tiles * per_tile + 1, -1, dtype=np.int64)  # patch number -> kept row
        flat = (kept + per_tile * np.arange(tiles)[:, None]).reshape(-1)  # (T * K,)
        row_of[flat] = np.arange(flat.size)
        rows = np.where(packed < 0, flat.size, row_of[np.maximum(packed, 0)])  # newline last
        rows = rows[(packed < 0) | (rows >= 0)]
        table = features.reshape(-1, features.shape[-1])
        if newline is not None:
            table = np.concatenate([table, newline[None].astype(table.dtype)])
        return table[rows]

    def _pack(self, features: np.ndarray, meta: tuple[int, int], newline: Any) -> np.ndarray:
        return pack_image_features(
            features,
            meta,
            image_size_px=self.image_size,
            patch_size=self.patch_size,
            grid_pinpoints=self.preprocess.grid_pinpoints,
            image_newline=newline,
        )


@dataclass
class QwenImages:
    """Qwen2-VL / Qwen2.5-VL: each image as one sequence of patches at its own size, fed to the
    vision segment alone (`per_image`); its rows are the merged tokens the segment returns."""

    preprocess: QwenPreprocessor
    window_size: int = 0  # Qwen2.5-VL's attention window in pixels (0: Qwen2-VL, none)
    per_image: ClassVar[bool] = True  # one vision call per image (`encode_each`)
    image_token: ClassVar[str] = IMAGE_TOKEN  # Qwen2VLProcessor's, if the tokenizer names none

    def tiles(self, image: Image_) -> tuple[dict[str, np.ndarray], ImageRows]:
        """image -> (the vision segment's feeds: pixel_values (N, C*tp*p*p) float32,
        vision_position_ids (N, 2) int64, cu_seqlens (2,) int32, and with a window size
        window_index (N/m^2,) int64 and cu_window_seqlens (W + 1,) int32; its `ImageRows`)."""
        pre = self.preprocess
        pixels, grid = pre(image)
        window = self.window_size or None
        feeds = vision_inputs(grid[None], pre.merge_size, window, pre.patch_size)
        return {"pixel_values": pixels, **feeds}, ImageRows(grid, pre.merge_size)

    def pack(self, outputs: dict[str, np.ndarray], meta: ImageRows) -> np.ndarray:
        """The image's `image_features` (K, d) -> its rows (K, d), as they are."""
        features = outputs["image_features"]
        return features.reshape(-1, features.shape[-1])

    def rows(self, outputs: dict[str, np.ndarray], meta: ImageRows) -> ImageRows:
        """The image's row count and grid: after a pre-LLM pass, the merged tokens it kept
        (`patch_index` (K,), ascending), each of which keeps its own position."""
        kept = outputs.get("patch_index")
        if kept is None:
            return meta
        return ImageRows(meta.grid, self.preprocess.merge_size, np.asarray(kept).reshape(-1))

    def positions(self, layout: PromptLayout, counts: Sequence[int]) -> PromptLayout:
        """The prompt encoder's position hook: M-RoPE positions (3, 1, n) from the counts'
        grids (`qwen2_vl.mrope_layout`)."""
        return mrope_layout(layout, counts, self.preprocess.merge_size)


def encode_each(
    images: QwenImages, tiles: Sequence[dict[str, np.ndarray]], metas: Sequence[Any], runner: Any
) -> tuple[np.ndarray, list[ImageRows]]:
    """Run the vision segment (`runner`: a SegmentRunner) once per image on its feeds (`tiles`
    from `images.tiles`) -> (every image's rows (1, V, d), in order; each image's ImageRows)."""
    rows, counts = [], []
    for feeds, meta in zip(tiles, metas, strict=True):
        outputs = {name: runner.to_numpy(value) for name, value in runner(feeds).items()}
        rows.append(images.pack(outputs, meta))
        counts.append(images.rows(outputs, meta))
        if rows[-1].shape[0] != counts[-1]:
            raise UserError(
                f"corrupt artifact: the vision segment gave {rows[-1].shape[0]} rows for an "
                f"image of {int(counts[-1])} merged tokens"
            )
    return np.concatenate(rows)[None], counts


def prompt_encoder(images: ImageInputs, root: str | os.PathLike) -> PromptEncoder:
    """The artifact's (or model dir's) prompt encoder, with the family's default image token
    and position hook (Qwen2-VL's M-RoPE; none: 1-D positions)."""
    return PromptEncoder.from_dir(
        root, getattr(images, "image_token", "<image>"), getattr(images, "positions", None)
    )


def _qwen_images(model: ModelInfo, processor: dict[str, Any]) -> QwenImages:
    """Qwen's image side; UserError when the image processor's patch geometry is not the
    model's (the patches would not be the ones the tower was built for)."""
    pre = QwenPreprocessor(processor)
    for name, ours, theirs in (
        ("patch_size", pre.patch_size, model.vision_patch_size),
        ("merge_size", pre.merge_size, model.spatial_merge_size),
        ("temporal_patch_size", pre.temporal_patch_size, model.temporal_patch_size),
    ):
        if ours != theirs:
            raise UserError(
                f"the image processor's {name} is {ours} but the model's vision tower takes "
                f"{theirs}: make the processor config match the model"
            )
    return QwenImages(pre, model.vision_window_size)


def image_inputs(manifest: Manifest, processor: dict[str, Any]) -> ImageInputs:
    """The image side of the artifact's family, from its manifest and image-processor config."""
    model = manifest.model
    if model.model_type == "llava":
        return LlavaImages(ImagePreprocessor(processor))
    if model.model_type == "llava_next":
        return LlavaNextImages(
            AnyresPreprocessor(processor), model.image_size, model.vision_patch_size
        )
    if model.model_type in QWEN_FAMILIES:
        return _qwen_images(model, processor)
    raise UserError(
        f"the artifact's model type {model.model_type!r} is not one this runtime runs "
        f"({', '.join(FAMILIES)}): upgrade mllmc"
    )
