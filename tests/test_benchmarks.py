"""Smoke runs of the benchmark scripts that need hardware this machine may lack: each runs on the
CPU at a tiny size, so that a GPU session spends its time measuring, not debugging the script."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.slow
def test_shortv_gpu_runs_every_row_on_the_cpu(tiny_model_dir, tmp_path):
    """benchmarks/shortv_gpu.py with its CUDA-graph and decode rows, --device cpu: every row is
    timed, the rewrite matches its eager reference, the decode row counts the bytes it reads."""
    cmd = [
        sys.executable, str(BENCHMARKS / "shortv_gpu.py"), "--device", "cpu", "--model",
        str(tiny_model_dir), "--dtype", "float32", "--layers", "[0,2]", "--no-compile",
        "--cuda-graphs", "--decode", "--repeats", "2", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "shortv_gpu.json").read_text())
    assert set(report["rows"]) == {
        "hf_eager",
        "mllmc_torch",
        "mllmc_torch+shortv",
        "mllmc_compile_graphs",
        "mllmc_compile_graphs+shortv",
    }  # the mllmc_cuda_graphs rows (captured CUDA graphs) need CUDA
    for name, row in report["rows"].items():
        assert row["llm_prefill_s"] > 0, name
        assert row.get("kernel_s") is None, name  # kernel time is measured on CUDA only
    assert set(report["pass_speedup"]) == {"mllmc_torch+shortv", "mllmc_compile_graphs+shortv"}
    assert report["parity"]["shortv_vs_reference"]["max_abs_logit_diff"] <= 1e-4
    decode = report["decode"]
    assert set(decode["rows"]) == {"decode", "decode_static"}  # decode_cuda_graphs: CUDA
    assert all(r["same_tokens"] for r in decode["rows"].values())
    assert decode["weight_bytes"] > 0 and decode["kv_bytes"] > 0
    assert all(0 < r["fraction_of_bandwidth"] for r in decode["rows"].values())
    assert "mllmc_compile_graphs+shortv" in proc.stdout and "ms/token" in proc.stdout


@pytest.mark.slow
def test_llava_next_benchmark_reports_every_engine(tmp_path):
    """benchmarks/llava_next.py on tiny-llava-next (112 px image: 88 visual rows), every
    variant, one round: every engine has its timings, KV bytes and ratios; the plan's KV bytes
    shrink where a pass drops cached rows; each pass has its FLOPs-ideal speedup; the engines
    on every visual row are timed two to a group; the goals and the run are recorded."""
    from mllmc.compiler.data.presets import write_preset

    model = write_preset("tiny-llava-next", tmp_path / "tiny-llava-next", seed=0)
    cmd = [
        sys.executable, str(BENCHMARKS / "llava_next.py"), "--model", str(model),
        "--image-size", "112", "--rounds", "1", "--decode-tokens", "2", "--variants", "all",
        "--group-size", "2", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "llava_next.json").read_text())
    assert (tmp_path / "llava_next.png").stat().st_size > 0
    passes = {"fastv", "vte:k=3", "shortv:ratio=0.6", "fastervlm", "vtc_cls", "fastv+shortv",
              "fastervlm+shortv"}  # fmt: skip
    engines = {"mllmc_onnx"} | {f"mllmc_onnx+{p}" for p in passes}
    rows = report["rows"]
    assert set(rows) | set(report["skipped"]) == {"hf_eager"} | engines
    assert report["image"] == [112, 112] and report["visual_tokens"] == 88
    for name, row in rows.items():
        assert row["vision_s"] > 0 and row["llm_prefill_s"] > 0, name
        assert row["decode_s_per_token"] > 0 and row["kv_cache_bytes_prompt"] > 0, name
        for ref in ("vs_hf_eager", "vs_mllmc_onnx"):
            assert set(row[ref]) == {"vision", "LLM prefill", "decode"}, name
    kv = {name: row["kv_cache_bytes_prompt"] for name, row in rows.items()}
    assert kv["hf_eager"] == kv["mllmc_onnx"] == kv["mllmc_onnx+shortv:ratio=0.6"]
    assert kv["mllmc_onnx+fastv"] < kv["mllmc_onnx"] and kv["mllmc_onnx+vte:k=3"] < kv["mllmc_onnx"]
    assert set(report["pass_speedups"]) == set(rows) - {"hf_eager", "mllmc_onnx"}
    for name, s in report["pass_speedups"].items():
        assert s["flops_ideal"] > 1 and s["measured"] > 0 and "share_of_ideal" in s, name
    assert [isinstance(g["met"], bool) for g in report["goals"]] == [True] * 3
    groups = [set(g["engines"]) - {"hf_eager", "mllmc_onnx"} for g in report["groups"]]
    assert len(groups) == 2 and set().union(*groups) == set(rows) - {"hf_eager", "mllmc_onnx"}
    assert report["versions"]["torch"] and "llava_next.py" in report["command"]
    assert "mllmc_onnx+fastv+shortv" in proc.stdout and "FLOPs-ideal" in proc.stdout


def test_precision_benchmark_extracts_the_language_model(tiny_model_dir, tmp_path):
    """benchmarks/precision.py hands onnxruntime-genai's builder LLaVA's language model as a plain
    LlamaForCausalLM directory: on text alone it gives LLaVA's own logits."""
    import torch
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from precision import extract_language_model
    finally:
        sys.path.remove(str(BENCHMARKS))
    lm_dir = extract_language_model(tiny_model_dir, tmp_path / "lm")
    lm = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    llava = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[1, 17, 42, 99, 5, 300]])
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, llava(input_ids=ids).logits)
    assert type(lm).__name__ == "LlamaForCausalLM"


