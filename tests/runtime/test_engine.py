"""The runtime engine: runner chosen by the manifest's target, engine files checked against the
manifest on load, and every argument a user passes checked (console script: one line, exit 2)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mllmc.runtime import UserError, load

MLLMC = str(Path(sys.executable).parent / "mllmc")


def run_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([MLLMC, *map(str, args)], capture_output=True, text=True, timeout=600)


def one_line_error(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert match in lines[0], lines[0]


@pytest.fixture
def copied(tiny_base_artifact: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(tiny_base_artifact, out)
    return out


def test_swapped_engine_file_is_one_line(copied: Path, sample_image: Path):
    shutil.copy(copied / "decode.onnx", copied / "vision.onnx")  # names still say vision.onnx
    proc = run_cli("run", copied, "--image", sample_image, "--prompt", "Hi")
    one_line_error(proc, "vision.onnx does not match the manifest's 'vision' segment")
    assert "pixel_values" in proc.stderr and "input_ids" in proc.stderr


def test_a_model_folder_is_not_an_artifact(tiny_model_dir: Path, sample_image: Path):
    with pytest.raises(
        UserError, match="is a model folder \\(config.json\\), not an mllmc artifact"
    ):
        load(tiny_model_dir)
    proc = run_cli("run", tiny_model_dir, "--image", sample_image, "--prompt", "Hi")
    one_line_error(proc, f"compile it first (mllmc compile {tiny_model_dir} -o OUT)")


def test_dtype_mismatch_names_the_input(copied: Path):
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["segments"]["prefill"]["inputs"][1]["dtype"] = "float16"
    (copied / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="'image_features' is rank 3 float32, the manifest says"):
        load(copied)


def test_unknown_target_names_the_known_ones(copied: Path, sample_image: Path):
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["target_settings"]["target"] = "tpu"
    (copied / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("run", copied, "--image", sample_image, "--prompt", "Hi")
    one_line_error(proc, "target 'tpu'")
    assert "targets it runs: " in proc.stderr and "onnx" in proc.stderr


def test_llava_needs_an_image(tiny_base_artifact: Path):
    """LLaVA's prefill takes no text-only prompt: no image is one line, API and CLI."""
    engine = load(tiny_base_artifact)
    assert not engine.text_only
    with pytest.raises(UserError, match="give the image .* or images=\\[...\\], one of them"):
        engine.generate(None, "Hi")
    with pytest.raises(UserError, match="no image given: pass an image or a list of images"):
        engine.generate(images=[], prompt="Hi")
    proc = run_cli("run", tiny_base_artifact, "--prompt", "Hi")
    one_line_error(
        proc, "needs an image (give --image FILE): a llava model's prompt holds at least one image"
    )


@pytest.mark.parametrize("threads", [0, -1, 100_000, True, 1.5])
def test_threads_bounded_by_the_cores(tiny_base_artifact: Path, threads):
    with pytest.raises(UserError, match="threads must be an integer from 1 to"):
        load(tiny_base_artifact, threads=threads)


def test_threads_cli(tiny_base_artifact: Path, sample_image: Path):
    proc = run_cli(
        "run", tiny_base_artifact, "--image", sample_image, "--prompt", "Hi", "--threads", 100000
    )
    one_line_error(proc, "--threads")


def _threads_of(engine) -> set[int]:
    """Each onnxruntime session's intra-op threads (the in-place decoder's: its program's)."""
    runners = [getattr(r, "static", r) for r in engine.runners.values()]
    return {r.session.get_session_options().intra_op_num_threads for r in runners}


