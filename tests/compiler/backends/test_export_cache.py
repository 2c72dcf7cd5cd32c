"""The ONNX export cache (`export_cache`): an equal segment is copied, not exported again, and
gives the same files; anything the export reads changes the key; a damaged entry is a miss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllmc.compiler.backends import export_cache
from mllmc.compiler.backends import onnx as onnx_backend


@pytest.fixture(scope="module")
def vision(tiny_model_dir):
    """The tiny model and its captured vision segment (the smallest of its segments)."""
    from mllmc.compiler.core.capture import export_vision, load_model

    model, info = load_model(tiny_model_dir)
    return model, info, export_vision(model, info)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_equal_segment_is_copied_from_the_cache(vision, tmp_path, monkeypatch):
    _, _, seg = vision
    cache = tmp_path / "cache"
    monkeypatch.setenv(export_cache.ENV, str(cache))
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    exported = onnx_backend.export_segment(seg, first)
    (entry_dir,) = [p for p in cache.iterdir()]
    stored = json.loads((entry_dir / export_cache.ENTRY).read_text())
    assert stored["entry"]["file"] == "vision.onnx" and list(stored["files"]) == ["vision.onnx"]

    def no_export(*args):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_backend, "_export", no_export)
    restored = onnx_backend.export_segment(seg, second)
    assert restored == exported
    assert _files(second) == _files(first)


def test_without_a_cache_folder_every_export_runs(vision, tmp_path, monkeypatch):
    _, _, seg = vision
    monkeypatch.delenv(export_cache.ENV, raising=False)
    monkeypatch.setenv(export_cache.ENV, "  ")  # empty: no cache
    assert export_cache.cache_dir() is None
    calls = []
    monkeypatch.setattr(onnx_backend, "_export", lambda s, out: calls.append(out) or "entry")
    assert onnx_backend.export_segment(seg, tmp_path) == "entry"
    assert onnx_backend.export_segment(seg, tmp_path) == "entry"
    assert len(calls) == 2


def test_the_key_changes_with_what_the_export_reads(vision):
    from mllmc.compiler.core.capture import export_vision

    model, info, seg = vision
    key = export_cache.segment_key(seg, 18)
    assert export_cache.segment_key(export_vision(model, info), 18) == key  # a fresh capture
    assert export_cache.segment_key(seg, 17) != key  # the opset
    renamed = type(seg)(**{**seg.__dict__, "output_names": ["other"]})
    assert export_cache.segment_key(renamed, 18) != key  # the IO names
    weights = seg.program.state_dict
    name = next(n for n, t in weights.items() if t.is_floating_point() and t.numel() > 1)
    with torch.no_grad():
        old = weights[name].flatten()[0].item()
        weights[name].flatten()[0] += 1.0  # one element of one weight
        try:
            assert export_cache.segment_key(seg, 18) != key
        finally:
            weights[name].flatten()[0] = old
    assert export_cache.segment_key(seg, 18) == key


@pytest.mark.parametrize("damage", ["entry", "missing", "truncated", "altered"])
def test_a_damaged_entry_is_exported_again_and_replaced(vision, tmp_path, monkeypatch, damage):
    _, _, seg = vision
    cache = tmp_path / "cache"
    monkeypatch.setenv(export_cache.ENV, str(cache))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    exported = onnx_backend.export_segment(seg, tmp_path / "a")
    (entry_dir,) = list(cache.iterdir())
    onnx_file = entry_dir / "vision.onnx"
    if damage == "entry":
        (entry_dir / export_cache.ENTRY).write_text("{not json")
    elif damage == "missing":
        onnx_file.unlink()
    elif damage == "truncated":  # what a crash mid-write would leave
        onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    else:  # the same size, one byte changed
        data = bytearray(onnx_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        onnx_file.write_bytes(bytes(data))
    calls = []
    real = onnx_backend._export
    monkeypatch.setattr(onnx_backend, "_export", lambda s, out: calls.append(1) or real(s, out))
    assert onnx_backend.export_segment(seg, tmp_path / "b") == exported
    assert calls == [1]
    assert _files(tmp_path / "b") == _files(tmp_path / "a")
    replaced = (entry_dir / "vision.onnx").read_bytes()
    assert replaced == (tmp_path / "a" / "vision.onnx").read_bytes()
    assert [p.name for p in cache.iterdir()] == [entry_dir.name]  # no temporary folder left


def test_store_keeps_an_entry_another_compile_stored_and_clears_stale_temporaries(
    vision, tmp_path, monkeypatch
):
    import os
    import time

    _, _, seg = vision
    cache = tmp_path / "cache"
    monkeypatch.setenv(export_cache.ENV, str(cache))
    (tmp_path / "a").mkdir()
    entry = onnx_backend.export_segment(seg, tmp_path / "a")
    (entry_dir,) = list(cache.iterdir())
    inode = (entry_dir / export_cache.ENTRY).stat().st_ino
    old, new = cache / ".tmp-old", cache / ".tmp-new"
    old.mkdir()
    new.mkdir()
    week_ago = time.time() - 7 * 24 * 3600
    os.utime(old, (week_ago, week_ago))
    export_cache.store(cache, entry_dir.name, tmp_path / "a", entry)  # as a racing compile would
    assert (entry_dir / export_cache.ENTRY).stat().st_ino == inode  # the stored one is kept
    assert sorted(p.name for p in cache.iterdir()) == sorted([entry_dir.name, ".tmp-new"])


def test_a_cache_folder_the_compile_cannot_use_is_refused(tmp_path, tiny_model_dir):
    from mllmc.runtime import UserError

    out, model = tmp_path / "out", Path(tiny_model_dir)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for root, why in [
        (out, "is the output folder or inside it"),
        (out / "cache", "is the output folder or inside it"),
        (model, "is the model folder or inside it"),
        (model / "cache", "is the model folder or inside it"),
        (a_file, "is not a folder"),
        (a_file / "sub", "cannot be made"),
    ]:
        with pytest.raises(UserError, match=why):
            export_cache.check_folder(root, out, model)
    assert a_file.read_text() == "x" and not out.exists() and not (model / "cache").exists()
    export_cache.check_folder(tmp_path / "deep" / "cache", out, model)  # made, parents too
    assert (tmp_path / "deep" / "cache").is_dir()


def _compile_cli(model: Path, out: Path, *args: str, env: dict | None = None):
    cli = [sys.executable, "-m", "mllmc.compiler.tools.cli", "compile", str(model), "-o", str(out)]
    return subprocess.run([*cli, *args], capture_output=True, text=True, env=env)


def test_cli_refuses_a_cache_dir_it_cannot_use_before_compiling(tmp_path, tiny_model_dir):
    import os

    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("x")
    out = tmp_path / "out"
    env = {**os.environ, export_cache.ENV: str(out / "cache")}
    for args, env_, line in [
        (
            ["--cache-dir", str(not_a_folder)],
            None,
            f"--cache-dir {str(not_a_folder)!r} is not a folder",
        ),
        (["--cache-dir", ""], None, "--cache-dir '' is not a folder"),
        (
            ["--cache-dir", str(tmp_path / "c"), "--target", "aoti"],
            None,
            "does not apply to --target aoti",
        ),
        (["--cache-dir", str(out / "cache")], None, "is the output folder or inside it"),
        ([], env, "is the output folder or inside it"),  # the variable, checked alike
    ]:
        proc = _compile_cli(tiny_model_dir, out, *args, env=env_)
        assert proc.returncode == 2, proc.stderr
        (printed,) = proc.stderr.strip().splitlines()
        assert printed.startswith("mllmc: error: ") and line in printed, printed
        assert not out.exists()
    assert not_a_folder.read_text() == "x" and not (tmp_path / "c").exists()
