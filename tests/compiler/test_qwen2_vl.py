"""Qwen2-VL and Qwen2.5-VL (fixtures `qwen_dirs`, `qwen`: tests/conftest.py): the presets'
files, the config checks, the vision segment against HF's vision model alone (three grid
shapes), and the captured prefill + decode, in torch and through ONNX, against HF's own
`generate` (one image at two sizes, two images, text only), and the ONNX engine end to end.

HF's inputs come from the model directory's own files through transformers' classes (the
image processor `Qwen2VLImageProcessorPil`, `Qwen2Tokenizer` and its chat-template rendering,
then the placeholder expansion `Qwen2VLProcessor` does, whose class needs torchvision:
`capture.load_processor`), the vision segment's from `transformers.vision_utils`, the 3-D
positions from HF's `get_rope_index`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mllmc.compiler.core.capture import (
    load_model,
    load_processor,
    prefill_feeds,
    processor_inputs,
)
from mllmc.compiler.core.model_dir import read_config
from mllmc.runtime.errors import UserError

STEPS = 16
PROMPT = "Describe the image."


def image(width: int, height: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


# one image at two sizes, two images of different sizes, no image
CASES = {
    "wide": [(120, 90, 0)],
    "tall": [(50, 140, 1)],
    "two-images": [(120, 90, 0), (70, 150, 1)],
    "text-only": [],
}


def hf_inputs(model_dir: Path, images: list, prompt: str = PROMPT) -> dict[str, torch.Tensor]:
    """What `Qwen2VLProcessor` gives for the chat template's one user turn (the images, then
    `prompt`), from transformers' image processor and tokenizer (`load_processor`)."""
    return dict(processor_inputs(load_processor(model_dir), images, prompt))


def vision_feeds(info, pixel_values: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
    """The vision segment's inputs for HF's pixel_values and image_grid_thw, from
    transformers.vision_utils (what HF's vision model computes from the grid itself)."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    feeds = [
        pixel_values,
        get_vision_position_ids(grid, info.spatial_merge_size).long(),
        get_vision_cu_seqlens(grid).int(),
    ]
    if info.vision_window_size:
        index, windows = get_vision_window_index(
            grid, info.spatial_merge_size, info.vision_window_size, info.vision_patch_size
        )
        feeds += [index.long(), windows.int()]
    return feeds


def rope_index(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """HF's 3-D positions (3, 1, n) of the prompt (arange on every axis without an image)."""
    ids = inputs["input_ids"]
    if "image_grid_thw" not in inputs:
        return torch.arange(ids.shape[1])[None, None].expand(3, 1, -1).contiguous()
    positions, _ = model.model.get_rope_index(
        ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"]
    )
    return positions


def hf_generate(model, inputs: dict[str, torch.Tensor], steps: int = STEPS):
    """HF's greedy tokens and the logits of each step (S, vocab), EOS ignored."""
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
        )
    return out.sequences[0, inputs["input_ids"].shape[1] :].tolist(), torch.cat(out.logits)


def greedy(run, info, decode_inputs: list[str], model, inputs, steps: int = STEPS):
    """Prefill + `steps` greedy decode steps through `run(segment name, feeds) -> outputs`
    (torch tensors in, torch tensors out) -> (tokens, logits per step (S, vocab))."""
    positions = rope_index(model, inputs)
    if "pixel_values" in inputs:
        grid = inputs["image_grid_thw"]
        (features,) = run("vision", vision_feeds(info, inputs["pixel_values"], grid))[:1]
    else:
        features = torch.zeros(0, info.hidden_size)
    feeds = prefill_feeds(inputs["input_ids"], features, info.image_token_id, positions)
    logits, *kv = run("prefill", list(feeds))
    tokens, rows = [], []
    start = int(positions.max()) + 1  # HF: the cache length plus the prompt's rope delta
    pad = (
        [torch.zeros(info.num_layers, 1, dtype=torch.int64)] if "cache_pad" in decode_inputs else []
    )
    for step in range(steps):
        rows.append(logits[0])
        tokens.append(int(logits[0].argmax()))
        position = torch.full((3, 1, 1), start + step, dtype=torch.int64)
        logits, *kv = run("decode", [torch.tensor([[tokens[-1]]]), position, *pad, *kv])
    return tokens, torch.stack(rows)


def torch_runner(segments):
    modules = {seg.name: seg.program.module() for seg in segments}

    def run(name, feeds):
        with torch.no_grad():
            out = modules[name](*feeds)
        return out if isinstance(out, (tuple, list)) else (out,)

    return run


