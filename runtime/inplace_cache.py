"""The batched decode contract (`past.*` in, `present.*` out, one more row per layer each step)
over the static-cache decode program on onnxruntime: numpy cache buffers of a fixed capacity
that this runner owns, each step's new rows written into them in place, so that a step reads
every cached row once and copies none of them (the growing-cache program concatenates the new
row to a copy of the whole cache, every sample's, every step).

The program (compiler/core/capture.py, `StaticCacheDecodeSegment`) takes input_ids (B, 1),
position_ids, cache_len (L,), cache_pad (L, B) and the buffers (B, kvh, C, hd), and returns the
logits (B, V) and each layer's new rows (B, kvh, 1, hd). A batch's caches are left-padded
(runtime/decode_batch.py), so every sample's cache of layer l ends at row cache_len[l]: one write
row a layer serves the whole batch.

The `present.*` this runner returns are views of its buffers (`buffer[:, :, :len]`); handed back
as the next step's `past.*` (the generate loop and `DecodeBatch` do), they are recognised and
not copied. Any other cache (a prefill's, or a batch that a sample joined or left) is copied
into buffers no other cache shares, so the views returned before stay valid: a step writes only
past the rows of the views it returned. Those buffers are the last ones again when nothing
outside this runner still holds them or a view of them (their reference counts are what this
runner's own views and binding give them) and they have room for the cache but not over twice
its rows: a new request then costs a copy of its prompt's rows, not a fresh allocation of every
buffer (whose first-touch page faults made a request's first step 2-10x a later one's) nor a
new I/O binding. A cache that fills its buffers moves into ones half as big again (rounded up
to `chunk` rows: one copy), so that a long generation moves a few times, not every `chunk` rows
(each move allocates and copies every buffer: ~150 ms at a 700-row Qwen2.5-VL cache on a 2-core
VM, ~10 steps' time).

onnxruntime reads a C-contiguous numpy input of the expected dtype in place on the CPU, so the
buffers are fed without a copy. A program compiled with the fused attention returns the buffers
themselves (`inplace.*`, onnxruntime's GroupQueryAttention: compiler/core/fused_attention.py)
instead of the new rows: each `inplace.*` output is bound to the memory of its `past.*` buffer
(an I/O binding over the numpy arrays), so the operator writes the new row there and reads only
the rows the cache holds, and this runner writes nothing. Such a program takes the operator's
small inputs (rotary angles, write rows, attention bias) instead of position_ids, cache_len and
cache_pad: this runner computes them (runtime/step_inputs.py) into arrays bound with the
buffers.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UserError
from .runners import check_feeds
from .runners.onnx import first_line
from .step_inputs import HostStepInputs

if TYPE_CHECKING:
    from .manifest import SegmentEntry

DEFAULT_CHUNK = 64  # buffer capacities are multiples of this many rows
GROWTH = 1.5  # a full buffer moves into one this much bigger


class InPlaceCacheDecoder:
    """A `SegmentRunner` for the decode segment (its manifest `entry`: past.*/present.*) that
    runs `static`, an onnxruntime runner of the static-cache decode program (inputs input_ids,
    position_ids, cache_len, cache_pad, past.*, or for the fused attention the operator's inputs
    that `step_inputs.HostStepInputs` computes from those; outputs logits, then the new rows
    new.* or the fused attention's buffers inplace.*), over numpy buffers."""

    def __init__(self, name: str, entry: SegmentEntry, static: Any, chunk: int = DEFAULT_CHUNK):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.name = name
        self.entry = entry
        self.static = static
        self.chunk = chunk
        self._past_names = [t.name for t in entry.inputs if t.name.startswith("past.")]
        self._present_names = ["present" + n[len("past") :] for n in self._past_names]
        self._small_inputs = frozenset(
            [t.name for t in entry.inputs if not t.name.startswith("past.")] + self._past_names[:1]
        )
        outputs = [t.name for t in static.entry.outputs]
        self._new_names = [n for n in outputs if n.startswith("new.")]
        self._inplace_names = [n for n in outputs if n.startswith("inplace.")]
        written = self._inplace_names or self._new_names
        if len(written) != len(self._past_names):
            raise UserError(
                f"corrupt artifact: the {static.name} program returns {len(written)} cache "
                f"tensors for {len(self._past_names)} caches"
            )
        dtypes = {t.name: np.dtype(t.dtype) for t in static.entry.inputs}
        self._cache_dtype = dtypes[self._past_names[0]]
        # a fused program's small inputs, computed here (`HostStepInputs`, made at each binding)
        self._step_spec = static.entry.step_inputs  # open_segment refuses a fused one without
        self._table_dtype = dtypes.get("rotary_cos", self._cache_dtype)
        self._host: HostStepInputs | None = None
        self._buffers: list[np.ndarray] = []  # (B, kvh, C, hd) per cache input
        self._lens = np.zeros(0, dtype=np.int64)  # (L,) rows each layer's buffers hold
        self._rows: list[int] = []  # the same per cache input (2L), as Python ints
        self._returned: list[np.ndarray] = []  # the views the last step returned
        self._binding: Any = None  # the I/O binding of the buffers (fused attention only)
        self._bound_values: list[Any] = []  # the OrtValues the binding holds
        self._logits = np.zeros((0, 0), dtype=np.float32)  # the bound logits
        self.adopts = 0  # caches copied in (a prefill's, a batch that changed)
        self.moves = 0  # times the buffers grew
        self.reuses = 0  # adopted caches copied into the buffers the runner already held

    @property
    def capacity(self) -> int:
        """Rows per cache buffer now (0 before the first step)."""
        return int(self._buffers[0].shape[2]) if self._buffers else 0

    def _rounded(self, rows: int) -> int:
        return -(-rows // self.chunk) * self.chunk

    def _adopt(self, caches: list[Any]) -> None:
        """Copy caches this runner did not return into new buffers (B, kvh, C, hd)."""
        arrays = [np.asarray(c, dtype=self._cache_dtype) for c in caches]
        lens = [int(a.shape[2]) for a in arrays[::2]]
        if any(int(a.shape[2]) != n for a, n in zip(arrays[1::2], lens, strict=True)):
            raise UserError("each layer's key and value caches must have the same length")
        if self._reusable(arrays, max(lens) + 1):
            for buf, rows, held in zip(self._buffers, arrays, self._rows, strict=True):
                n = rows.shape[2]
                buf[:, :, :n] = rows
                buf[:, :, n:held] = 0  # rows past a cache's length stay zero (finite)
            self.reuses += 1
        else:
            capacity = self._rounded(max(lens) + 1)
            self._buffers = [self._copied(a, capacity) for a in arrays]
            self._binding = None
        self._set_lens(lens)
        self.adopts += 1

    def _set_lens(self, lens: Sequence[int]) -> None:
        self._lens = np.array(lens, dtype=np.int64)
        self._rows = [int(n) for n in lens for _ in range(2)]  # each layer's key and value

    def _reusable(self, arrays: list[np.ndarray], rows: int) -> bool:
        """Whether the buffers this runner holds can take `arrays` (caches of up to `rows` - 1
        rows, and the next row): the same shapes but for the rows, room enough but not over
        twice the rows (a long generation's buffers are not kept for short prompts: their
        memory, and the unfused program's attention over every buffer row), and no reference
        to a buffer, or to a view this runner returned, from outside this runner (a cache a
        caller kept, or a view of one, must keep its values)."""
        if len(arrays) != len(self._buffers):
            return False
        if not rows <= self.capacity <= 2 * rows + self.chunk:
            return False  # too small, or at over twice the rows (kept from a long generation)
        fits = all(
            a.shape[:2] == buf.shape[:2] and a.shape[3] == buf.shape[3]
            and not np.may_share_memory(a, buf)
            for a, buf in zip(arrays, self._buffers, strict=True)
        )  # fmt: skip
        return fits and not self._held_elsewhere()

    def _held_elsewhere(self) -> bool:
        """Whether anything outside this runner references a buffer (a view of it, say) or a
        view the last step returned: their reference counts against those of a probe array
        held the way this runner holds a buffer (in a list, by one view of it kept in another,
        and by the bound OrtValue), counted by the same code."""
        probe = [np.empty(0)]
        view = [probe[0][:]]
        bound = [probe[0]] if self._binding is not None else []  # the OrtValue's reference
        buf_refs, view_refs = _refcounts(probe)[0], _refcounts(view)[0]
        del bound
        return any(n != buf_refs for n in _refcounts(self._buffers)) or any(
            n != view_refs for n in _refcounts(self._returned)
        )

    def _copied(self, rows: np.ndarray, capacity: int) -> np.ndarray:
        """`rows` (B, kvh, n, hd) at the start of zeroed (B, kvh, capacity, hd) buffer (the rows
        past n must be finite: the program masks them, and 0 * NaN would not vanish)."""
        b, heads, n, hd = rows.shape
        buf = np.zeros((b, heads, capacity, hd), dtype=self._cache_dtype)
        buf[:, :, :n] = rows
        return buf

    def _grow(self) -> None:
        """Move the caches into buffers with room for the next row and GROWTH times the rows."""
        capacity = self._rounded(max(int(self._lens.max()) + 1, int(self.capacity * GROWTH)))
        self._buffers = [
            self._copied(buf[:, :, :n], capacity)
            for buf, n in zip(self._buffers, self._rows, strict=True)
        ]
        self._binding = None
        self.moves += 1

    def owns(self, caches: Sequence[Any]) -> bool:
        """Whether `caches` are the present.* views the last step returned, in order: caches
        this runner wrote, known to fit (a caller need not check them again)."""
        return len(caches) == len(self._returned) and all(
            a is b for a, b in zip(caches, self._returned, strict=True)
        )

    @property
    def cache_names(self) -> list[str]:
        """The past.* inputs, in the order `continue_step` takes and returns their caches."""
        return list(self._past_names)

    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """One decode step: the decode segment's feeds -> logits (B, V) and present.* views
        (B, kvh, P_l + 1, hd) of the buffers."""
        caches = [feeds.get(n) for n in self._past_names]
        mine = self.owns(caches)
        # the caches this runner returned last step are known to fit: check the small inputs,
        # and one cache for the batch size they share
        check_feeds(self.entry, feeds, self.name, self._small_inputs if mine else None)
        if not mine:
            self._adopt(caches)
        logits = self._step(feeds["input_ids"], feeds["position_ids"], feeds["cache_pad"])
        return {"logits": logits, **dict(zip(self._present_names, self._returned, strict=True))}

    def continue_step(
        self, caches: Sequence[Any], input_ids: np.ndarray, position_ids: np.ndarray,
        cache_pad: np.ndarray,
    ) -> tuple[np.ndarray, list[np.ndarray]] | None:  # fmt: skip
        """One step of one sample on `caches` (in `cache_names` order) when they are the views
        the last step returned, for a batch of one: (logits (1, V), the caches one row longer).
        None for any other caches (the caller then steps through __call__, which checks and
        adopts them). The small inputs are the caller's own, of the decode segment's shapes
        for one sample. A generate loop's step without the feeds and checks __call__ makes
        (~0.15 ms of a ~27 ms Qwen2.5-VL step on a 2-core VM, cold in the caches after the run)."""
        if not self.owns(caches) or self._buffers[0].shape[0] != 1:
            return None
        logits = self._step(input_ids, position_ids, cache_pad)
        return logits, list(self._returned)  # a list of the caller's: this runner keeps its own

    def _step(self, input_ids: Any, position_ids: Any, cache_pad: Any) -> np.ndarray:
        """Run the program on the buffers, which hold the caches; the logits (B, V), and
        `_returned` the caches one row longer."""
        if max(self._rows) + 1 > self.capacity:
            self._grow()
        if self._inplace_names:
            logits = self._run_bound(input_ids, position_ids, cache_pad)  # the buffers are bound
        else:
            small = {
                "input_ids": np.asarray(input_ids, dtype=np.int64),
                "position_ids": np.asarray(position_ids, dtype=np.int64),
                "cache_len": self._lens,
                "cache_pad": np.ascontiguousarray(cache_pad, dtype=np.int64),
            }
            out = self.static({**small, **dict(zip(self._past_names, self._buffers, strict=True))})
            logits = out["logits"]
            for i, (buf, name) in enumerate(zip(self._buffers, self._new_names, strict=True)):
                buf[:, :, self._lens[i // 2]] = out[name][:, :, 0]
        # the new lengths, and views at them (Python ints as the bounds: a step's bookkeeping
        # after the run, cold in the caches, cost as much again with numpy's)
        self._lens += 1  # the program's inputs were read: this array is this runner's alone
        self._rows = [n + 1 for n in self._rows]
        self._returned = [buf[:, :, :n] for buf, n in zip(self._buffers, self._rows, strict=True)]
        return logits

    def _run_bound(self, input_ids: Any, position_ids: Any, cache_pad: Any) -> np.ndarray:
        """One step of a fused-attention program with each `inplace.*` output bound to its
        `past.*` buffer, so the operator writes the new rows in place. Returns the logits.
        Everything is bound once per set of buffers: the buffers, and arrays of this runner's
        for the small inputs and the logits, which a step fills and reads. A step then binds
        nothing (binding every tensor anew cost ~0.2 ms a step, more than a small layer's
        attention)."""
        if self._binding is None:  # new buffers (a batch, a capacity): new small inputs too
            self._bind()
        assert self._host is not None  # made with the binding
        self._host.fill(input_ids, position_ids, self._lens, cache_pad)
        try:
            self.static.session.run_with_iobinding(self._binding)
        except Exception as e:  # onnxruntime's own Fail / InvalidArgument / ... classes
            raise UserError(f"the {self.static.name} engine failed: {first_line(e)}") from None
        return self._logits.copy()  # the next step writes the bound array again

    def _bind(self) -> None:
        """A new I/O binding: the buffers (each `past.*` input and its `inplace.*` output one
        memory), the small inputs and the logits (arrays of this runner's, filled and read in
        place)."""
        import onnxruntime as ort

        assert self._step_spec is not None  # checked when the runner was made
        binding = self.static.session.io_binding()
        batch, _, capacity, _ = self._buffers[0].shape
        self._host = HostStepInputs(
            self._step_spec, len(self._lens), batch, capacity, self._table_dtype
        )
        logits = next(t for t in self.static.entry.outputs if t.name == "logits")
        self._logits = np.empty((batch, int(logits.shape[-1])), dtype=np.dtype(logits.dtype))
        values = []  # OrtValues over the arrays' memory (no copies), kept with the binding
        for name, array in self._host.arrays().items():
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
            binding.bind_ortvalue_input(name, values[-1])
        values.append(ort.OrtValue.ortvalue_from_numpy(self._logits))
        binding.bind_ortvalue_output("logits", values[-1])
        for past, inplace, buf in zip(
            self._past_names, self._inplace_names, self._buffers, strict=True
        ):
            values.append(ort.OrtValue.ortvalue_from_numpy(buf))
            binding.bind_ortvalue_input(past, values[-1])
            binding.bind_ortvalue_output(inplace, values[-1])
        self._binding, self._bound_values = binding, values

    def to_numpy(self, value: Any) -> np.ndarray:
        a = np.asarray(value)  # the logits a step returned are its own array: no copy needed
        return a.astype(np.float32, copy=False) if a.dtype.kind == "f" else a


def _refcounts(arrays: Sequence[np.ndarray]) -> list[int]:
    return [sys.getrefcount(a) for a in arrays]
