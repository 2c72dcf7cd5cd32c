"""The runtime's input side, without torch: image -> pixel_values, prompt -> input_ids, ids -> text.

It reproduces what `AutoProcessor.from_pretrained(model_dir)` (transformers 5: LlavaProcessor with
the PIL backend of CLIPImageProcessor and the `tokenizers` backend) gives for a LLaVA-1.5 model
directory, reading the same files: the arithmetic below is copied from transformers, step by step
and dtype by dtype, so pixel values agree to float32 rounding and input ids exactly.

    cfg = read_image_processor_config(model_dir)
    pixel_values = ImagePreprocessor(cfg)("cat.png")                  # (1, 3, H, W) float32
    encoder = PromptEncoder.from_dir(model_dir)
    layout = encoder.layout("Compare the two.", [576, 576])          # PromptLayout, 2 images
    text = encoder.decode(generated_ids)

Imports numpy, PIL, tokenizers and jinja2 only: never torch or transformers.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .jsonfile import JSONError, read_json
from .layout import PromptLayout, check_counts, locate_images, placeholder_mismatch
from .manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

# A family's rotary positions: (a prompt's layout with 1-D positions, the image row counts the
# caller gave) -> the layout with the family's position_ids and next_position
PositionHook = Callable[[PromptLayout, Sequence[int]], PromptLayout]

# transformers.image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# CLIPImageProcessor's class defaults: what transformers uses for a key the config leaves out (or null).
_CLIP_DEFAULTS: dict[str, Any] = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,  # PIL.Image.BICUBIC
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "do_pad": False,
    "pad_size": None,
    "default_to_square": False,
}
_CLIP_TYPES = {None, "CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil"}
_LLAVA_NEXT_TYPES = {
    "LlavaNextImageProcessor",
    "LlavaNextImageProcessorFast",
    "LlavaNextImageProcessorPil",
}
# LlavaNextImageProcessor's class default for image_grid_pinpoints, as [height, width] pairs.
LLAVA_NEXT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_FLAGS = ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_pad")

# Where the image settings live, in transformers' order of preference. An artifact (a
# directory with a manifest.json) holds the model's files too, but its image_processor.json
# comes first there: `mllmc compile` writes into it the dict this module returns, normalised.
_ARTIFACT_IMAGE_CONFIG = ("image_processor.json", None)
_IMAGE_CONFIG_SOURCES = (
    ("processor_config.json", "image_processor"),  # saved by transformers >= 5
    ("preprocessor_config.json", None),  # llava-hf checkpoints
    _ARTIFACT_IMAGE_CONFIG,
)


# -- image ------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return read_json(path)
    except JSONError as e:
        raise UserError(f"corrupt {path}: {e}") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _size_dict(value: Any, default_to_square: bool, name: str, path: Path) -> dict[str, int]:
    """transformers' get_size_dict: an int, an (h, w) list or a dict -> {"shortest_edge"} or {"height", "width"}.

    A size of more pixels than the image limit (`max_image_pixels`) is refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    if isinstance(value, dict) and set(value) in ({"shortest_edge"}, {"height", "width"}):
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values()):
            h = value.get("height", value.get("shortest_edge"))
            check_pixels(value.get("width", h), h, f"{path}: {name}")
            return {k: int(v) for k, v in value.items()}
    raise UserError(
        f"{path}: unsupported {name} {value!r}; mllmc supports {{'shortest_edge': N}} or {{'height': H, 'width': W}}"
    )


def _channel_list(value: Any, name: str, path: Path) -> list[float]:
    """image_mean / image_std: one finite number or three; image_std's must not be 0 (pixels
    are divided by it)."""
    values = [value] * 3 if isinstance(value, (int, float)) else value
    if not (
        isinstance(values, (list, tuple))
        and len(values) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        and all(math.isfinite(v) for v in values)
    ):
        raise UserError(f"{path}: {name} must be a finite number or 3 of them, got {value!r}")
    if name == "image_std" and any(v == 0 for v in values):
        raise UserError(
            f"{path}: image_std must not be 0 (pixels are divided by it), got {value!r}"
        )
    return [float(v) for v in values]


