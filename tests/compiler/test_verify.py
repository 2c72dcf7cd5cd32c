"""The oracle comparison: tolerance relative to the logits' size, every step compared on the
engine's own tokens (teacher forcing), each token divergence judged by eager's gap there; and the
dtype / tolerance an artifact records, which `mllmc verify` runs the eager model in and holds it to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mllmc.compiler.verify import compare
from mllmc.runtime.errors import UserError
from mllmc.runtime.manifest import MANIFEST_NAME, Manifest, Precision, read_manifest
from tests.compiler.tools.test_cli import mllmc


def _logits(scale: float, steps: int = 4, vocab: int = 50) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((steps, vocab))
    x[:, 7] += 3  # a clear top-1 at every step
    return (x / np.abs(x).max() * scale).astype(np.float32)


def test_tolerance_scales_with_the_logits():
    tokens = [7, 7, 7, 7]
    small = _logits(0.5)
    assert compare(tokens, small + 9e-5, tokens, small).ok  # |logits| < 1: absolute 1e-4
    assert not compare(tokens, small + 2e-4, tokens, small).ok
    big = _logits(20.0)
    report = compare(tokens, big + 1.5e-3, tokens, big)
    assert report.ok and abs(report.scale - 20.0) < 1e-3  # 1e-4 x 20 = 2e-3
    assert "logit scale 20.0" in report.line()
    assert not compare(tokens, big + 3e-3, tokens, big).ok


def test_token_divergence_fails_unless_a_near_tie():
    ref = _logits(1.0)
    # eager ran free (fed its own 7s): step 2 is a clear divergence, step 3 cannot be compared
    report = compare([7, 7, 3, 7], ref, [7, 7, 7, 7], ref)
    assert not report.ok and len(report.step_diffs) == 3 and "other tokens" in report.line()
    tie = ref.copy()
    tie[2, 3] = tie[2, 7]  # two equal top logits at step 2: eager's argmax picks 3, 7 is as right
    tokens = [7, 7, 7, 7]
    report = compare(tokens, tie, tokens, tie)  # teacher-forced: eager fed the engine's tokens
    assert report.ok and len(report.step_diffs) == 4 and not report.tokens_match
    (d,) = report.divergences
    assert (d.step, d.engine_token, d.eager_token, d.gap) == (2, 7, 3, 0.0)
    assert "step 2 engine 7 / eager 3" in report.line() and "a near-tie" in report.line()
    assert report.summary()["divergences"] == [
        {"step": 2, "engine_token": 7, "eager_token": 3, "gap": 0.0}
    ]


def test_wrong_after_a_near_tie_fails():
    """An engine right until a near-tie and wrong after it: every step after the tie is still
    compared, on the engine's tokens, and fails."""
    eager = _logits(1.0)
    eager[1, 3] = eager[1, 7] - 1e-5  # a near-tie at step 1: the engine picks the runner-up
    tokens = [7, 3, 7, 7]
    engine = eager.copy()
    engine[2:] += 0.5  # right until the tie, wrong after it
    report = compare(tokens, engine, tokens, eager)
    assert not report.ok and len(report.step_diffs) == 4, report.line()
    assert [d.step for d in report.divergences] == [1] and "a near-tie" in report.line()
    # eager run free after the tie (its own 7 at step 1): only steps 0-1 compare, so it fails
    assert not compare(tokens, engine, [7, 7, 7, 7], eager).ok
    # right after the tie too: passes, the tie reported
    assert compare(tokens, eager, tokens, eager).ok


def test_a_divergence_beyond_twice_the_bound_fails():
    """Logits within the bound, but a token the logits cannot explain (eager's gap > 2 x bound)."""
    eager = _logits(1.0)
    tokens = [7, 7, 3, 7]  # step 2 picks token 3, far below eager's (and the engine's) top-1
    report = compare(tokens, eager + 5e-5, tokens, eager)
    assert report.max_abs_logit_diff <= report.bound and not report.ok
    assert "not a near-tie" in report.line()
    # fewer engine steps than asked for is a failure, never a pass over what is there
    assert not compare(tokens[:2], eager[:2], tokens[:2], eager[:2], steps=4).ok


