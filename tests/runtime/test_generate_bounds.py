"""Bounds on what generate() and the run-time options accept: token counts, temperatures, prompt
text, argument types and image arrays are refused (or made safe) before anything runs long."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mllmc.runtime import load
from mllmc.runtime.engine import MAX_NEW_TOKENS, _choose
from mllmc.runtime.errors import UserError
from mllmc.runtime.preprocess import MAX_IMAGE_PIXELS_ENV, read_image_processor_config

MLLMC = str(Path(sys.executable).parent / "mllmc")
BAD_PROMPT = b"<image> \xff\xfe hi"  # not UTF-8: a lone surrogate once Python decodes argv


def run_cli(*args: object) -> subprocess.CompletedProcess:
    argv = [MLLMC, *(a if isinstance(a, bytes) else str(a) for a in args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def one_line_error(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def engine(tiny_base_artifact: Path):
    return load(tiny_base_artifact)


def test_cli_refuses_unbounded_counts(tiny_base_artifact: Path, sample_image: Path, tmp_path):
    art, img = tiny_base_artifact, sample_image
    for n in ("100001", "99999999999999999999999"):
        for argv in (
            ("run", art, "--image", img, "--prompt", "Hi"),
            ("golden", "record", art, "--image", img, "--prompt", "Hi", "-o", tmp_path / "g.json"),
            ("eval", art, "--task", "shapes-qa", "-n", 1),
            ("verify", art, "--against", art),
        ):
            one_line_error(run_cli(*argv, "--max-new-tokens", n), "--max-new-tokens")
    bench = ("bench", tmp_path / "no-model")
    one_line_error(run_cli(*bench, "--repeats", 100001), "--repeats")
    one_line_error(run_cli(*bench, "--decode-tokens", 100001), "--decode-tokens")
    assert not (tmp_path / "g.json").exists()


def test_cli_refuses_tokens_past_the_positions(tiny_base_artifact: Path, sample_image: Path):
    limit = json.loads((tiny_base_artifact / "manifest.json").read_text())["model"][
        "max_position_embeddings"
    ]
    assert limit < MAX_NEW_TOKENS
    proc = run_cli(
        "run", tiny_base_artifact, "--image", sample_image, "--prompt", "Hi",
        "--max-new-tokens", limit + 1,
    )  # fmt: skip
    one_line_error(proc, "max_position_embeddings")
    assert proc.stdout == ""


def test_api_refuses_unbounded_counts(engine, sample_image: Path):
    limit = engine.manifest.model.max_position_embeddings
    for n in (MAX_NEW_TOKENS + 1, 10**20):
        with pytest.raises(UserError, match="max_new_tokens must be an integer from 1 to"):
            engine.generate(sample_image, "Hi", max_new_tokens=n)
    with pytest.raises(UserError, match="alone is past the model's max_position_embeddings"):
        engine.generate(sample_image, "Hi", max_new_tokens=limit + 1)


def test_golden_with_huge_max_new_tokens_is_refused(
    tiny_base_artifact: Path, sample_image: Path, tmp_path: Path
):
    golden = tmp_path / "g.json"
    proc = run_cli(
        "golden", "record", tiny_base_artifact, "--image", sample_image, "--prompt", "Hi",
        "--max-new-tokens", 2, "-o", golden,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(golden.read_text())
    data["inputs"]["max_new_tokens"] = 1_000_000_000
    golden.write_text(json.dumps(data))
    one_line_error(run_cli("golden", "check", tiny_base_artifact, golden), "max_new_tokens")


def test_prompt_not_utf8_is_refused(
    tiny_base_artifact: Path, sample_image: Path, engine, tmp_path: Path
):
    with pytest.raises(UserError, match="UTF-8"):
        engine.generate(sample_image, "<image> \udcff hi", max_new_tokens=1)
    art, img = tiny_base_artifact, sample_image
    for argv in (
        ("run", art, "--image", img),
        ("golden", "record", art, "--image", img, "-o", tmp_path / "g.json"),
    ):
        one_line_error(run_cli(*argv, "--prompt", BAD_PROMPT), "UTF-8")
    assert not (tmp_path / "g.json").exists()


def test_tiny_temperatures_are_greedy(tiny_base_artifact: Path, sample_image: Path, engine):
    greedy = engine.generate(sample_image, "Hi", max_new_tokens=3).token_ids
    for t in (1e-310, 5e-324, 1e-7):
        got = engine.generate(sample_image, "Hi", max_new_tokens=3, temperature=t, seed=0)
        assert got.token_ids == greedy
    # huge logits at a temperature just above the floor: a valid sample, no NaN
    logits = np.array([3e38, -3e38, 1.0, 3e38], dtype=np.float32)
    assert _choose(logits, 1e-6, 0, np.random.default_rng(0)) in (0, 3)
    proc = run_cli(
        "run", tiny_base_artifact, "--image", sample_image, "--prompt", "Hi",
        "--max-new-tokens", 2, "--temperature", "5e-324", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["token_ids"] == greedy[:2]
    assert "greedy" in run_cli("run", "--help").stdout


def test_api_argument_types(tiny_base_artifact: Path, tiny_model_dir: Path, tmp_path, engine):
    from mllmc.compiler.pipeline import compile_model

    with pytest.raises(TypeError, match="max_seq_len"):
        compile_model(tiny_model_dir, tmp_path / "o", target="trt", max_seq_len="100")
    with pytest.raises(TypeError, match="force"):
        compile_model(tiny_model_dir, tiny_base_artifact, force="no")
    assert (tiny_base_artifact / "manifest.json").is_file()
    with pytest.raises(TypeError, match="strict"):
        engine.generate(tmp_path / "x.png", "Hi", strict="yes")
    with pytest.raises(TypeError, match="share_weights"):
        load(tiny_base_artifact, share_weights="no")
    with pytest.raises(TypeError, match="providers"):
        load(tiny_base_artifact, providers="CPUExecutionProvider")
    with pytest.raises(TypeError, match="providers"):
        load(tiny_base_artifact, providers=[1])


def test_image_array_over_the_pixel_limit(engine, monkeypatch):
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "10000")
    with pytest.raises(UserError, match="more than the limit"):
        engine.images.tiles(np.zeros((200, 100, 3), dtype=np.uint8))
    tiles, _ = engine.images.tiles(np.zeros((100, 100, 3), dtype=np.uint8))
    assert tiles.shape[0] == 1 and tiles.dtype == np.float32


def test_artifact_reads_its_own_image_processor(tiny_base_artifact: Path, tmp_path: Path):
    art = tmp_path / "art"
    shutil.copytree(tiny_base_artifact, art)
    own = json.loads((art / "image_processor.json").read_text())
    own["image_mean"] = [0.25, 0.5, 0.75]
    (art / "image_processor.json").write_text(json.dumps(own))
    copied = [
        n for n in ("processor_config.json", "preprocessor_config.json") if (art / n).is_file()
    ]
    assert copied  # the model's own files travel with the artifact too
    assert read_image_processor_config(art)["image_mean"] == [0.25, 0.5, 0.75]
    # a model directory (no manifest) keeps transformers' order
    (art / "manifest.json").unlink()
    assert read_image_processor_config(art)["image_mean"] != [0.25, 0.5, 0.75]