def read_image_processor_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a model's (or artifact's) image-processor settings into one dict with every key explicit.

    In an artifact, its own image_processor.json (what `mllmc compile` normalised). Elsewhere,
    as transformers does, the "image_processor" block of processor_config.json first, then
    preprocessor_config.json (then an image_processor.json). Keys the file leaves
    out take CLIPImageProcessor's defaults; `size` comes back as {"shortest_edge": N} or
    {"height": H, "width": W} and `crop_size` as {"height": H, "width": W}. A LLaVA-NeXT
    config also gives "image_grid_pinpoints" ([[height, width], ...]), and do_pad False. A
    Qwen2-VL config (Qwen2VLImageProcessor) is read by `qwen2_vl.read_qwen_processor_config`.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise UserError(f"model directory {root} not found")
    raw, path = None, root
    sources = _IMAGE_CONFIG_SOURCES
    if (root / MANIFEST_NAME).is_file():
        sources = (_ARTIFACT_IMAGE_CONFIG, *sources)
    for name, key in sources:
        path = root / name
        if not path.is_file():
            continue
        data = _read_json(path)
        if not isinstance(data, dict):
            raise UserError(f"corrupt {path}: expected a JSON object")
        if key is None:
            raw = data
            break
        if isinstance(data.get(key), dict):
            raw = data[key]
            break
    if raw is None:
        raise UserError(
            f"{root} has no image processor config: expected preprocessor_config.json or an "
            "'image_processor' block in processor_config.json"
        )
    from .qwen2_vl import QWEN_IMAGE_PROCESSOR_TYPES, read_qwen_processor_config  # imports us

    if raw.get("image_processor_type") in QWEN_IMAGE_PROCESSOR_TYPES:
        return read_qwen_processor_config(raw, path)
    anyres = _is_anyres(raw, path)
    if anyres:  # LLaVA-NeXT's do_pad pads tile counts across a batch of images: nothing for one
        raw = {k: v for k, v in raw.items() if k not in ("do_pad", "pad_size")}

    # A missing key takes the class default; an explicit null stays None in transformers, which
    # means False for a flag, and an error for a value that a step needs.
    cfg = {k: (raw[k] if k in raw else default) for k, default in _CLIP_DEFAULTS.items()}
    for k in _FLAGS:
        cfg[k] = bool(cfg[k])
    for flag, keys in (
        ("do_resize", ("size", "resample")),
        ("do_center_crop", ("crop_size",)),
        ("do_rescale", ("rescale_factor",)),
        ("do_normalize", ("image_mean", "image_std")),
        ("do_pad", ("pad_size",)),
    ):
        for k in keys:
            if cfg[flag] and cfg[k] is None:
                raise UserError(f"{path}: {flag} is true but {k} is null")
    default_to_square = bool(cfg.pop("default_to_square"))
    if cfg["size"] is not None:
        cfg["size"] = _size_dict(cfg["size"], default_to_square, "size", path)
    if cfg["crop_size"] is not None:
        cfg["crop_size"] = _size_dict(cfg["crop_size"], True, "crop_size", path)
    if cfg["resample"] is None:  # unused (do_resize is false)
        cfg["resample"] = 2
    if cfg["resample"] not in (0, 1, 2, 3, 4, 5) or isinstance(cfg["resample"], bool):
        # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING
        raise UserError(f"{path}: resample must be a PIL filter code 0-5, got {cfg['resample']!r}")
    cfg["resample"] = int(cfg["resample"])
    factor = cfg["rescale_factor"]
    if factor is not None:
        if not isinstance(factor, (int, float)) or isinstance(factor, bool):
            raise UserError(f"{path}: rescale_factor must be a number, got {factor!r}")
        cfg["rescale_factor"] = float(factor)
    for k in ("image_mean", "image_std"):
        if cfg[k] is not None:
            cfg[k] = _channel_list(cfg[k], k, path)
    if cfg["pad_size"] is not None:
        cfg["pad_size"] = _size_dict(cfg["pad_size"], True, "pad_size", path)
    if anyres:
        cfg["image_grid_pinpoints"] = _grid_pinpoints(raw, cfg, path)
    return cfg


def _is_anyres(raw: dict[str, Any], path: Path) -> bool:
    """Whether `raw` is a LLaVA-NeXT (anyres) image-processor config: its type says so, or, in an
    artifact's image_processor.json, it has image_grid_pinpoints. UserError for another type."""
    kind = raw.get("image_processor_type")
    if kind in _LLAVA_NEXT_TYPES or (kind is None and "image_grid_pinpoints" in raw):
        return True
    if kind not in _CLIP_TYPES:
        raise UserError(
            f"{path}: image processor {kind!r} is not supported; mllmc reads CLIPImageProcessor "
            "and LlavaNextImageProcessor configs"
        )
    return False


