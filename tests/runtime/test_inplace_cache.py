"""The ONNX static-cache decode (runtime/inplace_cache.py): each step's rows written in place into
numpy buffers, against the growing-cache decode of the same artifact (the same logits within
1e-4, batched and left-padded, across buffer growth, joins and leaves); the buffers are fed and
returned without copies; the compile option and load() choices for it."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mllmc.runtime import UserError, load
from mllmc.runtime.inplace_cache import InPlaceCacheDecoder

TOL = 1e-4
PROMPTS = ["Describe the image.", "What colour is the square? Answer in a long sentence.", "Hi"]


def prefilled(engine: Any) -> list[tuple[list[Any], int, int]]:
    """Each prompt's (cache, first token, next position), with images of different sizes."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        image = Image.new("RGB", (60 + 40 * i, 90), (40 * i, 200, 90))
        features, counts = engine.encode_images([image])
        layout = engine.encode_prompt(prompt, counts)
        logits, cache = engine.prefill(layout, features)
        out.append((cache, int(np.argmax(logits)), layout.next_position))
    return out


def run(engine: Any, starts: list[tuple[list[Any], int, int]], steps: int, leave_at: int) -> Any:
    """Greedy batched steps over every start (sample 0 leaves after step `leave_at`, then
    joins again from its prefill): the logits of each step (B, V) and the batch."""
    batch = engine.new_batch()
    for i, (cache, _, _) in enumerate(starts):
        batch.join(i, cache)
    tokens = {i: s[1] for i, s in enumerate(starts)}
    positions = {i: s[2] for i, s in enumerate(starts)}
    logits = []
    for step in range(steps):
        keys = list(batch.keys)
        out = engine.decode_batch_step(
            [tokens[k] for k in keys], [positions[k] for k in keys], batch
        )
        logits.append(dict(zip(keys, out, strict=True)))
        for k, row in zip(keys, out, strict=True):
            tokens[k], positions[k] = int(np.argmax(row)), positions[k] + 1
        if step == leave_at:
            batch.leave([0])
        if step == leave_at + 1:
            batch.join(0, starts[0][0])
            tokens[0], positions[0] = starts[0][1], starts[0][2]
    return logits, batch


def test_in_place_batches_equal_the_growing_cache(tiny_base_artifact: Path):
    """Three left-padded samples over buffers of 4-row chunks (they grow every few steps), with
    a leave and a join: every sample's logits are the growing cache's; the steps between two
    changes of the batch copy nothing (the buffers are fed as they are, the caches returned are
    views of them), and the views a step returned stay valid after the batch changes."""
    static, growing = load(tiny_base_artifact), load(tiny_base_artifact, decode_cache="growing")
    runner = static.runners["decode"]
    assert isinstance(runner, InPlaceCacheDecoder)
    assert type(growing.runners["decode"]).__name__ == "OnnxRunner"
    runner.chunk = 4
    starts = prefilled(growing)
    got, batch = run(static, starts, 9, leave_at=3)
    want, _ = run(growing, starts, 9, leave_at=3)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in g:
            assert float(np.abs(g[key] - w[key]).max()) <= TOL
    assert runner.moves >= 1  # grew past 4-row chunks
    assert runner.adopts == 3  # the first step, after the leave, after the join
    for view, buf in zip(batch.cache, runner._buffers, strict=True):
        assert view.base is buf and buf.flags.c_contiguous
    kept = [np.array(c) for c in batch.cache]
    held = list(batch.cache)
    batch.leave([1])
    static.decode_batch_step([5] * len(batch), [40] * len(batch), batch)
    for view, copy in zip(held, kept, strict=True):
        np.testing.assert_array_equal(view, copy)


def test_in_place_single_sample_generate_equals_growing(tiny_base_artifact: Path, sample_image):
    """One sample alone (the generate loop's decode_step): the same tokens and logits."""
    static, growing = load(tiny_base_artifact), load(tiny_base_artifact, decode_cache="growing")
    kwargs = {"images": [sample_image], "prompt": "Hi", "max_new_tokens": 6, "stop_at_eos": False}
    got, want = static.generate(**kwargs), growing.generate(**kwargs)
    assert got.token_ids == want.token_ids
    assert float(np.abs(got.logits - want.logits).max()) <= TOL
    assert static.runners["decode"].adopts == 1


def test_each_step_returns_its_own_logits(tiny_base_artifact: Path):
    """The runner binds one logits array for every step: what a step returns is a copy, so
    the logits a caller holds stay as they were when the next step runs; the caches it
    returned are recognised as its own (no adopt, no copy) step after step."""
    engine, growing = load(tiny_base_artifact), load(tiny_base_artifact, decode_cache="growing")
    (cache, token, position), *_ = prefilled(engine)
    held, want = [], []
    other = cache
    for step in range(4):
        logits, cache = engine.decode_step(token + step, position + step, cache)
        mine, other = growing.decode_step(token + step, position + step, other)
        held.append(logits)
        want.append(mine.copy())
    for got, expected in zip(held, want, strict=True):
        assert float(np.abs(got - expected).max()) <= TOL
    assert engine.runners["decode"].adopts == 1


