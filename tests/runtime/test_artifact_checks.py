"""An artifact or golden file whose contents do not hold together is refused when it is read:
one line, exit 2, naming what is wrong, from `mllmc run` and `mllmc inspect` alike (inspect
makes the checks `load()` makes, short of opening the engine files)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mllmc.runtime import UserError, load
from tests.compiler.tools.test_cli import mllmc, user_error
from tests.compiler.tools.test_no_tracebacks import refused_before_torch


def _artifact(src: Path, dst: Path, change: Callable[[dict], Any] | None = None) -> Path:
    shutil.copytree(src, dst)
    if change is not None:
        data = json.loads((dst / "manifest.json").read_text())
        change(data)
        (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def _model(**values: Any) -> Callable[[dict], Any]:
    return lambda m: m["model"].update(values)


def test_manifests_that_do_not_hold_together(tiny_base_artifact, sample_image, tmp_path):
    manifests: dict[str, tuple[Callable[[dict], Any], str]] = {
        # numbers the segments' own IO records contradict
        "vocab": (_model(vocab_size=1000), "model.vocab_size is 1000, but the 'prefill'"),
        "hidden": (_model(hidden_size=64), "model.hidden_size is 64, but the 'vision'"),
        "visual": (_model(num_visual_tokens=17), "model.num_visual_tokens 17 but 16 visual"),
        # numbers impossible on their own
        "eos": (_model(eos_token_ids=[99999]), "eos_token_ids 99999 is not a token id"),
        "positions": (_model(max_position_embeddings=0), "max_position_embeddings must be >= 1"),
        "image-size": (_model(image_size=0), "model.image_size must be >= 1, got 0"),
        "version-str": (lambda m: m.update(format_version="2"), 'must be an integer, got "2"'),
        "target": (
            lambda m: m["target_settings"].update(target="tensorrt-ng"),
            "'tensorrt-ng', which this mllmc cannot run",
        ),
    }
    cases: list[tuple[list[Any], str]] = []
    run = ["--image", sample_image, "--prompt", "Hi"]
    for name, (change, match) in manifests.items():
        art = _artifact(tiny_base_artifact, tmp_path / name, change)
        cases += [(["run", art, *run], match), (["inspect", art], match)]
    # text edits JSON's own parser cannot leave through: a NaN, a key given twice
    nan = _artifact(tiny_base_artifact, tmp_path / "nan")
    text = (nan / "manifest.json").read_text()
    (nan / "manifest.json").write_text(
        text.replace('"max_abs_logit_diff": ', '"max_abs_logit_diff": NaN, "x": ', 1)
    )
    twice = _artifact(tiny_base_artifact, tmp_path / "twice")
    text = (twice / "manifest.json").read_text()
    text = text.replace('"target_settings": {', '"target_settings": {"target": "onnx", ', 1)
    (twice / "manifest.json").write_text(text)
    for art, match in ((nan, "NaN is not a number JSON allows"), (twice, "key 'target' appears")):
        cases += [(["run", art, *run], match), (["inspect", art], match)]
    refused_before_torch(cases)
    # and through the console script itself
    user_error("inspect", tmp_path / "target", match="which this mllmc cannot run")
    user_error("run", tmp_path / "vocab", *run, match="corrupt artifact manifest")


def test_engine_files_missing_or_outside_the_artifact(tiny_base_artifact, sample_image, tmp_path):
    missing = _artifact(tiny_base_artifact, tmp_path / "missing")
    (missing / "weights.data").unlink()
    line = user_error("inspect", missing, match="weights.data is missing")
    assert line.count("weights.data") == 1, line
    outside = tmp_path / "elsewhere.onnx"
    linked = _artifact(tiny_base_artifact, tmp_path / "linked")
    shutil.move(linked / "decode.onnx", outside)
    (linked / "decode.onnx").symlink_to(outside)
    for cmd in ("inspect", "run"):
        args = ["--image", sample_image, "--prompt", "Hi"] if cmd == "run" else []
        user_error(cmd, linked, *args, match=f"decode.onnx is a link to {outside}, outside")
    # a link that stays inside the artifact is a file of the artifact
    inside = _artifact(tiny_base_artifact, tmp_path / "inside")
    (inside / "decode.onnx").rename(inside / "decode-real.onnx")
    (inside / "decode.onnx").symlink_to("decode-real.onnx")
    mllmc("inspect", inside)


def test_output_that_is_a_device_is_named_as_such(tiny_model_dir):
    user_error(
        "compile", tiny_model_dir, "-o", "/dev/null", match="/dev/null exists and is a character"
    )


def test_decode_cache_of_one_layer_that_does_not_agree(tiny_base_artifact, sample_image):
    engine = load(tiny_base_artifact)
    layout = engine.encode_prompt("Describe the image.")
    _, cache = engine.prefill(layout, engine.encode_image(sample_image))
    n = layout.next_position
    short = [cache[0][:, :, :3], *cache[1:]]
    with pytest.raises(UserError, match=r"past\.0\.value of shape \[1, 2, 3, 32\] .*past\.0\.key"):
        engine.decode_step(5, n, short)
    # key and value agree, but layer 1 holds fewer rows than the plan gives it
    rows = cache[0].shape[2]
    layer1 = [*cache[:2], cache[2][:, :, :3], cache[3][:, :, :3], *cache[4:]]
    match = rf"cache of layer 1 does not match the layer plan: past\.1\.key should have shape \[1, 2, {rows}, 32\]"
    with pytest.raises(UserError, match=match):
        engine.decode_step(5, n, layer1)
    engine.decode_step(5, n, cache)  # the cache prefill gave is taken


def _golden(image: Path, vocab_ids: list[int], **changes: Any) -> dict[str, Any]:
    golden: dict[str, Any] = {
        "golden_version": 2,
        "inputs": {
            "image": str(image.resolve()),
            "image_sha256": hashlib.sha256(image.read_bytes()).hexdigest()[:16],
            "prompt": "Hi",
            "max_new_tokens": 1,
        },
        "token_ids": vocab_ids[:1],
        "logits": [
            {"top_ids": vocab_ids, "top_values": [1.0] * len(vocab_ids), "mean": 0.0, "std": 1.0}
        ],
        "provenance": {},
    }
    golden.update(changes)
    return golden


def test_golden_files_with_impossible_records(tiny_base_artifact, sample_image, tmp_path):
    def write(name: str, golden: dict[str, Any]) -> Path:
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(golden))
        return p

    bad = {
        "negative": (_golden(sample_image, [-1, 2]), "token_ids should be a non-empty list"),
        "top-negative": (
            _golden(sample_image, [3, 2], logits=[_golden(sample_image, [3, -1])["logits"][0]]),
            "logits[0].top_ids should be",
        ),
        "beyond-vocab": (_golden(sample_image, [640, 2]), "token_ids holds 640, not a token id"),
        "provenance": (_golden(sample_image, [3, 2], provenance=None), "provenance should be"),
    }
    for name, (golden, match) in bad.items():
        user_error("golden", "check", tiny_base_artifact, write(name, golden), match=match)
    # a non-finite value recorded in the file is the file's, not the engine's
    nan = _golden(sample_image, [3, 2])
    nan["logits"][0]["top_values"][0] = float("nan")
    proc = mllmc("golden", "check", tiny_base_artifact, write("nan", nan), check=1)
    assert "the golden file records NaN or infinite logits" in proc.stdout, proc.stdout
