"""Decode over fixed-capacity cache buffers (the static-cache program and its runner,
runtime/static_cache.py): the same 16 greedy tokens and logits as HF generate and as
the growing-cache decode, with and without a pass that leaves layers with different cache
lengths, across capacity buckets and across prompts; on CUDA, the same again as CUDA graph
replays."""

from __future__ import annotations

import pytest
import torch

from mllmc.compiler.core.capture import capture, load_model, processor_inputs
from mllmc.compiler.pipeline import prepare_passes, resolve_passes, run_passes
from mllmc.compiler.tools.torch_engine import TorchEngine, segment_entry
from mllmc.compiler.verify import DEFAULT_PROMPT, LOGIT_TOL, compare, eager_generate
from mllmc.runtime.layout import locate_images

needs_cuda = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.fixture(scope="module", params=["tiny_model_dir", "other_model_dir"])
def captured(request):
    model_dir = request.getfixturevalue(request.param)
    model, info = load_model(model_dir)
    return model_dir, model, info, capture(model, info, static_decode=True)


def _inputs(model_dir, image, prompt=DEFAULT_PROMPT):
    from transformers import AutoProcessor

    return processor_inputs(AutoProcessor.from_pretrained(model_dir), image, prompt)


def test_static_decode_program_io(captured):
    """One capacity dim shared by every buffer; one new row per layer and sample out; the
    lengths and each sample's padding in; one dynamic batch dim throughout."""
    _, _, info, segs = captured
    entry = segment_entry(segs.static_decode)
    names = [t.name for t in entry.inputs]
    assert names[:4] == ["input_ids", "position_ids", "cache_len", "cache_pad"]
    assert list(entry.inputs[2].shape) == [info.num_layers] and entry.inputs[2].dtype == "int64"
    batch = entry.inputs[0].shape[0]
    assert isinstance(batch, str) and list(entry.inputs[3].shape) == [info.num_layers, batch]
    capacities = {t.shape[2] for t in entry.inputs[4:]}
    assert len(capacities) == 1 and isinstance(capacities.pop(), str)
    assert {t.shape[0] for t in entry.inputs[4:]} == {batch}
    rows = entry.outputs[1:]
    assert [t.name for t in rows][:2] == ["new.0.key", "new.0.value"]
    assert len(rows) == 2 * info.num_layers
    assert all(list(t.shape) == [batch, info.num_kv_heads, 1, info.head_dim] for t in rows)


@pytest.mark.parametrize("specs", [[], ["fastv:k=1,ratio=0.5"]], ids=["plain", "fastv"])
def test_static_cache_matches_growing_cache(captured, sample_image, specs):
    model_dir, model, info, segs = captured
    segs, records = run_passes(segs, prepare_passes(resolve_passes(specs), model, info))
    inputs = _inputs(model_dir, sample_image)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    ref_tokens, ref_logits = TorchEngine(segs).generate(ids, pixels, max_new_tokens=16)
    # HF generate with the passes' eager references: the growing cache is the right one
    hf_tokens, hf_logits = eager_generate(
        model, model_dir, sample_image, DEFAULT_PROMPT, 16, records
    )
    report = compare(ref_tokens, ref_logits.numpy(), hf_tokens, hf_logits)
    assert report.tokens_match and report.max_abs_logit_diff <= LOGIT_TOL, report.line()

    # bucket 4: the cache moves to a bigger buffer several times during the 15 decode steps
    engine = TorchEngine(segs, static_cache=True, bucket=4)
    for _ in range(2):  # the second generation reuses the buffers the first one filled
        tokens, logits = engine.generate(ids, pixels, max_new_tokens=16)
        assert tokens == ref_tokens
        assert float((logits - ref_logits).abs().max()) <= 1e-5
    decoder = engine.runners["decode"]
    assert decoder.capacity >= ids.shape[1] + 15 and decoder.capacity % 4 == 0
    assert decoder.moves >= 3  # grown, not sized once
    assert len(decoder._buckets) == decoder.max_buckets == 2  # and the old buffers let go
    if specs:  # a pruning pass leaves the layers from k on with fewer cached rows
        assert len(set(decoder._lens)) == 2

    # a shorter prompt next: adopted into the buffers there are, same tokens as a fresh engine
    short = _inputs(model_dir, sample_image, "USER: <image>\nWhat? ASSISTANT:")
    want, want_logits = TorchEngine(segs).generate(short["input_ids"], pixels, 8)
    got, got_logits = engine.generate(short["input_ids"], pixels, 8)
    assert got == want and float((got_logits - want_logits).abs().max()) <= 1e-5


def test_static_cache_refuses_what_cannot_run(captured):
    _, _, _, segs = captured
    with pytest.raises(ValueError, match="CUDA device"):
        TorchEngine(segs, device="cpu", cuda_graphs=True)
    plain = capture(*load_model(captured[0]))
    with pytest.raises(ValueError, match="static_decode=True"):
        TorchEngine(plain, static_cache=True)


@pytest.mark.parametrize("specs", [[], ["shortv:layers=[0,1]"]], ids=["plain", "shortv"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_cuda_graphs_match_eager(captured, sample_image, specs, device):
    """Vision and prefill as one graph replay per shape, decode as one replay per step: the
    same tokens and logits as the same programs run op by op (fp32, TF32 off)."""
    model_dir, model, info, segs = captured
    segs, _ = run_passes(segs, prepare_passes(resolve_passes(specs), model, info))
    model.to(device)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        inputs = _inputs(model_dir, sample_image).to(device)
        ids, pixels = inputs["input_ids"], inputs["pixel_values"]
        want, want_logits = TorchEngine(segs, device, static_cache=True, bucket=8).generate(
            ids, pixels, 16
        )
        engine = TorchEngine(segs, device, cuda_graphs=True, bucket=8)  # grows across buckets
        for _ in range(2):
            got, got_logits = engine.generate(ids, pixels, 16)
            assert got == want
            assert float((got_logits - want_logits).abs().max()) <= 1e-4
        decoder = engine.runners["decode"]
        assert decoder.replays == 30 and decoder.moves >= 2 and decoder.captures >= 2
        assert engine.runners["prefill"].fn.replays == 2
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
        model.to("cpu")


def test_static_cache_continues_from_an_older_cache(captured, sample_image):
    """A cache the runner returned steps ago stays valid: continuing from it (a second branch)
    gives what the growing cache gives from the same point."""
    import numpy as np

    model_dir, _, _, segs = captured
    inputs = _inputs(model_dir, sample_image)
    ids, pixels = inputs["input_ids"].numpy(), inputs["pixel_values"].numpy()
    layout = locate_images(ids[0], segs.info.image_token_id, [segs.visual_tokens])
    n = layout.next_position

    def branches(engine):
        features = engine.encode_pixels(pixels)["image_features"]  # (1, K, d): one image, one tile
        logits, cache = engine.prefill(layout, features)
        for i in range(3):
            logits, cache = engine.decode_step(int(np.argmax(logits)), n + i, cache)
        branch_point, at = cache, logits
        for i in range(3, 6):  # on past the branch point
            logits, cache = engine.decode_step(int(np.argmax(logits)), n + i, cache)
        first = logits
        logits, cache = at, branch_point  # back to step 3, another token
        for i in range(3, 6):
            logits, cache = engine.decode_step(int(np.argsort(logits)[-2]), n + i, cache)
        return first, logits

    want = branches(TorchEngine(segs))
    got = branches(TorchEngine(segs, static_cache=True, bucket=4))
    for a, b in zip(got, want, strict=True):
        assert float(np.abs(a - b).max()) <= 1e-5
