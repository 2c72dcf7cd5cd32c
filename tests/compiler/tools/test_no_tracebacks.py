"""Bad input of every kind is one line (exit 2), never a traceback: pass options and recipes,
config.json and processor configs, engine files and manifests, onnxruntime's own log, and the
Python API's arguments. The console-script cases that need no model run in one process
(`main()` per case), which also shows they are refused before torch is imported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mllmc.runtime.errors import UserError
from tests.compiler.tools.test_cli import MLLMC


def refused_before_torch(cases: list[tuple[list[Any], str]]) -> None:
    """Run each (argv, match) case through the CLI's `main()` in one fresh process: each must
    exit 2 with exactly one line on stderr, `mllmc: error: ...` containing `match` (a traceback
    ends the process), and torch must never have been imported."""
    code = (
        "import contextlib, io, json, sys\n"
        "from mllmc.compiler.tools.cli import main\n"
        "results = []\n"
        "for case in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        results.append([main(case), err.getvalue()])\n"
        "print(json.dumps({'results': results, 'torch': 'torch' in sys.modules}))\n"
    )
    arg = json.dumps([[str(a) for a in argv] for argv, _ in cases])
    proc = subprocess.run(
        [sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for (argv, match), (exit_code, err) in zip(cases, out["results"], strict=True):
        lines = err.splitlines()
        assert exit_code == 2 and len(lines) == 1, (argv, exit_code, err)
        assert lines[0].startswith("mllmc: error:") and match in lines[0], (argv, lines[0])
    assert out["torch"] is False


def test_pass_options_are_type_checked_before_torch_loads(tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    cases = [
        ("shortv:lc=5", "lc must be a string, got 5 (to mean the text, quote it: lc='5')"),
        ("shortv:lc=[1,2]", "lc must be a string, got [1, 2]"),
        ("shortv:ratio=abc", "ratio must be a number, got 'abc'"),
        ("shortv:layers=[1,'x']", "layers must be a list of integers"),
        ("fastv:k=2.5", "k must be an integer, got 2.5"),
        ("fastv:k=2,k=3", "option 'k' is given twice in 'fastv:k=2,k=3'"),
        ("fastv:x=1", "unknown option 'x' for pass 'fastv'; valid options: k, ratio"),
        ("vte:calib=[1]", "calib must be a string"),
        ("fastervlm:keep=True", "keep must be an integer, got True"),
    ]
    refused_before_torch(
        [(["compile", tiny_model_dir, "--pass", spec, "-o", out], m) for spec, m in cases]
    )
    assert not out.exists()


def test_recipes_of_the_wrong_shape_are_one_line(tiny_model_dir, tmp_path):
    recipes = {
        "table.toml": ('[pass]\nname = "shortv"\n', "got one [pass] table (write [[pass]]"),
        "string.toml": ('pass = "shortv"\n', "'pass' must be [[pass]] tables"),
        "ints.toml": ("pass = [1, 2]\n", "'pass' must be [[pass]] tables"),
        "name-list.toml": ('[[pass]]\nname = ["shortv"]\n', "a [[pass]] name must be a string"),
        "typo.toml": ('[[passes]]\nname = "shortv"\n', "unknown key 'passes'"),
        "none-opts.toml": ('[[pass]]\nname = "none"\nk = 1\n', "pass 'none' takes no options"),
        "lc-int.toml": ('[[pass]]\nname = "shortv"\nlc = 5\n', "lc must be a string"),
    }
    cases = []
    for name, (text, match) in recipes.items():
        (tmp_path / name).write_text(text)
        cases.append(
            (["compile", tiny_model_dir, "--recipe", tmp_path / name, "-o", tmp_path / "o"], match)
        )
    refused_before_torch(cases)


def image(**values: Any) -> Callable[[dict], Any]:
    """A change to processor_config.json's image processor settings."""
    return lambda c: c["image_processor"].update(values)


def _copy_with(src: Path, dst: Path, file: str, change: Callable[[dict], Any]) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / file).read_text())
    change(data)
    (dst / file).write_text(json.dumps(data))
    return dst


def test_config_json_and_processor_config_values_are_checked(tiny_model_dir, tmp_path):
    config = {
        "text-list": (lambda c: c.update(text_config=[1]), "text_config must be a JSON object"),
        "vision-str": (
            lambda c: c.update(vision_config="clip"),
            "vision_config must be a JSON object, got str",
        ),
        "type-list": (lambda c: c.update(model_type=["llava"]), "model_type must be a string"),
        "text-type-int": (
            lambda c: c["text_config"].update(model_type=5),
            "text_config.model_type must be a string",
        ),
    }
    processor = {
        "crop": (
            image(crop_size={"height": 32, "width": 32}),
            "crop_size makes 32x32 images, but the vision tower takes 64x64",
        ),
        "std-zeros": (image(image_std=[0, 0, 0]), "image_std must not be 0"),
        "std-zero": (image(image_std=0.0), "image_std must not be 0"),
        "mean-short": (image(image_mean=[0.5, 0.5]), "image_mean must be a finite number"),
    }
    cases = []
    for files, file in ((config, "config.json"), (processor, "processor_config.json")):
        for name, (change, match) in files.items():
            model = _copy_with(tiny_model_dir, tmp_path / name, file, change)
            cases.append((["compile", model, "-o", tmp_path / "o"], match))
    refused_before_torch(cases)
    assert not (tmp_path / "o").exists()


