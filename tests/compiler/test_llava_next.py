"""LLaVA-NeXT compiled end to end (capture -> passes -> ONNX -> runtime) against Hugging Face's
own LlavaNextForConditionalGeneration: 16 greedy steps of the unrewritten artifact equal HF
`generate` on images of three aspect ratios (each at another anyres pinpoint) and on a
two-image prompt; every in-LLM pass's artifact equals HF `generate` under the pass's eager
reference; identity configs give the unrewritten logits; no graph holds NonZero; bad input is
refused in one line."""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import pytest
import torch
from PIL import Image, ImageDraw

from mllmc.compiler.core.capture import load_model
from mllmc.compiler.data.presets import write_preset
from mllmc.compiler.pipeline import compile_model
from mllmc.passes import parse_pass_spec
from mllmc.runtime import load
from mllmc.runtime.errors import UserError
from mllmc.runtime.preprocess import MAX_IMAGE_PIXELS_ENV

NEW_TOKENS = 16
TOL = 1e-4  # x max(1, max |HF logit|), as compiler/verify.py holds every artifact
PROMPT = "Describe the image."
# (width, height): square, 2:1 and 1:3; on tiny-llava-next's grid they select the (height,
# width) pinpoints (112, 112), (56, 112) and (168, 56)
SIZES = {"square": (100, 100), "wide": (200, 100), "tall": (60, 180)}
PINPOINTS = {"square": (112, 112), "wide": (56, 112), "tall": (168, 56)}
# each tile keeps its top patches by its own [CLS], packed on the grid (FasterVLM's way)
PRE_LLM_PIPELINE = "vtc_cls:layers=[0,1],ratio=0.25+fastv:k=2+shortv:layers=[0,3]"
# every pass on LLaVA-NeXT; each artifact is a compile (~10 s on 2 cores): the composed
# pre-LLM pipeline and vte run by default, the rest are slow
PASS_SPECS = ["vte:k=2", PRE_LLM_PIPELINE]  # the pipeline runs vtc_cls', fastv's, shortv's rewrites
SLOW_PASS_SPECS = ["fastv", "shortv:layers=[0,3]", "fastv+shortv:layers=[0,3]", "fastervlm:keep=8"]


class Hf(NamedTuple):
    """HF's model (float32, eval), mllmc's ModelInfo for it, and HF's processor."""

    model: Any
    info: Any
    processor: Any


