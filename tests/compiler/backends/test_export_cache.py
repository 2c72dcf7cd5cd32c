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
    assert json.loads((entry_dir / export_cache.ENTRY).read_text())["file"] == "vision.onnx"

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


@pytest.mark.parametrize("damage", ["entry", "file"])
def test_a_damaged_entry_is_exported_again_and_replaced(vision, tmp_path, monkeypatch, damage):
    _, _, seg = vision
    cache = tmp_path / "cache"
    monkeypatch.setenv(export_cache.ENV, str(cache))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    exported = onnx_backend.export_segment(seg, tmp_path / "a")
    (entry_dir,) = list(cache.iterdir())
    if damage == "entry":
        (entry_dir / export_cache.ENTRY).write_text("{not json")
    else:
        (entry_dir / "vision.onnx").unlink()
    calls = []
    real = onnx_backend._export
    monkeypatch.setattr(onnx_backend, "_export", lambda s, out: calls.append(1) or real(s, out))
    assert onnx_backend.export_segment(seg, tmp_path / "b") == exported
    assert calls == [1]
    assert _files(tmp_path / "b") == _files(tmp_path / "a")
    assert json.loads((entry_dir / export_cache.ENTRY).read_text())["file"] == "vision.onnx"
    assert [p.name for p in cache.iterdir()] == [entry_dir.name]  # no temporary folder left


def test_cli_cache_dir_that_is_a_file_is_refused(tmp_path, tiny_model_dir):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("x")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "mllmc.compiler.tools.cli", "compile", str(tiny_model_dir),
         "-o", str(out), "--cache-dir", str(not_a_folder)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"mllmc: error: --cache-dir {str(not_a_folder)!r} is not a folder"
    ]
    assert not out.exists()
    assert not_a_folder.read_text() == "x"
