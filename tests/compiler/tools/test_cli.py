"""The real `mllmc` console script: the happy path of every subcommand, and every user error
as one line on stderr, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

MLLMC = str(Path(sys.executable).parent / "mllmc")


def mllmc(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([MLLMC, *map(str, args)], capture_output=True, text=True, timeout=900)
    if check is not None:
        assert proc.returncode == check, (
            f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def user_error(*args: str, match: str) -> str:
    """Run a command that must fail with a one-line user error (exit 2)."""
    proc = mllmc(*args, check=2)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "it/s]" not in line]
    errors = [line for line in lines if line.startswith("mllmc")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert match in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny-shortv"
    proc = mllmc("compile", tiny_model_dir, "--pass", "shortv:layers=[0,2,3]", "-o", out, "-q")
    assert "wrote" in proc.stdout and "cut" in proc.stdout and "validated" in proc.stdout
    return out


def test_help_shows_examples():
    proc = mllmc("--help")
    assert "examples:" in proc.stdout and "mllmc compile" in proc.stdout
    assert "examples:" in mllmc("compile", "--help").stdout


def test_each_subcommand_help_shows_its_own_examples():
    commands = ("preset", "compile", "calibrate", "eval", "run", "verify", "inspect", "golden")
    for cmd in (*commands, "bench"):
        epilog = mllmc(cmd, "--help").stdout.split("examples:", 1)[1]
        assert f"mllmc {cmd} " in epilog, cmd
        others = [c for c in commands if c != cmd and f"mllmc {c} " in epilog]
        # calibrate shows the compile that uses its LC file; no other command mixes in
        assert others == (["compile"] if cmd == "calibrate" else []), (cmd, others)
    preset = " ".join(mllmc("preset", "--help").stdout.split())
    assert "trained-tiny-llava (trained)" in preset and "tiny-llava (random init)" in preset
    bench = " ".join(mllmc("bench", "--help").stdout.split())
    assert "--threads" in bench and "--artifacts-dir" in bench
    assert "[-o FILE.json]" in bench and "optional" in bench


def test_compile_help_lists_every_pass_and_its_options():
    import dataclasses

    from mllmc.passes import REGISTRY

    listed = mllmc("compile", "--help").stdout.split("passes (--pass", 1)[1]
    for name, info in REGISTRY.items():
        options = "|".join(f.name for f in dataclasses.fields(info.config_cls))
        assert f"  {name}:{options} " in listed and info.summary in listed, name
    assert "Qwen2.5-VL" in mllmc("--help").stdout


def test_preset_writes_a_loadable_model(tmp_path):
    out = tmp_path / "m"
    mllmc("preset", "tiny-llava", "-o", out, "--seed", "3")
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "chat_template.jinja",
    ):
        assert (out / f).is_file(), f
    again = tmp_path / "again"
    mllmc("preset", "tiny-llava", "-o", again, "--seed", "3")
    # deterministic for a given seed: same weights and tokenizer, byte for byte
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    user_error("preset", "tiny-llava", "-o", out, match="exists")
    user_error("preset", "huge-llava", "-o", tmp_path / "x", match="unknown preset 'huge-llava'")
    user_error(
        "preset", "tiny-llava", "-o", tmp_path / "x", "--device", "gpu9", match="unknown device"
    )
    if not torch.cuda.is_available():
        user_error(
            "preset", "tiny-llava", "-o", tmp_path / "x", "--device", "cuda", match="no CUDA device"
        )


def test_run_inspect_verify_golden(artifact, tiny_model_dir, sample_image, tmp_path):
    proc = mllmc(
        "run",
        artifact,
        "--image",
        sample_image,
        "--prompt",
        "Describe the image.",
        "--max-new-tokens",
        "6",
        "--json",
        "--save-logits",
        tmp_path / "l.npy",
    )
    out = json.loads(proc.stdout)
    assert len(out["token_ids"]) == 6 or out["token_ids"][-1] == 2
    assert set(out["timings"]) >= {"prefill_s", "decode_s_per_token"}
    logits = np.load(tmp_path / "l.npy")
    assert logits.dtype == np.float32 and logits.shape[0] == len(out["token_ids"])
    assert [int(i) for i in logits.argmax(-1)] == out["token_ids"]

    text = mllmc(
        "run",
        artifact,
        "--image",
        sample_image,
        "--prompt",
        "USER: <image>\nHi ASSISTANT:",
        "--max-new-tokens",
        "3",
    ).stdout
    assert "prefill" in text and "ms/token" in text

    info = mllmc("inspect", artifact).stdout
    assert "frozen_layers=[0, 2, 3]" in info and "prefill" in info and "cut" in info
    assert json.loads(mllmc("inspect", artifact, "--json").stdout)["passes"][0]["name"] == "shortv"

    proc = mllmc("verify", artifact, "--against", tiny_model_dir, "--max-new-tokens", "8")
    assert proc.stdout.startswith("PASS")
    # a tolerance no float computation meets: verify must report FAIL and exit 1
    proc = mllmc(
        "verify",
        artifact,
        "--against",
        tiny_model_dir,
        "--max-new-tokens",
        "2",
        "--tol",
        "1e-12",
        check=1,
    )
    assert proc.stdout.startswith("FAIL")

    golden = tmp_path / "golden.json"
    mllmc(
        "golden",
        "record",
        artifact,
        "--image",
        sample_image,
        "--prompt",
        "Describe the image.",
        "-o",
        golden,
    )
    assert "golden check passed" in mllmc("golden", "check", artifact, golden).stdout
    g = json.loads(golden.read_text())
    g["token_ids"][0] += 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(g))
    assert "FAILED" in mllmc("golden", "check", artifact, bad, check=1).stdout


def test_model_dir_errors(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    user_error("compile", tmp_path / "missing", "-o", out, match="not found")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    user_error("compile", tmp_path / "bert", "-o", out, match="supported: llava")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{")
    user_error("compile", tmp_path / "badjson", "-o", out, match="corrupt")
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_model_dir, trunc)
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    user_error("compile", trunc, "-o", out, "-q", match="cannot load model")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_pass_and_option_errors(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    user_error(
        "compile",
        tiny_model_dir,
        "--pass",
        "fastx",
        "-o",
        out,
        match="valid passes: fastervlm, fastv, shortv, vispruner, vtc_cls, vte",
    )
    user_error(
        "compile", tiny_model_dir, "--pass", "shortv:k=1", "-o", out, match="valid options: layers"
    )
    user_error(
        "compile", tiny_model_dir, "--pass", "shortv:layers=[1,1]", "-o", out, match="duplicate"
    )
    user_error("compile", tiny_model_dir, "--pass", "shortv:ratio=1.5", "-o", out, match="ratio")
    user_error(
        "compile",
        tiny_model_dir,
        "--pass",
        "shortv:layers=[6]",
        "-o",
        out,
        "-q",
        match="out of range",
    )
    user_error(
        "compile", tiny_model_dir, "--pass", "shortv:lc=nope.json", "-o", out, "-q", match="LC file"
    )
    user_error(
        "compile",
        tiny_model_dir,
        "--target",
        "tpu",
        "-o",
        out,
        match="valid targets: onnx, aoti, trt",
    )
    user_error("compile", tiny_model_dir, "-o", out, "--bogus", match="unrecognized arguments")
    out.mkdir()
    user_error("compile", tiny_model_dir, "-o", out, match="--force")
    assert not list(out.iterdir())


def test_input_checks_come_before_torch_loads(tmp_path, tiny_model_dir):
    """What can be checked without the model (pass specs and the options config.json rules out,
    targets and their options, the model directory's config, output paths) is refused before
    torch is imported: one line at once."""
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("mine")
    cases = [
        ["compile", tiny_model_dir, "--pass", "fastx", "-o", tmp_path / "o"],
        ["compile", tiny_model_dir, "--pass", "fastv:ratio=1.0", "-o", tmp_path / "o"],
        # ruled out by config.json alone: refused before the model loads too
        ["compile", tiny_model_dir, "--pass", "fastv:k=6", "-o", tmp_path / "o"],
        ["compile", tiny_model_dir, "--pass", "fastervlm:keep=17", "-o", tmp_path / "o"],
        ["compile", tiny_model_dir, "--pass", "shortv:layers=[6]", "-o", tmp_path / "o"],
        ["compile", tiny_model_dir, "--target", "aoti", "--dtype", "int8", "-o", tmp_path / "o"],
        ["compile", tiny_model_dir, "--max-seq-len", "100", "-o", tmp_path / "o"],
        ["compile", tmp_path / "nope", "-o", tmp_path / "o"],
        ["compile", tiny_model_dir, "-o", user_dir, "--force"],
        ["calibrate", tmp_path / "nope", "-o", tmp_path / "lc.json"],
        ["calibrate", tiny_model_dir, "--pass", "fastv", "-o", tmp_path / "lc.json"],
        ["bench", tiny_model_dir, "--pass", "shortv:k=1"],
        ["bench", tiny_model_dir, "--target", "tensorflow"],
        ["bench", tiny_model_dir, "--dtype", "bfloat16"],  # onnx builds float32 engines
        ["bench", tiny_model_dir, "--target", "aoti", "--dtype", "int4"],
    ]
    code = (
        "import json, sys\n"
        "from mllmc.compiler.tools.cli import main\n"
        "codes = [main([str(a) for a in case]) for case in json.loads(sys.argv[1])]\n"
        "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules}))\n"
    )
    arg = json.dumps([[str(a) for a in case] for case in cases])
    proc = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"codes": [2] * len(cases), "torch": False}, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mllmc: error:")]
    assert len(errors) == len(cases), proc.stderr
    assert not (tmp_path / "o").exists() and (user_dir / "notes.txt").read_text() == "mine"


def test_artifact_and_input_errors(artifact, tmp_path, sample_image):
    run = ("--prompt", "Describe.", "--max-new-tokens", "2")
    user_error("run", tmp_path / "none", "--image", sample_image, *run, match="not found")
    (tmp_path / "notes.txt").write_text("not an image")
    user_error("run", artifact, "--image", tmp_path / "notes.txt", *run, match="cannot read image")
    user_error(
        "run", artifact, "--image", tmp_path / "missing.png", *run, match="cannot read image"
    )
    user_error("run", artifact, "--image", tmp_path, *run, match="cannot read image")

    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    (broken / "decode.onnx").unlink()
    user_error("run", broken, "--image", sample_image, *run, match="decode.onnx is missing")
    shutil.copy(artifact / "decode.onnx", broken / "decode.onnx")
    p = broken / "prefill.onnx"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    user_error("run", broken, "--image", sample_image, *run, match="corrupt engine file")

    future = tmp_path / "future"
    shutil.copytree(artifact, future)
    m = json.loads((future / "manifest.json").read_text())
    m["format_version"] = 99
    (future / "manifest.json").write_text(json.dumps(m))
    user_error("inspect", future, match="format version 99")
    (future / "manifest.json").write_text("{")
    user_error("run", future, "--image", sample_image, *run, match="corrupt artifact manifest")

    plain = tmp_path / "plain"
    shutil.copytree(artifact, plain)
    (plain / "chat_template.jinja").unlink()
    for name in ("processor_config.json", "tokenizer_config.json"):
        if (plain / name).is_file():
            cfg = json.loads((plain / name).read_text())
            cfg.pop("chat_template", None)
            (plain / name).write_text(json.dumps(cfg))
    user_error("run", plain, "--image", sample_image, *run, match="<image>")
    user_error(
        "run", artifact, "--image", sample_image, "--prompt", "<image> <image>", match="image"
    )
    user_error(
        "run",
        artifact,
        "--image",
        sample_image,
        "--prompt",
        "x",
        "--max-new-tokens",
        "0",
        match="--max-new-tokens: must be >= 1",
    )


def test_calibrate_writes_lc_and_plot(tiny_model_dir, tmp_path):
    out = tmp_path / "lc.json"
    proc = mllmc("calibrate", tiny_model_dir, "--pass", "shortv", "-n", "2", "-o", out, "-q")
    lc = json.loads(out.read_text())
    assert sorted(lc["order"]) == list(range(lc["num_layers"])) and lc["samples"] == 2
    assert out.with_suffix(".png").is_file()
    assert "LC(visual)" in proc.stdout
    user_error("calibrate", tiny_model_dir, "-o", out, match="already exists; pass --force")
    other = tmp_path / "lc2.json"
    user_error(
        "calibrate", tiny_model_dir, "--images", tmp_path / "nodir", "-o", other, match="not found"
    )
    user_error("calibrate", tiny_model_dir, "--images", out, "-o", other, match="is a file")
    user_error("calibrate", tiny_model_dir, "--prompts", tmp_path, "-o", other, match="is a dir")
    user_error(
        "calibrate",
        tiny_model_dir,
        "--pass",
        "fastv",
        "-o",
        other,
        match="supports --pass shortv or vte",
    )