def test_threads_from_the_environment(tiny_base_artifact: Path, monkeypatch):
    """MLLMC_THREADS is the default of load(threads=...) and --threads; an explicit count wins,
    and a bad value is one line (API and CLI)."""
    monkeypatch.setenv("MLLMC_THREADS", "1")
    assert _threads_of(load(tiny_base_artifact)) == {1}
    monkeypatch.setenv("MLLMC_THREADS", "2")
    assert _threads_of(load(tiny_base_artifact, threads=1)) == {1}
    monkeypatch.setenv("MLLMC_THREADS", "")  # empty: unset, onnxruntime's default (0: its own)
    assert _threads_of(load(tiny_base_artifact)) == {0}
    for bad in ("0", "-1", "1.5", "two", "100000", "²", "1e3"):
        monkeypatch.setenv("MLLMC_THREADS", bad)
        with pytest.raises(UserError, match=f"MLLMC_THREADS must be an integer from 1 to .*{bad}"):
            load(tiny_base_artifact)


def test_threads_from_the_environment_cli(
    tiny_base_artifact: Path, sample_image: Path, monkeypatch
):
    monkeypatch.setenv("MLLMC_THREADS", "many")
    proc = run_cli("run", tiny_base_artifact, "--image", sample_image, "--prompt", "Hi")
    one_line_error(proc, "MLLMC_THREADS must be an integer from 1 to")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 10**6}, "top_k"),
        ({"seed": -3}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.0}, "max_new_tokens"),
    ],
)
def test_generate_checks_its_arguments(tiny_base_artifact: Path, sample_image: Path, kwargs, match):
    engine = load(tiny_base_artifact)
    with pytest.raises(UserError, match=match):
        engine.generate(sample_image, "Hi", **{"max_new_tokens": 2, **kwargs})


def test_top_k_above_vocab_cli(tiny_base_artifact: Path, sample_image: Path):
    proc = run_cli(
        "run",
        tiny_base_artifact,
        "--image",
        sample_image,
        "--prompt",
        "Hi",
        "--top-k",
        100000,
        "--temperature",
        1,
    )
    one_line_error(proc, "top_k must be an integer from 0 to the vocabulary size")


@pytest.fixture
def short_context(copied: Path) -> Path:
    """The tiny artifact with its model's max_position_embeddings cut to 40 positions, so that
    going past it takes a few decode steps, not thousands."""
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["model"]["max_position_embeddings"] = 40
    (copied / "manifest.json").write_text(json.dumps(manifest))
    return copied


def test_past_max_positions_warns_or_refuses(short_context: Path, sample_image: Path, caplog):
    engine = load(short_context)
    n = engine.encode_prompt("Hi", engine.image_rows(sample_image)).n
    fits = 40 - n + 1  # the last new token is never fed back: positions 0 .. 39
    assert fits > 1
    with pytest.raises(UserError, match="max_position_embeddings"):
        engine.generate(sample_image, "Hi", max_new_tokens=fits + 1, strict=True)
    with caplog.at_level("WARNING", logger="mllmc.runtime.engine"):
        engine.generate(sample_image, "Hi", max_new_tokens=fits, strict=True)
        assert not caplog.records
        engine.generate(sample_image, "Hi", max_new_tokens=fits + 1)
    warnings = [r for r in caplog.records if "max_position_embeddings" in r.getMessage()]
    assert len(warnings) == 1


def _run_past_max_positions(artifact: Path, image: Path, *flags: str):
    """`mllmc run` with 40 new tokens on the 40-position artifact: past the model's positions."""
    return run_cli(
        "run", artifact, "--image", image, "--prompt", "Hi", "--max-new-tokens", 40, *flags
    )


def test_past_max_positions_cli_warns_once(short_context: Path, sample_image: Path):
    proc = _run_past_max_positions(short_context, sample_image, "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("max_position_embeddings") == 1, proc.stderr
    assert json.loads(proc.stdout)["token_ids"]


def test_past_max_positions_cli_strict_refuses(short_context: Path, sample_image: Path):
    proc = _run_past_max_positions(short_context, sample_image, "--strict")
    one_line_error(proc, "max_position_embeddings")
    assert proc.stdout == ""  # refused before generating anything
