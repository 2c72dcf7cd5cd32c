"""`--target trt`: the parts that need neither TensorRT nor a GPU (optimisation-profile shape
ranges, precisions, capability detection, manifest settings), and the one-line errors where
CUDA / tensorrt / torch_tensorrt are missing. The TensorRT build itself has not been run here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllmc.compiler import backends
from mllmc.compiler.backends import trt
from mllmc.runtime import UserError

MLLMC = str(Path(sys.executable).parent / "mllmc")
HAVE_TRT = not trt.missing_requirements(torch.cuda.is_available())
INSTALL_HINT = "the signature check runs where pip install 'mllmc[trt]' has been done"


def one_line_error(args: list[object], match: str) -> str:
    proc = subprocess.run([MLLMC, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mllmc")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert match in lines[0], lines[0]
    return lines[0]


PREFILL_INPUTS = [
    {"name": "input_ids", "shape": [1, "n"], "dtype": "int64"},
    {"name": "image_features", "shape": [1, "visual", 128], "dtype": "float16"},
    {"name": "visual_rows", "shape": ["visual"], "dtype": "int64"},
    {"name": "position_ids", "shape": [1, "n"], "dtype": "int64"},
    {"name": "attention_mask", "shape": [1, "n"], "dtype": "int64"},
]
DECODE_INPUTS = [
    {"name": "input_ids", "shape": ["batch", 1], "dtype": "int64"},
    {"name": "position_ids", "shape": ["batch", 1], "dtype": "int64"},
    {"name": "cache_pad", "shape": [2, "batch"], "dtype": "int64"},
    {"name": "past.0.key", "shape": ["batch", 2, "past_0", 32], "dtype": "float16"},
    {"name": "past.1.key", "shape": ["batch", 2, "past_1", 32], "dtype": "float16"},
]


def test_prefill_profile():
    ids, feats, rows, positions, mask = trt.input_specs(PREFILL_INPUTS, max_seq_len=1024)
    assert (ids.min_shape, ids.opt_shape, ids.max_shape) == ((1, 4), (1, 576 + 64), (1, 1024))
    assert (feats.min_shape, feats.opt_shape, feats.max_shape) == (
        (1, 1, 128),
        (1, 576, 128),
        (1, 1021, 128),
    )
    assert feats.dtype == "float16" and rows.max_shape == (1021,)
    assert positions.max_shape == mask.max_shape == (1, 1024)


def test_decode_profile_per_layer_cache():
    specs = {s.name: s for s in trt.input_specs(DECODE_INPUTS, max_seq_len=100)}
    ids, pad = specs["input_ids"], specs["cache_pad"]
    # a decode step takes 1 to MAX_DECODE_BATCH samples
    assert (ids.min_shape, ids.opt_shape, ids.max_shape) == ((1, 1), (8, 1), (16, 1))
    assert (pad.min_shape, pad.max_shape) == ((2, 1), (2, 16))
    for name in ("past.0.key", "past.1.key"):
        s = specs[name]
        assert (s.min_shape, s.opt_shape, s.max_shape) == (
            (1, 2, 1, 32),
            (8, 2, 64, 32),
            (16, 2, 100, 32),
        )


def test_profile_refuses_short_max_seq_len():
    with pytest.raises(UserError, match="shorter than 4 tokens"):
        trt.input_specs(PREFILL_INPUTS, max_seq_len=3)


def _trt_kwargs() -> dict[str, dict[str, object]]:
    spec = trt.input_specs(PREFILL_INPUTS, max_seq_len=512)[0]
    return {
        "Input": trt.input_kwargs(spec, torch.int64),
        "dynamo.compile": trt.compile_kwargs([]),
        "save": trt.save_kwargs([]),
    }


def test_trt_call_kwargs_without_precisions():
    """The engine's precision follows the graph's dtype: torch-tensorrt 2.14's compile has no
    `enabled_precisions` (it would fall into **kwargs and be ignored)."""
    kwargs = _trt_kwargs()
    assert backends.DEFAULT_DTYPE["trt"] == "float16"
    assert set(kwargs["dynamo.compile"]) == {"inputs", "truncate_double"}
    assert set(kwargs["save"]) == {"output_format", "inputs"}
    assert set(kwargs["Input"]) == {"min_shape", "opt_shape", "max_shape", "dtype", "name"}
    assert kwargs["Input"]["min_shape"] == (1, 4) and kwargs["Input"]["name"] == "input_ids"


def test_trt_call_kwargs_match_installed_signatures():
    """Every keyword the backend passes is a named parameter of the installed torch-tensorrt
    (not swallowed by **kwargs), and Input builds the dynamic profile from its keywords."""
    try:
        import torch_tensorrt
    except Exception as e:  # not installed, or installed without its TensorRT / CUDA libraries
        pytest.skip(f"torch_tensorrt is not importable here ({type(e).__name__}): {INSTALL_HINT}")
    import inspect

    kwargs = _trt_kwargs()
    for name, fn in (
        ("dynamo.compile", torch_tensorrt.dynamo.compile),
        ("save", torch_tensorrt.save),
    ):
        params = inspect.signature(fn).parameters
        named = {p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_KEYWORD}
        assert set(kwargs[name]) <= named, (name, set(kwargs[name]) - named)
    # Input takes **kwargs only: build one and read back what it kept
    spec = torch_tensorrt.Input(**kwargs["Input"])
    assert spec.shape_mode == torch_tensorrt.Input._ShapeMode.DYNAMIC
    assert spec.shape["min_shape"] == (1, 18) and spec.shape["max_shape"] == (1, 512)
    assert spec.name == "input_ids"


def test_missing_requirements_names_each():
    def none(m: str) -> bool:
        return False

    def both(m: str) -> bool:
        return True

    assert trt.missing_requirements(False, none) == ["a CUDA device", "tensorrt", "torch_tensorrt"]
    assert trt.missing_requirements(True, lambda m: m == "tensorrt") == ["torch_tensorrt"]
    assert trt.missing_requirements(True, both) == []


def test_backend_settings_for_the_manifest(monkeypatch):
    """With the requirements faked present: device cuda, float16 by default, the profile limit."""
    monkeypatch.setattr(trt, "check_available", lambda what="": None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend = backends.get_backend("trt", backends.TargetOptions())
    settings = backend.settings
    assert (settings.device, settings.dtype, settings.max_seq_len) == ("cuda", "float16", 8192)
    backend = backends.get_backend(
        "trt", backends.TargetOptions(dtype="bfloat16", max_seq_len=2048)
    )
    assert backend.settings.dtype == "bfloat16" and backend.settings.max_seq_len == 2048
    with pytest.raises(UserError, match="unknown dtype"):
        backends.get_backend("trt", backends.TargetOptions(dtype="int8"))
    with pytest.raises(UserError, match="between 2 and 8192"):
        backends.get_backend("trt", backends.TargetOptions(max_seq_len=9000))


def test_max_seq_len_applies_to_trt_only():
    for target in ("onnx", "aoti"):
        with pytest.raises(UserError, match="--target trt"):
            backends.get_backend(target, backends.TargetOptions(max_seq_len=1024))


def test_max_seq_len_cli_errors(tiny_model_dir, tmp_path):
    """--max-seq-len: an integer >= 2, and only where it applies; nothing is written."""
    out = tmp_path / "t"
    one_line_error(["compile", tiny_model_dir, "-o", out, "--max-seq-len", "lots"], "integer")
    one_line_error(["compile", tiny_model_dir, "-o", out, "--max-seq-len", "1"], ">= 2")
    line = one_line_error(
        ["compile", tiny_model_dir, "-o", out, "--max-seq-len", "1024"], "--max-seq-len"
    )
    assert "--target trt" in line
    assert not out.exists()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_compile_trt_says_what_is_missing(tiny_model_dir, tmp_path):
    line = one_line_error(
        ["compile", tiny_model_dir, "--target", "trt", "-o", tmp_path / "t"], "needs"
    )
    for what in trt.missing_requirements(torch.cuda.is_available()):
        assert what in line
    assert "pip install 'mllmc[trt]'" in line
    assert not (tmp_path / "t").exists()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_run_trt_artifact_says_what_is_missing(tiny_base_artifact, tmp_path, sample_image):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base_artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target_settings"]["target"] = "trt"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(
        ["run", copy, "--image", sample_image, "--prompt", "Hi"], "TensorRT engine"
    )
    assert "pip install 'mllmc[trt]'" in line
