"""Capture: exported segments equal the HF model (prefill and decode), the locator finds every
layer's anatomy, and bad model directories give one-line UserErrors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mllmc.compiler.core.capture import capture, load_model, prefill_feeds, read_config
from mllmc.compiler.core.locator import locate_layers
from mllmc.compiler.pipeline import prepare_passes, resolve_passes
from mllmc.runtime.errors import UserError


@pytest.fixture(scope="module")
def captured(tiny_model_dir):
    model, info = load_model(tiny_model_dir)
    return model, info, capture(model, info)


def _hf_inputs(model_dir, image):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    return proc(images=image, text="USER: <image>\nWhat is this? ASSISTANT:", return_tensors="pt")


def test_prefill_and_decode_match_hf(captured, tiny_model_dir, sample_image):
    from PIL import Image

    model, info, segs = captured
    inputs = _hf_inputs(tiny_model_dir, Image.open(sample_image))
    ids = inputs["input_ids"]
    with torch.no_grad():
        ref = model(**inputs).logits[:, -1]
        feats = segs.vision.program.module()(inputs["pixel_values"])
        out = segs.prefill.program.module()(*prefill_feeds(ids, feats, info.image_token_id))
        assert (out[0] - ref).abs().max().item() <= 1e-4
        assert len(out) == 1 + 2 * info.num_layers
        nxt = ref.argmax(-1)[:, None]
        longer = dict(inputs, input_ids=torch.cat([ids, nxt], 1))
        longer["attention_mask"] = torch.ones_like(longer["input_ids"])
        ref2 = model(**longer).logits[:, -1]
        no_pad = torch.zeros(info.num_layers, 1, dtype=torch.int64)
        step = segs.decode.program.module()(nxt, torch.tensor([[ids.shape[1]]]), no_pad, *out[1:])
        assert (step[0] - ref2).abs().max().item() <= 1e-4
        assert step[1].shape[2] == ids.shape[1] + 1


def test_locator_finds_every_layer(captured):
    _, info, segs = captured
    for seg in (segs.prefill, segs.decode):
        layers = locate_layers(seg.program.module().graph)
        assert [layer.index for layer in layers] == list(range(info.num_layers))
        for layer in layers:
            assert layer.q_proj.args[0] is layer.norm_out  # unrewritten: q reads every row
            assert layer.k_proj.args[0] is layer.norm_out
            assert len(layer.query_rope_operands) == 2  # q * cos and rotate_half(q) * sin
            assert layer.o_proj in layer.attn_residual.args
    prefill_layers = locate_layers(segs.prefill.program.module().graph)
    assert all(layer.attention_mask is not None for layer in prefill_layers)


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "other_model_dir"])
def test_model_shape_from_config_agrees_with_the_loaded_model(request, model_fixture):
    """The shape pass options are checked against before the model loads (config.json alone)
    is the loaded model's."""
    from mllmc.compiler.core.model_dir import model_shape

    model_dir = request.getfixturevalue(model_fixture)
    _, info = load_model(model_dir)
    shape = model_shape(read_config(model_dir))
    assert (shape.num_layers, shape.visual_tokens, shape.vision_layers) == (
        info.num_layers,
        info.visual_tokens,
        info.vision_layers,
    )


def test_model_shape_leaves_unstated_values_to_the_loaded_model():
    from mllmc.compiler.core.model_dir import ModelShape, model_shape

    assert model_shape({"model_type": "llava"}) == ModelShape(None, None, None)
    cfg = {
        "text_config": {"num_hidden_layers": 32},
        "vision_config": {"image_size": 336, "patch_size": 14, "num_hidden_layers": True},
        "vision_feature_select_strategy": "full",
    }
    assert model_shape(cfg) == ModelShape(32, 577, None)  # "full" keeps [CLS]; a bool is no count