# ----------------------------------------------------------------------------------------------
# Presets and config checks


def test_presets_write_both_template_files_and_qwen_tokens(qwen_dirs):
    from transformers import AutoTokenizer

    v2, v25 = qwen_dirs["tiny-qwen2-vl"], qwen_dirs["tiny-qwen2.5-vl"]
    assert (v2 / "chat_template.json").is_file() and not (v2 / "chat_template.jinja").exists()
    assert (v25 / "chat_template.jinja").is_file() and not (v25 / "chat_template.json").exists()
    processor = json.loads((v2 / "preprocessor_config.json").read_text())
    assert (processor["min_pixels"], processor["max_pixels"]) == (32 * 32, 128 * 128)
    for model_dir in (v2, v25):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        specials = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_start|>"]
        ids = tokenizer.convert_tokens_to_ids(specials)
        assert ids[:2] == [config["vision_start_token_id"], config["image_token_id"]]
        text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi"
        assert set(ids) <= set(tokenizer(text)["input_ids"])
    config = json.loads((v25 / "config.json").read_text())["vision_config"]
    assert config["fullatt_block_indexes"] == [1] and config["window_size"] == 56


def test_flat_config_of_released_checkpoints_loads_the_same(qwen_dirs, tmp_path):
    """Released checkpoints state the decoder at config.json's top level."""
    src = qwen_dirs["tiny-qwen2.5-vl"]
    flat = shutil.copytree(src, tmp_path / "flat")
    config = json.loads((src / "config.json").read_text())
    text = config.pop("text_config")
    text.pop("model_type")
    (flat / "config.json").write_text(json.dumps({**config, **text}))
    read_config(flat)
    _, nested = load_model(src)
    _, info = load_model(flat)
    same = ("num_layers", "hidden_size", "num_kv_heads", "mrope_section", "vision_window_size")
    assert [getattr(info, k) for k in same] == [getattr(nested, k) for k in same]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[2, 2, 2]), "mrope"),
        (lambda c: c["vision_config"].update(fullatt_block_indexes=[5]), "fullatt_block"),
        (lambda c: c["vision_config"].update(window_size=20), "window_size"),
        (lambda c: c["vision_config"].update(out_hidden_size=32), "merger outputs 32"),
        (lambda c: c["text_config"].pop("hidden_size"), "has no hidden_size"),
        (lambda c: c.update(image_token_id=10**6), "image_token_id"),
    ],
)
def test_bad_qwen_configs_are_one_line(qwen_dirs, tmp_path, edit, message):
    model_dir = shutil.copytree(qwen_dirs["tiny-qwen2.5-vl"], tmp_path / "bad")
    config = json.loads((model_dir / "config.json").read_text())
    edit(config)
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message) as e:
        read_config(model_dir)
    assert "\n" not in str(e.value)


def test_unsupported_architecture_lists_the_qwen_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    with pytest.raises(UserError, match="qwen2_vl = Qwen2-VL .*qwen2_5_vl = Qwen2.5-VL"):
        read_config(tmp_path)


