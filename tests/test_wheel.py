"""mllmc installs as a wheel: `pip install .` ships every package (compiler/, passes/, runtime/
and all their subpackages) and its data, and the installed runtime runs an artifact with its
declared dependencies only (no torch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = {"compiler": "mllmc/compiler", "passes": "mllmc/passes", "runtime": "mllmc/runtime"}
BUILD_FILES = ("pyproject.toml", "setup.py", "README.md")
# wheels of the runtime's dependencies, kept between runs so that a rerun needs no index
DEPS_CACHE = Path(tempfile.gettempdir()) / "mllmc-test-wheel-deps"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel .` builds, from a copy of the source (the build writes build/ and
    *.egg-info/ next to pyproject.toml, which would race other runs in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_FILES:
        shutil.copy2(ROOT / name, src / name)
    for folder in PACKAGE_ROOTS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    proc = subprocess.run([*pip, str(src), "-w", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("mllmc-*.whl")
    return whl


def test_wheel_has_every_package_and_asset(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = []
    for folder, package in PACKAGE_ROOTS.items():
        for py in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in py.parts:
                rel = py.relative_to(ROOT / folder).as_posix()
                if f"{package}/{rel}" not in names:
                    missing.append(f"{folder}/{rel}")
        for asset in (ROOT / folder).rglob("assets/*"):
            rel = asset.relative_to(ROOT / folder).as_posix()
            if f"{package}/{rel}" not in names:
                missing.append(f"{folder}/{rel}")
    assert not missing, f"not in {wheel.name}: {missing}"
    assert "mllmc/runtime/runners/onnx.py" in names  # the runtime's loaders, by name
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "build/"))]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert (
        "mllmc = mllmc.compiler.tools.cli:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


RUN_IN_VENV = """
import json, sys
from mllmc.runtime import load
result = load(sys.argv[1]).generate(sys.argv[2], "What is in the image?", max_new_tokens=4)
loaded = [m for m in ("torch", "transformers") if m in sys.modules]
try:
    import torch  # noqa: F401
    importable = True
except ImportError:
    importable = False
print(json.dumps({"tokens": result.token_ids, "loaded": loaded, "torch_importable": importable}))
"""


def pip_install_offline(python: Path, *requirements: str) -> subprocess.CompletedProcess:
    cmd = [str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(DEPS_CACHE)]
    return subprocess.run([*cmd, *requirements], capture_output=True, text=True)


def test_installed_wheel_runs_an_artifact_without_torch(
    wheel: Path, tiny_base_artifact: Path, sample_image: Path, tmp_path: Path
):
    """A fresh virtual environment (not seeing this one's torch) gets the wheel and the
    dependencies it declares; the installed runtime and `mllmc run` generate the same tokens as
    the development install, and torch is neither loaded nor importable there."""
    from mllmc.runtime import load

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    if pip_install_offline(python, str(wheel)).returncode != 0:
        DEPS_CACHE.mkdir(exist_ok=True)
        download = [sys.executable, "-m", "pip", "download", "-q", "-d", str(DEPS_CACHE)]
        got = subprocess.run([*download, str(wheel)], capture_output=True, text=True)
        if got.returncode != 0:
            pytest.skip(f"cannot fetch the runtime's dependencies: {got.stderr.strip()[-300:]}")
        for stale in DEPS_CACHE.glob("mllmc-*"):  # the wheel itself: built fresh each run
            stale.unlink()
        proc = pip_install_offline(python, str(wheel))
        assert proc.returncode == 0, proc.stderr[-3000:]

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run(
        [str(python), "-c", RUN_IN_VENV, str(tiny_base_artifact), str(sample_image)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    expected = load(tiny_base_artifact).generate(str(sample_image), "What is in the image?", 4)
    assert got == {"tokens": expected.token_ids, "loaded": [], "torch_importable": False}

    cli = subprocess.run(
        [str(env_dir / "bin" / "mllmc"), "run", str(tiny_base_artifact), "--image"]
        + [
            str(sample_image),
            "--prompt",
            "What is in the image?",
            "--max-new-tokens",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert json.loads(cli.stdout.strip().splitlines()[-1])["token_ids"] == expected.token_ids