def _grid_pinpoints(raw: dict[str, Any], cfg: dict[str, Any], path: Path) -> list[list[int]]:
    """A LLaVA-NeXT config's image_grid_pinpoints as [[height, width], ...] (the class default when
    the key is missing), each within the image pixel limit; UserError for anything else, or
    when `size`, which the whole-image tile is resized to, is null."""
    value = raw.get("image_grid_pinpoints", LLAVA_NEXT_GRID_PINPOINTS)
    if cfg["size"] is None:
        raise UserError(f"{path}: size is null, but LLaVA-NeXT resizes every image to it")
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    for pair in value if ok else ():
        ok = ok and (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)
        )
    if not ok:
        raise UserError(
            f"{path}: image_grid_pinpoints must be a non-empty list of [height, width] pairs of "
            f"positive integers, got {str(value)[:80]}"
        )
    for h, w in value:
        check_pixels(w, h, f"{path}: image_grid_pinpoints {[h, w]}")
    return [[int(h), int(w)] for h, w in value]


def output_size(cfg: dict[str, Any]) -> tuple[str, int, int] | None:
    """(the setting that fixes it, height, width) of every image the processor config `cfg`
    (from `read_image_processor_config`) makes, or None where the size depends on the image."""
    if cfg["do_pad"]:
        return "pad_size", cfg["pad_size"]["height"], cfg["pad_size"]["width"]
    if cfg["do_center_crop"]:
        return "crop_size", cfg["crop_size"]["height"], cfg["crop_size"]["width"]
    if cfg["do_resize"] and "height" in cfg["size"]:
        return "size", cfg["size"]["height"], cfg["size"]["width"]
    return None


def check_image_size(cfg: dict[str, Any], image_size: int, where: str | os.PathLike) -> None:
    """UserError when the processor config `cfg` makes images of another size than the
    `image_size` x `image_size` its vision tower takes."""
    fixed = output_size(cfg)
    if fixed is not None and fixed[1:] != (image_size, image_size):
        key, h, w = fixed
        raise UserError(
            f"{where}: the image processor's {key} makes {h}x{w} images, but the vision tower "
            f"takes {image_size}x{image_size}: set {key} to {image_size} in its processor config"
        )


# The most pixels an image may have, as a file mllmc decodes, as the size a processor config
# resizes to, or after a resize: a larger one is refused before memory goes to it. The
# environment variable MLLMC_MAX_IMAGE_PIXELS sets another limit (up to Pillow's own
# decompression-bomb limit, about 179 megapixels, for files).
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
MAX_IMAGE_PIXELS_ENV = "MLLMC_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int:
    """The image pixel limit: MLLMC_MAX_IMAGE_PIXELS, or 8192 x 8192."""
    text = os.environ.get(MAX_IMAGE_PIXELS_ENV)
    if text is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{MAX_IMAGE_PIXELS_ENV} must be an integer >= 1, got {text[:40]!r}")
    return value


def check_pixels(width: int, height: int, what: str) -> None:
    """UserError when a `width` x `height` image is over the pixel limit."""
    limit = max_image_pixels()
    if width * height > limit:
        raise UserError(
            f"{what} is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{limit} (set {MAX_IMAGE_PIXELS_ENV} to allow larger images)"
        )


def _image_error(path: Any, e: BaseException) -> UserError:
    if isinstance(e, FileNotFoundError):
        return UserError(f"cannot read image {path}: no such file")
    if isinstance(e, IsADirectoryError):
        return UserError(f"cannot read image {path}: is a directory")
    if isinstance(e, UnidentifiedImageError):
        return UserError(f"cannot read image {path}: not an image file PIL can read")
    if isinstance(e, Image.DecompressionBombError):
        return UserError(
            f"cannot read image {path}: more pixels than the limit of {max_image_pixels()} "
            f"(set {MAX_IMAGE_PIXELS_ENV} to allow larger images)"
        )
    return UserError(f"cannot read image {path}: {_one_line(e)}")


