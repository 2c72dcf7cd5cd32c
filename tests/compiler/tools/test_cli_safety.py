"""What mllmc promises about a user's files and its own error contract, through the real console
script: --force replaces only what mllmc wrote, the source model is never an output, a
replacement is one atomic swap, a killed compile leaves nothing behind, goldens never pass
vacuously, and every bad input is one line on stderr with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mllmc.runtime.errors import UserError
from tests.compiler.tools.test_cli import MLLMC, mllmc, user_error


def temps_beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-"))


def one_line_error(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mllmc")]
    assert len(errors) == 1 and match in errors[0], proc.stderr


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("my notes")
    return d


def test_force_replaces_only_an_mllmc_artifact(
    tiny_model_dir, tiny_base_artifact, user_dir, tmp_path
):
    weights = sorted(p.name for p in tiny_model_dir.iterdir())
    # a user's directory, the current directory, the source model, inside it, above it
    user_error("compile", tiny_model_dir, "-o", user_dir, "--force", match="not an mllmc artifact")
    assert (user_dir / "notes.txt").read_text() == "my notes"
    proc = subprocess.run(
        [MLLMC, "compile", str(tiny_model_dir), "-o", ".", "--force"],
        cwd=user_dir,
        capture_output=True,
        text=True,
    )
    one_line_error(proc, "refusing to replace")
    assert (user_dir / "notes.txt").read_text() == "my notes"
    for out in (tiny_model_dir, tiny_model_dir / "sub", tiny_model_dir.parent):
        user_error("compile", tiny_model_dir, "-o", out, "--force", match="source model")
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == weights
    # an artifact with a file mllmc did not write in it is not replaced either
    art = tmp_path / "art"
    shutil.copytree(tiny_base_artifact, art)
    from mllmc.compiler.files.artifact import replaceable

    # every file an artifact holds is one its manifest names (the packed decode graph included)
    assert (art / "decode_static.packed.onnx").is_file() and replaceable(art) is None
    (art / "README.txt").write_text("mine")
    user_error("compile", tiny_model_dir, "-o", art, "--force", match="did not write (README.txt)")
    assert (art / "README.txt").is_file()
    # nor one holding engine-like files its manifest does not name: they are a user's too
    (art / "README.txt").unlink()
    (art / "my_model.onnx").write_bytes(b"my model")
    (art / "results.data").write_bytes(b"my results")
    user_error(
        "compile",
        tiny_model_dir,
        "-o",
        art,
        "--force",
        match="did not write (my_model.onnx, results.data)",
    )
    assert (art / "my_model.onnx").read_bytes() == b"my model"
    assert (art / "results.data").read_bytes() == b"my results"
    # a file is never replaced, and the check comes before any work (no temp dir made)
    f = tmp_path / "file.bin"
    f.write_bytes(b"data")
    user_error("compile", tiny_model_dir, "-o", f, "--force", match="is a file")
    user_error("compile", tiny_model_dir, "-o", f / "sub", match="is a file, not a directory")
    assert f.read_bytes() == b"data" and temps_beside(f) == []
    user_error("compile", tiny_model_dir, "-o", "/sys/mllmc-out", match="cannot write")


def test_force_replaces_an_artifact_in_one_swap(tiny_base_artifact, tmp_path):
    """The swap compile ends with, run directly: the old artifact is renamed aside, the new one
    renamed in, the old one deleted; nothing else is left beside it."""
    from mllmc.compiler.files.artifact import staged_directory

    art = tmp_path / "art"
    shutil.copytree(tiny_base_artifact, art)
    with staged_directory(art, force=True) as tmp:
        assert tmp.parent == art.parent and tmp.name.startswith(f".art.tmp-{os.getpid()}-")
        shutil.copytree(tiny_base_artifact, tmp, dirs_exist_ok=True)
        (tmp / "manifest.json").write_text((tmp / "manifest.json").read_text() + " ")
        assert (art / "prefill.onnx").is_file()  # the old artifact is intact until the swap
    assert (art / "manifest.json").read_text().endswith(" ")  # the new one is in place
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".art."))
    assert leftovers == [], leftovers  # the swap's lock file lives in the user's lock directory
    with pytest.raises(UserError, match="already exists|appeared"), staged_directory(art):
        pass  # without force: refused at the swap too, and its temp dir removed
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".art.")) == leftovers


def test_concurrent_writers_to_one_output_do_not_both_succeed(tmp_path):
    """Two writers racing for one new output without --force (presets: the same staging and
    swap as compile, seconds instead of a minute): exactly one succeeds."""
    out = tmp_path / "out"
    cmd = [MLLMC, "preset", "tiny-llava", "-o", str(out)]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "appeared while this ran" in loser or "already exists" in loser, loser
    assert (out / "config.json").is_file() and temps_beside(out) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_killed_compile_leaves_nothing_behind(tiny_model_dir, tmp_path, signum):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [MLLMC, "compile", str(tiny_model_dir), "-o", str(out), "-q"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not temps_beside(out) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert temps_beside(out), "the compile never staged its output"
    time.sleep(1.0)  # well inside the compile (loading the model)
    proc.send_signal(signum)
    code = proc.wait(timeout=120)
    assert code == 128 + signum, proc.stderr.read()
    assert f"stopped by {signal.Signals(signum).name}" in proc.stderr.read()
    assert not out.exists() and temps_beside(out) == []


def signal_self_and_run_on(signum: int) -> None:
    os.kill(os.getpid(), signum)
    for _ in range(10_000):  # Python runs the handler between these bytecodes
        pass


class SignalledInDel:
    """Sends its signal from inside `__del__`, so that Python runs the handler there: where an
    exception is printed as "Exception ignored in ..." and dropped."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        signal_self_and_run_on(self.signum)


