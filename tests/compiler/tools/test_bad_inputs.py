"""Absurd or malformed inputs are refused in one line (exit 2 on the command line), before
memory or time goes to them: item and sample counts, image sizes, chat templates, and every
JSON file mllmc reads (NaN/Infinity, numbers beyond float64, deep nesting, non-UTF-8 text)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from mllmc.runtime import preprocess
from mllmc.runtime.errors import UserError
from mllmc.runtime.jsonfile import JSONError, loads, read_json
from tests.compiler.tools.test_cli import MLLMC, user_error

HUGE_INT = "1" + "0" * 400  # 10**400: a JSON integer, beyond float64
DIGITS_5000 = "7" * 5000  # beyond Python's 4300-digit int() limit


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG file of `width` x `height` pixels whose pixel data is not there: opening it reads
    the size, decoding it would need width * height * 3 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data)
    return path


def test_strict_json_loader(tmp_path):
    for text, match in (
        ("NaN", "NaN"),
        ('{"a": [1, Infinity]}', "Infinity"),
        ("-Infinity", "Infinity"),
        ("1e400", "out of range"),
        (HUGE_INT, "out of range"),
        (DIGITS_5000, "5000 digits"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"a": ', "Expecting value"),
    ):
        with pytest.raises(JSONError, match=match) as e:
            loads(text)
        assert "\n" not in str(e.value)
    # what real model files hold still reads: a 31-digit model_max_length, plain floats
    assert loads('{"model_max_length": 1000000000000000019884624838656, "x": 0.5}')["x"] == 0.5
    assert str(loads("NaN", allow_nan=True)) == "nan"
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"prompt": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(JSONError, match="not UTF-8"):
        read_json(bad)
    with pytest.raises(JSONError, match="more than the 10"):
        read_json(bad, max_bytes=10)


def test_eval_data_refuses_bad_lines_and_images(tiny_model_dir, sample_image, tmp_path):
    """Every bad input of `mllmc eval --data` is one line, exit 2, before the model loads."""
    image = json.dumps(str(sample_image))
    bomb = png_header(tmp_path / "bomb.png", 20_000, 10_000)  # 200 megapixels
    big = png_header(tmp_path / "big.png", 10_000, 10_000)  # 100 megapixels: over 8192 x 8192
    cases = {
        "deep": ("[" * 100_000, "nested too deeply"),
        "nul": ('{"image": "a\\u0000b.png", "prompt": "p", "answer": "a"}', "cannot read image"),
        "digits": (f'{{"image": {image}, "prompt": "p", "answer": "a", "n": {DIGITS_5000}}}', "5000 digits"),
        "nan": (f'{{"image": {image}, "prompt": "p", "answer": NaN}}', "NaN"),
        "bomb": (f'{{"image": "{bomb}", "prompt": "p", "answer": "a"}}', "more pixels than the limit"),
        "big": (f'{{"image": "{big}", "prompt": "p", "answer": "a"}}', "more than the limit of"),
    }  # fmt: skip
    for name, (line, match) in cases.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text(line + "\n")
        user_error("eval", tiny_model_dir, "--data", data, match=match)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(
        f'{{"image": {image}, "prompt": "caf\xe9", "answer": "a"}}\n'.encode("latin-1")
    )
    user_error("eval", tiny_model_dir, "--data", latin1, match="not UTF-8")
    # counts beyond what one run takes are refused at once, not built item by item
    for n in ("9000000", "0"):
        user_error("eval", tiny_model_dir, "--task", "shapes-qa", "-n", n, match="between 1 and")


def test_item_counts_are_bounded_and_streamed():
    from mllmc.compiler.tools.evaluate import MAX_ITEMS, task_items

    with pytest.raises(UserError, match=f"from 1 to {MAX_ITEMS}"):
        task_items("shapes-qa", 9_000_000)
    items = task_items("shapes-qa", MAX_ITEMS)  # nothing is made until it is iterated
    assert len(items) == MAX_ITEMS
    first = next(iter(items))
    assert first.image.size == (128, 128)


def test_calibrate_refuses_bad_counts_and_prompts(tiny_model_dir, tmp_path):
    out = tmp_path / "lc.json"
    user_error(
        "calibrate", tiny_model_dir, "-n", "1000000000", "-o", out, match="between 1 and 100000"
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("D\xe9cris l'image.\n".encode("latin-1"))
    user_error(
        "calibrate", tiny_model_dir, "--prompts", prompts, "-o", out, match="is not UTF-8 text"
    )
    assert not out.exists()


def _info(**kw) -> SimpleNamespace:
    return SimpleNamespace(
        **{"num_layers": 4, "config_hash": "aaaa", "model_dir": "/models/m", **kw}
    )


def test_calibration_files_are_strict_and_match_the_model(tmp_path):
    from mllmc.passes.calibration import read_exit_file, read_lc_file
    from mllmc.passes.vte import VTEConfig

    def write(name: str, text: str) -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    lc = '{"model_config_hash": "aaaa", "num_layers": 4, "order": [2, 0, 1, 3], "lc_visual": %s}'
    assert read_lc_file(write("lc.json", lc % "[0.1, 0.2, 0.3, 0.4]"), _info()) == [2, 0, 1, 3]
    for name, text, match in (
        ("lc-inf", lc % "[Infinity, 0, 0, 0]", "Infinity"),
        ("lc-nan", lc % "[NaN, 0, 0, 0]", "NaN"),
        ("lc-float-order", lc.replace("[2, 0", "[2.0, 0") % "[]", "not an integer"),
    ):
        with pytest.raises(UserError, match=match):
            read_lc_file(write(name, text), _info())
    # a file made for another model is refused, naming both hashes
    with pytest.raises(UserError, match="config hash aaaa.*config hash bbbb"):
        read_lc_file(write("lc.json", lc % "[]"), _info(config_hash="bbbb"))
    # a minimal file: the model's hash and layer count, and the order
    minimal = '{"model_config_hash": "aaaa", "num_layers": 4, "order": [3, 2, 1, 0]}'
    assert read_lc_file(write("old.json", minimal), _info()) == [3, 2, 1, 0]

    ex = '{"model_config_hash": "aaaa", "num_layers": 4, "k": %s, "threshold": %s}'
    assert read_exit_file(write("ex.json", ex % ("2", "0.1")), _info()) == (2, 0.1)
    for name, text, match in (
        ("k-float", ex % ("2.7", "0.1"), "2.7 is not an integer"),
        ("t-nan", ex % ("2", "NaN"), "NaN"),
        ("t-inf", ex % ("2", "Infinity"), "Infinity"),
        ("t-neg", ex % ("2", "-1"), "not a number > 0"),
        ("k-huge", ex % ("2", HUGE_INT), "out of range"),
    ):
        with pytest.raises(UserError, match=match):
            read_exit_file(write(name, text), _info())
    with pytest.raises(UserError, match="another model"):
        read_exit_file(write("ex.json", ex % ("2", "0.1")), _info(config_hash="bbbb"))
    # a NaN threshold never reaches a manifest
    with pytest.raises(ValueError, match="finite number > 0"):
        VTEConfig(k=2, threshold=float("nan"))


def test_golden_numbers_beyond_float64_are_refused(tmp_path):
    golden = {
        "golden_version": 2,
        "inputs": {"image": "x.png", "image_sha256": "0", "prompt": "p", "max_new_tokens": 1},
        "token_ids": [1],
        "logits": [{"top_ids": [1], "top_values": [0.0], "mean": 0.0, "std": 1.0}],
    }
    text = json.dumps(golden).replace('"top_values": [0.0]', f'"top_values": [{HUGE_INT}]')
    path = tmp_path / "golden.json"
    path.write_text(text)
    user_error("golden", "check", tmp_path, path, match="out of range")
    # and through the API, a record built in Python is refused the same way
    from mllmc.runtime.golden import _schema_problem

    golden["logits"][0]["top_values"] = [10**400]
    assert "top_values" in _schema_problem(golden)


def test_bench_text_tokens_bounded_by_the_model(tiny_model_dir, tmp_path):
    user_error(
        "bench",
        tiny_model_dir,
        "--text-tokens",
        "1000000",
        "-o",
        tmp_path / "bench.json",
        match="max_position_embeddings",
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return preprocess.PromptEncoder.from_dir(tiny_model_dir).tokenizer


def test_chat_templates_are_bounded(tokenizer, monkeypatch):
    for template, match in (
        ('{{ "a" * 100000000 }}', "longer than 1000000"),
        ("{{ 10 ** 100000000 }}", "too large"),
        ("{{ (10 ** 1000) ** 1000 }}", "too large"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{% for i in range(10**9) %}{% endfor %}", "OverflowError"),
        ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "more than 1000000 characters"),
        ("{{ raise_exception('no images here') }}", "no images here"),
    ):
        encoder = preprocess.PromptEncoder(tokenizer, chat_template=template)
        with pytest.raises(UserError, match=match) as e:
            encoder.encode("Describe the image.", 4)
        assert "\n" not in str(e.value) and str(e.value).startswith("chat template failed")
    # a template that runs (without writing) for longer than its time limit is stopped
    monkeypatch.setattr(preprocess, "TEMPLATE_SECONDS", 0.2)
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    encoder = preprocess.PromptEncoder(tokenizer, chat_template=slow)
    with pytest.raises(UserError, match="longer than 0.2 s"):
        encoder.encode("Describe the image.", 4)


def test_image_sizes_are_bounded(tiny_model_dir, sample_image, tmp_path, monkeypatch):
    import shutil

    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix == ".json":
            shutil.copy2(f, model / f.name)
    for name in ("processor_config.json", "preprocessor_config.json"):
        p = model / name
        if p.is_file():
            cfg = json.loads(p.read_text())
            block = cfg.get("image_processor", cfg)
            block["size"] = {"height": 40000, "width": 40000}
            p.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="40000x40000 = 1600000000 pixels, more than the limit"):
        preprocess.read_image_processor_config(model)
    # a resize that would make a huge image from a very long, thin one
    cfg = preprocess.read_image_processor_config(tiny_model_dir)
    cfg["size"] = {"shortest_edge": 1000}
    thin = preprocess.ImagePreprocessor(cfg)
    import numpy as np

    with pytest.raises(UserError, match="the image resized from 100000x1"):
        thin(np.zeros((1, 100_000, 3), dtype=np.uint8))
    # the limit is configurable, in one line
    monkeypatch.setenv("MLLMC_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(UserError, match="more than the limit of 100 .set MLLMC_MAX_IMAGE_PIXELS"):
        preprocess.load_image(sample_image)
    proc = subprocess.run(
        [MLLMC, "eval", str(tiny_model_dir), "--data", str(_one_item(tmp_path, sample_image))],
        capture_output=True,
        text=True,
        env={**os.environ, "MLLMC_MAX_IMAGE_PIXELS": "100"},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "more than the limit of 100" in proc.stderr
    monkeypatch.setenv("MLLMC_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(UserError, match="MLLMC_MAX_IMAGE_PIXELS must be an integer"):
        preprocess.load_image(sample_image)


def _one_item(tmp_path: Path, image: Path) -> Path:
    p = tmp_path / "one.jsonl"
    p.write_text(json.dumps({"image": str(image), "prompt": "p", "answer": "a"}) + "\n")
    return p


def test_model_and_artifact_json_go_through_the_strict_reader(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for text, match in (
        (f'{{"model_type": "llava", "n": {DIGITS_5000}}}', "5000 digits"),
        ("[" * 100_000, "nested too deeply"),
    ):
        (model / "config.json").write_text(text)
        user_error("calibrate", model, "-o", tmp_path / "lc.json", match="corrupt")
        user_error("calibrate", model, "-o", tmp_path / "lc.json", match=match)
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "manifest.json").write_text(f'{{"format_version": {HUGE_INT}}}')
    user_error("inspect", artifact, match="out of range")