def test_verify_teacher_forces_eager_with_the_engines_tokens(tiny_model_dir, monkeypatch):
    """`verify` with a fake engine that takes eager's runner-up at step 1 (a near-tie under a
    tolerance of that gap) and is wrong afterwards: every step is compared and it fails."""
    import mllmc.runtime
    from mllmc.compiler.core.capture import load_model
    from mllmc.compiler.verify import eager_generate, probe_image, verify

    model, info = load_model(tiny_model_dir)
    image, prompt = probe_image(), "Describe the image."
    free, free_logits = eager_generate(model, tiny_model_dir, image, prompt, 4)
    runner_up = int(np.argsort(free_logits[1])[-2])
    gap = float(free_logits[1, free[1]] - free_logits[1, runner_up])
    tokens = [free[0], runner_up, 0, 0]
    for step in (2, 3):  # after the tie, eager's own choices on the engine's prefix
        forced, logits = eager_generate(model, tiny_model_dir, image, prompt, 4, tokens=tokens)
        tokens[step] = int(np.argmax(logits[step]))
    assert forced[:3] == tokens[:3] and np.array_equal(logits[:2], free_logits[:2])
    assert not np.allclose(logits[2:], free_logits[2:])  # later steps see the engine's prefix

    def fake_engine(engine_logits: np.ndarray) -> SimpleNamespace:
        result = SimpleNamespace(token_ids=tokens, logits=engine_logits)
        manifest = SimpleNamespace(precision=Precision())  # float weights
        return SimpleNamespace(generate=lambda *a, **k: result, manifest=manifest)

    wrong = logits.copy()
    wrong[2:] += 3 * gap * max(1.0, float(np.abs(logits).max()))  # 3 x the bound
    monkeypatch.setattr(mllmc.runtime, "load", lambda _: fake_engine(wrong))
    report = verify("unused", model, info, [], image, prompt, max_new_tokens=4, tol=gap)
    assert not report.ok and len(report.step_diffs) == 4, report.line()
    assert [d.step for d in report.divergences] == [1]
    monkeypatch.setattr(mllmc.runtime, "load", lambda _: fake_engine(logits))
    report = verify("unused", model, info, [], image, prompt, max_new_tokens=4, tol=gap)
    assert report.ok and [d.step for d in report.divergences] == [1], report.line()


def _with(data: dict, dtype: str | None = None, **changes: object) -> dict:
    """The manifest JSON `data` with `changes`, and the engines' dtype (kept in the manifest's
    target settings) set to `dtype` when given."""
    out = {**data, **changes}
    if dtype is not None:
        out["target_settings"] = {**data["target_settings"], "dtype": dtype}
    return out


def _copy_with_manifest(artifact: Path, dest: Path, **changes: object) -> Path:
    shutil.copytree(artifact, dest)
    data = json.loads((dest / MANIFEST_NAME).read_text())
    (dest / MANIFEST_NAME).write_text(json.dumps(_with(data, **changes)))
    return dest


def test_manifest_records_dtype_and_tolerance(tiny_base_artifact):
    m = read_manifest(tiny_base_artifact)
    assert (m.dtype, m.tol) == ("float32", 1e-4)
    assert m.validation is not None and m.validation["dtype"] == "float32"
    assert m.validation["ok"] and isinstance(m.validation["divergences"], list)
    # a manifest that records neither (older artifacts) reads as float32 at float32's tolerance
    data = json.loads((tiny_base_artifact / MANIFEST_NAME).read_text())
    old = {k: v for k, v in data.items() if k not in ("target_settings", "tol")}
    old = Manifest.from_json({**old, "format_version": 2, "target": "onnx"})
    assert (old.dtype, old.tol) == ("float32", 1e-4)
    for changes, match in [
        ({"dtype": "float8"}, "unknown dtype 'float8'"),
        ({"tol": -1}, "tol must be a positive number"),
        ({"tol": "big"}, "tol should be a finite number"),
    ]:
        with pytest.raises(UserError, match=match):
            Manifest.from_json(_with(data, **changes))