def signalled_in_weakref_callback(signum: int) -> None:
    """The same from a weakref callback, as importlib's module locks have."""
    import weakref

    class Target:
        pass

    target = Target()
    ref = weakref.ref(target, lambda _: signal_self_and_run_on(signum))
    del target
    assert ref() is None


@pytest.fixture
def ctrl_c():
    """SIGINT raising KeyboardInterrupt, as Python has it in a terminal: a process started in
    the background inherits SIGINT ignored, and Python then leaves it so."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def busy(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # bytecodes, between which a handler may run
        pass


@pytest.mark.parametrize("where", ["__del__", "weakref callback"])
@pytest.mark.parametrize(
    ("signum", "raised"),
    [
        (signal.SIGTERM, "Terminated"),
        (signal.SIGHUP, "Terminated"),
        (signal.SIGINT, "KeyboardInterrupt"),
    ],
)
def test_a_stop_signal_that_lands_where_exceptions_are_dropped_still_stops(
    where, signum, raised, capfd, ctrl_c
):
    from mllmc.compiler.tools import cli

    hook, handlers = sys.unraisablehook, [signal.getsignal(s) for s in cli.STOP_SIGNALS]
    expected = cli.Terminated if raised == "Terminated" else KeyboardInterrupt
    with pytest.raises(expected) as stopped, cli.StopSignals() as stops:
        if where == "__del__":
            SignalledInDel(signum)  # dropped at once: __del__ runs here
        else:
            signalled_in_weakref_callback(signum)
        busy(10)  # the stop is raised again in the code that follows
        pytest.fail("the stop was dropped")
    assert stops.redelivered == 1  # dropped, then sent again: not raised where it landed
    if expected is cli.Terminated:
        assert stopped.value.signum == signum
    assert "Exception ignored" not in capfd.readouterr().err  # one line stays one line
    assert sys.unraisablehook is hook  # both put back as they were
    assert [signal.getsignal(s) for s in cli.STOP_SIGNALS] == handlers


def test_a_stop_sent_again_while_the_hook_still_runs_waits_until_it_has_left(monkeypatch):
    """On a loaded machine the main thread can still be inside the hook when the timer fires:
    sent then, the stop would be raised inside the hook, where it is dropped for good. It is
    sent once the hook has returned."""
    from mllmc.compiler.tools import cli

    monkeypatch.setattr(cli, "REDELIVERY_DELAY_S", 0.0)  # the timer fires at once
    dropped = cli.StopSignals._dropped

    def dropped_slowly(self, unraisable):
        dropped(self, unraisable)
        busy(0.3)  # still in the hook, where a handler may run between bytecodes

    monkeypatch.setattr(cli.StopSignals, "_dropped", dropped_slowly)
    with pytest.raises(cli.Terminated), cli.StopSignals() as stops:
        SignalledInDel(signal.SIGTERM)
        busy(10)
        pytest.fail("the stop was dropped")
    assert stops.redelivered == 1


def test_a_dropped_stop_still_waiting_when_the_block_ends_is_raised_there():
    from mllmc.compiler.tools import cli

    with pytest.raises(cli.Terminated), cli.StopSignals() as stops:
        SignalledInDel(signal.SIGTERM)  # dropped; the block ends before it is sent again
    assert stops.redelivered == 0
    busy(0.2)  # and nothing is sent after the block


def test_a_dropped_stop_does_not_interrupt_the_clean_up_of_one_already_unwinding():
    from mllmc.compiler.tools import cli

    with cli.StopSignals() as stops:
        try:
            signal_self_and_run_on(signal.SIGTERM)
            pytest.fail("SIGTERM did not stop")
        except cli.Terminated:  # unwinding: the clean-up runs, and a second stop lands in it
            SignalledInDel(signal.SIGHUP)
            busy(0.2)
    assert stops.redelivered == 0


def test_stale_temp_dirs_of_dead_writers_are_removed_never_live_ones(tmp_path):
    from mllmc.compiler.files.outputs import TEMP_MARKER

    out = tmp_path / "m"
    dead = tmp_path / ".m.tmp-99999999-abc"  # above any pid_max: no such process
    dead_old = tmp_path / ".m.old-99999999-abc"  # an old output set aside, then a crash
    live = tmp_path / f".m.tmp-{os.getpid()}-def"  # this test process: alive
    other = tmp_path / ".other.tmp-99999999-abc"  # another output's: not ours to touch
    for d in (dead, dead_old, live, other):
        d.mkdir()
        (d / "weights.bin").write_bytes(b"x")
        (d / TEMP_MARKER).write_text("99999999\n")
    # a user's directories whose names merely look like temporaries: no marker, never removed
    users = [tmp_path / ".m.old-99999999-x", tmp_path / ".m.tmp-99999999-y"]
    for d in users:
        d.mkdir()
        (d / "notes.txt").write_text("mine")
    mllmc("preset", "tiny-llava", "-o", out)
    assert not dead.exists() and not dead_old.exists() and live.is_dir() and other.is_dir()
    assert all((d / "notes.txt").read_text() == "mine" for d in users)
    assert not (out / TEMP_MARKER).exists()  # the marker never reaches the output


def test_preset_force_replaces_only_a_preset(user_dir, tmp_path):
    user_error("preset", "tiny-llava", "-o", user_dir, "--force", match="not a preset directory")
    assert (user_dir / "notes.txt").read_text() == "my notes"
    out = tmp_path / "p"
    mllmc("preset", "tiny-llava", "-o", out)
    mllmc("preset", "tiny-llava", "-o", out, "--force", "--seed", "1")
    (out / "extra.txt").write_text("mine")
    user_error("preset", "tiny-llava", "-o", out, "--force", match="did not write (extra.txt)")


def test_two_passes_of_one_kind_are_refused(tiny_model_dir, tmp_path):
    user_error(
        "compile",
        tiny_model_dir,
        "--pass",
        "shortv:layers=[1]",
        "--pass",
        "shortv:layers=[2]",
        "-o",
        tmp_path / "x",
        match="'shortv' is given twice",
    )
    assert not (tmp_path / "x").exists()


def test_bad_numbers_are_one_line_errors(
    tiny_base_artifact, tiny_model_dir, sample_image, tmp_path
):
    run = ("run", tiny_base_artifact, "--image", sample_image, "--prompt", "Hi")
    for args, match in [
        (("--seed", "-1"), "--seed: must be between 0"),
        (("--temperature", "nan"), "--temperature: must be a finite number"),
        (("--temperature", "-1"), "--temperature: must be a finite number"),
        (("--top-k", "-3"), "--top-k: must be >= 0"),
        (("--threads", "100000"), "--threads: must be between 1 and"),
        (("--threads", "-1"), "--threads: must be between 1 and"),
        (("--max-new-tokens", "0"), "--max-new-tokens: must be >= 1"),
    ]:
        user_error(*run, *args, match=match)
    verify = ("verify", tiny_base_artifact, "--against", tiny_model_dir)
    user_error(*verify, "--tol", "-1", match="--tol: must be a finite number > 0")
    user_error(*verify, "--tol", "inf", match="--tol: must be a finite number > 0")
    user_error("golden", "check", tiny_base_artifact, "g.json", "--tol", "0", match="--tol")
    user_error("bench", tiny_model_dir, "--repeats", "0", match="--repeats: must be >= 1")
    user_error(
        "bench", tiny_model_dir, "--target", "aoti", "--device", "tpu", match="unknown device"
    )
    user_error("bench", tiny_model_dir, "--dtype", "bfloat16", match="target 'onnx' builds float32")
    user_error("calibrate", tiny_model_dir, "-n", "0", "-o", tmp_path / "lc.json", match="-n")


def test_output_files_go_where_asked_and_replace_only_with_force(
    tiny_base_artifact, sample_image, tmp_path
):
    run = ("run", tiny_base_artifact, "--image", sample_image, "--prompt", "Hi")
    logits = tmp_path / "new" / "dir" / "x.npy"  # missing parents are made
    mllmc(*run, "--max-new-tokens", "2", "--save-logits", logits)
    assert np.load(logits).shape[0] >= 1
    user_error(*run, "--save-logits", logits, match="already exists; pass --force")
    mllmc(*run, "--max-new-tokens", "3", "--save-logits", logits, "--force")
    user_error(*run, "--save-logits", tmp_path, match="is a directory")
    f = tmp_path / "plain"
    f.write_text("x")
    user_error(*run, "--save-logits", f / "x.npy", match="is a file, not a directory")
    golden = tmp_path / "g" / "golden.json"
    rec = ("golden", "record", tiny_base_artifact, "--image", sample_image, "--prompt", "Hi")
    mllmc(*rec, "-o", golden)
    user_error(*rec, "-o", golden, match="already exists; pass --force")
    assert golden.is_file() and not [p for p in golden.parent.iterdir() if ".tmp-" in p.name]


def test_golden_check_works_from_another_directory(tiny_base_artifact, sample_image, tmp_path):
    work = tmp_path / "work"
    (work / "goldens").mkdir(parents=True)
    img = work / "img.png"
    shutil.copy(sample_image, img)
    proc = subprocess.run(
        [MLLMC, "golden", "record", str(tiny_base_artifact), "--image", "img.png"]
        + ["--prompt", "Hi", "--max-new-tokens", "3", "-o", "goldens/g.json"],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    g = json.loads((work / "goldens" / "g.json").read_text())
    assert g["inputs"]["image"] == "../img.png"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [MLLMC, "golden", "check", str(tiny_base_artifact), str(work / "goldens" / "g.json")],
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "passed" in proc.stdout, proc.stderr


def test_goldens_never_pass_vacuously(tiny_base_artifact, sample_image, tmp_path):
    path = tmp_path / "g.json"
    mllmc(
        "golden",
        "record",
        tiny_base_artifact,
        "--image",
        sample_image,
        "--prompt",
        "Hi",
        "-o",
        path,
    )
    good = json.loads(path.read_text())

    def variant(name: str, change) -> Path:
        g = json.loads(json.dumps(good))
        change(g)
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(g))
        return p

    corrupt = {
        "empty-logits": lambda g: g.update(logits=[]),
        "fewer-logits": lambda g: g["logits"].pop(),
        "no-tokens": lambda g: g.update(token_ids=[]),
        "missing-inputs": lambda g: g.pop("inputs"),
        "string-prompt-len": lambda g: g["inputs"].update(max_new_tokens="16"),
        "bad-top-values": lambda g: g["logits"][0].update(top_values="high"),
        "no-mean": lambda g: g["logits"][-1].pop("mean"),
    }
    for name, change in corrupt.items():
        user_error(
            "golden", "check", tiny_base_artifact, variant(name, change), match="corrupt golden"
        )
    # NaN statistics (Python's json reads NaN) fail the check, at any step, never pass
    for step in (0, len(good["logits"]) - 1):
        nan = variant(f"nan{step}", lambda g, s=step: g["logits"][s].update(std=float("nan")))
        proc = mllmc("golden", "check", tiny_base_artifact, nan, check=1)
        assert "FAILED" in proc.stdout and "NaN" in proc.stdout
    # a drift at the last step is found: every step is compared
    last = variant("drift", lambda g: g["logits"][-1]["top_values"].__setitem__(1, 99.0))
    assert "FAILED" in mllmc("golden", "check", tiny_base_artifact, last, check=1).stdout


def _corrupt_manifest(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    change(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_manifest_schema_and_paths_are_checked(tiny_base_artifact, sample_image, tmp_path):
    cases = {
        "layers-wrong-type": (lambda m: m.update(layers="all"), "layers should be a list"),
        "visual-str": (
            lambda m: m.update(visual_tokens="16"),
            "visual_tokens should be an integer",
        ),
        "file-int": (
            lambda m: m["segments"]["vision"].update(file=3),
            "segments.vision.file should be a string",
        ),
        "no-model": (lambda m: m.pop("model"), "missing 'model'"),
        "escape": (
            lambda m: m["segments"]["decode"].update(file="../decode.onnx"),
            "outside the artifact",
        ),
        "absolute": (
            lambda m: m["segments"]["prefill"].update(file="/etc/passwd"),
            "outside the artifact",
        ),
        "short-plan": (lambda m: m["layers"].pop(), "layer plans for a"),
        "packed-int": (
            lambda m: m["segments"]["decode_static"].update(packed_file=3),
            "segments.decode_static.packed_file should be a string",
        ),
        "packed-escape": (
            lambda m: m["segments"]["decode_static"].update(packed_file="../x.packed.onnx"),
            "outside the artifact",
        ),
    }
    for name, (change, match) in cases.items():
        art = _corrupt_manifest(tiny_base_artifact, tmp_path / name, change)
        for cmd in (("inspect", art), ("run", art, "--image", sample_image, "--prompt", "Hi")):
            msg = user_error(*cmd, match="corrupt artifact manifest")
            assert match in msg, msg


def test_inspect_refuses_an_artifact_with_missing_engine_files(tiny_base_artifact, tmp_path):
    art = tmp_path / "a"
    shutil.copytree(tiny_base_artifact, art)
    (art / "prefill.onnx").unlink()
    user_error("inspect", art, match="prefill.onnx is missing")


def test_eval_and_calibrate_numbers_are_checked(tiny_base_artifact, tiny_model_dir, tmp_path):
    ev = ("eval", tiny_base_artifact, "--task", "shapes-qa")
    user_error(*ev, "--threads", "100000", match="--threads: must be between 1 and")
    user_error(*ev, "--max-new-tokens", "0", match="--max-new-tokens: must be >= 1")
    cal = ("calibrate", tiny_model_dir, "--pass", "vte", "-o", tmp_path / "exit.json")
    user_error(*cal, "--threshold", "nan", match="--threshold: must be a finite number > 0")
    user_error(*cal, "--threshold", "-1", match="--threshold: must be a finite number > 0")


def test_bench_writes_its_artifacts_where_asked_or_to_a_temporary_directory(
    tiny_model_dir, tiny_base_artifact, tmp_path, monkeypatch
):
    """bench compiles into --artifacts-dir (an existing artifact replaced only with --force) or
    into a temporary directory it removes; never beside -o, into the current directory or the
    source tree. The compile itself is the base artifact fixture, copied."""
    from mllmc.compiler import pipeline
    from mllmc.compiler.tools import bench
    from mllmc.runtime.manifest import read_manifest

    name = f"{tiny_model_dir.name}-mllmc_onnx"
    mine = tmp_path / "arts" / name
    shutil.copytree(tiny_base_artifact, mine)
    before = (mine / "manifest.json").read_bytes()
    proc = subprocess.run(
        [MLLMC, "bench", str(tiny_model_dir), "--artifacts-dir", str(tmp_path / "arts")],
        capture_output=True,
        text=True,
    )
    one_line_error(proc, "already exists; pass --force")
    (mine / "notes.txt").write_text("mine")
    proc = subprocess.run(
        [MLLMC, "bench", str(tiny_model_dir), "--artifacts-dir", str(tmp_path / "arts")]
        + ["--force"],
        capture_output=True,
        text=True,
    )
    one_line_error(proc, "did not write (notes.txt)")
    assert (mine / "manifest.json").read_bytes() == before

    compiled: list[Path] = []

    def fake_compile(model_dir, out, passes, force=False, **_kw):
        assert not Path(out).exists() or force
        compiled.append(Path(out))
        shutil.copytree(tiny_base_artifact, out, dirs_exist_ok=force)
        return pipeline.CompileResult(Path(out), read_manifest(out))

    monkeypatch.setattr(pipeline, "compile_model", fake_compile)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    threads = torch.get_num_threads()
    try:
        report = bench.bench(str(tiny_model_dir), [], n_text=4, decode_tokens=1, repeats=1)
    finally:
        torch.set_num_threads(threads)  # bench uses every core; leave the session as it was
    assert set(report["rows"]) == {"hf_eager", "mllmc_onnx"}
    (where,) = compiled
    assert where.name == name and not where.exists()  # a temporary directory, removed
    assert list(work.iterdir()) == []
    assert tmp_path not in where.parents and tiny_model_dir not in where.parents


def test_output_names_too_long_are_one_line_errors(tiny_model_dir, tiny_base_artifact, tmp_path):
    long = tmp_path / ("n" * 300)
    run = ("run", tiny_base_artifact, "--image", "x.png", "--prompt", "Hi")
    rec = ("golden", "record", tiny_base_artifact, "--image", "x.png", "--prompt", "Hi")
    for cmd in [
        ("compile", tiny_model_dir, "-o", long),
        ("compile", tiny_model_dir, "-o", long / "sub"),
        ("preset", "tiny-llava", "-o", long),
        ("calibrate", tiny_model_dir, "-o", long),
        ("calibrate", tiny_model_dir, "--pass", "vte", "--threshold", "1", "-o", long),
        (*run, "--save-logits", long),
        (*rec, "-o", long),
        ("bench", tiny_model_dir, "-o", long),
        ("bench", tiny_model_dir, "--artifacts-dir", long),
    ]:
        user_error(*cmd, match="longer than the 255 a file name may be")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_link_is_never_written_through(
    tiny_model_dir, tiny_base_artifact, sample_image, tmp_path
):
    """A symbolic link at an output path counts as existing, a dangling one too; --force replaces
    the link itself, and the file it points to is untouched."""
    dangling = tmp_path / "dangling.npy"
    dangling.symlink_to(tmp_path / "nowhere.npy")
    run = ("run", tiny_base_artifact, "--image", sample_image, "--prompt", "Hi")
    rec = ("golden", "record", tiny_base_artifact, "--image", sample_image, "--prompt", "Hi")
    for cmd in [
        (*run, "--save-logits", dangling),
        (*rec, "-o", dangling),
        ("calibrate", tiny_model_dir, "-o", dangling),
        ("calibrate", tiny_model_dir, "--pass", "vte", "--threshold", "1", "-o", dangling),
        ("bench", tiny_model_dir, "-o", dangling),
    ]:
        user_error(*cmd, match="already exists; pass --force")
    assert dangling.is_symlink() and not (tmp_path / "nowhere.npy").exists()
    fifo = tmp_path / "fifo"  # nor is anything but a file or a link replaced: a device, a FIFO
    os.mkfifo(fifo)
    user_error(*run, "--save-logits", fifo, "--force", match="it is not a regular file")
    user_error(*rec, "-o", fifo, "--force", match="it is not a regular file")
    assert fifo.is_fifo()
    fifo.unlink()
    mllmc(*run, "--max-new-tokens", "2", "--save-logits", dangling, "--force")
    assert not dangling.is_symlink() and np.load(dangling).shape[0] >= 1
    assert not (tmp_path / "nowhere.npy").exists()
    # calibrate --force onto links to a user's files: the links are replaced, the files kept
    mine_json, mine_png = tmp_path / "mine.json", tmp_path / "mine.png"
    mine_json.write_text("my json")
    mine_png.write_bytes(b"my png")
    lc = tmp_path / "lc.json"
    lc.symlink_to(mine_json)
    lc.with_suffix(".png").symlink_to(mine_png)
    mllmc("calibrate", tiny_model_dir, "-n", "1", "-o", lc, "--force", "-q")
    assert mine_json.read_text() == "my json" and mine_png.read_bytes() == b"my png"
    assert not lc.is_symlink() and json.loads(lc.read_text())["samples"] == 1
    assert not lc.with_suffix(".png").is_symlink()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_file_that_appears_meanwhile_is_not_replaced(tmp_path, monkeypatch):
    """Every file mllmc writes takes its name at the end only if nothing has it by then, without
    --force: a file, or a dangling link, made while mllmc worked is kept."""
    from mllmc.compiler.files import outputs

    checked = outputs.check_output_file

    def appears(path, force, what="output"):
        checked(path, force, what)  # the check up front passes; then the name is taken
        if Path(path).name == "f.json":
            Path(path).write_text("theirs")
        else:
            Path(path).symlink_to(tmp_path / "nowhere")

    monkeypatch.setattr(outputs, "check_output_file", appears)
    for name in ("f.json", "link.json"):
        with pytest.raises(UserError, match="appeared while this ran"):
            outputs.write_file(tmp_path / name, "ours")
    assert (tmp_path / "f.json").read_text() == "theirs"
    assert (tmp_path / "link.json").is_symlink() and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "link.json"]


@pytest.fixture
def immutable(tmp_path):
    """chattr +i PATH, undone after the test; skips where the file system or user cannot."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip("chattr +i is not available here")
        made.append(path)
        return path

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_force_checks_the_old_output_can_be_removed_before_any_work(
    tiny_model_dir, tiny_base_artifact, sample_image, tmp_path, immutable
):
    art = tmp_path / "art"
    shutil.copytree(tiny_base_artifact, art)
    immutable(art / "prefill.onnx")
    compile_ = ("compile", tiny_model_dir, "-o", art, "--force", "-q")
    user_error(*compile_, match="prefill.onnx is immutable")
    immutable(art)
    user_error(*compile_, match="read-only or immutable")
    assert (art / "prefill.onnx").is_file() and temps_beside(art) == []
    golden = tmp_path / "golden.json"
    golden.write_text("mine")
    immutable(golden)
    rec = ("golden", "record", tiny_base_artifact, "--image", sample_image, "--prompt", "Hi")
    user_error(*rec, "-o", golden, "--force", match="golden.json is immutable")
    assert golden.read_text() == "mine"