def test_decode_step_on_its_own_caches_skips_the_feeds_and_keeps_every_check(
    tiny_base_artifact: Path, monkeypatch
):
    """decode_step on the caches the last step returned takes the runner's continue_step (no
    feeds, no __call__); a list the caller changed, or a batch's caches, are not taken for
    its own: the step adopts the changed list (still the growing cache's logits) and refuses
    the batch's caches in one line."""
    engine, growing = load(tiny_base_artifact), load(tiny_base_artifact, decode_cache="growing")
    runner = engine.runners["decode"]
    calls = []
    call = InPlaceCacheDecoder.__call__
    monkeypatch.setattr(InPlaceCacheDecoder, "__call__", lambda r, f: calls.append(1) or call(r, f))
    (cache, token, position), (other_cache, *_), _ = prefilled(engine)
    theirs = cache
    for step in range(3):
        logits, cache = engine.decode_step(token + step, position + step, cache)
        want, theirs = growing.decode_step(token + step, position + step, theirs)
        assert float(np.abs(logits - want).max()) <= TOL
    assert len(calls) == 1 and runner.adopts == 1  # the first step adopted the prefill's
    cache[0] = cache[0].copy()  # the caller's list: the runner's own is unchanged
    logits, cache = engine.decode_step(token, position + 3, cache)
    want, theirs = growing.decode_step(token, position + 3, theirs)
    assert float(np.abs(logits - want).max()) <= TOL
    assert len(calls) == 2 and runner.adopts == 2
    batch = engine.new_batch()
    batch.join("a", cache)
    batch.join("b", other_cache)
    engine.decode_batch_step([token, token], [position + 4, position + 4], batch)
    with pytest.raises(UserError, match="as many rows in .batch. as input_ids"):
        engine.decode_step(token, position + 5, batch.cache)  # two samples' caches


def test_static_decode_choices(tiny_base_artifact: Path, tmp_path: Path):
    """onnx compiles the static decode by default; an artifact without it refuses
    decode_cache='static' with one line and decodes with the growing cache."""
    from mllmc.compiler.backends import TargetOptions, resolve_options

    assert resolve_options("onnx", TargetOptions()).decode_cache == "static"
    assert resolve_options("aoti", TargetOptions()).decode_cache == "growing"
    with pytest.raises(UserError, match="built for --target aoti and onnx"):
        resolve_options("trt", TargetOptions(decode_cache="static"))
    copy = tmp_path / "growing"
    shutil.copytree(tiny_base_artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["segments"]["decode_static"]
    manifest["target_settings"]["decode_cache"] = "growing"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="recompile it with --decode-cache static"):
        load(copy, decode_cache="static")
    assert type(load(copy).runners["decode"]).__name__ == "OnnxRunner"


@pytest.mark.slow  # compiles a second artifact; the unfused path runs by default on heads the
# fused operator does not take (tests/compiler/test_compile.py's other_model_dir)
def test_fused_and_unfused_static_programs_decode_alike(
    tiny_model_dir: Path, tiny_base_artifact: Path, tmp_path: Path, monkeypatch
):
    """The onnx target's static decode is the fused one (GroupQueryAttention over buffers bound
    in place: `inplace.*` outputs, no `new.*`); a static program that returns the new rows
    instead (the unfused form) is run by writing them, and both equal the growing cache."""
    import dataclasses

    from mllmc.compiler import backends
    from mllmc.compiler.pipeline import compile_model

    fused = load(tiny_base_artifact)
    outputs = [t.name for t in fused.runners["decode"].static.entry.outputs]
    assert outputs[0] == "logits" and all(n.startswith("inplace.") for n in outputs[1:])
    build = backends.build_backend
    monkeypatch.setattr(
        backends,
        "build_backend",
        lambda *a, **k: dataclasses.replace(build(*a, **k), fused_attention=False),
    )
    unfused_dir = compile_model(tiny_model_dir, tmp_path / "unfused", progress=False).out_dir
    unfused = load(unfused_dir)
    outputs = [t.name for t in unfused.runners["decode"].static.entry.outputs]
    assert all(n.startswith("new.") for n in outputs[1:])
    growing = load(tiny_base_artifact, decode_cache="growing")
    starts = prefilled(growing)
    want, _ = run(growing, starts, 6, leave_at=2)
    for engine in (fused, unfused):
        engine.runners["decode"].chunk = 4
        got, _ = run(engine, starts, 6, leave_at=2)
        for g, w in zip(got, want, strict=True):
            assert max(float(np.abs(g[k] - w[k]).max()) for k in w) <= TOL
        # one sample's steps (decode_step: the runner's continue_step after the first)
        (ours, token, position), theirs = starts[1], starts[1][0]
        calls = []
        with monkeypatch.context() as patch:
            call = InPlaceCacheDecoder.__call__
            patch.setattr(
                InPlaceCacheDecoder,
                "__call__",
                lambda r, f, calls=calls, call=call: calls.append(1) or call(r, f),
            )
            for step in range(6):
                logits, ours = engine.decode_step(token, position + step, ours)
                expected, theirs = growing.decode_step(token, position + step, theirs)
                assert float(np.abs(logits - expected).max()) <= TOL
        assert len(calls) == 1  # the first step adopted the prefill's caches; 5 continued