def test_verify_runs_eager_in_the_artifacts_dtype_at_its_tolerance(
    tiny_base_artifact, tiny_model_dir, tmp_path
):
    """An artifact recording bfloat16 at 0.25: `mllmc verify` runs the eager model in bfloat16
    (so it differs from the float32 engine by far more than 1e-4) and holds it to 0.25; --tol
    still overrides."""
    from mllmc.compiler.verify import verify_artifact

    art = _copy_with_manifest(tiny_base_artifact, tmp_path / "bf16", dtype="bfloat16", tol=0.25)
    proc = mllmc("verify", art, "--against", tiny_model_dir, "--max-new-tokens", "4")
    assert proc.stdout.startswith("PASS") and "tol 0.25" in proc.stdout, proc.stdout
    assert "bfloat16" in proc.stdout and "over 4 of 4 steps" in proc.stdout, proc.stdout
    report = verify_artifact(art, tiny_model_dir, max_new_tokens=2, tol=1e-4)
    assert report.dtype == "bfloat16" and report.max_abs_logit_diff > 1e-3
    assert not report.ok and report.tol == 1e-4


def test_verify_opens_image_files_as_the_runtime_does(tiny_base_artifact, tiny_model_dir, tmp_path):
    """A transparent PNG and a JPEG with an EXIF rotation: the engine and the eager oracle open
    the file the same way (transformers' `load_image`: orientation applied, alpha dropped), so a
    correct artifact passes on them."""
    from PIL import Image

    from mllmc.compiler.verify import verify_artifact

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (40, 56, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rotated.jpg", exif=exif)
    for name in ("alpha.png", "rotated.jpg"):
        report = verify_artifact(tiny_base_artifact, tiny_model_dir, tmp_path / name, "x", 8)
        assert report.ok and report.max_abs_logit_diff <= 1e-4, (name, report)


@pytest.mark.slow
def test_bfloat16_aoti_artifact_verifies(tiny_model_dir, tmp_path):
    """A real bfloat16 AOTInductor artifact (~1 min to compile on 2 cores): its manifest records
    its dtype and tolerance, and `mllmc verify` passes it."""
    from mllmc.compiler.pipeline import compile_model

    out = compile_model(
        tiny_model_dir,
        tmp_path / "bf16",
        target="aoti",
        dtype="bfloat16",
        validate=False,
        progress=False,
    ).out_dir
    m = read_manifest(out)
    assert (m.dtype, m.tol, m.validation) == ("bfloat16", 0.25, None)
    proc = mllmc("verify", out, "--against", tiny_model_dir, "--max-new-tokens", "8")
    assert proc.stdout.startswith("PASS") and "bfloat16" in proc.stdout, proc.stdout


def test_a_model_without_chat_template_compiles_and_verifies(tiny_model_dir, tmp_path):
    """Compile's validation and `mllmc verify` choose their own prompt: without a chat template
    it holds the image placeholder itself, so such a model compiles and verifies; a prompt the
    user gives without a placeholder is still the runtime's one line."""
    src = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, src)
    for name in ("chat_template.jinja", "chat_template.json"):
        (src / name).unlink(missing_ok=True)
    art = tmp_path / "art"
    proc = mllmc("compile", src, "-o", art, "-q")
    assert proc.returncode == 0 and "validated against eager" in proc.stdout, proc.stderr
    proc = mllmc("verify", art, "--against", src, "--max-new-tokens", "2")
    assert proc.returncode == 0 and proc.stdout.startswith("PASS"), proc.stdout + proc.stderr
    proc = mllmc("verify", art, "--against", src, "--prompt", "Hi", check=2)
    assert "has no chat template" in proc.stderr, proc.stderr
