"""Capture: exported segments equal the HF model (prefill and decode), the locator finds every
layer's anatomy, and bad model directories give one-line UserErrors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mllmc.compiler.capture import capture, load_model, read_config
from mllmc.compiler.locator import locate_layers
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
    start = int((ids[0] == info.image_token_id).nonzero()[0])
    with torch.no_grad():
        ref = model(**inputs).logits[:, -1]
        feats = segs.vision.program.module()(inputs["pixel_values"])
        out = segs.prefill.program.module()(ids, feats, torch.tensor([start]))
        assert (out[0] - ref).abs().max().item() <= 1e-4
        assert len(out) == 1 + 2 * info.num_layers
        nxt = ref.argmax(-1)[:, None]
        longer = dict(inputs, input_ids=torch.cat([ids, nxt], 1))
        longer["attention_mask"] = torch.ones_like(longer["input_ids"])
        ref2 = model(**longer).logits[:, -1]
        step = segs.decode.program.module()(nxt, torch.tensor([[ids.shape[1]]]), *out[1:])
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
    from mllmc.compiler.model_dir import model_shape

    model_dir = request.getfixturevalue(model_fixture)
    _, info = load_model(model_dir)
    shape = model_shape(read_config(model_dir))
    assert (shape.num_layers, shape.num_visual_tokens, shape.vision_layers) == (
        info.num_layers,
        info.num_visual_tokens,
        info.vision_layers,
    )


def test_model_shape_leaves_unstated_values_to_the_loaded_model():
    from mllmc.compiler.model_dir import ModelShape, model_shape

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