def test_next_request_reuses_the_buffers_unless_a_cache_is_kept(tiny_base_artifact: Path):
    """A second request's first step copies its prompt's rows into the buffers the first
    request left (no new buffers, no new binding) when nothing outside the runner holds them,
    with the growing cache's logits; a caller that kept the first request's cache (or a view
    of it) gets new buffers, and the values it kept stay as they were."""
    engine, growing = load(tiny_base_artifact), load(tiny_base_artifact, decode_cache="growing")
    runner = engine.runners["decode"]
    starts = prefilled(growing)

    def greedy(eng: Any, start: tuple[list[Any], int, int], steps: int) -> tuple[Any, Any]:
        cache, token, position = start
        out = []
        for step in range(steps):
            logits, cache = eng.decode_step(token, position + step, cache)
            out.append(logits.copy())
            token = int(np.argmax(logits))
        return out, cache

    greedy(engine, starts[1], 3)  # the longest prompt first: its buffers fit the others
    buffers = [weakref.ref(b) for b in runner._buffers]  # a reference would keep them held
    binding = runner._binding
    got, _ = greedy(engine, starts[0], 3)
    want, _ = greedy(growing, starts[0], 3)
    for g, w in zip(got, want, strict=True):
        assert float(np.abs(g - w).max()) <= TOL
    assert (runner.adopts, runner.reuses) == (2, 1)
    assert all(a is ref() for a, ref in zip(runner._buffers, buffers, strict=True))
    assert runner._binding is binding

    _, kept = greedy(engine, starts[2], 2)  # a caller keeps this request's cache
    copies = [np.array(c) for c in kept]
    got, last = greedy(engine, starts[0], 3)
    assert (runner.adopts, runner.reuses) == (4, 2)  # new buffers: the kept cache is intact
    for g, w in zip(got, want, strict=True):
        assert float(np.abs(g - w).max()) <= TOL
    for view, copy in zip(kept, copies, strict=True):
        np.testing.assert_array_equal(view, copy)

    part = last[3][:, :, :2]  # a view of a view: it holds the buffer, not the view returned
    first = np.array(part)
    del last
    greedy(engine, starts[1], 2)
    assert (runner.adopts, runner.reuses) == (5, 2)
    np.testing.assert_array_equal(part, first)
    del part
    greedy(engine, starts[0], 1)
    assert (runner.adopts, runner.reuses) == (6, 3)


def test_full_buffers_grow_by_half_again(tiny_base_artifact: Path):
    """A cache that fills its buffers moves into ones GROWTH times as big (rounded to `chunk`
    rows), so 40 steps past a short prompt move them once or twice, not every 4-row chunk; the
    logits stay the growing cache's."""
    from mllmc.runtime.inplace_cache import GROWTH

    engine, growing = load(tiny_base_artifact), load(tiny_base_artifact, decode_cache="growing")
    runner = engine.runners["decode"]
    runner.chunk = 4
    (cache, token, position), *_ = prefilled(growing)
    rows = cache[0].shape[2]
    capacities, mine, other = [], cache, cache
    for step in range(40):
        logits, mine = engine.decode_step(token, position + step, mine)
        want, other = growing.decode_step(token, position + step, other)
        assert float(np.abs(logits - want).max()) <= TOL
        token = int(np.argmax(want))
        capacities.append(runner.capacity)
    grown = sorted(set(capacities))
    assert grown[0] == runner._rounded(rows + 1)
    for small, big in zip(grown, grown[1:], strict=False):
        assert big >= small * GROWTH
    assert runner.moves == len(grown) - 1 <= 3


def test_buffers_over_twice_a_prompt_are_not_kept_for_it(tiny_base_artifact: Path):
    """After a long generation, a short prompt gets new buffers sized for it, not the long
    generation's (over twice its rows): their memory, and an unfused program's attention over
    every buffer row, would stay with every later request."""
    engine = load(tiny_base_artifact)
    runner = engine.runners["decode"]
    runner.chunk = 4
    (cache, token, position), *_ = prefilled(engine)
    rows = cache[0].shape[2]
    past, step = cache, 0
    while runner.capacity <= 2 * (rows + 1) + runner.chunk:
        _, past = engine.decode_step(token, position + step, past)
        step += 1
    del past
    adopts, reuses = runner.adopts, runner.reuses
    engine.decode_step(token, position, cache)
    assert (runner.adopts, runner.reuses) == (adopts + 1, reuses)
    assert runner.capacity == runner._rounded(rows + 1)
    engine.decode_step(token, position, cache)  # the next request of its size keeps them
    assert runner.reuses == reuses + 1