# ----------------------------------------------------------------------------------------------
# Vision segment against HF's vision model alone


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 8, 8), (1, 2, 4)], [(1, 10, 6)]])
def test_vision_segment_matches_hf_vision_model(qwen, grids):
    _, model, info, segs = qwen
    grid = torch.tensor(grids)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(int(grid.prod(-1).sum()), 6 * info.vision_patch_size**2, generator=gen)
    with torch.no_grad():
        expected = model.model.visual(pixels, grid_thw=grid).pooler_output
        got = segs.vision.program.module()(*vision_feeds(info, pixels, grid))
    assert got.shape == (grid.prod(-1).sum() // 4, info.hidden_size)
    assert (got - expected).abs().max().item() <= 1e-5


def test_no_nonzero_and_the_prefill_takes_3d_positions(qwen):
    _, _, info, segs = qwen
    for seg in segs:
        targets = {str(n.target) for n in seg.program.graph.nodes if n.op == "call_function"}
        assert not any("nonzero" in t for t in targets), seg.name
    positions = segs.prefill.example_inputs[3]
    assert positions.shape[0] == 3 and segs.min_visual_rows == 0
    windowed = info.model_type == "qwen2_5_vl"
    assert len(segs.vision.input_names) == (5 if windowed else 3)


# ----------------------------------------------------------------------------------------------
# Prefill + decode against HF generate


@pytest.mark.parametrize("case", list(CASES))
def test_captured_segments_match_hf_generate(qwen, case):
    model_dir, model, info, segs = qwen
    inputs = hf_inputs(model_dir, [image(*c) for c in CASES[case]])
    expected_tokens, expected = hf_generate(model, inputs)
    tokens, logits = greedy(torch_runner(segs), info, segs.decode.input_names, model, inputs)
    assert (logits - expected).abs().max().item() <= 1e-4
    assert tokens == expected_tokens


@pytest.fixture(scope="module")
def onnx_run(qwen, tmp_path_factory):
    """The captured segments as ONNX files (the onnx backend), run by onnxruntime."""
    import onnxruntime as ort

    from mllmc.compiler.backends import get_backend

    _, _, _, segs = qwen
    out = tmp_path_factory.mktemp("qwen-onnx")
    backend = get_backend("onnx")
    entries = backend.finish_artifact(out, {seg.name: backend(seg, out) for seg in segs})
    sessions = {name: ort.InferenceSession(str(out / e.file)) for name, e in entries.items()}

    def run(name, feeds):
        session = sessions[name]
        names = [i.name for i in session.get_inputs()]
        arrays = {k: np.asarray(f) for k, f in zip(names, feeds, strict=True)}
        return [torch.from_numpy(o) for o in session.run(None, arrays)]

    return run


@pytest.mark.parametrize("case", ["tall", "two-images", "text-only"])
def test_onnx_segments_match_hf_generate(qwen, onnx_run, case):
    model_dir, model, info, segs = qwen
    inputs = hf_inputs(model_dir, [image(*c) for c in CASES[case]])
    expected_tokens, expected = hf_generate(model, inputs)
    tokens, logits = greedy(onnx_run, info, segs.decode.input_names, model, inputs)
    assert (logits - expected).abs().max().item() <= 1e-4
    assert tokens == expected_tokens


@pytest.fixture(scope="module")
def artifact(qwen, tmp_path_factory) -> Path:
    """The model compiled to ONNX, validated at compile time against HF eager."""
    from mllmc.compiler.pipeline import compile_model

    out = tmp_path_factory.mktemp("qwen-artifact") / "base"
    return compile_model(qwen[0], out, progress=False).out_dir


@pytest.mark.slow  # compiles two artifacts (~15 s each)
@pytest.mark.parametrize("case", ["wide", "two-images"])
def test_engine_generate_matches_hf_generate(qwen, artifact, case):
    from mllmc.runtime import load

    model_dir, model, _, _ = qwen
    images = [image(*c) for c in CASES[case]]
    engine = load(artifact)
    one = images[0] if len(images) == 1 else None
    result = engine.generate(one, PROMPT, STEPS, images=None if one else images, stop_at_eos=False)
    tokens, logits = hf_generate(model, hf_inputs(model_dir, images))
    assert abs(result.logits - logits.numpy()).max() <= 1e-4
    assert result.token_ids == tokens


@pytest.mark.slow  # compiles two artifacts (~15 s each; shared with the test above)
def test_engine_text_only_prompt_matches_hf_generate(qwen, artifact):
    """No image, through the engine (`generate(None, ...)`, `images=[]`) and `mllmc run`
    without --image: HF's own generate on the same text-only prompt."""
    import subprocess
    import sys

    from mllmc.runtime import load

    model_dir, model, _, _ = qwen
    tokens, logits = hf_generate(model, hf_inputs(model_dir, []))
    engine = load(artifact)
    assert engine.text_only
    for result in (
        engine.generate(None, PROMPT, STEPS, stop_at_eos=False),
        engine.generate(images=[], prompt=PROMPT, max_new_tokens=STEPS, stop_at_eos=False),
    ):
        assert abs(result.logits - logits.numpy()).max() <= 1e-4
        assert result.token_ids == tokens
        assert result.prompt_tokens == hf_inputs(model_dir, [])["input_ids"].shape[1]
    mllmc = Path(sys.executable).parent / "mllmc"
    args = [mllmc, "run", artifact, "--prompt", PROMPT, "--max-new-tokens", STEPS, "--json"]
    proc = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    # the CLI stops at EOS: its tokens are HF's up to the first EOS
    got = json.loads(proc.stdout)["token_ids"]
    assert got == tokens[: len(got)]
    assert len(got) == STEPS or got[-1] in engine.eos_token_ids
