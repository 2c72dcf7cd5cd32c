"""Shared fixtures: preset model directories are written, and the shared artifacts compiled, once
per test run: under pytest-xdist the workers share them (the first worker to ask builds one
while the others wait for it), so a compile is not repeated on every worker."""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

TINY_SHORTV_LAYERS = [0, 1, 2, 5]  # first, last and adjacent layers


def pytest_configure(config: pytest.Config) -> None:
    """Fewer garbage-collector passes in the test processes (each xdist worker, and the runner):
    tracing and exporting graphs makes millions of short-lived objects, and a full pass over a
    worker's heap (every model and artifact its earlier modules loaded) took up to seconds;
    these are the thresholds a compile runs under (`pipeline.COMPILE_GC_THRESHOLDS`).
    Reference counting still frees everything that is not in a cycle."""
    from mllmc.compiler.pipeline import COMPILE_GC_THRESHOLDS

    gc.set_threshold(*COMPILE_GC_THRESHOLDS)
    _share_the_cores()


def _share_the_cores() -> None:
    """Each xdist worker runs on its share of the cores: torch's threads (`OMP_NUM_THREADS`, read
    by the CLI's subprocesses too) and the engines' (`MLLMC_THREADS`). Two workers on two cores,
    each starting one thread per core, oversubscribed them: the threads waited on each other,
    and onnxruntime's spin between kernels (the default suite did ~11% less work with one thread
    per worker). A thread count set in the environment is kept."""
    import torch

    from mllmc.runtime.engine import THREADS_ENV

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if workers < 2:
        return
    share = str(max(1, (os.cpu_count() or 1) // workers))
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = share
        torch.set_num_threads(int(share))
    os.environ.setdefault(THREADS_ENV, share)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-goldens",
        action="store_true",
        help="re-record tests/goldens/*.json from the current artifacts instead of checking them",
    )


def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test run's base temp folder, the same for every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # <run>/popen-gwN: the run's folder is its parent
        base = base.parent
    return base


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX export cache (`MLLMC_CACHE_DIR`) for every compile of the run, in-process and in
    the CLI's subprocesses, on every worker: a segment that many tests compile alike (the vision
    segment and decode steps under most passes) is exported once per run. The first compile of
    each distinct segment still exports it; `test_export_cache.py` checks the cache itself."""
    from mllmc.compiler.backends.export_cache import ENV

    folder = run_folder(tmp_path_factory) / "export-cache"
    os.environ[ENV] = str(folder)
    return folder


def shared(
    tmp_path_factory: pytest.TempPathFactory, key: str, name: str, build: Callable[[Path], Path]
) -> Path:
    """`build(out)` once per test run, for every xdist worker: `out` is <run>/shared/<key>/<name>
    (a folder of its own under the run's base temp, which the workers have in common), and the
    first worker to ask builds it under a file lock while the others wait, then read it. What
    a shared folder holds is never changed by a test (tests that change one work on a copy)."""
    from filelock import FileLock

    root = run_folder(tmp_path_factory) / "shared"
    root.mkdir(exist_ok=True)
    out, done = root / key / name, root / f"{key}.done"
    with FileLock(str(root / f"{key}.lock")):
        if not done.exists():
            shutil.rmtree(root / key, ignore_errors=True)  # what a failed build left
            (root / key).mkdir()
            built = Path(build(out))
            assert built == out, (built, out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllmc.compiler.data.presets import write_preset

    return shared(
        tmp_path_factory,
        "models-tiny",
        "tiny-llava",
        lambda out: write_preset("tiny-llava", out, seed=0),
    )


def shapes_png(
    folder: Path, name: str, size: tuple[int, int], background: tuple[int, int, int], shapes: dict
) -> Path:
    """An RGB PNG of `size` (width, height) with `shapes` ({"ellipse" | "rectangle": (box,
    fill)}) drawn on `background`, written to folder/name."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    for kind, (box, fill) in shapes.items():
        getattr(draw, kind)(box, fill=fill)
    img.save(folder / name)
    return folder / name


@pytest.fixture(scope="session")
def sample_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-square RGB PNG with shapes on it (exercises resize + center crop)."""
    shapes = {
        "ellipse": ((10, 10, 60, 60), (220, 30, 30)),
        "rectangle": ((65, 20, 110, 80), (30, 60, 200)),
    }
    return shapes_png(
        tmp_path_factory.mktemp("images"), "shapes.png", (120, 90), (250, 250, 250), shapes
    )


@pytest.fixture(scope="session")
def tall_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A portrait RGB PNG (70x150), unlike the landscape `sample_image` (120x90)."""
    shapes = {
        "rectangle": ((5, 90, 60, 140), (240, 200, 30)),
        "ellipse": ((10, 10, 60, 60), (40, 200, 90)),
    }
    return shapes_png(
        tmp_path_factory.mktemp("images"), "tall.png", (70, 150), (20, 20, 40), shapes
    )


# A second LLaVA config with different widths, head counts, GQA ratio (8:2), head_dim, image size
# and patch size: the suite's guard against shape assumptions that only hold for tiny-llava.
OTHER_SPEC = dict(
    description="test-only LLaVA: CLIP 3 layers 84 px / patch 14 -> 36 tokens; Llama 5 layers GQA 8:2",
    image_size=84,
    patch_size=14,
    vision_hidden=48,
    vision_layers=3,
    vision_heads=3,
    vision_mlp=96,
    hidden=192,
    layers=5,
    heads=8,
    kv_heads=2,
    mlp=320,
    vocab_size=700,
    init_std=0.06,
)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllmc.compiler.data.presets import PresetSpec, write_model

    return shared(
        tmp_path_factory,
        "models-other",
        "other-llava",
        lambda out: write_model(PresetSpec(**OTHER_SPEC), out, seed=1),
    )


@pytest.fixture(scope="session")
def tiny_base_artifact(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllmc.compiler.pipeline import compile_model

    return shared(
        tmp_path_factory,
        "artifacts-tiny-base",
        "tiny-base",
        lambda out: compile_model(tiny_model_dir, out, progress=False).out_dir,
    )


@pytest.fixture(scope="session")
def tiny_shortv_artifact(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllmc.compiler.pipeline import compile_model

    spec = f"shortv:layers={TINY_SHORTV_LAYERS}"
    return shared(
        tmp_path_factory,
        "artifacts-tiny-shortv",
        "tiny-shortv",
        lambda out: compile_model(tiny_model_dir, out, [spec], progress=False).out_dir,
    )


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained-tiny-llava preset (shipped shapes-qa weights)."""
    from mllmc.compiler.data.presets import write_preset

    return shared(
        tmp_path_factory,
        "models-trained",
        "trained",
        lambda out: write_preset("trained-tiny-llava", out),
    )


@pytest.fixture(scope="session")
def trained_artifact(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """trained-tiny-llava compiled without passes, validated against HF eager at compile time
    (the check's tolerance scales with the logits' size; a trained model's reach ~10)."""
    from mllmc.compiler.pipeline import compile_model

    return shared(
        tmp_path_factory,
        "artifacts-trained-base",
        "trained-base",
        lambda out: compile_model(trained_model_dir, out, progress=False).out_dir,
    )


QWEN_PRESETS = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


@pytest.fixture(scope="session")
def qwen_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two tiny Qwen presets (Qwen2-VL, Qwen2.5-VL), written once per session."""
    from mllmc.compiler.data.presets import write_preset

    def build(out: Path) -> Path:
        out.mkdir()
        for name in QWEN_PRESETS:
            write_preset(name, out / name, seed=0)
        return out

    root = shared(tmp_path_factory, "qwen", "presets", build)
    return {name: root / name for name in QWEN_PRESETS}


@pytest.fixture(scope="module", params=QWEN_PRESETS)
def qwen(request, qwen_dirs):
    """(model dir, eager model, ModelInfo, captured Segments) of each tiny Qwen preset."""
    from mllmc.compiler.core.capture import capture, load_model

    model_dir = qwen_dirs[request.param]
    model, info = load_model(model_dir)
    return model_dir, model, info, capture(model, info)


# The slowest modules (seconds on one worker of a 2-core machine, most of it compiles), slowest
# first. Under `-n auto --dist loadfile` (make test) each module runs whole on one worker and an
# idle worker takes the next module in collection order, so a slow module collected late would
# run alone at the end while the other workers sit idle; started first, the small modules fill
# in around them. The order of the tests in a module is unchanged.
SLOW_MODULES = [
    "tests/compiler/backends/test_aoti.py",
    "tests/passes/test_pruning.py",
    "tests/compiler/tools/test_cli_safety.py",
    "tests/compiler/test_compile.py",
    "tests/compiler/tools/test_cli.py",
    "tests/compiler/test_llava_next.py",
    "tests/passes/test_qwen_passes.py",
    "tests/compiler/test_verify.py",
    "tests/compiler/backends/test_static_cache.py",
    "tests/compiler/tools/test_evaluate.py",
    "tests/compiler/core/test_capture.py",
    "tests/runtime/test_batching.py",
    "tests/passes/test_shortv.py",
    "tests/compiler/tools/test_bench.py",
    "tests/passes/test_batch_decode.py",
    "tests/compiler/backends/test_quantize.py",
]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {module: i for i, module in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable
