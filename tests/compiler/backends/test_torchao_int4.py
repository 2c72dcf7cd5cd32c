"""`--target aoti --quantize int4` (torchao's int4 weight-only, CPU) on tiny-llava with
fastervlm + fastv + shortv composed (the float one is tests/compiler/backends/test_aoti_passes.py;
the default suite's aoti artifact is test_aoti.py's shortv): one compile per session (~75 s on
2 cores, so the tests on it are `slow`), validated against the eager model with the same int4 Linears and embedding and the
passes' eager references (the bfloat16 tolerance, identical tokens over 16 steps), failing
against the float model, its weights stored once as int4 codes (and the constant AOTInductor
adds while lowering); `int4_linear` against torchao's own int4 linear, the embedding against
the onnx target's round trip; `mllmc verify` / `inspect`; bad options are one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllmc.runtime import UserError, load
from mllmc.runtime.manifest import Precision, TargetSettings
from tests.passes.test_pruning import PIPELINES

DEFAULT_PARTS = ("decoder", "lm_head", "embedding")

pytest.importorskip("torchao", reason="torchao (the `torchao` extra) is not installed")

MLLMC = str(Path(sys.executable).parent / "mllmc")
BLOCK = 32


@pytest.fixture(scope="module")
def int4_aoti(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllmc.compiler.pipeline import compile_model

    out = tmp_path_factory.mktemp("artifacts") / "tiny-aoti-int4-composed"
    passes = PIPELINES["fastervlm+fastv+shortv"]  # pre-LLM, in-LLM pruning and freezing
    return compile_model(
        tiny_model_dir, out, passes, target="aoti", quantize="int4", progress=False
    ).out_dir


@pytest.mark.slow  # on the int4 AOTI artifact (one ~75 s compile)
def test_int4_aoti_matches_int4_eager(int4_aoti, tiny_model_dir, sample_image):
    from mllmc.compiler.core.capture import load_model
    from mllmc.compiler.verify import records_from_manifest, verify

    engine = load(int4_aoti)
    m = engine.manifest
    assert m.precision == Precision("int4", BLOCK, None, DEFAULT_PARTS, "torchao")
    assert m.validation["ok"] and m.validation["tol"] == 0.05, m.validation
    # a fresh float model: verify swaps in torchao's int4 weights for the oracle, then restores
    model, info = load_model(tiny_model_dir)
    before = {n: p.clone() for n, p in model.named_parameters()}
    report = verify(int4_aoti, model, info, records_from_manifest(m), image=sample_image,
                    max_new_tokens=16, tol=m.tol)  # fmt: skip
    assert len(report.step_diffs) == 16 and report.ok, report.line()
    assert report.tokens_match, report.line()
    after = dict(model.named_parameters())  # the float Linears are back
    assert after.keys() == before.keys() and isinstance(model.lm_head, torch.nn.Linear)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.slow  # on the int4 AOTI artifact (one ~75 s compile)
def test_int4_aoti_is_not_the_float_model(int4_aoti, tiny_model_dir, sample_image, monkeypatch):
    """Held to the float model instead of its int4 twin, the same check fails by far more than
    its tolerance: the engine's weights are the int4 codes, and the check above sees it."""
    import contextlib

    from mllmc.compiler.backends import quantize
    from mllmc.compiler.core.capture import load_model
    from mllmc.compiler.verify import records_from_manifest, verify

    monkeypatch.setattr(quantize, "quantized_weights", lambda m, p: contextlib.nullcontext(m))
    model, info = load_model(tiny_model_dir)
    m = load(int4_aoti).manifest
    report = verify(int4_aoti, model, info, records_from_manifest(m), image=sample_image,
                    max_new_tokens=4, tol=m.tol)  # fmt: skip
    assert not report.ok
    assert report.max_abs_logit_diff > 2 * m.tol * max(1.0, report.scale), report.line()


