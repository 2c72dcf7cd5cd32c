"""`--target aoti` on tiny-llava, CPU: the ShortV artifact (compiled once per session, with both
decode programs, `--decode-cache static`: one AOTI compile of tiny-llava is ~1-2 min on 2 cores)
matches HF eager with the pass's eager reference (<= 1e-4, identical greedy tokens over 16 steps)
and the ONNX artifact of the same pipeline with either decode, runs through `mllmc run` /
`inspect` / `golden check` / Python `load()`, and bad input is one line, exit 2. The artifact
without passes (growing-cache decode only, the CPU default) is checked the same way in a slow
test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mllmc.runtime import UserError, load
from tests.conftest import TINY_SHORTV_LAYERS

MLLMC = str(Path(sys.executable).parent / "mllmc")
GOLDENS = Path(__file__).parents[2] / "goldens"


def run_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([MLLMC, *map(str, args)], capture_output=True, text=True, timeout=900)


def one_line_error(proc: subprocess.CompletedProcess, match: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mllmc")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def tiny_aoti_shortv(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllmc.compiler.pipeline import compile_model

    out = tmp_path_factory.mktemp("artifacts") / "tiny-aoti-shortv"
    spec = f"shortv:layers={TINY_SHORTV_LAYERS}"
    return compile_model(
        tiny_model_dir, out, [spec], target="aoti", decode_cache="static", progress=False
    ).out_dir


def check_parity(artifact: Path, model_dir: Path, image: Path, device: str = "cpu") -> None:
    from mllmc.compiler.core.capture import load_model
    from mllmc.compiler.verify import LOGIT_TOL, records_from_manifest, verify

    engine = load(artifact)
    assert engine.manifest.target == "aoti" and engine.manifest.target_settings.device == device
    model, info = load_model(model_dir)
    records = records_from_manifest(engine.manifest)
    report = verify(artifact, model, info, records, image=image, max_new_tokens=16)
    assert len(report.step_diffs) == 16, report.line()
    assert report.tokens_match and report.max_abs_logit_diff <= LOGIT_TOL, report.line()


def test_aoti_shortv_matches_eager_reference(tiny_aoti_shortv, tiny_model_dir, sample_image):
    files = sorted(p.name for p in tiny_aoti_shortv.iterdir() if p.suffix == ".pt2")
    assert files == ["decode.pt2", "decode_static.pt2", "prefill.pt2", "vision.pt2"]
    assert type(load(tiny_aoti_shortv).runners["decode"]).__name__ == "StaticCacheDecoder"
    check_parity(tiny_aoti_shortv, tiny_model_dir, sample_image)


def test_aoti_matches_onnx_same_pipeline(tiny_aoti_shortv, tiny_shortv_artifact, sample_image):
    onnx = load(tiny_shortv_artifact)
    o = onnx.generate(sample_image, "Describe the image.", 16, stop_at_eos=False)
    for decode_cache in ("static", "growing"):  # both decode programs of the artifact
        aoti = load(tiny_aoti_shortv, decode_cache=decode_cache)
        a = aoti.generate(sample_image, "Describe the image.", 16, stop_at_eos=False)
        assert a.token_ids == o.token_ids, decode_cache
        assert np.abs(a.logits - o.logits).max() <= 1e-4, decode_cache
    # the same manifest, but for the target and its settings
    assert aoti.manifest.layers == onnx.manifest.layers
    assert aoti.manifest.visual_tokens == onnx.manifest.visual_tokens


def test_aoti_batched_decode(tiny_aoti_shortv, sample_image, tall_image):
    """The growing-cache decode program takes any batch (B is dynamic in the compiled program):
    each sample gets what it gets alone. The static-cache decode runs one sample a step:
    generate_batch decodes its samples in turn there, and a batched step is one line."""
    images = [[sample_image], [tall_image, sample_image]]
    prompts = ["Describe the image.", "What differs between the two pictures, in a few words?"]
    steps = [6, 4]
    for decode_cache, max_batch in (("growing", None), ("static", 1)):
        engine = load(tiny_aoti_shortv, decode_cache=decode_cache)
        assert engine.max_decode_batch == max_batch
        results = engine.generate_batch(images, prompts, steps, stop_at_eos=False)
        for result, imgs, prompt, n in zip(results, images, prompts, steps, strict=True):
            want = engine.generate(images=imgs, prompt=prompt, max_new_tokens=n, stop_at_eos=False)
            assert result.token_ids == want.token_ids, decode_cache
            assert np.abs(result.logits - want.logits).max() <= 1e-4, decode_cache
    layout = engine.encode_prompt("Describe the image.")
    _, cache = engine.prefill(layout, engine.encode_image(sample_image))
    batch = engine.new_batch()
    batch.join(0, cache)
    batch.join(1, cache)
    n = layout.next_position
    with pytest.raises(
        UserError, match="this engine decodes at most 1 sample a step, the batch has 2"
    ):
        engine.decode_batch_step([5, 5], [n, n], batch)


def test_aoti_cli_run_inspect_golden(tiny_aoti_shortv, sample_image):
    proc = run_cli("run", tiny_aoti_shortv, "--image", sample_image, "--prompt", "Hi", "--json")
    assert proc.returncode == 0, proc.stderr
    tokens = json.loads(proc.stdout)["token_ids"]
    assert len(tokens) >= 1
    args = ("run", tiny_aoti_shortv, "--image", sample_image, "--prompt", "Hi", "--json")
    proc = run_cli(*args, "--no-cuda-graphs")  # what the CPU runs anyway: the same tokens
    assert proc.returncode == 0 and json.loads(proc.stdout)["token_ids"] == tokens, proc.stderr
    proc = run_cli("inspect", tiny_aoti_shortv)
    assert proc.returncode == 0 and "aoti" in proc.stdout, proc.stderr
    # the ONNX ShortV golden (same model, same pass) holds for the AOTI engine too
    proc = run_cli("golden", "check", tiny_aoti_shortv, GOLDENS / "tiny-llava-shortv.json")
    assert proc.returncode == 0 and "passed" in proc.stdout, proc.stdout + proc.stderr


def test_aoti_package_for_another_device(tiny_aoti_shortv, tmp_path, sample_image):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_aoti_shortv, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target_settings"]["device"] = "cuda"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("run", copy, "--image", sample_image, "--prompt", "Hi")
    one_line_error(proc, "vision.pt2 was compiled for cpu, the manifest says cuda")


def test_aoti_swapped_package(tiny_aoti_shortv, tmp_path, sample_image):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_aoti_shortv, copy)
    shutil.copy(copy / "decode.pt2", copy / "prefill.pt2")
    proc = run_cli("run", copy, "--image", sample_image, "--prompt", "Hi")
    one_line_error(proc, "prefill.pt2 does not match the manifest's 'prefill' segment")


def test_aoti_bad_options(tiny_model_dir, tmp_path):
    out = tmp_path / "x"
    one_line_error(
        run_cli("compile", tiny_model_dir, "-o", out, "--target", "aoti", "--dtype", "float8"),
        "unknown dtype 'float8'",
    )
    one_line_error(
        run_cli("compile", tiny_model_dir, "-o", out, "--target", "aoti", "--device", "tpu"),
        "unknown device 'tpu'",
    )
    one_line_error(
        run_cli("compile", tiny_model_dir, "-o", out, "--dtype", "bfloat16"),
        "target 'onnx' builds float32 engines",
    )
    one_line_error(
        run_cli(
            "compile", tiny_model_dir, "-o", out, "--target", "trt", "--decode-cache", "static"
        ),
        "--decode-cache static is built for --target aoti and onnx",
    )
    one_line_error(
        run_cli("compile", tiny_model_dir, "-o", out, "--target", "aoti", "--decode-cache", "x"),
        "invalid choice: 'x'",
    )
    if not torch.cuda.is_available():
        one_line_error(
            run_cli("compile", tiny_model_dir, "-o", out, "--target", "aoti", "--device", "cuda"),
            "no CUDA device on this machine",
        )
    assert not out.exists()


def test_aoti_runtime_options_that_cannot_apply(tiny_aoti_shortv, tiny_base_artifact, tmp_path):
    from mllmc.runtime.errors import UserError

    with pytest.raises(UserError, match="CUDA graphs need an artifact compiled for CUDA"):
        load(tiny_aoti_shortv, cuda_graphs=True)
    with pytest.raises(UserError, match="CUDA graphs are built for aoti artifacts"):
        load(tiny_base_artifact, cuda_graphs=True)
    with pytest.raises(UserError, match="decode_cache must be"):
        load(tiny_aoti_shortv, decode_cache="paged")
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_aoti_shortv, renamed)
    manifest = json.loads((renamed / "manifest.json").read_text())
    manifest["segments"]["decode_static"]["inputs"][2]["name"] = "lengths"
    (renamed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="decode_static segment's inputs do not match decode's"):
        load(renamed)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_aoti_shortv, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["segments"]["decode_static"]
    manifest["target_settings"]["decode_cache"] = "growing"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="recompile it with --decode-cache static"):
        load(copy, decode_cache="static")
    assert type(load(copy).runners["decode"]).__name__ == "TorchCallRunner"


@pytest.mark.slow  # a second AOTI compile (~1-2 min)
def test_aoti_base_matches_hf(tiny_model_dir, tmp_path, sample_image):
    from mllmc.compiler.pipeline import compile_model

    out = compile_model(tiny_model_dir, tmp_path / "base", target="aoti", progress=False).out_dir
    check_parity(out, tiny_model_dir, sample_image)


def test_aoti_weights_once(tiny_aoti_shortv, tiny_model_dir):
    """The packages hold code only; weights.pt holds each tensor once, prefill and decode read
    the same keys (and, loaded, the same memory)."""
    from mllmc.runtime.runners.aoti import CONSTANTS_KEY, package_metadata

    weights = (tiny_aoti_shortv / "weights.pt").stat().st_size
    model_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    assert weights < 1.05 * model_bytes, (weights, model_bytes)
    maps = {
        seg: json.loads(package_metadata(tiny_aoti_shortv / f"{seg}.pt2")[CONSTANTS_KEY])
        for seg in ("prefill", "decode")
    }
    layer_keys = {k for k in maps["decode"].values() if k.startswith("layers.")}
    assert layer_keys and layer_keys <= set(maps["prefill"].values())
    static = json.loads(package_metadata(tiny_aoti_shortv / "decode_static.pt2")[CONSTANTS_KEY])
    # the decoder weights again, not a second copy (each program has its own rope table)
    assert {k for k in static.values() if k.startswith("layers.")} == layer_keys
    for decode_cache in ("static", "growing"):
        engine = load(tiny_aoti_shortv, decode_cache=decode_cache)
        pre, dec = engine.runners["prefill"].weights, engine.runners["decode"].weights
        assert pre is dec  # one set of tensors for every package


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_aoti_cuda_graphs_match_eager(tiny_model_dir, tmp_path, sample_image):
    """--device cuda (static-cache decode by default): vision and prefill as one graph replay
    per shape, each decode step as one replay, against HF eager with the pass's reference and
    against the same packages run call by call (fp32, TF32 off)."""
    from mllmc.compiler.pipeline import compile_model

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        spec = f"shortv:layers={TINY_SHORTV_LAYERS}"
        out = compile_model(
            tiny_model_dir, tmp_path / "cuda", [spec], target="aoti", device="cuda", progress=False
        ).out_dir
        engine = load(out)
        assert engine.manifest.target_settings.decode_cache == "static"
        assert engine.runners["decode"].cuda_graphs
        check_parity(out, tiny_model_dir, sample_image, device="cuda")
        eager = load(out, cuda_graphs=False)
        for _ in range(2):  # the second run replays the graphs the first one captured
            a = engine.generate(sample_image, "Describe the image.", 16, stop_at_eos=False)
            b = eager.generate(sample_image, "Describe the image.", 16, stop_at_eos=False)
            assert a.token_ids == b.token_ids
            assert np.abs(a.logits - b.logits).max() <= 1e-4
        assert engine.runners["decode"].replays == 30 and engine.runners["decode"].captures >= 1
        assert engine.runners["prefill"].fn.replays == 2
        assert not eager.runners["decode"].cuda_graphs
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
