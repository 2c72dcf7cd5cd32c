"""Weight-only int4 / int8 ONNX engines (compiler/backends/quantize.py).

The round trip the eager reference applies is checked bit for bit against onnxruntime's own
quantizer; the compiled artifacts are checked against that reference: at accuracy level 0
(float32 compute) to the float32 tolerance, which only an exact round trip passes, and at the
default level 4 (int8 activations) to its own tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mllmc.compiler.backends.quantize import (
    DEFAULT_PARTS,
    quantize_config,
    quantized_tol,
    quantized_weights,
    roundtrip_gather_weight,
    roundtrip_matmul_weight,
)
from mllmc.runtime.errors import UserError
from mllmc.runtime.manifest import FLOAT32_TOL, Precision, read_manifest

MLLMC = str(Path(sys.executable).parent / "mllmc")
PASSES = ["fastv:k=2,ratio=0.5", "shortv:layers=[3,4]"]


def _weights(n: int, k: int, seed: int) -> np.ndarray:
    """(N, K) weights with the cases rounding rules split on: values on a coarse grid (exact
    .5 ties after scaling), blocks whose max and min have the same magnitude, an all-zero block."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[: n // 2] = np.round(w[: n // 2] * 16) / 16  # bf16-like grid: many ties
    w[::3, 0], w[::3, 1] = 2.5, -2.5  # |max| == |min| in the first block
    w[1, :16] = 0.0
    return w


