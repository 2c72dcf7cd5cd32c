"""ShortV's Layer Contribution: the decoder-tail reruns give the full ablated forwards' values,
and the built-in calibration a shortv pass runs without an order is small and says so."""

from __future__ import annotations

import logging

import pytest
import torch


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from mllmc.compiler.core.capture import load_model

    return load_model(tiny_model_dir)


def test_layer_contribution_matches_full_ablated_forwards(tiny):
    from transformers import AutoProcessor

    from mllmc.compiler.core.capture import processor_inputs
    from mllmc.compiler.data.calib_images import builtin_samples
    from mllmc.passes.calibration import _kl, layer_contribution
    from mllmc.passes.shortv import keep_rows

    model, info = tiny
    samples = builtin_samples(info, n=1)
    lc = layer_contribution(model, info, samples)
    inputs = processor_inputs(AutoProcessor.from_pretrained(info.model_dir), *samples[0])
    expected = {"visual": [], "text": []}
    with torch.no_grad():
        orig = model(**inputs).logits[0, -1]
        for layer in range(info.num_layers):
            for rows, values in expected.items():
                with keep_rows(model, [layer], rows=rows):
                    values.append(_kl(model(**inputs).logits[0, -1], orig))
    assert lc["lc_visual"] == pytest.approx(expected["visual"], rel=1e-4, abs=1e-9)
    assert lc["lc_text"] == pytest.approx(expected["text"], rel=1e-4, abs=1e-9)
    assert max(expected["visual"]) > 0 and max(expected["text"]) > 0
    visual_only = layer_contribution(model, info, samples, text=False)
    assert visual_only["lc_visual"] == lc["lc_visual"] and visual_only["lc_text"] is None


def test_builtin_calibration_is_small_and_says_how_many_samples(tiny, caplog):
    from mllmc.passes.calibration import DEFAULT_SAMPLES
    from mllmc.passes.shortv import ShortVConfig, prepare

    model, info = tiny
    with caplog.at_level(logging.WARNING, logger="mllmc"):
        cfg = prepare(ShortVConfig(ratio=0.5), model, info)
    assert DEFAULT_SAMPLES <= 4
    assert f"calibration on {DEFAULT_SAMPLES} built-in samples" in cfg.order_from
    assert f"calibrating on {DEFAULT_SAMPLES} built-in samples" in caplog.text
    assert len(cfg.layers) == round(0.5 * info.num_layers)