def shapes_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A noisy RGB image with a disc and a box on it, so that tiling and resampling show."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse((2, 2, width // 2, height - 2), fill=(220, 30, 30))
    draw.rectangle((width // 2 + 2, 4, width - 3, height - 5), fill=(30, 60, 200))
    return img


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_preset("tiny-llava-next", tmp_path_factory.mktemp("models") / "next", seed=0)


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> Hf:
    from transformers import AutoProcessor

    model, info = load_model(model_dir)
    return Hf(model.float().eval(), info, AutoProcessor.from_pretrained(str(model_dir)))


@pytest.fixture(scope="module")
def artifacts(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """name -> the artifact compiled with that pipeline ("base": no pass; "a+b:opts": pass a,
    then pass b with opts), each compiled once for the module."""
    work = tmp_path_factory.mktemp("artifacts")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            specs = [] if name == "base" else name.split("+")
            out = work / f"a{len(built)}"
            built[name] = compile_model(
                model_dir, out, specs, validate=False, progress=False
            ).out_dir
        return built[name]

    return get


def _references(hf: Hf, specs: Sequence[str]) -> list[Any]:
    """The passes' eager references, each prepared against the model (`prepare`), as callables
    that make the context managers to enter, in pipeline order."""
    refs = []
    for spec in specs:
        info, cfg = parse_pass_spec(spec)
        cfg = info.prepare(cfg, hf.model, hf.info) if info.prepare else cfg
        refs.append(lambda info=info, cfg=cfg: info.reference(hf.model, hf.info, cfg))
    return refs


def hf_inputs(hf: Hf, images: Sequence[Image.Image], prompt: str = PROMPT) -> Any:
    """HF's processor on the chat template with the images first, then the prompt."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = hf.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )
    return hf.processor(images=list(images), text=text, return_tensors="pt")


def hf_generate(
    hf: Hf, images: Sequence[Image.Image], specs: Sequence[str] = ()
) -> tuple[torch.Tensor, list[int], np.ndarray]:
    """HF greedy `generate` for NEW_TOKENS steps, never stopping at EOS, with the eager references
    of `specs` active -> (input_ids (1, n), tokens, logits (NEW_TOKENS, vocab))."""
    inputs = hf_inputs(hf, images)
    n = inputs["input_ids"].shape[1]
    config = copy.deepcopy(hf.model.generation_config)
    config.update(
        max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    config.eos_token_id = None
    saved_eos = hf.model.generation_config.eos_token_id
    hf.model.generation_config.eos_token_id = None  # generate() falls back to it otherwise
    try:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for ref in _references(hf, specs):
                stack.enter_context(ref())
            out = hf.model.generate(**inputs, generation_config=config)
    finally:
        hf.model.generation_config.eos_token_id = saved_eos
    logits = torch.cat(out.logits, 0).float().numpy()
    return inputs["input_ids"], out.sequences[0, n:].tolist(), logits


def assert_same_generation(result: Any, tokens: list[int], logits: np.ndarray) -> None:
    """The engine's 16 greedy steps equal HF's: identical tokens, every step's logits within
    TOL x max(1, max |HF logit|)."""
    assert len(result.token_ids) == len(tokens) == NEW_TOKENS
    assert list(result.token_ids) == tokens
    assert result.logits.shape == logits.shape
    for step, (got, want) in enumerate(zip(result.logits, logits, strict=True)):
        bound = TOL * max(1.0, float(np.abs(want).max()))
        diff = float(np.abs(got.astype(np.float64) - want).max())
        assert diff <= bound, f"step {step}: max |dlogit| {diff:.2e} > {bound:.2e}"


def image_runs(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """The lengths of the runs of image tokens in input_ids (1, n), in order."""
    runs, count = [], 0
    for is_image in (input_ids[0] == image_token_id).tolist() + [False]:
        if is_image:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    return runs


def run_engine(art: Path, images: Sequence[Image.Image]) -> Any:
    return load(art).generate(list(images), PROMPT, max_new_tokens=NEW_TOKENS, stop_at_eos=False)


# ----------------------------------------------------------------------------------------------
# The unrewritten artifact against HF


def test_image_sizes_select_different_pinpoints(hf: Hf):
    from transformers.image_processing_utils import select_best_resolution

    grid = hf.model.config.image_grid_pinpoints
    for name, (w, h) in SIZES.items():
        assert tuple(select_best_resolution((h, w), grid)) == PINPOINTS[name], name


@pytest.mark.parametrize("names", [["square"], ["wide"], ["tall"], ["wide", "tall"]], ids="+".join)
def test_unrewritten_artifact_matches_hf_generate(hf: Hf, artifacts, names):
    images = [shapes_image(*SIZES[name], seed=i) for i, name in enumerate(names)]
    input_ids, tokens, logits = hf_generate(hf, images)
    engine = load(artifacts("base"))
    # the prompt: HF's input ids, each image with as many rows as HF's processor gives it
    counts = engine.image_rows(images)
    assert counts == image_runs(input_ids, hf.info.image_token_id)
    layout = engine.encode_prompt(PROMPT, counts)
    assert layout.n == input_ids.shape[1]
    assert np.array_equal(layout.input_ids, input_ids.numpy())
    result = engine.generate(images, PROMPT, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    assert result.prompt_tokens == input_ids.shape[1]
    assert_same_generation(result, tokens, logits)


# ----------------------------------------------------------------------------------------------
# In-LLM passes against their eager references


@pytest.fixture(scope="module")
def wide_plain(hf: Hf) -> tuple[list[int], np.ndarray]:
    """HF's unrewritten generation on the 2:1 image: (tokens, logits)."""
    return hf_generate(hf, [shapes_image(*SIZES["wide"])])[1:]


@pytest.mark.parametrize(
    "name",
    PASS_SPECS + [pytest.param(spec, marks=pytest.mark.slow) for spec in SLOW_PASS_SPECS],
)
def test_pass_artifact_matches_eager_reference(hf: Hf, artifacts, wide_plain, name):
    image = shapes_image(*SIZES["wide"])
    specs = name.split("+")
    _, tokens, logits = hf_generate(hf, [image], specs)
    art = artifacts(name)
    assert_same_generation(run_engine(art, [image]), tokens, logits)
    assert_no_nonzero(art)
    # the check can fail: under every pass HF computes another model than the unrewritten one,
    # and under a pipeline another one than under its passes but the last
    assert np.abs(logits - wide_plain[1]).max() > 1e-3, name
    if len(specs) > 1:
        shorter = hf_generate(hf, [image], specs[:-1])[2]
        assert np.abs(logits - shorter).max() > 1e-3, name


def test_pre_llm_pipeline_on_two_images(hf: Hf, artifacts):
    """The per-tile [CLS] pruning packed per image, then the in-LLM passes, on a prompt with two
    images of different aspect ratios, against HF generate under the composed references."""
    images = [shapes_image(*SIZES["wide"]), shapes_image(*SIZES["tall"], seed=1)]
    ids, tokens, logits = hf_generate(hf, images, PRE_LLM_PIPELINE.split("+"))
    result = run_engine(artifacts(PRE_LLM_PIPELINE), images)
    assert_same_generation(result, tokens, logits)
    # every image lost rows, and the prompt is shorter than HF's unpruned one
    assert result.prompt_tokens < hf_inputs(hf, images)["input_ids"].shape[1]


def _gathers(art: Path) -> int:
    """The gather ops in the artifact's prefill graph."""
    graph = onnx.load(str(art / "prefill.onnx"), load_external_data=False).graph
    return sum(n.op_type in ("Gather", "GatherElements", "GatherND") for n in graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["fastv:ratio=0.0", "vte:k=L"])
def test_identity_config_gives_the_unrewritten_logits(hf: Hf, artifacts, spec):
    """fastv keeping every row and vte exiting after the last layer run their row gathers (in
    the prefill graph) and generate what the unrewritten artifact generates."""
    spec = spec.replace("k=L", f"k={hf.info.num_layers}")
    image = shapes_image(*SIZES["wide"])
    plain = run_engine(artifacts("base"), [image])
    ident_art = artifacts(spec)
    ident = run_engine(ident_art, [image])
    assert ident.token_ids == plain.token_ids
    assert np.abs(ident.logits - plain.logits).max() <= 1e-6
    assert _gathers(ident_art) > _gathers(artifacts("base")), spec
    assert_no_nonzero(ident_art)


def _op_types(graph: onnx.GraphProto) -> set[str]:
    """Every node's op type in `graph` and in the subgraphs of its nodes (If / Loop / Scan)."""
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                ops |= _op_types(sub)
    return ops


def assert_no_nonzero(art: Path) -> None:
    """No NonZero op in any ONNX graph of the artifact (vision, prefill, decode)."""
    files = sorted(art.glob("*.onnx"))
    assert {f.stem for f in files} >= {"vision", "prefill", "decode"}, art
    for f in files:
        ops = _op_types(onnx.load(str(f), load_external_data=False).graph)
        assert ops and "NonZero" not in ops, f


def test_no_nonzero_in_any_graph(artifacts):
    """The unrewritten artifact and the default pass artifacts (the slow ones check theirs)."""
    for name in ["base", *PASS_SPECS]:
        assert_no_nonzero(artifacts(name))


# ----------------------------------------------------------------------------------------------
# Bad input


def _refused(engine: Any, images: Any, prompt: str, match: str) -> None:
    """engine.generate(images, prompt) raises a one-line UserError matching `match`."""
    with pytest.raises(UserError, match=match) as e:
        engine.generate(images, prompt, max_new_tokens=2)
    assert "\n" not in str(e.value)


def test_bad_input_through_the_api(artifacts, monkeypatch, tmp_path: Path):
    engine = load(artifacts("base"))
    wide, tall = shapes_image(*SIZES["wide"]), shapes_image(*SIZES["tall"])
    more = "the prompt has 1 <image> placeholder but 2 images were given"
    _refused(engine, [wide, tall], "<image> What is it?", more)
    fewer = "the prompt has 2 <image> placeholders but 1 image was given"
    _refused(engine, [wide], "<image><image> Hi", fewer)
    with pytest.raises(UserError, match="counts is needed for this model"):
        engine.encode_prompt(PROMPT)  # an image's rows depend on its size here
    big = tmp_path / "big.png"
    shapes_image(100, 100).save(big)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "5000")  # 100 x 100 = 10,000 pixels
    for images in (big, np.zeros((100, 100, 3), np.uint8), [wide, big]):
        _refused(engine, images, PROMPT, "more than the limit of 5000")


def test_processor_and_config_must_agree_on_the_grid(model_dir: Path, tmp_path: Path):
    """The model packs tiles by config.json's pinpoints; a processor with other pinpoints would
    make prompts of other lengths than the model's features: one line before torch loads."""
    import json
    import shutil
    import subprocess

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    proc_cfg = json.loads((bad / "processor_config.json").read_text())
    proc_cfg["image_processor"]["image_grid_pinpoints"] = [[56, 56], [112, 112]]
    (bad / "processor_config.json").write_text(json.dumps(proc_cfg))
    mllmc = Path(sys.executable).parent / "mllmc"
    out = subprocess.run(
        [str(mllmc), "compile", str(bad), "-o", str(tmp_path / "a")], capture_output=True, text=True
    )
    assert out.returncode == 2 and "differ from config.json's" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