def _ort_dequantized(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """W (N, K) through onnxruntime's MatMulNBits quantizer kernel and back."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w.shape
    blocks, per_byte = -(-k // block), 8 // bits
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = w.T
    packed = np.zeros((n, blocks, block // per_byte), np.uint8)
    zero_points = np.zeros((n, -(-blocks // per_byte)), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, padded, scales, zero_points, block, n, blocks * block, True)
    if bits == 4:
        q = np.stack([packed & 15, packed >> 4], -1).reshape(n, blocks, block)
    else:
        q = packed.reshape(n, blocks, block)
    mid = 1 << (bits - 1)
    return ((q.astype(np.float32) - mid) * scales[..., None]).reshape(n, -1)[:, :k]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [16, 32, 128])
def test_matmul_roundtrip_is_onnxruntimes_bit_for_bit(bits: int, block: int):
    w = _weights(48, 200, seed=bits + block)  # K = 200: the last block is padded
    ours = roundtrip_matmul_weight(torch.from_numpy(w), bits, block).numpy()
    np.testing.assert_array_equal(ours, _ort_dequantized(w, bits, block))
    assert np.abs(ours - w).max() > 0  # it did quantize


@pytest.mark.parametrize("block", [16, 32])
def test_gather_roundtrip_is_the_quantizers_bit_for_bit(block: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    w = _weights(40, 96, seed=block)
    with np.errstate(invalid="ignore"):
        packed, scales, _ = DefaultWeightOnlyQuantizer.quantize_ndarray(w, 1, block, True)
    low, high = packed & 15, packed >> 4
    q = np.stack([low, high], -1).reshape(w.shape).astype(np.int8)
    q = np.where(q > 7, q - 16, q).astype(np.float32)  # two's complement nibbles
    theirs = (q.reshape(40, -1, block) * scales[..., None]).reshape(w.shape)
    ours = roundtrip_gather_weight(torch.from_numpy(w), block).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_config_defaults_keep_and_parts():
    cfg = quantize_config("int4")
    assert (cfg.bits, cfg.block_size, cfg.accuracy_level, cfg.parts) == (4, 32, 4, DEFAULT_PARTS)
    cfg = quantize_config("int4", 128, 0, keep="lm_head,embedding", parts=["vision"])
    assert cfg.parts == ("decoder", "vision") and cfg.block_size == 128
    # onnxruntime's quantizer writes GatherBlockQuantized for 4 bits only
    assert quantize_config("int8").parts == ("decoder", "lm_head")
    assert quantize_config("int8").block_size == 128 and quantize_config("int4").block_size == 32
    assert quantize_config(None) is None
    assert quantized_tol(quantize_config("int8", accuracy_level=0).record()) == FLOAT32_TOL


@pytest.mark.parametrize(
    "kwargs, valid",
    [
        ({"weights": "int3"}, "int4, int8"),
        ({"weights": "int4", "block_size": 33}, "16, 32, 64, 128, 256"),
        ({"weights": "int4", "accuracy_level": 5}, "0, 1, 2, 3, 4"),
        ({"weights": "int4", "keep": "decoder"}, "lm_head, embedding"),
        ({"weights": "int4", "parts": "lm_head"}, "vision, projector"),
        ({"weights": None, "block_size": 64}, "--quantize int4|int8"),
    ],
)
def test_config_refuses_bad_values_naming_valid_ones(kwargs: dict, valid: str):
    with pytest.raises(UserError, match=valid):
        quantize_config(**kwargs)


def test_roundtrip_reference_moves_logits_and_restores_weights(tiny_model_dir: Path):
    """The reference is not the float model: the round trip moves the logits far past the
    tolerance, and the weights come back afterwards."""
    from mllmc.compiler.core.capture import load_model

    model, _ = load_model(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with quantized_weights(model, quantize_config("int4").record()) as q:
            moved = (q(input_ids=ids).logits - ref).abs().max().item()
        after = model(input_ids=ids).logits
    assert moved > 10 * quantized_tol(Precision("int4", 32, 4, DEFAULT_PARTS))
    torch.testing.assert_close(after, ref, rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([MLLMC, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_tied_embedding_and_lm_head_each_take_their_rule():
    """A weight tied between the embedding (GatherBlockQuantized: round half to even) and
    lm_head (MatMulNBits: MLAS's rounding) gets each rule on its own module; the tie is back
    afterwards."""
    lm = torch.nn.Module()
    lm.embed_tokens = torch.nn.Embedding(40, 64)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.language_model = lm
    model.lm_head = torch.nn.Linear(64, 40, bias=False)
    model.lm_head.weight = lm.embed_tokens.weight  # tied
    w = torch.from_numpy(_weights(40, 64, seed=3))
    lm.embed_tokens.weight.data = w.clone()
    with quantized_weights(model, quantize_config("int4").record()):
        assert torch.equal(lm.embed_tokens.weight, roundtrip_gather_weight(w, 32))
        assert torch.equal(model.lm_head.weight, roundtrip_matmul_weight(w, 4, 32))
    assert model.lm_head.weight is lm.embed_tokens.weight and torch.equal(model.lm_head.weight, w)


@pytest.fixture(scope="module")
def int4_artifact(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llava, int4 defaults (block 32, accuracy level 4), validated at compile time."""
    from mllmc.compiler.pipeline import compile_model

    out = tmp_path_factory.mktemp("quantize") / "int4"
    return compile_model(tiny_model_dir, out, quantize="int4", progress=False).out_dir


def _ops(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_int4_artifact_validated_and_recorded(int4_artifact: Path):
    m = read_manifest(int4_artifact)
    assert m.precision == Precision("int4", 32, 4, DEFAULT_PARTS, "matmulnbits")
    assert m.tol == quantized_tol(m.precision) and m.validation["ok"]
    assert m.validation["max_abs_logit_diff"] <= m.tol * m.validation["logit_scale"]
    for seg in ("prefill", "decode"):
        ops = _ops(int4_artifact / f"{seg}.onnx")
        # 6 layers x 7 Linears + lm_head; the embedding gather
        assert ops["MatMulNBits"] == 43 and ops["GatherBlockQuantized"] == 1
        assert "Gemm" not in ops
    assert "MatMulNBits" not in _ops(int4_artifact / "vision.onnx")  # not asked for


def _external(path: Path) -> set[tuple[int, int]]:
    model = onnx.load(str(path), load_external_data=False)
    spans = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            d = {e.key: e.value for e in init.external_data}
            spans.add((int(d["offset"]), int(d["length"])))
    return spans


def test_int4_weights_stored_once(int4_artifact: Path, tiny_model_dir: Path):
    prefill, decode = (
        _external(int4_artifact / "prefill.onnx"),
        _external(int4_artifact / "decode.onnx"),
    )
    assert prefill and prefill == decode  # every quantized tensor shared, at the same offset
    data = (int4_artifact / "weights.data").stat().st_size
    float_bytes = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    assert data < 0.3 * float_bytes


def test_int4_fused_decode_fuses_norms_over_the_stored_weights(int4_artifact: Path):
    """The fused decode step runs one SkipSimplifiedLayerNormalization per residual add and no
    separate norm inside the layers, and reads the prefill's stored int4 tensors (it adds none)."""
    info = read_manifest(int4_artifact).model
    ops = _ops(int4_artifact / "decode_static.onnx")
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * info.num_layers
    assert ops["GroupQueryAttention"] == info.num_layers
    assert _external(int4_artifact / "decode_static.onnx") <= _external(
        int4_artifact / "prefill.onnx"
    )


def test_verify_holds_int4_to_the_roundtrip_reference(int4_artifact: Path, tiny_model_dir: Path):
    out = _cli("verify", int4_artifact, "--against", tiny_model_dir, "--max-new-tokens", 6)
    assert out.returncode == 0 and out.stdout.startswith("PASS"), out.stdout + out.stderr
    assert "tol 0.05" in out.stdout


def test_inspect_shows_precision_and_bytes(int4_artifact: Path):
    out = subprocess.run([MLLMC, "inspect", str(int4_artifact)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("weights"))
    assert "int4 weights (block 32, accuracy level 4)" in line and "MiB" in line
    data = json.loads(
        subprocess.run(
            [MLLMC, "inspect", str(int4_artifact), "--json"], capture_output=True, text=True
        ).stdout
    )
    assert data["target_settings"]["precision"]["weights"] == "int4"
    assert data["engine_bytes"] > (int4_artifact / "weights.data").stat().st_size


def test_int8_after_passes_matches_roundtrip_exactly(tiny_model_dir: Path, tmp_path: Path):
    """fastv + shortv rewrite the graphs first, then the MatMuls are quantized: at accuracy
    level 0 the engine holds the float32 tolerance against the round-trip reference, which
    only the very weights MatMulNBits multiplies by can."""
    from mllmc.compiler.pipeline import compile_model

    cfg = quantize_config("int8", block_size=16, accuracy_level=0, parts="projector")
    m = compile_model(tiny_model_dir, tmp_path / "a", PASSES, quantize=cfg, progress=False).manifest
    assert [p.name for p in m.passes] == ["fastv", "shortv"]
    assert m.tol == FLOAT32_TOL and m.validation["ok"] and m.validation["tokens_match"]
    assert m.precision.parts == ("decoder", "lm_head", "projector")
    assert _ops(tmp_path / "a" / "vision.onnx")["MatMulNBits"] == 2  # the projector's two


@pytest.mark.parametrize(
    "args, says",
    [
        (["--quantize", "int3"], "valid: int4, int8"),
        (["--quantize", "int4", "--block-size", "48"], "16, 32, 64, 128, 256"),
        (["--quantize", "int4", "--accuracy-level", "9"], "0, 1, 2, 3, 4"),
        (["--quantize", "int4", "--quantize-keep", "decoder"], "valid: lm_head, embedding"),
        (["--quantize", "int4", "--quantize-parts", "all"], "valid: vision, projector"),
        (["--block-size", "64"], "give --quantize int4|int8"),
        (["--quantize", "int4", "--target", "trt"], "target 'trt' has none"),
        (["--quantize", "int8", "--target", "aoti"], "--target aoti quantizes int4"),
        (
            ["--quantize", "int4", "--target", "aoti", "--block-size", "256"],
            "be one of 32, 64, 128",
        ),
        (["--quantize", "int4", "--eval-task", "mmlu"], "tasks: shapes-qa"),
        (["-n", "5"], "give --eval-task"),
    ],
)
def test_cli_bad_options_one_line_exit_2(tiny_model_dir: Path, tmp_path: Path, args, says):
    out = _cli("compile", tiny_model_dir, "-o", tmp_path / "out", *args)
    assert out.returncode == 2 and says in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_cli_bad_options_refused_before_torch_loads(tiny_model_dir: Path, tmp_path: Path):
    cases = [
        ["--quantize", "int3"],
        ["--quantize", "int4", "--block-size", "0"],
        ["--quantize", "int4", "--target", "trt"],
        ["--accuracy-level", "4"],
    ]
    code = (
        "import json, sys\n"
        "from mllmc.compiler.tools.cli import main\n"
        "codes = [main(case) for case in json.loads(sys.argv[1])]\n"
        "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules}))\n"
    )
    head = ["compile", str(tiny_model_dir), "-o", str(tmp_path / "o")]
    arg = json.dumps([head + case for case in cases])
    proc = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"codes": [2] * len(cases), "torch": False}, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == len(cases)


@pytest.mark.slow  # two compiles and 2 x 12 generations of trained-tiny-llava (~40 s)
def test_cli_quantize_with_eval(trained_model_dir: Path, tmp_path: Path):
    out = _cli(
        "compile", trained_model_dir, "-o", tmp_path / "q", "--quantize", "int4",
        "--eval-task", "shapes-qa", "-n", 12, "-q",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "weights: int4 weights (block 32, accuracy level 4)" in out.stdout
    line = next(x for x in out.stdout.splitlines() if x.startswith("eval:"))
    assert "12 items" in line and "quantized vs" in line and "float32 (" in line
