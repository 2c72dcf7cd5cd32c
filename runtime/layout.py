"""Where a prompt's images sit: the host-side layout the prefill graph is fed.

A prompt with k images holds, for image j, one contiguous span of counts[j] rows of the image
token; the prefill graph takes the input ids, the rows the visual tokens occupy and explicit
position ids, so one artifact serves any number of images of any size.

    layout = expand_placeholders([1, 3148, 32000, 13, 32000, 29871], 32000, [576, 576])
    layout.input_ids      # (1, 1156) int64, each placeholder repeated to its image's count
    layout.image_spans    # ((2, 576), (579, 576)): per image, (first row, token count)
    layout.visual_rows    # (1152,) int64: 2..577, 579..1154
    layout.position_ids   # (1, 1156) int64: 0..1155

Imports numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import UserError

# the fewest text rows a prompt has besides its images (a BOS, a word and the turn's end at
# least): the prefill graphs' index arithmetic is traced for prompts of this many or more
MIN_TEXT_ROWS = 3


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def check_counts(counts: Sequence[int]) -> list[int]:
    """The per-image visual-token counts as a list of ints, each >= 1 (ValueError otherwise:
    the counts come from the image pipeline, not from the user)."""
    out = []
    for k, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
            raise ValueError(f"image {k}'s visual-token count must be an integer >= 1, got {c!r}")
        out.append(int(c))
    return out


def placeholder_mismatch(found: int, given: int, placeholder: str, hint: str = "") -> UserError:
    """The one-line error for a prompt whose image placeholders and images do not pair up:
    "the prompt has 1 <image> placeholder but 2 images were given" (then `hint`, if any)."""
    return UserError(
        f"the prompt has {_plural(found, placeholder + ' placeholder')} but "
        f"{_plural(given, 'image')} {'was' if given == 1 else 'were'} given"
        + (f": {hint}" if hint else "")
    )


@dataclass(frozen=True, eq=False)
class PromptLayout:
    """One prompt as the prefill graph takes it (n prompt rows, V visual rows in all).

    input_ids:      (1, n) int64, each image placeholder expanded to its image's token count
    image_spans:    per image, in prompt order: (first row, token count)
    position_ids:   (1, n) int64, arange(n) for 1-D rope ((3, 1, n) for M-RoPE families)
    attention_mask: (1, n) int64, all ones for one prompt
    next_position:  the position id of the first generated token (n for 1-D rope)
    """

    input_ids: np.ndarray
    image_spans: tuple[tuple[int, int], ...]
    position_ids: np.ndarray
    attention_mask: np.ndarray
    next_position: int

    @property
    def n(self) -> int:
        """The number of prompt rows."""
        return int(self.input_ids.shape[-1])

    @property
    def num_visual(self) -> int:
        """V: the visual rows of all images together."""
        return sum(count for _, count in self.image_spans)

    @property
    def visual_rows(self) -> np.ndarray:
        """(V,) int64, ascending: every image's rows, image after image."""
        if not self.image_spans:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(
            [np.arange(start, start + count, dtype=np.int64) for start, count in self.image_spans]
        )

    @property
    def text_rows(self) -> np.ndarray:
        """(n - V,) int64, ascending: the rows that are not visual."""
        is_text = np.ones(self.n, dtype=bool)
        is_text[self.visual_rows] = False
        return np.flatnonzero(is_text).astype(np.int64)

    def check(self, vocab_size: int | None = None, image_token_id: int | None = None) -> None:
        """UserError (one line) unless the layout is one the prefill graph can take: shapes and
        dtypes as documented, ids inside the vocabulary, spans inside the prompt, ascending and
        not overlapping, and (given image_token_id) the image token on exactly the visual rows."""
        ids = self.input_ids
        if not isinstance(ids, np.ndarray) or ids.dtype != np.int64 or ids.ndim != 2:
            raise UserError(f"input_ids must be a (1, n) int64 array, got {_describe(ids)}")
        if ids.shape[0] != 1 or ids.shape[1] == 0:
            raise UserError(f"input_ids must hold one non-empty prompt, got shape {ids.shape}")
        n = self.n
        if vocab_size is not None and not 0 <= ids.min() <= ids.max() < vocab_size:
            bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
            raise UserError(f"token id {bad} is outside the vocabulary (0 to {vocab_size - 1})")
        _check_spans(self.image_spans, n)
        _check_array("position_ids", self.position_ids, ((1, n), (3, 1, n)))
        _check_array("attention_mask", self.attention_mask, ((1, n),))
        if not isinstance(self.next_position, (int, np.integer)) or self.next_position < 0:
            raise UserError(f"next_position must be an integer >= 0, got {self.next_position!r}")
        if image_token_id is not None:
            found = np.flatnonzero(ids[0] == image_token_id)
            if not np.array_equal(found, self.visual_rows):
                raise UserError(
                    f"the image token (id {image_token_id}) is on {found.size} rows, but the "
                    f"image spans {list(self.image_spans)} cover {self.num_visual}"
                )


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return type(x).__name__


