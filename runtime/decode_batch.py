"""The state of a batched decode: the samples that decode together, their KV caches stacked
into one array per cache input, and how many padding rows each sample's cache starts with.

The decode segment takes B samples a step (`input_ids` (B, 1), `position_ids` (B, 1),
`cache_pad` (L, B), `past.<l>.key/value` (B, kvh, P_l, hd)): sample b's cache of layer l is its
own rows LEFT-padded with cache_pad[l, b] zero rows to the batch's P_l, which the step's mask
hides. Each step appends one row at the end, so the pads stay as they are; they change only
when the batch does:

    batch = engine.new_batch()
    batch.join("a", cache_a)              # a prefilled sample: prefill()'s cache (1, kvh, n_l, hd)
    batch.join("b", cache_b)              # the shorter caches (and their pads) grow to the longest
    logits = engine.decode_batch_step([tok_a, tok_b], [pos_a, pos_b], batch)   # (2, V)
    batch.leave(["a"])                    # drops a's row, and the pad columns every sample shares

Iteration-level ("continuous") batching is these three calls: a sample joins between two steps
and leaves after the step that finished it, and the others never wait for it. The caches stay
in the decode runner's own array type (numpy for onnx, torch tensors on the device for aoti /
trt): only indexing, slicing and `new_zeros` are used on them, so nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from .errors import UserError


def _zeros(like: Any, shape: tuple[int, ...]) -> Any:
    """Zeros of `shape` in `like`'s array type, dtype and device."""
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dtype=like.dtype)
    return like.new_zeros(shape)


def _take(array: Any, rows: list[int], start: int) -> Any:
    """array[rows, :, start:] (a copy, contiguous for numpy; the torch runners make theirs so)."""
    out = array[rows] if rows != list(range(array.shape[0])) else array
    if start:
        out = out[:, :, start:]
    return np.ascontiguousarray(out) if isinstance(out, np.ndarray) else out


class DecodeBatch:
    """The samples of a batched decode, in batch order.

    keys:  each sample's handle (any hashable), the order of the rows of every array below
    cache: per decode cache input (`past.<l>.key`, `.value`, in the decode segment's order)
           (B, kvh, P_l, hd), each sample's rows right-aligned
    pads:  (L, B) int64, the zero rows sample b's cache of layer l starts with
    layers: the layer l of each cache input"""

    def __init__(self, layers: Sequence[int]):
        self.layers = [int(layer) for layer in layers]
        self.num_layers = max(self.layers) + 1 if self.layers else 0
        self.keys: list[Hashable] = []
        self.cache: list[Any] = []
        self.pads = np.zeros((self.num_layers, 0), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.keys

    def join(self, key: Hashable, cache: Sequence[Any]) -> None:
        """Add a sample whose cache is `cache` (what prefill() returned: one (1, kvh, n_l, hd)
        array per cache input) as the batch's last row. Layers whose cache is shorter than the
        batch's are left-padded; where it is longer, every other sample's pad grows instead."""
        self._check_join(key, cache)
        if not self.keys:
            self.keys, self.cache = [key], list(cache)
            self.pads = np.zeros((self.num_layers, 1), dtype=np.int64)
            return
        b = len(self.keys)
        grown = []
        new_pads = np.zeros((self.num_layers, b + 1), dtype=np.int64)
        for old, new, layer in zip(self.cache, cache, self.layers, strict=True):
            have, rows = int(old.shape[2]), int(new.shape[2])
            total = max(have, rows)
            buf = _zeros(old, (b + 1, old.shape[1], total, old.shape[3]))
            buf[:b, :, total - have :] = old
            buf[b:, :, total - rows :] = new
            grown.append(buf)
            new_pads[layer, :b] = self.pads[layer] + total - have
            new_pads[layer, b] = total - rows
        self.keys.append(key)
        self.cache, self.pads = grown, new_pads

    def leave(self, keys: Iterable[Hashable]) -> None:
        """Drop the samples `keys` (those not in the batch are ignored), then the leading pad
        rows every remaining sample has in a layer."""
        gone = set(keys)
        keep = [i for i, k in enumerate(self.keys) if k not in gone]
        if len(keep) == len(self.keys):
            return
        if not keep:
            self.keys, self.cache = [], []
            self.pads = np.zeros((self.num_layers, 0), dtype=np.int64)
            return
        pads = self.pads[:, keep]
        trim = pads.min(axis=1)  # (L,) rows every remaining sample pads in that layer
        self.cache = [
            _take(c, keep, int(trim[layer]))
            for c, layer in zip(self.cache, self.layers, strict=True)
        ]
        self.pads = pads - trim[:, None]
        self.keys = [self.keys[i] for i in keep]

    def _check_join(self, key: Hashable, cache: Sequence[Any]) -> None:
        if key in self.keys:
            raise UserError(f"sample {key!r} is in the batch already")
        if not isinstance(cache, (list, tuple)) or len(cache) != len(self.layers):
            got = f"{len(cache)} values" if isinstance(cache, (list, tuple)) else repr(cache)[:40]
            raise UserError(
                f"cache must be the list of {len(self.layers)} arrays prefill() returned, got {got}"
            )
        for i, c in enumerate(cache):
            shape = tuple(getattr(c, "shape", ()))
            if len(shape) != 4 or shape[0] != 1:
                raise UserError(
                    f"cache {i} must be one sample's (1, heads, rows, head_dim) array as prefill() "
                    f"returned it, got shape {list(shape)}"
                )
            if self.cache and shape[1::2] != tuple(self.cache[i].shape)[1::2]:
                raise UserError(
                    f"cache {i} has shape {list(shape)}, unlike the batch's "
                    f"{list(self.cache[i].shape)} in heads or head_dim"
                )
