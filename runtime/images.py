"""A model family's image side on the host: image -> tiles for the vision segment, how many
prompt rows the image takes, and the packing of its tiles' features into those rows.

    images = image_inputs(manifest, processor_config)        # ImageInputs for the family
    tiles, meta = images.tiles("cat.png")                   # (T, 3, S, S) float32
    rows = images.count(meta)                                # the image's visual rows
    features = images.pack(tile_features, meta, newline)     # (rows, d)

- llava (LLaVA-1.5): one tile per image, CLIP's preprocessing; rows = the vision segment's
  tokens per tile (after a pre-LLM pass, the ones it keeps); packing is the tile itself.
- llava_next (LLaVA-NeXT): the whole image plus a grid of tiles at the best pinpoint
  (`runtime/llava_next.py`, equal to LlavaNextImageProcessorPil); packing is LLaVA-NeXT's
  unpad + one image_newline per grid row, done here in numpy, as TensorRT-LLM does it: the
  grid shape depends on the image, and on the host it is index work, so one vision graph serves
  every aspect ratio.

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
from .llava_next import AnyresPreprocessor, image_token_count, pack_image_features
from .manifest import Manifest
from .preprocess import ImagePreprocessor

Image_ = str | os.PathLike | Image.Image | np.ndarray
FAMILIES = ("llava", "llava_next")
# the most tiles one vision call takes (a LLaVA-NeXT image at 672 px is 5; a prompt holds many)
MAX_TILES = 256


class ImageInputs(Protocol):
    """What the engine asks of a family about one image."""

    def tiles(self, image: Image_) -> tuple[np.ndarray, Any]:
        """image -> (pixel tiles (T, 3, S, S) float32, what `count` and `pack` need of it)."""
        ...

    def count(self, meta: Any) -> int:
        """The prompt rows the image takes."""
        ...

    def pack(self, features: np.ndarray, meta: Any, newline: np.ndarray | None) -> np.ndarray:
        """The image's tile features (T, K, d) -> its rows (count, d)."""
        ...


@dataclass
class LlavaImages:
    """LLaVA-1.5: one CLIP tile per image, its `tokens` rows as they are."""

    preprocess: ImagePreprocessor
    tokens: int

    def tiles(self, image: Image_) -> tuple[np.ndarray, None]:
        return self.preprocess(image), None  # (1, 3, S, S)

    def count(self, meta: None) -> int:
        return self.tokens

    def pack(self, features: np.ndarray, meta: None, newline: np.ndarray | None) -> np.ndarray:
        return features.reshape(-1, features.shape[-1])  # (tokens, d)


@dataclass
class LlavaNextImages:
    """LLaVA-NeXT: the whole image and its anyres grid; rows as LlavaNextProcessor counts them."""

    preprocess: AnyresPreprocessor
    image_size: int
    patch_size: int
    strategy: str

    def tiles(self, image: Image_) -> tuple[np.ndarray, tuple[int, int]]:
        return self.preprocess(image)  # (1 + grid, 3, S, S), (height, width)

    def count(self, meta: tuple[int, int]) -> int:
        return image_token_count(
            *meta,
            image_size=self.image_size,
            patch_size=self.patch_size,
            grid_pinpoints=self.preprocess.grid_pinpoints,
            strategy=self.strategy,
        )

    def pack(
        self, features: np.ndarray, meta: tuple[int, int], newline: np.ndarray | None
    ) -> np.ndarray:
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
        return LlavaImages(ImagePreprocessor(processor), manifest.visual_tokens)
    if model.model_type == "llava_next":
        return LlavaNextImages(
            AnyresPreprocessor(processor),
            model.image_size,
            model.vision_patch_size,
            model.vision_feature_select_strategy,
        )
    raise UserError(
        f"the artifact's model type {model.model_type!r} is not one this runtime runs "
        f"({', '.join(FAMILIES)}): upgrade mllmc"
    )
