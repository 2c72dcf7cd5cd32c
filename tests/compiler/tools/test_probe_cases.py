"""Bad inputs and leftovers: calibration files must match the model exactly, conflicting
options are refused, an error after the model loads is still one stderr line, and mllmc leaves
no lock or scratch files where the user would see or have to clean them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from mllmc.runtime.errors import UserError
from tests.compiler.tools.test_cli import mllmc, user_error

HASH = "abcd1234"


def _info() -> SimpleNamespace:
    return SimpleNamespace(num_layers=6, config_hash=HASH, model_dir="/models/m")


def _write(tmp_path: Path, name: str, data: object) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_lc_and_exit_files_must_match_the_model(tmp_path):
    from mllmc.passes.calibration import read_exit_file, read_lc_file

    good = {"model_config_hash": HASH, "num_layers": 6, "order": [5, 4, 3, 2, 1, 0]}
    assert read_lc_file(_write(tmp_path, "good.json", good), _info()) == [5, 4, 3, 2, 1, 0]
    cases = [
        ({k: v for k, v in good.items() if k != "model_config_hash"}, "no model_config_hash"),
        ({**good, "num_layers": 7}, "is for a 7-layer model; this model has 6 layers"),
        ({**good, "order": [5, 5, 3, 2, 1, 0]}, "a layer appears twice"),
        ({**good, "order": [50, 4, 3, 2, 1, 0]}, "layer 50 is out of range 0..5"),
        ({**good, "order": [-1, 4, 3, 2, 1, 0]}, "layer -1 is out of range 0..5"),
        ({**good, "order": [4, 3, 2, 1, 0]}, "it has 5 entries"),
        ({**good, "order": "543210"}, "'order' must be a list of the 6 layer indices"),
        ({k: v for k, v in good.items() if k != "order"}, "'order' must be a list"),
    ]
    for i, (data, match) in enumerate(cases):
        with pytest.raises(UserError, match=match) as e:
            read_lc_file(_write(tmp_path, f"lc{i}.json", data), _info())
        message = str(e.value)
        assert "\n" not in message and "KeyError" not in message, message
    with pytest.raises(UserError, match="recalibrate with: mllmc calibrate MODEL -o"):
        read_lc_file(_write(tmp_path, "nohash.json", cases[0][0]), _info())

    exit_file = {"model_config_hash": HASH, "num_layers": 6, "k": 2, "threshold": 0.1}
    assert read_exit_file(_write(tmp_path, "ex.json", exit_file), _info()) == (2, 0.1)
    for i, (data, match) in enumerate(
        [
            ({k: v for k, v in exit_file.items() if k != "model_config_hash"}, "--pass vte"),
            ({**exit_file, "num_layers": 7}, "is for a 7-layer model"),
            ({**exit_file, "k": 9}, "exit layer 9 is not in 0..6"),
            ({k: v for k, v in exit_file.items() if k != "k"}, "no 'k'"),
        ]
    ):
        with pytest.raises(UserError, match=match):
            read_exit_file(_write(tmp_path, f"ex{i}.json", data), _info())


def test_error_after_the_model_loads_is_one_stderr_line(tiny_model_dir, tmp_path):
    """An LC file without a config hash is refused once the model is loaded; with -q no
    progress bar (Hugging Face's "Loading weights" included) comes before the error line."""
    lc = _write(tmp_path, "lc.json", {"num_layers": 6, "order": [5, 4, 3, 2, 1, 0]})
    proc = mllmc(
        "compile", tiny_model_dir, "--pass", f"shortv:lc={lc}", "-o", tmp_path / "out", "-q",
        check=2,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no model_config_hash" in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lc.json"]


def test_prompts_with_two_image_tokens_are_refused(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Describe <image>.\n\n<image> <image> hi\n")
    out = tmp_path / "x.json"
    user_error(
        "calibrate", tiny_model_dir, "--prompts", prompts, "-n", "2", "-o", out,
        match=f"prompts file {prompts}, line 3: 2 <image> tokens",
    )  # fmt: skip
    assert not out.exists()


def test_conflicting_options_are_refused(tiny_model_dir, tmp_path):
    from mllmc.passes import parse_pass_spec

    for spec, match in (
        ("shortv:ratio=0.5,layers=[1]", "give layers or ratio, not both"),
        ("shortv:layers=[1],lc=lc.json", "give layers or lc, not both"),
    ):
        with pytest.raises(UserError, match=match):
            parse_pass_spec(spec)
    out = tmp_path / "out"
    # freezing every layer is refused, as ratio=1 is
    user_error(
        "compile", tiny_model_dir, "--pass", "shortv:layers=[0,1,2,3,4,5]", "-o", out,
        match="shortv: layers freezes all 6 layers",
    )  # fmt: skip
    user_error(
        "compile", tiny_model_dir, "--pass", "shortv:ratio=0.5,layers=[1]", "-o", out,
        match="not both",
    )  # fmt: skip
    user_error(
        "calibrate", tiny_model_dir, "--threshold", "0.1", "-o", tmp_path / "lc.json",
        match="--threshold is for --pass vte",
    )  # fmt: skip
    user_error(
        "eval", tiny_model_dir, "--data", tmp_path / "items.jsonl", "--split", "train",
        match="--split chooses a --task split",
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_no_lock_file_beside_an_output(tiny_base_artifact, tmp_path, monkeypatch):
    from mllmc.compiler.files.outputs import lock_path

    # a compile (the session's artifact fixture) and a preset leave only their output
    assert [p.name for p in tiny_base_artifact.parent.iterdir()] == [tiny_base_artifact.name]
    out = tmp_path / "models" / "tiny"
    mllmc("preset", "tiny-llava", "-o", out)
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]
    # the lock is this user's, keyed by the output's resolved path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "link").symlink_to(out.parent)
    lock = lock_path(out)
    assert lock.parent == tmp_path / "tmp" / f"mllmc-locks-{os.getuid()}"
    assert lock == lock_path(tmp_path / "link" / "tiny") != lock_path(out.parent / "other")


def test_stale_bench_scratch_of_dead_processes_is_removed(tmp_path, monkeypatch):
    from mllmc.compiler.files.outputs import TEMP_MARKER, remove_stale_scratch, scratch_directory

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid, live_pid = int(dead.stdout), os.getppid()

    def make(name: str, marked: bool) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "prefill.onnx").write_bytes(b"x")
        if marked:
            (d / TEMP_MARKER).write_text("0\n")
        return d

    stale = make(f"mllmc-bench-{dead_pid}-abc", marked=True)
    kept = [
        make(f"mllmc-bench-{dead_pid}-unmarked", marked=False),  # not mllmc's
        make(f"mllmc-bench-{live_pid}-live", marked=True),  # a running bench
        make(f"other-{dead_pid}-abc", marked=True),  # another prefix
    ]
    scratch = scratch_directory("mllmc-bench-")
    made = Path(scratch.name)
    assert not stale.exists() and all(d.is_dir() for d in kept)
    assert made.name.startswith(f"mllmc-bench-{os.getpid()}-") and (made / TEMP_MARKER).is_file()
    assert remove_stale_scratch("mllmc-bench-") == []  # this process's own is never removed
    scratch.cleanup()
    assert not made.exists()