@pytest.mark.slow  # on the int4 AOTI artifact (one ~75 s compile)
def test_int4_aoti_weights_stored_once_as_codes(int4_aoti, tiny_model_dir):
    from mllmc.compiler.core.capture import load_model

    weights = torch.load(int4_aoti / "weights.pt")
    model, _ = load_model(tiny_model_dir)
    linears = {
        n: mod
        for n, mod in model.model.language_model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    }
    linears["lm_head"] = model.lm_head
    for name, mod in linears.items():
        n_out, n_in = mod.weight.shape
        assert f"{name}.weight" not in weights, name  # no float copy
        codes, scales = weights[f"{name}.qdata"], weights[f"{name}.scale_and_zero"]
        assert codes.dtype == torch.uint8 and codes.numel() == n_out * n_in // 2, name
        assert scales.shape == (n_in // BLOCK, n_out, 2), name
    # prefill and decode read the same codes: none is a segment's own copy (each program has
    # its own rope table)
    assert not [k for k in weights if "/" in k and k.endswith((".qdata", ".scale_and_zero"))]
    lowered = {k: v for k, v in weights.items() if "/lowered/" in k}
    assert lowered and all(v.dtype == torch.int64 and int(v) == BLOCK for v in lowered.values())
    table = model.model.language_model.embed_tokens.weight
    codes = weights["embed_tokens.codes"]
    assert "embed_tokens.weight" not in weights and codes.dtype == torch.uint8
    assert codes.numel() == table.numel() // 2
    assert weights["embed_tokens.scales"].shape == (table.shape[0], table.shape[1] // BLOCK)


@pytest.mark.slow  # on the int4 AOTI artifact (one ~75 s compile)
def test_int4_aoti_missing_lowered_constant(int4_aoti, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(int4_aoti, bad)
    weights = torch.load(bad / "weights.pt")
    dropped = next(k for k in weights if k.startswith("prefill/lowered/"))
    del weights[dropped]
    torch.save(weights, bad / "weights.pt")
    with pytest.raises(UserError, match="corrupt artifact: prefill.pt2 and weights.pt"):
        load(bad)


@pytest.mark.slow  # on the int4 AOTI artifact (one ~75 s compile)
def test_int4_aoti_cli_inspect_and_verify(int4_aoti, tiny_model_dir):
    """`mllmc inspect` shows the precision; `mllmc verify --against` (a fresh float model, which
    loads transformers and so torchao) passes, with torchao's import noise kept off stderr."""
    proc = subprocess.run([MLLMC, "inspect", str(int4_aoti)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    line = "int4 weights (torchao, block 32, bf16 activations): decoder, lm_head, embedding"
    assert line in proc.stdout
    proc = subprocess.run(
        [MLLMC, "verify", str(int4_aoti), "--against", str(tiny_model_dir)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("PASS"), (proc.stdout, proc.stderr)
    assert "Failed to load" not in proc.stderr and "register_constant" not in proc.stderr


@pytest.mark.parametrize("block", [32, 128])
def test_int4_linear_is_torchaos_linear(block):
    """`Int4Linear` (one graph node) computes what torchao's own int4 linear does with the same
    codes on bfloat16 activations, exactly, and the float Linear to within int4's rounding."""
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

    from mllmc.compiler.backends.torchao_int4 import int4_module

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    x = torch.randn(3, 5, 256)
    ours = int4_module(linear, block)(x)
    w = Int4OpaqueTensor.from_hp(linear.weight.detach(), [1, block])
    w.scale_and_zero = w.scale_and_zero.bfloat16()
    theirs = torch.nn.functional.linear(x.bfloat16(), w).float() + linear.bias
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
    exact = linear(x)
    err = float((ours - exact).abs().max() / exact.abs().max())
    assert 1e-3 < err < 0.1, err  # quantized, and close


def test_int4_embedding_is_the_gather_round_trip():
    """`Int4Embedding` gives exactly the rows of onnxruntime's int4 GatherBlockQuantized round
    trip (the onnx target's embedding), from half the bytes of int8 codes."""
    from mllmc.compiler.backends.quantize import roundtrip_gather_weight
    from mllmc.compiler.core.int4_linear import Int4Embedding

    torch.manual_seed(0)
    table = torch.randn(50, 64)
    table[3, :32] = 0  # a block of zeros: scale 0, code 8
    emb = Int4Embedding.quantize(table, 32)
    ids = torch.tensor([[3, 0, 49, 7, 3]])
    assert emb.codes.shape == (50, 32) and emb.codes.dtype == torch.uint8
    assert torch.equal(emb(ids), roundtrip_gather_weight(table, 32)[ids])


def test_int4_linear_is_one_node_the_passes_see(tiny_model_dir):
    from mllmc.compiler.backends.quantize import quantize_config
    from mllmc.compiler.backends.torchao_int4 import quantize_model
    from mllmc.compiler.core import capture, int4_linear
    from mllmc.compiler.core.locator import locate_layers

    model, info = capture.load_model(tiny_model_dir)
    quantize_model(model, quantize_config("int4", target="aoti").record())
    prefill = next(s for s in capture.capture(model, info) if s.name == "prefill")
    layers = locate_layers(prefill.program.graph)
    assert len(layers) == info.num_layers
    assert all(layer.q_proj.target is int4_linear.OP for layer in layers)
    lowered = int4_linear.decompose(prefill.program)
    targets = {n.target for n in lowered.graph.nodes}
    assert int4_linear.OP not in targets
    assert torch.ops.aten._weight_int4pack_mm_for_cpu.default in targets


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": "int8"}, "--target aoti quantizes int4"),
        ({"accuracy_level": 4}, "--accuracy-level sets onnxruntime's MatMulNBits"),
        ({"block_size": 256}, "--block-size on --target aoti must be one of 32, 64, 128 "),
    ],
)
def test_torchao_options_refused(kwargs, match):
    from mllmc.compiler.backends.quantize import quantize_config

    kwargs = {"weights": "int4", **kwargs}
    with pytest.raises(UserError, match=match):
        quantize_config(target="aoti", **kwargs)


def test_torchao_targets_refused():
    from mllmc.compiler.backends import TargetOptions, resolve_options
    from mllmc.compiler.backends.quantize import quantize_config

    torchao = quantize_config("int4", target="aoti")
    assert torchao.parts == DEFAULT_PARTS and torchao.accuracy_level is None
    assert quantize_config("int4", parts="projector", target="aoti").parts == (
        *DEFAULT_PARTS, "projector",
    )  # fmt: skip
    kept = quantize_config("int4", keep="lm_head,embedding", target="aoti")
    assert kept.parts == ("decoder",)
    with pytest.raises(UserError, match="float32 CPU engines"):
        resolve_options("aoti", TargetOptions(dtype="bfloat16", quantize=torchao))
    with pytest.raises(UserError, match="float32 CPU engines"):
        resolve_options("aoti", TargetOptions(device="cuda", quantize=torchao))  # no GPU needed
    with pytest.raises(UserError, match="target 'onnx' quantizes with matmulnbits"):
        resolve_options("onnx", TargetOptions(quantize=torchao))
    with pytest.raises(UserError, match=r"target 'aoti' quantizes with torchao: make them with"):
        resolve_options("aoti", TargetOptions(quantize=quantize_config("int4")))
    with pytest.raises(UserError, match="target 'trt' has none"):
        resolve_options("trt", TargetOptions(quantize=quantize_config("int4")))


def test_torchao_block_must_divide_inputs():
    from mllmc.compiler.backends.torchao_int4 import quantize_model

    decoder = torch.nn.Module()
    decoder.layers = torch.nn.ModuleList([torch.nn.Linear(96, 32)])
    with pytest.raises(UserError, match="--block-size 64: layers.0 has 96 inputs"):
        quantize_model(decoder, Precision("int4", 64, None, ("decoder",), "torchao"))


def test_torchao_missing_is_one_line(monkeypatch):
    from mllmc.compiler.backends.quantize import quantize_config

    monkeypatch.setitem(sys.modules, "torchao.prototype.quantization.int4.int4_opaque_tensor", None)
    with pytest.raises(UserError, match=r"needs torchao: pip install 'mllmc\[torchao\]'"):
        quantize_config("int4", target="aoti")


@pytest.mark.parametrize(
    "record, target, match",
    [
        (Precision("int4", 32, None, ("decoder",), "torchao"), "onnx", "on target 'onnx'"),
        (Precision("int4", 32, 4, ("decoder",)), "aoti", "on target 'aoti'"),
    ],
)
def test_manifest_scheme_must_match_target(record, target, match):
    with pytest.raises(ValueError, match=match):
        TargetSettings(target, "cpu", "float32", "growing", precision=record)


def test_manifest_scheme_read_from_json():
    """A quantized record written before the scheme was recorded is MatMulNBits; an unknown
    scheme is a corrupt manifest, one line."""
    from mllmc.runtime.manifest import from_json

    record = {"weights": "int4", "block_size": 32, "accuracy_level": 4, "parts": ["decoder"]}
    assert from_json(Precision, record).method == "matmulnbits"
    with pytest.raises(UserError, match="corrupt artifact manifest.*scheme 'bogus'"):
        from_json(Precision, {**record, "scheme": "bogus"})


def test_precision_record_rules():
    with pytest.raises(ValueError, match="torchao's int4 has no accuracy_level"):
        Precision("int4", 32, 4, ("decoder",), "torchao")
    with pytest.raises(ValueError, match="scheme 'torchao' with int8"):
        Precision("int8", 32, None, ("decoder",), "torchao")
    with pytest.raises(ValueError, match="torchao's block_size is 32, 64 or 128"):
        Precision("int4", 256, None, ("decoder",), "torchao")
    with pytest.raises(ValueError, match="a scheme without weights"):
        Precision(scheme="torchao")
    assert Precision("int4", 32, 4, ("decoder",)).method == "matmulnbits"
