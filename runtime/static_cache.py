"""The decode contract (`past.*` in, `present.*` out, one more row per layer each step) over a
static-cache program: cache buffers of a fixed capacity that the runner owns, so that every
decode step has the same shapes and, on CUDA, runs as one CUDA graph replay instead of one host
launch per op.

The program (compiler/core/capture.py, `StaticCacheDecodeSegment`) takes input_ids, position_ids,
cache_len (L,) and the buffers, and returns the logits and each layer's new row; this runner
writes the rows in place at cache_len and advances it, inside the same graph. The `present.*`
it returns are views of its buffers (`buffer[:, :, :len]`), handed back to it by the generate
loop as the next step's `past.*`, which it recognises and does not copy. A cache it did not
return (a prefill's) is copied into the buffers once.

Capacity comes in buckets of `bucket` rows: a cache that outgrows its buffers moves into the next
bucket's (one copy, and on CUDA one new graph capture per bucket, kept for reuse). At most
`max_buckets` buckets are kept (the least recently used goes first), so a long generation holds
two sets of buffers, not one per size it passed through. Like any static
cache, the buffers are the runner's: a step only writes past the lengths of the caches it returned
before, so an older one stays valid (continuing from it copies it back in), until the runner takes
in another prompt's cache, which overwrites the rows they share.

The buffers hold one sample's cache: this runner decodes one sample a step (`max_batch` 1), and a
batched decode (runtime/decode_batch.py) runs the growing-cache program instead
(`load(..., decode_cache="growing")`); `generate_batch` and the `Scheduler` decode one sample
at a time on it.

`GraphPerShape` is the same idea for segments whose shapes are fixed per call (vision, and the
prefill per prompt length): one CUDA graph per input shape, captured on first use.

Imported only by the torch-based runners (it imports torch).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import UserError
from .runners import check_feeds
from .torch_runner import TorchCallRunner, torch_dtype

if TYPE_CHECKING:
    from .manifest import SegmentEntry

DEFAULT_BUCKET = 256
MAX_BUCKETS = 2  # buffer sets (and decode graphs) kept per runner
MAX_GRAPHS = 8  # graphs kept per GraphPerShape (each holds its outputs: a prefill's KV cache)


@contextmanager
def capture_errors(segment: str) -> Iterator[None]:
    """A failed CUDA graph capture as one line that says how to run without graphs."""
    try:
        yield
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(
            f"CUDA graph capture of the {segment} segment failed ({first}); run without graphs: "
            "load(path, cuda_graphs=False) or mllmc run --no-cuda-graphs"
        ) from e


class _Bucket:
    """The buffers of one capacity, and (on CUDA) the graph that runs a step over them."""

    def __init__(
        self, capacity: int, shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device
    ):
        self.capacity = capacity
        self.buffers = [
            torch.zeros(1, heads, capacity, hd, dtype=dtype, device=device) for heads, hd in shapes
        ]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output tensor


class StaticCacheDecoder(TorchCallRunner):
    """A `SegmentRunner` for the decode segment (its manifest `entry`: past.*/present.*) that
    runs `fn`, a static-cache decode program, over buffers it owns.

    cuda_graphs: capture each bucket's step (the program + the in-place row writes + the length
    update) as a CUDA graph on first use and replay it; needs a CUDA device."""

    def __init__(
        self,
        name: str,
        entry: SegmentEntry,
        fn: Callable[..., Any],
        device: str,
        *,
        cuda_graphs: bool = False,
        bucket: int = DEFAULT_BUCKET,
        max_buckets: int = MAX_BUCKETS,
    ):
        super().__init__(name, entry, fn, device)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        if bucket < 1 or max_buckets < 2:
            raise ValueError(f"need bucket >= 1 and max_buckets >= 2, got {bucket}, {max_buckets}")
        self.cuda_graphs = cuda_graphs
        self.bucket = bucket
        self.max_buckets = max_buckets
        inputs = {t.name: t for t in entry.inputs}
        self._past_names = [t.name for t in entry.inputs if t.name.startswith("past.")]
        self._present_names = ["present" + n[len("past") :] for n in self._past_names]
        # (kv heads, head dim) of each cache (1, kvh, rows, hd); rows is the dynamic dim
        self._shapes = [
            (int(inputs[n].shape[1]), int(inputs[n].shape[3])) for n in self._past_names
        ]
        self._cache_dtype = torch_dtype(inputs[self._past_names[0]].dtype)
        self._ids = torch.zeros(1, 1, dtype=torch.int64, device=self.device)
        self._pos = torch.zeros(1, 1, dtype=torch.int64, device=self.device)
        self._lens_dev = torch.zeros(
            len(self._past_names) // 2, dtype=torch.int64, device=self.device
        )
        self._pad = torch.zeros_like(self._lens_dev)[:, None]  # (L, 1): one unpadded sample
        self._lens: list[int] = []  # host copy of _lens_dev, one per layer
        self._buckets: OrderedDict[int, _Bucket] = OrderedDict()  # least recently used first
        self._current: _Bucket | None = None
        self._returned: list[torch.Tensor] = []  # the views the last step returned
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.captures = self.replays = 0  # CUDA graphs captured (one per bucket) and replayed
        self.moves = 0  # times a cache moved into a bigger bucket
        self.max_batch = 1  # one sample a step: its buffers hold one cache

    @property
    def capacity(self) -> int:
        """Rows per cache buffer now (0 before the first step)."""
        return self._current.capacity if self._current else 0

    def _bucket_for(self, rows: int, keep: _Bucket | None = None) -> _Bucket:
        """The bucket that holds `rows` rows, now the most recently used; the least recently
        used others (never `keep`) are dropped down to max_buckets."""
        capacity = -(-rows // self.bucket) * self.bucket
        found = self._buckets.pop(capacity, None)
        if found is None:
            found = _Bucket(capacity, self._shapes, self._cache_dtype, self.device)
        self._buckets[capacity] = found
        for old in list(self._buckets):
            if len(self._buckets) <= self.max_buckets:
                break
            if self._buckets[old] is not keep and old != capacity:
                del self._buckets[old]
        return found

    def _adopt(self, caches: list[Any]) -> None:
        """Copy a cache this runner did not return (a prefill's) into a bucket's buffers."""
        tensors = [self._tensor(c, self._cache_dtype) for c in caches]
        lens = [int(t.shape[2]) for t in tensors[::2]]
        if any(int(t.shape[2]) != n for t, n in zip(tensors[1::2], lens, strict=True)):
            raise ValueError("each layer's key and value caches must have the same length")
        bucket = self._bucket_for(max(lens) + 1)
        for buf, t in zip(bucket.buffers, tensors, strict=True):
            buf[:, :, : t.shape[2]].copy_(t)
        self._set_lens(lens)
        self._current = bucket

    def _set_lens(self, lens: list[int]) -> None:
        self._lens = list(lens)
        self._lens_dev.copy_(torch.tensor(lens, dtype=torch.int64))

    def _grow(self) -> None:
        """Move the cache into the next bucket up (it fills its buffers)."""
        old = self._current
        assert old is not None
        new = self._bucket_for(old.capacity + 1, keep=old)
        for src, dst, n in zip(old.buffers, new.buffers, _repeat2(self._lens), strict=True):
            dst[:, :, :n].copy_(src[:, :, :n])
        self._current = new
        self.moves += 1

    def _step(self, bucket: _Bucket) -> torch.Tensor:
        """Run the program over `bucket`, write each new row at its layer's length, advance the
        lengths; the logits. Everything here is device work: it is what a CUDA graph holds."""
        out = self.fn(self._ids, self._pos, self._lens_dev, self._pad, *bucket.buffers)
        logits, rows = out[0], out[1:]
        for i, (buf, row) in enumerate(zip(bucket.buffers, rows, strict=True)):
            layer = i // 2
            buf.index_copy_(2, self._lens_dev[layer : layer + 1], row.to(buf.dtype))
        self._lens_dev.add_(1)
        return logits

    def _replay(self, bucket: _Bucket) -> torch.Tensor:
        if bucket.graph is None:
            # one eager step on a side stream first (lazy cuBLAS / allocator set-up must not happen
            # during capture); its writes are undone by resetting the lengths, and the replay
            # below rewrites the same rows
            saved = self._lens_dev.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step(bucket)
                self._lens_dev.copy_(saved)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with capture_errors(self.name), torch.cuda.graph(graph, pool=self._pool):
                bucket.logits = self._step(bucket)
            bucket.graph = graph
            self.captures += 1
        self.replays += 1
        bucket.graph.replay()
        assert bucket.logits is not None
        return bucket.logits

    @torch.no_grad()
    def __call__(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        check_feeds(self.entry, feeds, self.name)
        samples = int(tuple(feeds["input_ids"].shape)[0])
        pads = feeds.get("cache_pad")
        padded = pads is not None and bool(
            pads.any() if isinstance(pads, torch.Tensor) else np.asarray(pads).any()
        )
        if samples != 1 or padded:
            raise UserError(
                f"the static-cache decode runs one unpadded sample a step, got {samples}: load "
                "the artifact with decode_cache='growing' to decode a batch"
            )
        caches = [feeds[n] for n in self._past_names]
        mine = len(caches) == len(self._returned) and all(
            a is b for a, b in zip(caches, self._returned, strict=True)
        )
        if not mine:
            self._adopt(caches)
        if max(self._lens) + 1 > self.capacity:
            self._grow()
        bucket = self._current
        assert bucket is not None
        self._ids.copy_(self._tensor(feeds["input_ids"], torch.int64).reshape(1, 1))
        self._pos.copy_(self._tensor(feeds["position_ids"], torch.int64).reshape(1, 1))
        logits = self._replay(bucket) if self.cuda_graphs else self._step(bucket)
        self._lens = [n + 1 for n in self._lens]
        self._returned = [
            buf[:, :, :n] for buf, n in zip(bucket.buffers, _repeat2(self._lens), strict=True)
        ]
        return {
            "logits": logits.clone(),
            **dict(zip(self._present_names, self._returned, strict=True)),
        }


def _repeat2(lens: list[int]) -> list[int]:
    """Per-layer lengths -> per-cache lengths (key and value of each layer)."""
    return [n for n in lens for _ in range(2)]


class GraphPerShape:
    """`fn(*tensors) -> tensor or tuple` on CUDA, run as one CUDA graph per distinct set of input
    shapes and dtypes (captured on first use, after one eager warm-up call; the `max_graphs`
    most recently used are kept). Inputs are copied into the graph's static tensors; outputs are
    returned as copies, so a caller may keep them across calls. `fn` must do device work only
    (no host sync), as exported programs do. The graphs share one memory pool: safe here because
    a replay recomputes everything it writes and its outputs are copied before the next one."""

    def __init__(
        self,
        fn: Callable[..., Any],
        device: str,
        name: str = "segment",
        max_graphs: int = MAX_GRAPHS,
    ):
        self.fn = fn
        self.name = name
        self.max_graphs = max_graphs
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        # least recently used first
        self._graphs: OrderedDict[tuple[Any, ...], tuple[Any, list[torch.Tensor], Any]] = (
            OrderedDict()
        )
        self._pool = torch.cuda.graph_pool_handle()
        self.replays = 0

    def _capture(self, args: tuple[torch.Tensor, ...]) -> tuple[Any, list[torch.Tensor], Any]:
        static = [a.clone() for a in args]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.fn(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with capture_errors(self.name), torch.cuda.graph(graph, pool=self._pool):
            out = self.fn(*static)
        return graph, static, out

    @torch.no_grad()
    def __call__(self, *args: torch.Tensor) -> Any:
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if key in self._graphs:
            self._graphs.move_to_end(key)
        else:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            self._graphs[key] = self._capture(args)
        graph, static, out = self._graphs[key]
        for dst, src in zip(static, args, strict=True):
            dst.copy_(src)
        graph.replay()
        self.replays += 1
        if isinstance(out, torch.Tensor):
            return out.clone()
        return tuple(o.clone() for o in out)