def text(**values: Any) -> Callable[[dict], Any]:
    """A change to config.json's text_config."""
    return lambda c: c["text_config"].update(values)


def test_model_dirs_that_cannot_make_a_model_are_refused_before_torch(tiny_model_dir, tmp_path):
    """A config.json that would make Hugging Face build a default 7B model, sizes out of range
    or that do not fit together, an image token or feature layer out of range, a model dir
    without its tokenizer, and pass options the model cannot take: compile, bench and
    calibrate refuse each in one line before torch loads."""
    nan_config = (tiny_model_dir / "config.json").read_text()
    nan_config = nan_config.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN')
    assert "NaN" in nan_config
    configs = {
        "no-text": (lambda c: c.pop("text_config"), "has no text_config (a JSON object"),
        "null-text": (lambda c: c.update(text_config=None), "has no text_config"),
        "null-vision": (lambda c: c.update(vision_config=None), "has no vision_config"),
        "no-text-type": (lambda c: c["text_config"].pop("model_type"), "has no model_type"),
        "no-hidden": (
            lambda c: c["text_config"].pop("hidden_size"),
            "text_config has no hidden_size",
        ),
        "layers-huge": (
            text(num_hidden_layers=10**12),
            "text_config.num_hidden_layers must be an integer in 1..1024, got 1000000000000",
        ),
        "layers-0": (text(num_hidden_layers=0), "num_hidden_layers must be an integer in 1..1024"),
        "layers-neg": (text(num_hidden_layers=-3), "got -3"),
        "layers-float": (text(num_hidden_layers=6.5), "got 6.5"),
        "layers-bool": (text(num_hidden_layers=True), "got true"),
        "hidden-str": (text(hidden_size="128"), "text_config.hidden_size must be an integer"),
        "positions-huge": (text(max_position_embeddings=2**40), "max_position_embeddings"),
        "eps-zero": (text(rms_norm_eps=0), "text_config.rms_norm_eps must be a number > 0"),
        "heads": (
            lambda c: c["text_config"].update(hidden_size=130, head_dim=None),
            "hidden_size 130 is not divisible by num_attention_heads 4",
        ),
        "kv-heads": (
            text(num_key_value_heads=3),
            "num_attention_heads 4 is not divisible by num_key_value_heads 3",
        ),
        "vocab-100": (text(vocab_size=100), "image_token_index 556 is outside the vocabulary"),
        "token-high": (
            lambda c: c.update(image_token_index=99999),
            "image_token_index 99999 is outside the vocabulary 0..639",
        ),
        "token-neg": (lambda c: c.update(image_token_index=-1), "image_token_index -1 is outside"),
        "tokenizer-vocab": (
            lambda c: c.update(image_token_index=10) or c["text_config"].update(vocab_size=500),
            "vocab_size 500 is smaller than the tokenizer's 557 tokens",
        ),
        "feature-layer": (
            lambda c: c.update(vision_feature_layer=10),
            "vision_feature_layer 10 is outside the vision tower's 2 layers",
        ),
        "feature-layer-neg": (lambda c: c.update(vision_feature_layer=-4), "in -3..2"),
        "feature-list": (
            lambda c: c.update(vision_feature_layer=[-2, -1]),
            "vision_feature_layer [-2, -1] is a list of layers, which mllmc does not support",
        ),
        "patch": (
            lambda c: c["vision_config"].update(patch_size=15),
            "image_size 64 is not divisible by patch_size 15",
        ),
    }
    out = tmp_path / "o"
    cases: list[tuple[list[Any], str]] = []
    for name, (change, match) in configs.items():
        model = _copy_with(tiny_model_dir, tmp_path / name, "config.json", change)
        cases.append((["compile", model, "-o", out], match))
    shutil.copytree(tiny_model_dir, tmp_path / "nan")
    (tmp_path / "nan" / "config.json").write_text(nan_config)
    cases.append((["compile", tmp_path / "nan", "-o", out], "NaN is not a number JSON allows"))
    no_tokenizer = shutil.copytree(tiny_model_dir, tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    match = f"{no_tokenizer} has no tokenizer.json"
    cases += [
        (["compile", no_tokenizer, "-o", out, "--no-validate"], match),
        (["bench", no_tokenizer], match),
        (["calibrate", no_tokenizer, "-o", tmp_path / "lc.json"], match),
        (["bench", tmp_path / "kv-heads"], "not divisible by num_key_value_heads 3"),
        (["bench", tiny_model_dir, "--pass", "fastv:k=6"], "k must be in 1..5 for this 6-layer"),
    ]
    refused_before_torch(cases)
    assert not out.exists() and not (tmp_path / "lc.json").exists()


def test_artifacts_that_do_not_hold_together_are_refused_at_load(
    tiny_base_artifact, sample_image, tmp_path
):
    """An engine file of another model (here: a manifest whose fixed dims differ from the
    file's, the same mismatch either way round), a manifest missing a key any reader needs, and
    an artifact processor config the vision tower cannot take: one line, at load."""

    def segment(name: str, kind: str, i: int, shape: list) -> Callable[[dict], Any]:
        return lambda m: m["segments"][name][kind][i].update(shape=shape)

    manifests = {
        "pixels": (
            segment("vision", "inputs", 0, ["tiles", 3, 84, 84]),
            "vision.onnx does not match the manifest's 'vision' segment: input 'pixel_values' "
            "has shape ['tiles', 3, 64, 64], the manifest says ['tiles', 3, 84, 84]",
        ),
        "hidden": (
            segment("prefill", "inputs", 1, [1, "visual", 192]),
            "'image_features' has shape",
        ),
        "head-dim": (
            segment("decode", "inputs", 3, ["batch", 2, "past_0", 24]),
            "model.head_dim is 32, but the 'decode' segment's past.0.key has shape",
        ),
        "vocab": (
            segment("decode", "outputs", 0, [1, 700]),
            "model.vocab_size is 640, but the 'decode' segment's logits has shape [1, 700]",
        ),
        "dynamic": (
            segment("decode", "inputs", 0, [1, "n"]),
            "the manifest's 'decode' segment says [1, 'n']",
        ),
        "no-flops-key": (
            lambda m: m["flops"]["after"].pop("vision"),
            "missing 'flops.after.vision'",
        ),
        "no-flops-half": (lambda m: m["flops"].pop("before"), "missing 'flops.before'"),
        "flops-str": (
            lambda m: m["flops"]["before"].update(prefill="many"),
            "flops.before.prefill should be an integer",
        ),
        "validation": (
            lambda m: m["validation"].pop("tokens_match"),
            "missing 'validation.tokens_match'",
        ),
        "validation-str": (
            lambda m: m["validation"].update(max_abs_logit_diff="small"),
            "validation.max_abs_logit_diff should be a finite number",
        ),
    }
    run = ["--image", sample_image, "--prompt", "Hi"]
    cases = []
    for name, (change, match) in manifests.items():
        art = _copy_with(tiny_base_artifact, tmp_path / name, "manifest.json", change)
        cases.append((["run", art, *run], match))
        if name.startswith(("no-flops", "flops", "validation")):
            cases.append((["inspect", art], "corrupt artifact manifest"))
    processors = {
        "crop": ({"crop_size": {"height": 32, "width": 32}}, "crop_size makes 32x32 images"),
        "std": ({"image_std": [0.2, 0.0, 0.2]}, "image_std must not be 0"),
    }
    for name, (values, match) in processors.items():
        # the artifact's own normalised image settings: the ones its runtime reads
        art = _copy_with(
            tiny_base_artifact,
            tmp_path / name,
            "image_processor.json",
            lambda c, values=values: c.update(values),
        )
        cases.append((["run", art, *run], match))
    refused_before_torch(cases)


def test_onnxruntime_log_never_reaches_the_terminal(tiny_base_artifact, sample_image, tmp_path):
    """An engine file onnxruntime warns about (an unused initializer: by default it prints
    '[W:onnxruntime:...] Removing initializer' on stderr) runs with nothing on stderr."""
    import onnx
    from onnx import numpy_helper

    art = tmp_path / "art"
    shutil.copytree(tiny_base_artifact, art)
    model = onnx.load(str(art / "vision.onnx"), load_external_data=False)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "unused_x"))
    onnx.save(model, str(art / "vision.onnx"))
    proc = subprocess.run(
        [MLLMC, "run", art, "--image", sample_image, "--prompt", "Hi", "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr


def test_compile_model_checks_its_passes_argument(tiny_model_dir, tmp_path):
    from mllmc.compiler.pipeline import compile_model
    from mllmc.passes import get_pass
    from mllmc.passes.fastv import FastVConfig

    out = tmp_path / "never"
    for passes, error, match in [
        ("shortv", TypeError, "passes must be a list of pass specs"),
        ([123], TypeError, "each pass must be a spec string"),
        ([("shortv", None)], TypeError, "each pass must be a spec string"),
        ([(get_pass("shortv"), None)], TypeError, "must be a ShortVConfig, got NoneType"),
        ([(get_pass("shortv"), FastVConfig())], TypeError, "must be a ShortVConfig"),
        (["shortv:lc=5"], UserError, "lc must be a string"),
    ]:
        with pytest.raises(error, match=match):
            compile_model(tiny_model_dir, out, passes, progress=False)
    assert not out.exists()
