"""The manifest's typed target record (`TargetSettings`): every value checked on reading, a
version-2 manifest (untyped `extra`) read into it, and what the runtime does with each field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mllmc.runtime import FORMAT_VERSION, UserError, load
from mllmc.runtime.manifest import TargetSettings, _from_version_2, read_manifest

KEYS = ("target", "device", "dtype", "decode_cache", "max_seq_len")


def _manifest(artifact: Path) -> dict[str, Any]:
    """The artifact's manifest JSON as an onnx artifact with the growing decode cache only
    (`--decode-cache growing`) has it."""
    data = json.loads((artifact / "manifest.json").read_text())
    data["segments"].pop("decode_static", None)
    data["target_settings"]["decode_cache"] = "growing"
    return data


def _as_version_2(data: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`data` (this version's manifest JSON) in the shape format version 2 wrote."""
    old = {k: v for k, v in data.items() if k != "target_settings"}
    settings = data["target_settings"]
    old.update(
        format_version=2,
        target=settings["target"],
        dtype=settings["dtype"],
        extra=extra,
        decode_position_offset=0,
    )
    return old


def test_version_2_manifest_reads_into_target_settings(tiny_base_artifact: Path, tmp_path: Path):
    data = _manifest(tiny_base_artifact)
    assert data["format_version"] == FORMAT_VERSION == 7
    assert "extra" not in data and "decode_position_offset" not in data
    assert data["target_settings"] == {
        "target": "onnx",
        "device": "cpu",
        "dtype": "float32",
        "decode_cache": "growing",
        "max_seq_len": None,
        "precision": {
            "weights": None,
            "block_size": None,
            "accuracy_level": None,
            "parts": [],
            "scheme": None,
        },
    }
    old = tmp_path / "v2"
    shutil.copytree(tiny_base_artifact, old)
    (old / "manifest.json").write_text(json.dumps(_as_version_2(data, {})))
    m = read_manifest(old)
    assert m.target_settings == TargetSettings("onnx", "cpu", "float32", "growing", None)
    assert m.format_version == FORMAT_VERSION and m.target == "onnx" and m.dtype == "float32"
    # it runs as it did, and generates what the same artifact in this version's format does
    prompt = "Describe the image."
    image = Path(__file__).parents[2] / "examples" / "images" / "shapes.png"
    new_tokens = load(tiny_base_artifact).generate(image, prompt, max_new_tokens=3).token_ids
    assert load(old).generate(image, prompt, max_new_tokens=3).token_ids == new_tokens

    # what aoti and trt wrote into `extra`, and the defaults where they wrote nothing
    segments = {**data["segments"], "decode_static": data["segments"]["decode"]}
    aoti = _as_version_2(
        {**data, "segments": segments},
        {"device": "cuda", "dtype": "bfloat16", "decode_cache": "static"},
    )
    aoti["target"], aoti["dtype"] = "aoti", "bfloat16"
    settings = _from_version_2(aoti)["target_settings"]
    assert settings == dict(zip(KEYS, ("aoti", "cuda", "bfloat16", "static", None), strict=True))
    del aoti["extra"]["decode_cache"]  # an aoti artifact from before it was recorded
    assert _from_version_2(aoti)["target_settings"]["decode_cache"] == "static"
    trt = _as_version_2(data, {"device": "cuda", "dtype": "float16", "max_seq_len": 2048})
    trt["target"], trt["dtype"] = "trt", "float16"
    settings = _from_version_2(trt)["target_settings"]
    assert settings == dict(zip(KEYS, ("trt", "cuda", "float16", "growing", 2048), strict=True))
    del trt["extra"]["device"]
    assert _from_version_2(trt)["target_settings"]["device"] == "cuda"


def test_bad_target_settings_are_one_user_error(tiny_base_artifact: Path, tmp_path: Path):
    """Each bad value is a corrupt manifest naming what is wrong, read before any engine."""
    good = _manifest(tiny_base_artifact)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"decode_cache": "paged"}, "unknown decode cache 'paged'"),
        ({"max_seq_len": 1}, "max_seq_len must be None or >= 2"),
        ({"max_seq_len": "long"}, "target_settings.max_seq_len should be an integer"),
        ({"target": ""}, "target must name a target"),
        ({"decode_cache": "static"}, "decode_cache 'static' without a 'decode_static' segment"),
    ]
    for change, match in cases:
        data = json.loads(json.dumps(good))
        data["target_settings"].update(change)
        (tmp_path / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(UserError, match="corrupt artifact manifest") as err:
            read_manifest(tmp_path)
        assert match in str(err.value) and "\n" not in str(err.value), (change, str(err.value))
    data = json.loads(json.dumps(good))
    data["segments"]["decode_static"] = data["segments"]["decode"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="decode_cache 'growing' with a 'decode_static' segment"):
        read_manifest(tmp_path)
    data = json.loads(json.dumps(good))
    data["flops"]["after"]["reference_text_tokens"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="flops before and after are counted at different"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="unknown dtype"):
        TargetSettings("onnx", "cpu", "float64")


def test_generate_refuses_what_the_engines_do_not_accept(tiny_base_artifact: Path, tmp_path: Path):
    """`max_seq_len` (trt's profile bound) is refused before anything runs: the prompt and the
    KV cache (the positions before the last generated token) must fit."""
    copy = tmp_path / "bounded"
    shutil.copytree(tiny_base_artifact, copy)
    image = Path(__file__).parents[2] / "examples" / "images" / "shapes.png"
    prompt = "Describe the image."
    n = load(tiny_base_artifact).generate(image, prompt, max_new_tokens=1).prompt_tokens
    data = _manifest(copy)
    data["target_settings"]["max_seq_len"] = n + 2
    (copy / "manifest.json").write_text(json.dumps(data))
    engine = load(copy)
    assert len(engine.generate(image, prompt, max_new_tokens=4, stop_at_eos=False).token_ids) == 4
    with pytest.raises(UserError, match=f"needs sequences of {n + 3}, past the {n + 2}") as err:
        engine.generate(image, prompt, max_new_tokens=5)
    assert "--max-seq-len" in str(err.value)
