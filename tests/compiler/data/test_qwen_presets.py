"""The Qwen presets' specs: small-qwen2.5-vl has the real tower's shape (built on the meta
device: no weights drawn), and specs that would not make a loadable model are refused."""

from __future__ import annotations

import dataclasses

import pytest

from mllmc.compiler.data.presets import PRESETS
from mllmc.compiler.data.qwen_presets import QwenVLSpec, build_qwen


def test_small_qwen25_vl_has_the_released_tower_shape():
    model, image_processor, tokenizer = build_qwen(PRESETS["small-qwen2.5-vl"], device="meta")
    vc, tc = model.config.vision_config, model.config.text_config
    tower = (vc.hidden_size, vc.num_heads, vc.patch_size, vc.window_size, vc.intermediate_size)
    assert tower == (1280, 16, 14, 112, 3420)  # Qwen2.5-VL-3B/7B's vision tower
    assert (vc.depth, list(vc.fullatt_block_indexes), vc.out_hidden_size) == (8, [3, 7], 1024)
    assert (tc.num_hidden_layers, tc.hidden_size) == (16, 1024)
    assert tc.rope_parameters["mrope_section"] == [16, 24, 24]
    assert 400e6 < sum(p.numel() for p in model.parameters()) < 480e6
    assert image_processor.size["longest_edge"] == 896 * 896
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


def test_specs_that_make_no_model_are_refused():
    fields = dataclasses.asdict(PRESETS["tiny-qwen2.5-vl"])
    with pytest.raises(ValueError, match="half the decoder's head_dim"):
        QwenVLSpec(**{**fields, "mrope_section": (4, 4, 4)})
    with pytest.raises(ValueError, match="window_size is given exactly"):
        QwenVLSpec(**{**fields, "family": "qwen2_vl"})
    with pytest.raises(ValueError, match="unknown family"):
        QwenVLSpec(**{**fields, "family": "llava"})