def test_qwen_extracted_language_model_is_qwen2_with_the_same_logits(qwen_dirs, tmp_path):
    """benchmarks/qwen.py hands onnxruntime-genai's builder Qwen2.5-VL's decoder as a plain
    Qwen2ForCausalLM directory: reloaded from disk, on text alone (every M-RoPE axis the same
    position: 1-D RoPE) it gives Qwen2.5-VL's own logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from mllmc.compiler.core.capture import load_model

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from qwen import extract_language_model
    finally:
        sys.path.remove(str(BENCHMARKS))
    model_dir = qwen_dirs["tiny-qwen2.5-vl"]
    model, _ = load_model(model_dir)
    lm_dir, diff = extract_language_model(model, model_dir, tmp_path / "lm")
    lm = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    assert type(lm).__name__ == "Qwen2ForCausalLM" and diff <= 1e-5
    ids = torch.tensor([[1, 17, 42, 99, 5, 300, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, model(input_ids=ids).logits)
    assert (lm_dir / "tokenizer.json").is_file()


@pytest.mark.slow
def test_qwen_benchmark_reports_every_engine_and_genai(tmp_path):
    """benchmarks/qwen.py on tiny-qwen2.5-vl (112 px image: 16 visual rows), vispruner + shortv,
    one round: every engine timed with its ratios, the pass against its FLOPs-ideal speedup, and
    (with onnxruntime-genai installed) genai's build of the extracted decoder giving mllmc's
    greedy tokens and prefill logits on the text prompt; the goals recorded."""
    from mllmc.compiler.data.presets import write_preset

    genai = importlib.util.find_spec("onnxruntime_genai") is not None
    model = write_preset("tiny-qwen2.5-vl", tmp_path / "tiny-qwen2.5-vl", seed=0)
    artifacts = tmp_path / "artifacts"
    cmd = [
        sys.executable, str(BENCHMARKS / "qwen.py"), "--model", str(model), "--image-size", "112",
        "--rounds", "1", "--decode-tokens", "2", "--variants", "vispruner+shortv",
        "--out", str(tmp_path), "--artifacts-dir", str(artifacts),
        *([] if genai else ["--no-genai"]),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "qwen.json").read_text())
    assert (tmp_path / "qwen.png").stat().st_size > 0
    rows = report["rows"]
    assert set(rows) == {"hf_eager", "mllmc_onnx", "mllmc_onnx+vispruner+shortv"}
    assert report["visual_tokens"] == 16
    for name, row in rows.items():
        assert row["vision_s"] > 0 and row["llm_prefill_s"] > 0, name
        assert set(row["vs_hf_eager"]) == {"vision", "LLM prefill", "decode"}, name
    assert rows["hf_eager"]["prompt_tokens"] == rows["mllmc_onnx"]["prompt_tokens"]
    pruned = rows["mllmc_onnx+vispruner+shortv"]["prompt_tokens"]
    assert pruned < report["prompt_tokens"]  # vispruner keeps a part of the 16 rows
    speed = report["pass_speedups"]["mllmc_onnx+vispruner+shortv"]
    assert speed["flops_ideal"] > 1 and speed["share_of_ideal_gain"] is not None
    assert [isinstance(g["met"], bool) for g in report["goals"]] == [True] * (2 + genai)
    if genai:
        g = report["genai"]
        assert g["prompt_tokens"] == report["prompt_tokens"]
        for parity in g["parity"].values():
            assert parity["same_tokens"] and parity["prefill_max_abs_logit_diff"] <= 1e-4
        assert {"mllmc_onnx (text)", "genai_fp32"} <= set(g["rows"])
        assert "genai_fp32" in proc.stdout

        # the same two decoders, each engine alone in its own process
        out = tmp_path / "processes"
        cmd = [
            sys.executable, str(BENCHMARKS / "genai_processes.py"),
            "--artifact", str(artifacts / f"{model.name}-mllmc_onnx"),
            "--genai", f"genai_fp32={artifacts / f'{model.name}-genai_fp32'}",
            "--prompt-tokens", str(report["prompt_tokens"]), "--decode-tokens", "2",
            "--processes", "2", "--runs", "1", "--out", str(out),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        alone = json.loads((out / "genai_processes.json").read_text())
        assert (out / "genai_processes.png").stat().st_size > 0
        assert alone["parity"]["genai_fp32"]["same_tokens"]
        assert alone["parity"]["genai_fp32"]["prefill_max_abs_logit_diff"] <= 1e-4
        for name in ("mllmc_onnx", "genai_fp32"):
            row = alone["rows"][name]
            assert row["prompt_tokens"] == report["prompt_tokens"]
            assert len(row["rounds"]["decode_s_per_token"]) == 2
            assert min(row["rounds"]["decode_s_per_token"]) > 0
        speed = alone["rows"]["genai_fp32"]["mllmc_speedup_decode"]
        assert speed["ci95"][0] <= speed["median"] <= speed["ci95"][1]
        assert isinstance(alone["goals"][0]["met"], bool)
        assert not list(out.glob("*.npy"))  # the children's prompt ids stay in a scratch folder


def _genai_processes():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import genai_processes
    finally:
        sys.path.remove(str(BENCHMARKS))
    return genai_processes


@pytest.mark.parametrize(
    ("values", "want"),
    [
        (range(1, 11), (2, 9)),  # n = 10: the 2nd and 9th order statistics, as tabulated
        (range(1, 21), (6, 15)),  # n = 20: the 6th and 15th
        ([3.0, 1.0, 2.0], (1.0, 3.0)),  # too few values for 95%: the whole range
    ],
)
def test_genai_processes_median_interval(values, want):
    """The sign test's 95% interval of a median, from the order statistics."""
    assert _genai_processes().median_interval(list(values)) == want


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--processes", "0"], "--processes must be from 1 to"),
        (["--runs", "0"], "--runs must be from 1 to"),
        (["--prompt-tokens", "0"], "--prompt-tokens must be >= 1, got 0"),
        (["--decode-tokens", "-1"], "--decode-tokens must be >= 1, got -1"),
        (["--threads", "0"], "--threads must be"),
    ],
)
def test_genai_processes_refuses_bad_options_before_writing(tmp_path, capsys, args, want):
    """One line, exit 2, nothing written; checked before any engine or build is looked at."""
    out = tmp_path / "out"
    argv = ["--artifact", str(tmp_path), "--genai", f"g={tmp_path}", "--out", str(out), *args]
    assert _genai_processes().main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("genai_processes.py: error: " + want), err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_genai_processes_refuses_what_is_not_an_artifact_or_a_build(
    tiny_base_artifact, tiny_shortv_artifact, tmp_path, capsys
):
    """A model folder or a rewritten artifact for --artifact, or a --genai that names no genai
    build, is one line."""
    genai = importlib.util.find_spec("onnxruntime_genai") is not None
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    build = tmp_path / "build"
    build.mkdir()
    (build / "genai_config.json").write_text("{}")
    cases = [
        (["--artifact", str(tiny_shortv_artifact), "--genai", f"g={build}"],
         "give an ONNX artifact compiled with no pass and no --precision (this one has passes shortv)"),
        (["--artifact", str(tiny_base_artifact), "--genai", f"g={build}", "--child", "bogus"],
         "--child bogus: expected one of parity, mllmc_onnx, g"),
        (["--artifact", str(tmp_path / "model"), "--genai", f"g={tmp_path}"],
         "is a model folder (config.json), not an mllmc artifact"),
        (["--artifact", str(tiny_base_artifact), "--genai", str(tmp_path)],
         "expected NAME=DIR, DIR an onnxruntime-genai build"),
        (["--artifact", str(tiny_base_artifact), "--genai", f"mllmc_onnx={tmp_path}"],
         "NAME not mllmc_onnx"),
    ]  # fmt: skip
    for args, want in cases:
        assert _genai_processes().main([*args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        if not genai:  # the benchmark needs it before anything else
            want = "onnxruntime-genai is not installed (pip install 'mllmc[bench]')"
        assert want in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("option", "value"), [("--rounds", "0"), ("--genai-rounds", "0"), ("--genai-rounds", "-3")]
)
def test_qwen_benchmark_refuses_bad_rounds_before_writing(tmp_path, option, value):
    """A round count below 1 is one line and exit 2, before the preset or any result is
    written."""
    model, out = tmp_path / "model", tmp_path / "out"
    cmd = [sys.executable, str(BENCHMARKS / "qwen.py"), "--model", str(model), "--out", str(out),
           option, value]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    from mllmc.compiler.tools.limits import MAX_REPEATS

    want = f"qwen.py: error: {option} must be from 1 to {MAX_REPEATS}, got {value}"
    assert proc.stderr.strip() == want
    assert not model.exists() and not out.exists()


def test_session_order_times_identical_copies(tiny_base_artifact, tmp_path):
    """Every copy of the artifact is timed in every round (the first a warm-up), the last one
    loaded is the reference; bad counts and a missing artifact are one line and exit 2."""
    out = tmp_path / "out"
    script = [sys.executable, str(BENCHMARKS / "session_order.py")]
    args = [str(tiny_base_artifact), "--copies", "2", "--rounds", "2", "--tokens", "2"]
    proc = subprocess.run(script + args + ["--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "session_order.json").read_text())
    assert [r["load_order"] for r in report["rows"]] == [0, 1]
    assert all(len(r["rounds_ms"]) == 2 and r["ms_per_token"] > 0 for r in report["rows"])
    assert report["rows"][1]["vs_last_loaded"]["median"] == 1.0
    assert (out / "session_order.png").is_file()
    elsewhere = ["--out", str(tmp_path / "bad")]
    for bad, want in (
        (["--copies", "1"], "error: --copies must be 2 to 8, got 1"),
        (["--threads", "0"], "error: --threads must be"),
        (["--image-size", "8"], "error: --image-size must be 16 to 4096, got 8"),
    ):
        proc = subprocess.run(script + args + bad + elsewhere, capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith(want), proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run(
        script + [str(tmp_path / "none")] + elsewhere, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "is not an artifact dir" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