def test_read_config_errors(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="not found"):
        read_config(tmp_path / "nope")
    with pytest.raises(UserError, match="config.json is missing"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="unsupported architecture 'bert'.*supported: llava"):
        read_config(tmp_path)
    bad = tmp_path / "trunc"
    shutil.copytree(tiny_model_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot load model"):
        load_model(bad)


def test_layer_windows_follow_hf_config_parsing():
    """The sliding window per layer is the one HF's config parsing and modeling give, not the
    presence of a config.json key."""
    from transformers import LlavaConfig

    from mllmc.compiler.core.capture import layer_windows

    def windows(**text):
        return layer_windows(LlavaConfig(text_config={"num_hidden_layers": 3, **text}).text_config)

    # Mistral: 4096 when config.json says nothing, in every layer; null turns it off
    assert windows(model_type="mistral") == [4096] * 3
    assert windows(model_type="mistral", sliding_window=None) == [None] * 3
    # Qwen2: only with use_sliding_window, and only in layers >= max_window_layers
    assert windows(model_type="qwen2", sliding_window=8) == [None] * 3
    qwen = dict(model_type="qwen2", sliding_window=8, use_sliding_window=True)
    assert windows(**qwen, max_window_layers=1) == [None, 8, 8]
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    assert windows(**qwen, layer_types=types) == [8, None, 8]  # layer_types has the last word
    assert windows(model_type="llama", sliding_window=8) == [None] * 3  # Llama has no window
    with pytest.raises(UserError, match="sets no sliding_window"):
        windows(model_type="qwen2", layer_types=["sliding_attention"] * 3)


def _windowed_model_dir(tiny_model_dir, out, text_type: str, **window):
    """tiny-llava's shapes with a Mistral or Qwen2 decoder of a small sliding window, saved as a
    model directory (random weights)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration, MistralConfig, Qwen2Config

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    tc = cfg.text_config
    keys = (
        "hidden_size intermediate_size num_hidden_layers num_attention_heads "
        "num_key_value_heads vocab_size max_position_embeddings rms_norm_eps bos_token_id "
        "eos_token_id pad_token_id tie_word_embeddings"
    ).split()
    cls = {"mistral": MistralConfig, "qwen2": Qwen2Config}[text_type]
    cfg.text_config = cls(**{k: getattr(tc, k) for k in keys}, initializer_range=0.1, **window)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "text_type, window, sliding",
    [
        ("mistral", {"sliding_window": 8}, [8] * 6),
        (
            "qwen2",
            {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 3},
            [None] * 3 + [8] * 3,
        ),
    ],
)
def test_sliding_window_matches_hf_past_the_window(
    tiny_model_dir, tmp_path, sample_image, text_type, window, sliding
):
    """Prefill, decode and the static-cache decode step of a decoder with an 8-token sliding
    window agree with HF eager on a ~26-token prompt and on decode steps past it."""
    from PIL import Image

    from mllmc.compiler.core.capture import (
        PrefillSegment,
        StaticCacheDecodeSegment,
        fused_step_args,
    )

    model_dir = _windowed_model_dir(tiny_model_dir, tmp_path / text_type, text_type, **window)
    model, info = load_model(model_dir)
    model.set_attn_implementation("eager")
    segs = capture(model, info, static_decode=True)
    assert [layer.window for layer in PrefillSegment(model, info).layers] == sliding
    # passes that drop cache rows are refused where a later layer has a window; vte's exit
    # after the last layer drops nothing
    for spec in ("fastv:k=2", "vte:k=3"):
        with pytest.raises(UserError, match="8-token sliding attention window"):
            prepare_passes(resolve_passes([spec]), model, info)
    prepare_passes(resolve_passes([f"vte:k={info.num_layers}"]), model, info)
    inputs = _hf_inputs(tiny_model_dir, Image.open(sample_image))
    ids = inputs["input_ids"]
    n = ids.shape[1]
    assert n > 2 * 8
    with torch.no_grad():
        feats = segs.vision.program.module()(inputs["pixel_values"])
        feeds = prefill_feeds(ids, feats, info.image_token_id)
        out = segs.prefill.program.module()(*feeds)
        ref = model(**inputs).logits[:, -1]
        assert (out[0] - ref).abs().max().item() <= 1e-4
        # the window matters here: the same layers with full causal attention differ
        full = PrefillSegment(model, info).eval()
        full.windows = [None] * info.num_layers
        assert (full(*feeds)[0] - ref).abs().max().item() > 1e-3
        cache, tokens = list(out[1:]), ids
        capacity = n + 4
        static_cache = [torch.nn.functional.pad(t, (0, 0, 0, capacity - n)) for t in cache]
        decode = segs.decode.program.module()
        static = segs.static_decode.program.module()
        fused = StaticCacheDecodeSegment(model, info, fused=True).eval()  # the ONNX target's
        nxt = ref.argmax(-1)[:, None]
        for step in range(3):
            tokens = torch.cat([tokens, nxt], 1)
            longer = dict(inputs, input_ids=tokens, attention_mask=torch.ones_like(tokens))
            ref = model(**longer).logits[:, -1]
            pos = torch.tensor([[n + step]])
            got = decode(nxt, pos, torch.zeros(info.num_layers, 1, dtype=torch.int64), *cache)
            assert (got[0] - ref).abs().max().item() <= 1e-4, step
            cache = list(got[1:])
            cache_len = torch.full((info.num_layers,), n + step, dtype=torch.int64)
            no_pad = torch.zeros(info.num_layers, 1, dtype=torch.int64)
            got_static = static(nxt, pos, cache_len, no_pad, *static_cache)
            assert (got_static[0] - ref).abs().max().item() <= 1e-4, step
            got_fused = fused(
                nxt, *fused_step_args(fused, nxt, pos, cache_len, no_pad, *static_cache)
            )
            assert (got_fused[0] - ref).abs().max().item() <= 1e-4, step
            for buffer, row in zip(got_fused[1:], got_static[1:], strict=True):
                assert (buffer[:, :, n + step] - row[:, :, 0]).abs().max().item() <= 1e-5
            for buf, row in zip(static_cache, got_static[1:], strict=True):
                buf[:, :, n + step] = row[:, :, 0]
            nxt = ref.argmax(-1)[:, None]


def test_sliding_window_onnx_fused_decode_equals_growing(tiny_model_dir, tmp_path, sample_image):
    """A Qwen2 decoder whose last layers have an 8-token window, compiled to ONNX: the fused
    in-place decode (the window as the operator's bias) gives the growing decode's logits for
    steps well past the window."""
    import numpy as np

    from mllmc.compiler.pipeline import compile_model
    from mllmc.runtime import load

    window = {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 3}
    model_dir = _windowed_model_dir(tiny_model_dir, tmp_path / "qwen2", "qwen2", **window)
    for f in tiny_model_dir.iterdir():  # tiny-llava's processor, tokenizer and chat template
        if not (model_dir / f.name).exists():
            shutil.copy(f, model_dir / f.name)
    out = compile_model(model_dir, tmp_path / "artifact", progress=False).out_dir
    kwargs = {"images": [sample_image], "prompt": "Hi", "max_new_tokens": 12, "stop_at_eos": False}
    fused, growing = load(out), load(out, decode_cache="growing")
    got, want = fused.generate(**kwargs), growing.generate(**kwargs)
    assert got.token_ids == want.token_ids
    assert float(np.abs(got.logits - want.logits).max()) <= 1e-4