def _check_array(name: str, x: object, shapes: tuple[tuple[int, ...], ...]) -> None:
    """UserError unless x is an int64 array of one of `shapes`."""
    if not isinstance(x, np.ndarray) or x.dtype != np.int64 or x.shape not in shapes:
        wanted = " or ".join(str(s) for s in shapes)
        raise UserError(f"{name} must be an int64 array of shape {wanted}, got {_describe(x)}")


def _check_spans(spans: tuple[tuple[int, int], ...], n: int) -> None:
    """UserError unless every (first row, count) span lies inside [0, n), with count >= 1, in
    ascending order and not overlapping the one before."""
    end = 0
    for k, span in enumerate(spans):
        ok = isinstance(span, tuple) and len(span) == 2
        if not ok or not all(isinstance(v, (int, np.integer)) for v in span):
            raise UserError(f"image span {k} must be a (first row, count) pair, got {span!r}")
        start, count = span
        if count < 1 or start < end or start + count > n:
            raise UserError(
                f"image span {k} {span} must hold >= 1 rows inside the {n}-row prompt, after "
                f"row {end - 1} where the span before it ends"
            )
        end = start + count


def _layout(ids: np.ndarray, spans: list[tuple[int, int]]) -> PromptLayout:
    """The 1-D rope layout of one expanded prompt, ids (n,) int64."""
    n = ids.shape[0]
    return PromptLayout(
        input_ids=ids.reshape(1, n),
        image_spans=tuple(spans),
        position_ids=np.arange(n, dtype=np.int64).reshape(1, n),
        attention_mask=np.ones((1, n), dtype=np.int64),
        next_position=n,
    )


def _ids_1d(ids: Sequence[int]) -> np.ndarray:
    out = np.asarray(ids)
    if out.ndim != 1 or (out.size and not np.issubdtype(out.dtype, np.integer)):
        raise ValueError(f"ids must be a 1-D sequence of integers, got {_describe(out)}")
    if out.size == 0:
        raise UserError("the prompt has no tokens")
    return out.astype(np.int64)


def expand_placeholders(
    ids: Sequence[int], image_token_id: int, counts: Sequence[int]
) -> PromptLayout:
    """Token ids with one placeholder per image -> the layout with the k-th placeholder
    repeated counts[k] times.

    ids: (m,) ints holding exactly len(counts) copies of image_token_id (UserError otherwise).
    The result has n = m - len(counts) + sum(counts) rows and 1-D rope positions.
    """
    counts = check_counts(counts)
    src = _ids_1d(ids)
    places = np.flatnonzero(src == image_token_id)
    if places.size != len(counts):
        raise placeholder_mismatch(places.size, len(counts), f"image (token {image_token_id})")
    pieces, spans, row, last = [], [], 0, 0
    for place, count in zip(places.tolist(), counts, strict=True):
        pieces.append(src[last:place])
        row += place - last
        spans.append((row, count))
        pieces.append(np.full(count, image_token_id, dtype=np.int64))
        row += count
        last = place + 1
    pieces.append(src[last:])
    return _layout(np.concatenate(pieces), spans)


def locate_images(
    ids: Sequence[int], image_token_id: int, counts: Sequence[int], placeholder: str = "image"
) -> PromptLayout:
    """Already expanded token ids -> their layout: the image tokens must form, in order, one run
    of counts[k] consecutive rows per image (two images' runs may touch).

    UserError (one line, naming `placeholder`) when the image tokens do not pair up that way,
    e.g. when a tokenizer merges the image token into its neighbours.
    """
    counts = check_counts(counts)
    src = _ids_1d(ids)
    rows = np.flatnonzero(src == image_token_id)
    spans, offset, ok = [], 0, rows.size == sum(counts)
    for count in counts if ok else ():
        run = rows[offset : offset + count]
        ok = ok and bool(run[-1] - run[0] + 1 == count)
        spans.append((int(run[0]), count))
        offset += count
    if not ok:
        raise UserError(
            f"{placeholder} did not tokenize into {sum(counts)} image tokens in runs of "
            f"{counts} consecutive rows (got {rows.size} image tokens): check the tokenizer"
        )
    return _layout(src, spans)
