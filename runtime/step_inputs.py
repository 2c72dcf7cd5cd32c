"""The small inputs of a fused static-cache decode step, computed on the host.

The fused decode program (compiler/core/capture.py, `StaticCacheDecodeSegment` with
`fused=True`) runs each layer's rotary embedding and attention as one GroupQueryAttention node.
What those nodes take besides the activations and the cache buffers is small and the same for
every layer but the bias:

    rotary_cos, rotary_sin  (B + C, hd/2)  this step's rotary angles, row b sample b's (the first
                                            half of the rotary tables: the second repeats it),
                                            then C zero rows (the operator wants at least C)
    rotary_rows             (B, 1) int64   the row of those tables sample b reads: b
    total_len               () int32       C, the buffers' capacity
    seqlens.<l>             (B,) int32     the row layer l writes this token to: its cache length
    bias.<l>                (B, 1, 1, C)   added to layer l's scores: 0 where a key may be read,
                                            the dtype's most negative number at left padding and
                                            outside a sliding window

In the graph they would be 38 small onnxruntime nodes before the first layer (~0.37 ms of a
~27 ms Qwen2.5-VL step on a 2-core VM); here they are a few numpy calls (~7 µs) into arrays bound
to the session once (`HostStepInputs.arrays`), most of which do not change from step to step: the
rows, the capacity, and the bias unless the padding changes or a layer has a sliding window.

The values are the ones the graph computed: the angles in float32 as HF's rotary embeddings
compute them (position x inverse frequency, then cos / sin, times the attention scaling), M-RoPE
taking each frequency's position from its own axis (`StepInputs.rope_axes`).
"""

from __future__ import annotations

import numpy as np

from .manifest import FUSED_STEP_INPUTS, StepInputs


def fused_input_names(num_layers: int) -> list[str]:
    """The fused static decode program's inputs before its past.* buffers."""
    return [
        *FUSED_STEP_INPUTS,
        *(f"seqlens.{layer}" for layer in range(num_layers)),
        *(f"bias.{layer}" for layer in range(num_layers)),
    ]


class HostStepInputs:
    """The fused step's inputs for a batch of `batch` samples over buffers of `capacity` rows,
    in arrays of this object's that `fill` rewrites in place (bind them once: `arrays`).
    `dtype`: the program's float dtype (its rotary tables and bias)."""

    def __init__(
        self, spec: StepInputs, num_layers: int, batch: int, capacity: int, dtype: np.dtype
    ):
        if spec.windows and len(spec.windows) != num_layers:
            raise ValueError(f"{len(spec.windows)} windows for {num_layers} layers")
        self.batch, self.capacity, self.dtype = batch, capacity, np.dtype(dtype)
        self._inv_freq = np.asarray(spec.inv_freq, dtype=np.float32)
        self._scaling = np.float32(spec.rope_scaling)
        self._axes = np.asarray(spec.rope_axes, dtype=np.intp) if spec.rope_axes else None
        windows = spec.windows or (None,) * num_layers
        self._windowed = np.array([i for i, w in enumerate(windows) if w is not None], np.intp)
        self._spans = np.array([windows[i] for i in self._windowed], np.int64)[:, None, None]
        half = len(spec.inv_freq)
        self.input_ids = np.zeros((batch, 1), dtype=np.int64)
        self.cos = np.zeros((batch + capacity, half), dtype=self.dtype)
        self.sin = np.zeros((batch + capacity, half), dtype=self.dtype)
        self.rows = np.arange(batch, dtype=np.int64)[:, None]
        self.total = np.array(capacity, dtype=np.int32)
        self.seqlens = np.zeros((num_layers, batch), dtype=np.int32)
        self.bias = np.zeros((num_layers, batch, 1, 1, capacity), dtype=self.dtype)
        self._keys = np.arange(capacity, dtype=np.int64)
        self._floor = np.finfo(self.dtype).min
        self._pad = np.zeros((num_layers, batch), dtype=np.int64)  # the padding `bias` holds

    def arrays(self) -> dict[str, np.ndarray]:
        """Each input's array, by name (a layer's seqlens and bias are views of one array
        each: C-contiguous, so an OrtValue over one reads it in place)."""
        named = dict(
            zip(
                FUSED_STEP_INPUTS,
                (self.input_ids, self.cos, self.sin, self.rows, self.total),
                strict=True,
            )
        )
        layers = range(len(self.seqlens))
        named.update({f"seqlens.{layer}": self.seqlens[layer] for layer in layers})
        named.update({f"bias.{layer}": self.bias[layer] for layer in layers})
        return named

    def fill(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        cache_len: np.ndarray,
        cache_pad: np.ndarray,
    ) -> None:
        """This step's values from the unfused program's inputs: input_ids (B, 1), position_ids
        (B, 1) (M-RoPE: (3, B, 1)), cache_len (L,) the rows each layer's buffers hold (padding
        included: where the new row goes), cache_pad (L, B) the padding rows sample b's cache of
        layer l starts with."""
        if np.shape(cache_pad) != self._pad.shape:
            raise ValueError(f"cache_pad of shape {np.shape(cache_pad)}, want {self._pad.shape}")
        np.copyto(self.input_ids, input_ids, casting="unsafe")
        np.copyto(self.seqlens, cache_len[:, None], casting="unsafe")
        if self._axes is None:
            positions = np.asarray(position_ids, dtype=np.float32)  # (B, 1)
        else:  # frequency j at its own axis's position: (3, B, 1) -> (B, hd/2)
            positions = np.asarray(position_ids)[self._axes, :, 0].T.astype(np.float32)
        angles = positions * self._inv_freq  # float32, as HF's rotary embeddings
        b = self.batch
        cos, sin = np.cos(angles), np.sin(angles)
        if self._scaling != 1.0:
            cos *= self._scaling
            sin *= self._scaling
        self.cos[:b] = cos
        self.sin[:b] = sin
        padding_changed = not np.array_equal(cache_pad, self._pad)
        if padding_changed or len(self._windowed):
            self._fill_bias(np.asarray(cache_pad, dtype=np.int64), cache_len, padding_changed)

    def _fill_bias(
        self, cache_pad: np.ndarray, cache_len: np.ndarray, padding_changed: bool
    ) -> None:
        """0 where a key may be read, the floor elsewhere: a layer's padding rows, and with a
        sliding window W the rows W or more before the new one (HF's sliding window: the query
        sees itself and the W - 1 rows before it)."""
        if padding_changed:
            allowed = self._keys[None, None, :] >= cache_pad[:, :, None]  # (L, B, C)
            self.bias[:, :, 0, 0] = np.where(allowed, 0.0, self._floor)
            self._pad = cache_pad.copy()
        if len(self._windowed):
            layers = self._windowed
            allowed = self._keys[None, None, :] >= cache_pad[layers][:, :, None]
            near = (cache_len[layers][:, None, None] - self._keys[None, None, :]) < self._spans
            self.bias[layers, :, 0, 0] = np.where(allowed & near, 0.0, self._floor)
