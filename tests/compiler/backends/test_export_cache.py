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


def _use_cache(tmp_path: Path, monkeypatch) -> Path:
    """A new cache folder, made and tagged as a compile makes it, and set as the cache."""
    cache = tmp_path / "cache"
    export_cache.check_folder(cache, tmp_path / "out", tmp_path / "model")
    monkeypatch.setenv(export_cache.ENV, str(cache))
    return cache


def _entries(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if p.name != export_cache.TAG]


def test_an_equal_segment_is_copied_from_the_cache(vision, tmp_path, monkeypatch):
    _, _, seg = vision
    cache = _use_cache(tmp_path, monkeypatch)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    exported = onnx_backend.export_segment(seg, first)
    (entry_dir,) = _entries(cache)
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


@pytest.mark.parametrize("damage", ["entry", "manifest entry", "missing", "truncated", "altered"])
def test_a_damaged_entry_is_exported_again_and_replaced(vision, tmp_path, monkeypatch, damage):
    _, _, seg = vision
    cache = _use_cache(tmp_path, monkeypatch)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    exported = onnx_backend.export_segment(seg, tmp_path / "a")
    (entry_dir,) = _entries(cache)
    onnx_file = entry_dir / "vision.onnx"
    if damage == "entry":
        (entry_dir / export_cache.ENTRY).write_text("{not json")
    elif damage == "manifest entry":  # well-formed, the files intact, the segment's IO changed
        record = json.loads((entry_dir / export_cache.ENTRY).read_text())
        record["entry"]["outputs"][0]["name"] = "image_feats"
        (entry_dir / export_cache.ENTRY).write_text(json.dumps(record))
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
    assert _entries(cache) == [entry_dir]  # no temporary folder left


def test_store_keeps_an_entry_another_compile_stored_and_clears_stale_temporaries(
    vision, tmp_path, monkeypatch
):
    import os
    import time

    _, _, seg = vision
    cache = _use_cache(tmp_path, monkeypatch)
    (tmp_path / "a").mkdir()
    entry = onnx_backend.export_segment(seg, tmp_path / "a")
    (entry_dir,) = _entries(cache)
    inode = (entry_dir / export_cache.ENTRY).stat().st_ino
    # a killed compile's old and a running one's new temporary, and an old folder that is not
    # a compile's temporary (only the first goes)
    old, new = (cache / f".tmp-{c * 32}" for c in "ab")
    other = cache / ".tmp-notes"
    for folder in (old, new, other):
        folder.mkdir()
    week_ago = time.time() - 7 * 24 * 3600
    for folder in (old, other):
        os.utime(folder, (week_ago, week_ago))
    export_cache.store(cache, entry_dir.name, tmp_path / "a", entry)  # as a racing compile would
    assert (entry_dir / export_cache.ENTRY).stat().st_ino == inode  # the stored one is kept
    assert sorted(p.name for p in _entries(cache)) == sorted([entry_dir.name, new.name, other.name])


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


def test_only_a_new_or_empty_folder_becomes_the_cache(vision, tmp_path, monkeypatch):
    """A folder that holds anything but mllmc's cache is refused (nothing of the user's is
    written into or cleared); an empty one is tagged; a tagged one is taken as it is; an
    untagged folder set without the check is not used."""
    from mllmc.runtime import UserError

    out, model = tmp_path / "out", tmp_path / "model"
    mine = tmp_path / "mine"
    (mine / ".tmp-notes").mkdir(parents=True)
    (mine / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="holds files and is not an mllmc export cache"):
        export_cache.check_folder(mine, out, model)
    (mine / export_cache.TAG).write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    with pytest.raises(UserError, match="is not an mllmc export cache"):  # another tool's tag
        export_cache.check_folder(mine, out, model)
    assert sorted(p.name for p in mine.iterdir()) == [".tmp-notes", export_cache.TAG, "notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_cache.check_folder(empty, out, model)
    assert (empty / export_cache.TAG).read_text() == export_cache.TAG_TEXT
    assert [p.name for p in empty.iterdir()] == [export_cache.TAG]
    export_cache.check_folder(empty, out, model)  # tagged: taken again
    _, _, seg = vision
    monkeypatch.setenv(export_cache.ENV, str(mine))
    monkeypatch.setattr(onnx_backend, "_export", lambda s, out: "exported")
    assert onnx_backend.export_segment(seg, tmp_path) == "exported"
    assert sorted(p.name for p in mine.iterdir()) == [".tmp-notes", export_cache.TAG, "notes.txt"]


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
        (["--cache-dir", str(tmp_path)], None, "holds files and is not an mllmc export cache"),
        ([], env, "is the output folder or inside it"),  # the variable, checked alike
    ]:
        proc = _compile_cli(tiny_model_dir, out, *args, env=env_)
        assert proc.returncode == 2, proc.stderr
        (printed,) = proc.stderr.strip().splitlines()
        assert printed.startswith("mllmc: error: ") and line in printed, printed
        assert not out.exists()
    assert not_a_folder.read_text() == "x" and not (tmp_path / "c").exists()
