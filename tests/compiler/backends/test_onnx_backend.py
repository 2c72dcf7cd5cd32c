"""The ONNX backend names dynamic dims by whole symbol: on a 24-layer decoder, layer l's cache
input `past.l.key` / `past.l.value` has dim `past_l` and its output `present.l.*` has
`past_l + 1` (a substring rename once gave layer 7 the dim of layer 26)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllmc.compiler.backends.onnx import rename_symbols

DEEP_SPEC = dict(
    description="test-only: 24 decoder layers of width 32",
    image_size=32,
    patch_size=16,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    vision_mlp=64,
    hidden=32,
    layers=24,
    heads=2,
    kv_heads=1,
    mlp=64,
    vocab_size=640,
)


def test_rename_symbols_whole_identifiers_only():
    renames = {"s2": "past_7", "s26": "past_12", "s7": "n"}
    assert rename_symbols("s26", renames) == "past_12"
    assert rename_symbols("s2 + 1", renames) == "past_7 + 1"
    assert rename_symbols("s26 + s2", renames) == "past_12 + past_7"
    assert rename_symbols("s270", renames) == "s270"  # not a symbol that was renamed
    assert rename_symbols("2*s7", renames) == "2*n"


@pytest.mark.slow  # a 24-layer capture + ONNX export takes ~1 min on 2 cores
def test_deep_decoder_dims_named_per_layer(tmp_path: Path):
    from mllmc.compiler.backends.onnx import export_segment
    from mllmc.compiler.core.capture import export_decode, load_model
    from mllmc.compiler.data.presets import PresetSpec, write_model

    model_dir = write_model(PresetSpec(**DEEP_SPEC), tmp_path / "deep", seed=0)
    model, info = load_model(model_dir)
    entry = export_segment(export_decode(model, info), tmp_path)
    inputs = {io.name: io.shape for io in entry.inputs}
    outputs = {io.name: io.shape for io in entry.outputs}
    for layer in range(24):
        for kv in ("key", "value"):
            assert inputs[f"past.{layer}.{kv}"][2] == f"past_{layer}", (layer, kv, inputs)
            assert outputs[f"present.{layer}.{kv}"][2] == f"past_{layer} + 1", (layer, kv)


def _external(path: Path) -> dict[tuple[int, int], str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    out = {}
    for init in graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            assert info["location"] == "weights.data"
            out[(int(info["offset"]), int(info["length"]))] = init.name
    return out


def test_weights_stored_once(tiny_base_artifact: Path, tiny_model_dir: Path):
    """Prefill and decode point into one weights.data at the same offsets: the artifact's engine
    files are < 1.3x the model's weight bytes (they were ~2.1x with a copy per graph)."""
    from mllmc.runtime.manifest import read_manifest

    manifest = read_manifest(tiny_base_artifact)
    assert {e.external_data for e in manifest.segments.values()} == {"weights.data"}
    prefill = _external(tiny_base_artifact / "prefill.onnx")
    decode = _external(tiny_base_artifact / "decode.onnx")
    decode_bytes = sum(length for _, length in decode)
    shared_bytes = sum(length for key in decode if key in prefill for _, length in [key])
    assert shared_bytes >= 0.95 * decode_bytes, (shared_bytes, decode_bytes)
    files = {f for e in manifest.segments.values() for f in e.files()}
    engine_bytes = sum((tiny_base_artifact / f).stat().st_size for f in files)
    weight_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    assert engine_bytes < 1.3 * weight_bytes, (engine_bytes, weight_bytes)


def test_share_weights_same_output(tiny_base_artifact: Path, sample_image: Path):
    """Sessions that map weights.data (no per-session prepacked copies) give the same tokens."""
    import numpy as np

    from mllmc.runtime import load

    default = load(tiny_base_artifact).generate(sample_image, "Hi", 8, stop_at_eos=False)
    shared = load(tiny_base_artifact, share_weights=True).generate(
        sample_image, "Hi", 8, stop_at_eos=False
    )
    assert shared.token_ids == default.token_ids
    assert np.abs(shared.logits - default.logits).max() <= 1e-4