_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file without decoding its pixels (a lazy PIL image; close it), refusing
    one over the pixel limit (`max_image_pixels`) or one PIL cannot identify."""
    import warnings

    try:
        with warnings.catch_warnings():  # the size is checked here, in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except _IMAGE_ERRORS as e:
        raise _image_error(path, e) from None
    try:
        check_pixels(image.width, image.height, f"image {path}")
    except UserError:
        image.close()
        raise
    return image


def load_image(path: str | os.PathLike, exif_transpose: bool = True) -> Image.Image:
    """Open an image file as transformers' `load_image` does: EXIF orientation applied, mode RGB.

    (Note: this drops an alpha channel rather than compositing it onto white, exactly like
    `processor(images="file.png")`; a PIL image passed in instead is composited onto white.)
    An image over the pixel limit (`max_image_pixels`) is refused before it is decoded.
    """
    with open_image(path) as image:
        try:
            return (ImageOps.exif_transpose(image) if exif_transpose else image).convert("RGB")
        except _IMAGE_ERRORS as e:
            raise _image_error(path, e) from None


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb: transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """An HxWxC uint8 array (C = 1, 3 or 4) -> HxWx3 uint8, as transformers converts arrays."""
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or array.dtype != np.uint8:
        raise UserError(
            f"image array must be HxWx3 (or HxWx1, HxWx4) uint8, got shape {array.shape} dtype {array.dtype}"
        )
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255  # float64
        composite = alpha * array[..., :3] + (1 - alpha) * 255  # blend onto white
        return np.round(composite).astype(np.uint8)
    return array


def _resize_shape(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False): the long edge is truncated."""
    if "shortest_edge" not in size:
        return size["height"], size["width"]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(image: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers.image_transforms.center_crop on (C, H, W): floor offsets, zero-pad if too small."""
    _, h, w = image.shape
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return image[:, top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    padded = np.zeros((image.shape[0], new_h, new_w), dtype=image.dtype)
    top_pad, left_pad = -(-(new_h - h) // 2), -(-(new_w - w) // 2)  # ceil
    padded[:, top_pad : top_pad + h, left_pad : left_pad + w] = image
    top, left = top + top_pad, left + left_pad
    return padded[
        :, max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)
    ]


def to_rgb_array(
    image: str | os.PathLike | Image.Image | np.ndarray, do_convert_rgb: bool
) -> np.ndarray:
    """An image (path, PIL image or HxWxC uint8 array) as transformers' PIL backend takes it in:
    loaded, converted to RGB when `do_convert_rgb`, -> (H, W, 3) uint8; UserError otherwise."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        check_pixels(image.width, image.height, f"image {image.width}x{image.height}")
        if do_convert_rgb:
            image = convert_to_rgb(image)
        array = np.array(image)  # (H, W, C) uint8
    elif isinstance(image, np.ndarray):
        if image.ndim >= 2:  # the limit image files have, before any copy is made
            check_pixels(image.shape[1], image.shape[0], f"image array {image.shape}")
        array = _array_to_rgb(image) if do_convert_rgb else image
    else:
        raise UserError(
            f"image must be a path, a PIL image or a numpy array, got {type(image).__name__}"
        )
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise UserError(
            f"image must be RGB uint8 after conversion, got shape {array.shape} dtype {array.dtype}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise UserError(f"image is empty ({array.shape[1]}x{array.shape[0]} pixels)")
    return array


class ImagePreprocessor:
    """CLIPImageProcessor (PIL backend) in numpy: convert to RGB, resize, center crop, rescale, normalize."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.mean = np.array(config["image_mean"] or [0.0] * 3, dtype=np.float32)  # (3,)
        self.std = np.array(config["image_std"] or [1.0] * 3, dtype=np.float32)  # (3,)

    def __call__(self, image: str | os.PathLike | Image.Image | np.ndarray) -> np.ndarray:
        """image (path, PIL image or HxWx3 uint8 array) -> pixel_values (1, 3, H, W) float32."""
        cfg = self.config
        array = to_rgb_array(image, cfg["do_convert_rgb"])  # (H, W, 3) uint8
        if cfg["do_resize"]:
            # a PIL resize of the uint8 image, as transformers' PIL backend does it
            h, w = _resize_shape(array.shape[0], array.shape[1], cfg["size"])
            check_pixels(w, h, f"the image resized from {array.shape[1]}x{array.shape[0]}")
            resized = Image.fromarray(array).resize((w, h), resample=cfg["resample"])
            array = np.array(resized)  # (h, w, 3) uint8
        x = np.ascontiguousarray(array.transpose(2, 0, 1))  # (3, H, W) uint8
        if cfg["do_center_crop"]:
            x = _center_crop(x, cfg["crop_size"]["height"], cfg["crop_size"]["width"])
        if cfg["do_rescale"]:  # upcast to float64, scale, downcast to float32
            x = (x.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32)
        if cfg["do_normalize"]:
            x = x.astype(np.float32)
            x = (x - self.mean[:, None, None]) / self.std[:, None, None]  # float32 throughout
        if cfg["do_pad"]:  # zeros at the bottom and right, after normalizing
            ph, pw = cfg["pad_size"]["height"], cfg["pad_size"]["width"]
            if ph < x.shape[1] or pw < x.shape[2]:
                raise UserError(
                    f"pad_size {ph}x{pw} is smaller than the processed image {x.shape[1]}x{x.shape[2]}"
                )
            x = np.pad(x, ((0, 0), (0, ph - x.shape[1]), (0, pw - x.shape[2])))
        return np.ascontiguousarray(x[None], dtype=np.float32)  # (1, 3, H, W)


# -- text -------------------------------------------------------------------------------------

_SPECIAL_TOKEN_KEYS = (
    "bos_token eos_token unk_token sep_token pad_token cls_token mask_token".split()
)


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a serialised AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_tokenizer(path: Path):
    """tokenizer.json exactly as transformers 5 runs it for a LLaVA model directory: as it is.

    AutoTokenizer ignores the tokenizer_class of a model_type "llava" checkpoint (llava-hf's say
    LlamaTokenizer, which would replace the normalizer and pre-tokenizer) and loads tokenizer.json
    into TokenizersBackend; and with a tokenizer.json present it also drops add_bos_token /
    add_eos_token from tokenizer_config.json, so the file's post-processor decides about BOS/EOS.
    """
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception subclasses
        raise UserError(f"corrupt {path}: {_one_line(e)}") from None


def _read_chat_template(
    root: Path, proc_cfg: dict[str, Any], tok_cfg: dict[str, Any]
) -> str | None:
    """The processor's chat template, found where transformers' ProcessorMixin looks for it.

    processor_config.json's "chat_template", then chat_template.json (legacy), then
    chat_template.jinja; the tokenizer's template in tokenizer_config.json is a last resort (the
    HF processor itself would refuse to template without one of the first three).
    """
    template: Any = proc_cfg.get("chat_template")
    if template is None and (root / "chat_template.json").is_file():
        data = _read_json(root / "chat_template.json")
        template = data.get("chat_template") if isinstance(data, dict) else None
    if template is None and (root / "chat_template.jinja").is_file():
        try:
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {root / 'chat_template.jinja'}: {_one_line(e)}") from None
    if template is None:
        template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


# What a chat template may do when it renders one prompt: write at most this many characters,
# and finish within this many seconds. A template that goes past either is refused.
MAX_TEMPLATE_OUTPUT = 1_000_000
TEMPLATE_SECONDS = 10.0
_MAX_INT_BITS = 14_300  # about 10**4300, the largest integer Python prints


def _bounded_sandbox():
    """jinja2's immutable sandbox, with `*` and `**` refused when their result would be larger
    than a template's output limit (a string, list) or than Python can print (an integer)."""
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if (
                        isinstance(seq, (str, list, tuple))
                        and isinstance(times, int)
                        and len(seq) * times > MAX_TEMPLATE_OUTPUT
                    ):
                        raise SecurityError(
                            f"the result would be longer than {MAX_TEMPLATE_OUTPUT} characters"
                        )
            if (
                operator == "**"
                and isinstance(left, int)
                and isinstance(right, int)
                and right > 0
                and abs(left) > 1
                and right * abs(left).bit_length() > _MAX_INT_BITS
            ):
                raise SecurityError("the result would be a number too large to print")
            return super().call_binop(context, operator, left, right)

    return BoundedSandbox


def _render_bounded(template: Any, variables: dict[str, Any]) -> str:
    """Render `template` within MAX_TEMPLATE_OUTPUT characters and TEMPLATE_SECONDS seconds
    (UserError otherwise). The time limit is checked at every line the template's code runs,
    through a trace function on this thread while it renders."""
    import sys
    import time

    deadline = time.monotonic() + TEMPLATE_SECONDS

    def on_line(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and time.monotonic() > deadline:
            raise TimeoutError(f"took longer than {TEMPLATE_SECONDS:g} s")
        return on_line

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        parts, size = [], 0
        for part in template.generate(**variables):
            size += len(part)
            if size > MAX_TEMPLATE_OUTPUT:
                raise UserError(
                    f"chat template failed: it writes more than {MAX_TEMPLATE_OUTPUT} characters"
                )
            parts.append(part)
        return "".join(parts)
    finally:
        sys.settrace(previous)


def _compile_template(source: str):
    """A jinja2 template set up as transformers' _compile_jinja_template sets it up (in a
    sandbox whose `*` and `**` are bounded; see `_bounded_sandbox`)."""
    import jinja2
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        # {% generation %}...{% endgeneration %} marks assistant text for masks; it renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(
                lineno
            )

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = _bounded_sandbox()(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise UserError(f"bad chat template: {_one_line(e)}") from None


def _check_utf8(prompt: str) -> None:
    """UserError unless `prompt` can be encoded as UTF-8 (a lone surrogate from a bad shell)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(
            f"the prompt is not valid text: {e.object[e.start : e.end]!r} at character "
            f"{e.start} cannot be encoded as UTF-8 (is the prompt's file or shell not UTF-8?)"
        ) from None


# the image placeholders of the families mllmc compiles (LLaVA / LLaVA-NeXT, Qwen2-VL)
FAMILY_PLACEHOLDERS = ("<image>", "<|image_pad|>")


def warn_foreign_placeholder(
    prompt: str, image_token: str, images: int, warned: set[str] | None = None
) -> None:
    """Warn when `prompt` holds another family's image placeholder (LLaVA's <image> in a
    Qwen2-VL prompt, or the reverse): the model's processor keeps it as plain text, and so does
    mllmc, but the user most likely meant an image there. `images`: how many images the prompt
    goes with; `warned`: the placeholders already warned about by this caller (each is said
    once, not once per prompt of a batch or an eval set), updated."""
    for other in FAMILY_PLACEHOLDERS:
        if other == image_token or other not in prompt or other in (warned or ()):
            continue
        if warned is not None:
            warned.add(other)
        where = (
            f"; the images go where {image_token} is, or, with none in the prompt, before it"
            if images
            else ""
        )
        log.warning(
            "the prompt's %s is not this model's image placeholder (%s): it is kept as text%s",
            other,
            image_token,
            where,
        )


class PromptEncoder:
    """LlavaProcessor's text side: chat template, tokenizer, image-token expansion; and decoding."""

    def __init__(
        self,
        tokenizer: Any,  # tokenizers.Tokenizer
        image_token: str = "<image>",
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        positions: PositionHook | None = None,
    ):
        self.tokenizer = tokenizer
        # the family's rotary positions for a laid-out prompt (None: 1-D, arange(n))
        self.positions = positions
        self.image_token = image_token
        self.chat_template = chat_template
        # bos_token, eos_token, ...: variables the chat template can use
        self.special_tokens = dict(special_tokens or {})
        self.bos_token = self.special_tokens.get("bos_token")
        image_token_id = tokenizer.token_to_id(image_token)
        if image_token_id is None:
            ids = tokenizer.encode(image_token, add_special_tokens=False).ids
            if len(ids) != 1:
                raise UserError(
                    f"the tokenizer has no {image_token!r} token: not this model family's tokenizer"
                )
            image_token_id = ids[0]
        self.image_token_id: int = image_token_id
        self._template = _compile_template(chat_template) if chat_template else None
        self._warned: set[str] = set()  # the other families' placeholders warned about

    @classmethod
    def from_dir(
        cls,
        model_dir: str | os.PathLike,
        default_image_token: str = "<image>",
        positions: PositionHook | None = None,
    ) -> PromptEncoder:
        """Load tokenizer.json, the chat template and the image token of a model (or artifact)
        dir. `default_image_token`: the family processor's image token when neither the
        tokenizer nor processor_config.json names one; `positions`: the family's position hook
        (`runtime/images.py` chooses both)."""
        root = Path(model_dir)
        if not (root / "tokenizer.json").is_file():
            raise UserError(f"{root} has no tokenizer.json (mllmc needs the fast-tokenizer file)")
        configs = []
        for name in ("processor_config.json", "tokenizer_config.json", "special_tokens_map.json"):
            data = _read_json(root / name) if (root / name).is_file() else {}
            if not isinstance(data, dict):
                raise UserError(f"corrupt {root / name}: expected a JSON object")
            configs.append(data)
        proc_cfg, tok_cfg, special_map = configs

        # The tokenizer's special_tokens_map: what the chat template sees as bos_token, eos_token, ...
        extra = tok_cfg.get("extra_special_tokens")
        named = {**special_map, **tok_cfg, **(extra if isinstance(extra, dict) else {})}
        keys = [*_SPECIAL_TOKEN_KEYS, "image_token", *(extra if isinstance(extra, dict) else ())]
        special = {k: _token_str(named.get(k)) for k in keys if _token_str(named.get(k))}
        # the processors take the tokenizer's image token when it has one, else their own
        image_token = (
            special.get("image_token")
            or _token_str(proc_cfg.get("image_token"))
            or default_image_token
        )
        tokenizer = _load_tokenizer(root / "tokenizer.json")
        template = _read_chat_template(root, proc_cfg, tok_cfg)
        return cls(tokenizer, image_token, template, special, positions)

    def apply_chat_template(self, prompt: str, num_images: int = 1) -> str:
        """One user turn holding `num_images` images, then `prompt`, plus the generation prompt,
        as text (the messages HF's processors template: images first, then the text)."""
        if self._template is None:
            raise UserError(
                f"the prompt has no {self.image_token} placeholder and the model has no chat template: "
                f"put {self.image_token} where each image goes"
            )
        images = [{"type": "image"} for _ in range(num_images)]
        messages = [{"role": "user", "content": [*images, {"type": "text", "text": prompt}]}]
        variables = {
            **self.special_tokens,
            "messages": messages,
            "tools": None,
            "documents": None,
            "add_generation_prompt": True,
        }
        try:
            return _render_bounded(self._template, variables)
        except UserError:
            raise
        except Exception as e:  # the template is the model's code: any error it raises
            raise UserError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from None

    def layout(self, prompt: str, counts: Sequence[int]) -> PromptLayout:
        """prompt + per-image visual-token counts -> the prompt's layout, as LlavaProcessor makes it.

        A prompt with image placeholders holds one per image, in image order, and is tokenized as
        it is (as `processor(images=..., text=prompt)` does); one without goes through the chat
        template as one user turn with the images first, and then, as in the processor's
        `apply_chat_template(tokenize=True)`, no BOS is added if the template already wrote one.
        The k-th placeholder becomes counts[k] image tokens before tokenizing. The family's
        position hook, if any, then sets the positions (Qwen2-VL's M-RoPE, from its counts).
        """
        given, counts = list(counts), check_counts(counts)
        _check_utf8(prompt)
        add_special_tokens = True
        found = prompt.count(self.image_token)
        warn_foreign_placeholder(prompt, self.image_token, len(counts), self._warned)
        if found == 0:
            prompt = self.apply_chat_template(prompt, num_images=len(counts))
            add_special_tokens = not (self.bos_token and prompt.startswith(self.bos_token))
            found = prompt.count(self.image_token)
            if found != len(counts):
                raise UserError(
                    f"the chat template wrote {found} {self.image_token} tokens, expected "
                    f"{len(counts)} (one per image): check the model's chat template"
                )
        elif found != len(counts):
            raise placeholder_mismatch(
                found, len(counts), self.image_token, "put one where each image goes, or none"
            )
        # As LlavaProcessor does: repeat each placeholder in the text, then tokenize.
        head, *tails = prompt.split(self.image_token)
        text = head + "".join(
            self.image_token * c + tail for c, tail in zip(counts, tails, strict=True)
        )
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        layout = locate_images(ids, self.image_token_id, counts, self.image_token)
        return layout if self.positions is None else self.positions(layout, given)

    def encode(self, prompt: str, num_visual_tokens: int) -> tuple[np.ndarray, int]:
        """prompt -> (input_ids (1, n) int64 with `num_visual_tokens` image tokens, index of the
        first): `layout` for one image."""
        found = prompt.count(self.image_token)
        if found > 1:
            raise placeholder_mismatch(
                found,
                1,
                self.image_token,
                "encode takes one image per prompt (layout takes several)",
            )
        layout = self.layout(prompt, [num_visual_tokens])
        return layout.input_ids, layout.image_spans[0][0]

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text, special tokens skipped (transformers skips its space clean-up for BPE)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
