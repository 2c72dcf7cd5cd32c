"""Every pass decodes per sample in a batch: for each pass (shortv, fastv, vte, fastervlm,
vtc_cls and a composition) on two families (tiny-llava, tiny-llava-next), three samples with
prompts of different lengths and images of different sizes and counts go through
`Engine.generate_batch` together, and each gets the tokens and logits (within 1e-4) that
`Engine.generate` gives it alone (with the in-place static decode cache, the onnx default, and
with the growing one). The samples' caches differ in length per layer (a pruning pass keeps a
share of each sample's own visual rows), so each layer's cache is padded on its own.

One pass per family runs by default; the rest of the matrix is marked slow (each artifact is a
compile of ~20-40 s on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

TOL = 1e-4
COMPOSED = "vtc_cls:keep=9+fastv:k=1,ratio=0.5+shortv:layers=[0,2]"
COMPOSED_NEXT = "vtc_cls:layers=[0,1],ratio=0.25+fastv:k=2+shortv:layers=[0,3]"
PASSES = {
    "tiny-llava": {
        "default": ["shortv:layers=[0,2,3]"],
        "slow": ["fastv:k=1,ratio=0.5", "vte:k=2", "fastervlm:keep=5", "vtc_cls:keep=9", COMPOSED],
    },
    "tiny-llava-next": {
        "default": ["fastv:k=2"],
        "slow": ["shortv:layers=[0,3]", "vte:k=2", "fastervlm:keep=8", COMPOSED_NEXT],
    },
}
CASES = [
    pytest.param(preset, spec, id=f"{preset}-{spec}", marks=[pytest.mark.slow] * (kind == "slow"))
    for preset, kinds in PASSES.items()
    for kind, specs in kinds.items()
    for spec in specs
]


def image(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.ellipse((w // 6, h // 6, w // 2, h // 2), fill=(230, 40, 40))
    draw.rectangle((w // 2, h // 2, w - 3, h - 3), fill=(40, 40, 230))
    return img


# (images, prompt, new tokens): sizes, counts and prompt lengths differ across the batch
SAMPLES = [
    ([image((120, 90), (250, 250, 250))], "Describe the image.", 6),
    (
        [image((70, 150), (20, 20, 40)), image((200, 100), (90, 200, 90))],
        "What differs between the two pictures? Say it in a few words.",
        3,
    ),
    ([image((90, 90), (200, 200, 30))], "What is it?", 9),
]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory):
    """(preset, pipeline "a+b") -> its artifact, each preset written and each pipeline compiled
    once for the module (unvalidated: what is checked here is the batch against the engine
    alone; the engine against eager is tests/passes/test_pruning.py's and test_shortv.py's)."""
    from mllmc.compiler.data.presets import write_preset
    from mllmc.compiler.pipeline import compile_model

    work = tmp_path_factory.mktemp("batch-decode")
    models: dict[str, Path] = {}
    built: dict[tuple[str, str], Path] = {}

    def get(preset: str, spec: str) -> Path:
        if preset not in models:
            models[preset] = write_preset(preset, work / preset, seed=0)
        if (preset, spec) not in built:
            out = work / f"{preset}-{len(built)}"
            specs = spec.split("+")
            result = compile_model(models[preset], out, specs, validate=False, progress=False)
            built[preset, spec] = result.out_dir
        return built[preset, spec]

    return get


@pytest.mark.parametrize(("preset", "spec"), CASES)
def test_each_sample_of_a_batch_gets_what_it_gets_alone(artifacts, preset: str, spec: str):
    from mllmc.runtime import load

    engine = load(artifacts(preset, spec))  # the static decode cache (the onnx default)
    growing = load(artifacts(preset, spec), decode_cache="growing")
    images, prompts, steps = (list(x) for x in zip(*SAMPLES, strict=True))
    results = engine.generate_batch(images, prompts, steps, stop_at_eos=False)
    lengths = set()
    for result, (imgs, prompt, n) in zip(results, SAMPLES, strict=True):
        want = engine.generate(images=imgs, prompt=prompt, max_new_tokens=n, stop_at_eos=False)
        assert result.token_ids == want.token_ids
        assert result.logits.shape == want.logits.shape == (n, engine.manifest.model.vocab_size)
        assert float(np.abs(result.logits - want.logits).max()) <= TOL
        other = growing.generate(images=imgs, prompt=prompt, max_new_tokens=n, stop_at_eos=False)
        assert other.token_ids == want.token_ids
        assert float(np.abs(other.logits - want.logits).max()) <= TOL
        lengths.add(want.prompt_tokens)
    assert len(lengths) == len(SAMPLES)  # the prompts' lengths all differ
