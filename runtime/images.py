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

The family is the manifest's `model.model_type`; nothing else in the runtime branches on it.
Imports numpy and PIL only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .errors import UserError
from .llava_next import AnyresPreprocessor, pack_image_features
from .manifest import Manifest
from .preprocess import ImagePreprocessor

Image_ = str | os.PathLike | Image.Image | np.ndarray
FAMILIES = ("llava", "llava_next")
# the most tiles one vision call takes (a LLaVA-NeXT image at 672 px is 5; a prompt holds many)
MAX_TILES = 256


class ImageInputs(Protocol):
    """What the engine asks of a family about one image."""

    def tiles(self, image: Image_) -> tuple[np.ndarray, Any]:
        """image -> (pixel tiles (T, 3, S, S) float32, what `pack` needs of it)."""
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


def image_inputs(manifest: Manifest, processor: dict[str, Any]) -> ImageInputs:
    """The image side of the artifact's family, from its manifest and image-processor config."""
    model = manifest.model
    if model.model_type == "llava":
        return LlavaImages(ImagePreprocessor(processor))
    if model.model_type == "llava_next":
        return LlavaNextImages(
            AnyresPreprocessor(processor), model.image_size, model.vision_patch_size
        )
    raise UserError(
        f"the artifact's model type {model.model_type!r} is not one this runtime runs "
        f"({', '.join(FAMILIES)}): upgrade mllmc"
    )
