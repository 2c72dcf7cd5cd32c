"""`mllmc serve` and `mllmc export-triton`: a tiny artifact served by the tritonserver PyTriton
ships, asked through tritonclient over HTTP (and gRPC for cancellation). Each answer equals
engine.generate's for the same request alone, concurrent requests too; every kind of bad
request gets a one-line error and the server goes on serving; SIGTERM drains what is in flight.
The request checks and the repository writer run everywhere; the server tests need the `serve`
extra (PyTriton, which pins numpy < 2) and skip, saying why, where it is missing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mllmc.compiler.tools.serve import (
    REPO_HEADER,
    ServeSettings,
    check_serve_requirements,
    model_config,
    write_model_repository,
)
from mllmc.compiler.tools.triton_model import MAX_PROMPT_BYTES, error_line, parse_request
from mllmc.runtime.errors import UserError

CLI = [sys.executable, "-m", "mllmc.compiler.tools.cli"]
MLLMC = str(Path(sys.executable).with_name("mllmc"))  # the console script
PROMPT = "Describe the image."


def _serve_missing() -> str | None:
    try:
        check_serve_requirements()
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except (UserError, ImportError) as e:
        return f"the serve extra is not usable here: {e}"
    return None


needs_server = pytest.mark.skipif(_serve_missing() is not None, reason=str(_serve_missing()))


def png_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def arrays(images: list[bytes], prompt: bytes, max_new: int, **extra: object) -> dict:
    """A request's input arrays as the Python backend hands them (batch dimension 1)."""
    out = {
        "image": np.array([images], dtype=np.object_),
        "prompt": np.array([[prompt]], dtype=np.object_),
        "max_new_tokens": np.array([[max_new]], dtype=np.int32),
    }
    out.update({k: np.array([[v]]) for k, v in extra.items()})
    return out


# -- request checks and the repository (no server) ---------------------------------------------


def test_parse_request_gives_the_scheduler_request(sample_image: Path) -> None:
    data = png_bytes(sample_image)
    kwargs = parse_request(arrays([data, data], PROMPT.encode(), 8, temperature=0.5, seed=3), 64)
    assert kwargs == {
        "images": [data, data],
        "prompt": PROMPT,
        "max_new_tokens": 8,
        "temperature": 0.5,
        "top_k": 0,
        "seed": 3,
    }
    assert parse_request(arrays([data], b"hi", 1), 64)["seed"] is None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"image": np.array([[]], dtype=np.object_)}, "1 to 16 images, got 0"),
        ({"image": np.array([[b""]], dtype=np.object_)}, "image 0 is empty"),
        ({"prompt": np.array([[b"  "]], dtype=np.object_)}, "the prompt is empty"),
        ({"prompt": np.array([[b"\xff\xfe"]], dtype=np.object_)}, "not valid UTF-8"),
        ({"prompt": np.array([[b"x" * (MAX_PROMPT_BYTES + 1)]], dtype=np.object_)}, "at most"),
        ({"max_new_tokens": np.array([[0]], dtype=np.int32)}, "from 1 to 64 here, got 0"),
        ({"max_new_tokens": np.array([[65]], dtype=np.int32)}, "from 1 to 64 here, got 65"),
        ({"temperature": np.array([[np.nan]], dtype=np.float32)}, "finite number >= 0"),
        ({"top_k": np.array([[-1]], dtype=np.int32)}, "top_k must be >= 0"),
        ({"max_new_tokens": np.array([[1, 2]], dtype=np.int32)}, "one value per request"),
    ],
)
def test_parse_request_refuses_bad_requests(change: dict, match: str) -> None:
    request = {**arrays([b"png"], PROMPT.encode(), 8), **change}
    with pytest.raises(UserError, match=match) as e:
        parse_request(request, 64)
    assert "\n" not in error_line(e.value)


def test_error_line_is_one_line_for_any_exception() -> None:
    assert error_line(UserError("bad image")) == "bad image"
    assert error_line(RuntimeError("boom\nat line 3")) == "internal error: RuntimeError: boom"


def test_export_triton_writes_a_repository_atomically(
    tiny_base_artifact: Path, tmp_path: Path
) -> None:
    out = tmp_path / "repo"
    settings = ServeSettings(max_batch=4, instances=2)
    write_model_repository(tiny_base_artifact, out, settings)
    config = (out / "mllmc" / "config.pbtxt").read_text()
    assert config.startswith(REPO_HEADER)
    assert config == model_config(settings, "artifact")
    assert "max_batch_size: 4" in config and "count: 2" in config and "dynamic_batching" in config
    copied = out / "mllmc" / "1" / "artifact"
    assert sorted(p.name for p in copied.iterdir()) == sorted(
        p.name for p in tiny_base_artifact.iterdir()
    )
    source = Path(sys.modules["mllmc.compiler.tools.triton_model"].__file__).read_text()
    assert (out / "mllmc" / "1" / "model.py").read_text() == source
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no temporary left beside it
    with pytest.raises(UserError, match="already exists"):
        write_model_repository(tiny_base_artifact, out)
    write_model_repository(tiny_base_artifact, out, copy_artifact=False, force=True)
    assert (
        f'string_value: "{tiny_base_artifact.resolve()}"'
        in (out / "mllmc" / "config.pbtxt").read_text()
    )


def test_export_triton_never_replaces_a_users_directory(
    tiny_base_artifact: Path, tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not a model repository mllmc export-triton wrote"):
        write_model_repository(tiny_base_artifact, mine, force=True)
    assert (mine / "notes.txt").read_text() == "keep"


def test_export_triton_may_replace_an_empty_directory(
    tiny_base_artifact: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["export-triton", str(tiny_base_artifact), "-o", str(empty), "--force"]
    proc = subprocess.run([MLLMC, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (empty / "mllmc" / "config.pbtxt").read_text().startswith(REPO_HEADER)


def test_text_only_requests_parse_where_the_artifact_takes_them() -> None:
    request = {k: v for k, v in arrays([b"png"], b"Hi", 4).items() if k != "image"}
    assert parse_request(request, 64, text_only=True)["images"] == []
    empty = {**request, "image": np.array([[]], dtype=np.object_)}
    assert parse_request(empty, 64, text_only=True)["images"] == []
    with pytest.raises(UserError, match="input 'image' is missing"):
        parse_request(request, 64)


def test_serve_bad_arguments_are_one_line(tiny_base_artifact: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            ([str(tmp_path / "missing"), "--port", "8000"], "not found"),
            ([str(tiny_base_artifact), "--port", str(port)], f"--port {port} on 127.0.0.1: in use"),
            ([str(tiny_base_artifact), "--port", "70000"], "between 1 and 65535"),
            ([str(tiny_base_artifact), "--port", "9000", "--grpc-port", "9000"], "must differ"),
            ([str(tiny_base_artifact), "--port", "18000", "--host", "999.1.1.1"], "--host 999."),
            ([str(tiny_base_artifact / "manifest.json"), "--port", "18000"], "is a file, not an"),
        ]
        for args, match in cases:
            proc = subprocess.run([MLLMC, "serve", *args], capture_output=True, text=True)
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and match in lines[0], proc.stderr


class FakeBackend(types.ModuleType):
    """The parts of Triton's `triton_python_backend_utils` the model uses, recording what it
    sends."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class TritonError:
        INVALID_ARG, INTERNAL, CANCELLED = "INVALID_ARG", "INTERNAL", "CANCELLED"

        def __init__(self, message: str, code: str | None = None):
            self.message, self.code = message, code

    class InferenceResponse:
        def __init__(self, output_tensors: list | None = None, error: object = None):
            self.outputs = {t.name: t.value for t in output_tensors or []}
            self.error = error

    class Tensor:
        def __init__(self, name: str, value: np.ndarray):
            self.name, self.value = name, value

    class Logger:
        lines: list[str] = []

        @staticmethod
        def log_info(line: str) -> None:
            FakeBackend.Logger.lines.append(line)

    def __init__(self) -> None:
        super().__init__("triton_python_backend_utils")

    @staticmethod
    def get_input_tensor_by_name(request: FakeRequest, name: str) -> object:
        value = request.arrays.get(name)
        return None if value is None else types.SimpleNamespace(as_numpy=lambda: value)


class FakeRequest:
    """A request with its response sender: `done` is set by the final response."""

    def __init__(self, arrays: dict):
        self.arrays, self.responses, self.done = arrays, [], threading.Event()

    def get_response_sender(self) -> FakeRequest:
        return self

    def send(self, response: object, flags: int) -> None:
        self.responses.append((response, flags))
        self.done.set()

    def is_cancelled(self) -> bool:
        return False


def test_model_answers_each_request_of_a_batch_on_its_own(
    tiny_base_artifact: Path, sample_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python-backend model itself, with the backend's API faked: in one batch a good
    request gets engine.generate's answer, a bad one its own INVALID_ARG line, and one that runs
    past the request timeout is stopped with CANCELLED."""
    from mllmc.runtime import load

    params = {"artifact": str(tiny_base_artifact), "request_timeout_s": "0.3", "threads": "1"}
    model = python_model(params, monkeypatch)
    # so that the 1000-token request surely outlasts the 0.3 s limit however fast the engine
    # decodes (EOS still stops a generation, as it does alone)
    slow_steps(model.engine, monkeypatch, seconds=0.005, stop_at_eos=True)
    good = png_bytes(sample_image)
    batch = [
        FakeRequest(arrays([good], PROMPT.encode(), 6)),
        FakeRequest(arrays([b"not an image"], PROMPT.encode(), 6)),
        FakeRequest(arrays([good], PROMPT.encode(), 1000)),
    ]
    try:
        assert model.execute(batch) is None
        assert all(r.done.wait(60) for r in batch)
    finally:
        model.finalize()
    (ok, flags), (bad, _), (late, _) = (r.responses[0] for r in batch)
    assert flags == FakeBackend.TRITONSERVER_RESPONSE_COMPLETE_FINAL and ok.error is None
    alone = load(tiny_base_artifact, threads=1).generate(sample_image, PROMPT, 6)
    assert ok.outputs["token_ids"].tolist() == [alone.token_ids]
    assert ok.outputs["text"][0, 0].decode() == alone.text
    assert bad.error.code == "INVALID_ARG" and "image 0 does not decode" in bad.error.message
    assert (
        late.error.code == "CANCELLED" and "past the server's limit of 0.3 s" in late.error.message
    )
    assert [len(r.responses) for r in batch] == [1, 1, 1]


def python_model(params: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The Python-backend model, initialized with `params` as its config's parameters, with the
    backend's API faked."""
    from mllmc.compiler.tools.triton_model import TritonPythonModel

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", FakeBackend())
    config = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    model = TritonPythonModel()
    model.initialize(
        {"model_config": json.dumps(config), "model_repository": "", "model_version": 1}
    )
    return model


def slow_steps(
    engine, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.02, stop_at_eos: bool = False
) -> None:
    """Make each decode step of `engine` take `seconds` more (and, unless `stop_at_eos`, never
    stop at EOS), so that a long generation surely outlasts a sub-second limit."""
    step = engine.decode_batch_step

    def slow(*args: object) -> object:
        time.sleep(seconds)
        return step(*args)

    monkeypatch.setattr(engine, "decode_batch_step", slow)
    if not stop_at_eos:
        engine.eos_token_ids = set()


def test_model_cuts_generations_left_when_the_drain_ends(
    tiny_base_artifact: Path, sample_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop file `mllmc serve` writes starts the drain: a short request finishes, one still
    running when drain_timeout_s passes is answered with a one-line CANCELLED error, the count
    goes to the control directory, and finalize returns with the scheduler's thread ended."""
    params = {"artifact": str(tiny_base_artifact), "drain_timeout_s": "0.5", "threads": "1"}
    params["control_dir"] = str(tmp_path)
    model = python_model(params, monkeypatch)
    slow_steps(model.engine, monkeypatch)  # the long one outlasts the drain
    good = png_bytes(sample_image)
    short, long = FakeRequest(arrays([good], b"Hi", 2)), FakeRequest(arrays([good], b"Hi", 1000))
    model.execute([short, long])
    assert short.done.wait(60)
    (tmp_path / "stop").touch()
    assert long.done.wait(60)
    model.finalize()
    assert short.responses[0][0].error is None
    error = long.responses[0][0].error
    assert error.code == "CANCELLED" and "drain timeout of 0.5 s passed" in error.message
    assert "\n" not in error.message
    assert [len(r.responses) for r in (short, long)] == [1, 1]
    assert (tmp_path / f"cut-{os.getpid()}").read_text() == "1"
    assert not model.scheduler._thread.is_alive()


def test_finalize_cuts_what_outlasts_the_drain(
    tiny_base_artifact: Path, sample_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without serve's stop file (an exported repository unloaded), finalize waits at most
    drain_timeout_s, then cancels what is left and answers it."""
    params = {"artifact": str(tiny_base_artifact), "drain_timeout_s": "0.3", "threads": "1"}
    model = python_model(params, monkeypatch)
    slow_steps(model.engine, monkeypatch)
    long = FakeRequest(arrays([png_bytes(sample_image)], b"Hi", 1000))
    model.execute([long])
    while model.scheduler.stats().running == 0 and not long.done.is_set():
        time.sleep(0.01)
    model.finalize()
    assert long.done.is_set() and not model.scheduler._thread.is_alive()
    error = long.responses[0][0].error
    assert error.code == "CANCELLED" and "drain timeout of 0.3 s passed" in error.message


# -- the server ------------------------------------------------------------------------------


class Server:
    """`mllmc serve ARTIFACT` on free ports, its output in a log file."""

    def __init__(self, artifact: Path, log: Path, *extra: str):
        self.artifact = artifact
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.grpc_port = s.getsockname()[1]
        self.log = log
        args = ["serve", str(artifact), "--port", str(self.port)]
        args += ["--grpc-port", str(self.grpc_port), "--threads", "1", *extra]
        with open(log, "w") as f:
            self.proc = subprocess.Popen([*CLI, *args], stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while "serving " not in self.output():
            assert self.proc.poll() is None, self.output()[-3000:]
            assert time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def http_inputs(images: list[bytes], prompt: bytes, max_new: int, **extra: object) -> list:
    import tritonclient.http as http

    types = {"temperature": ("FP32", np.float32), "top_k": ("INT32", np.int32)}
    types |= {"seed": ("INT64", np.int64)}
    inputs = []
    for name, value, dtype in [
        ("image", np.array([images], dtype=np.object_), "BYTES"),
        ("prompt", np.array([[prompt]], dtype=np.object_), "BYTES"),
        ("max_new_tokens", np.array([[max_new]], dtype=np.int32), "INT32"),
        *[(k, np.array([[v]], dtype=types[k][1]), types[k][0]) for k, v in extra.items()],
    ]:
        tensor = http.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def _longest(artifact: Path) -> int:
    """The most new tokens a request may ask of `artifact` (its positions, less room for the
    prompt)."""
    from mllmc.runtime.manifest import read_manifest

    return read_manifest(artifact).model.max_position_embeddings - 64


@pytest.fixture(scope="module")
def server(tiny_base_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    s = Server(tiny_base_artifact, log, "--max-new-tokens-limit", str(_longest(tiny_base_artifact)))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine(tiny_base_artifact: Path):
    from mllmc.runtime import load

    return load(tiny_base_artifact, threads=1)


def ask(port: int, inputs: list) -> tuple[str, list[int]]:
    """The text and token ids the server on `port` answers."""
    import tritonclient.http as http

    client = http.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        result = client.infer("mllmc", inputs)
        return result.as_numpy("text")[0, 0].decode(), result.as_numpy("token_ids")[0].tolist()
    finally:
        client.close()


def http_error(port: int, inputs: list) -> str:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as e:
        ask(port, inputs)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@needs_server
def test_answer_equals_engine_generate_alone(
    server: Server, engine, sample_image: Path, tall_image: Path
) -> None:
    alone = engine.generate(sample_image, PROMPT, 12)
    text, ids = ask(server.port, http_inputs([png_bytes(sample_image)], PROMPT.encode(), 12))
    assert ids == alone.token_ids and text == alone.text
    two = engine.generate(images=[sample_image, tall_image], prompt=PROMPT, max_new_tokens=6)
    images = [png_bytes(sample_image), png_bytes(tall_image)]
    assert ask(server.port, http_inputs(images, PROMPT.encode(), 6))[1] == two.token_ids
    sampled = engine.generate(sample_image, PROMPT, 10, temperature=0.8, top_k=20, seed=7)
    inputs = http_inputs(
        [png_bytes(sample_image)], PROMPT.encode(), 10, temperature=0.8, top_k=20, seed=7
    )
    assert ask(server.port, inputs)[1] == sampled.token_ids


@needs_server
def test_concurrent_requests_each_get_their_own_answer(
    server: Server, engine, sample_image: Path, tall_image: Path
) -> None:
    cases = [
        (image, f"{prompt} {i}", n)
        for i, (image, prompt, n) in enumerate(
            [(sample_image, PROMPT, 9), (tall_image, "What is it?", 5)] * 4
        )
    ]
    alone = [engine.generate(image, prompt, n).token_ids for image, prompt, n in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(
            pool.map(
                lambda c: ask(server.port, http_inputs([png_bytes(c[0])], c[1].encode(), c[2]))[1],
                cases,
            )
        )
    assert answers == alone


@needs_server
def test_each_bad_request_gets_one_line_and_the_server_goes_on(
    server: Server, sample_image: Path
) -> None:
    import tritonclient.http as http

    good = png_bytes(sample_image)
    message = http_error(server.port, http_inputs([b"not an image"], b"Hi", 4))
    assert message.startswith("[400] image 0 does not decode"), message  # INVALID_ARG
    assert "the prompt is empty" in http_error(server.port, http_inputs([good], b"", 4))
    big = b"x" * (MAX_PROMPT_BYTES + 1)
    assert f"at most {MAX_PROMPT_BYTES}" in http_error(server.port, http_inputs([good], big, 4))
    assert "max_new_tokens must be from 1" in http_error(server.port, http_inputs([good], b"Hi", 0))
    assert "max_new_tokens must be from 1" in http_error(
        server.port, http_inputs([good], b"Hi", 10**6)
    )
    wrong_name = http.InferInput("question", [1, 1], "BYTES")
    wrong_name.set_data_from_numpy(np.array([[b"Hi"]], dtype=np.object_))
    message = http_error(server.port, [*http_inputs([good], b"Hi", 4), wrong_name])
    assert "unexpected inference input 'question'" in message
    wrong_type = http.InferInput("max_new_tokens", [1, 1], "FP32")
    wrong_type.set_data_from_numpy(np.array([[4.0]], dtype=np.float32))
    message = http_error(server.port, [*http_inputs([good], b"Hi", 4)[:2], wrong_type])
    assert "expects 'INT32'" in message
    assert len(ask(server.port, http_inputs([good], b"Hi", 3))[1]) >= 1  # still serving


@needs_server
def test_a_cancelled_grpc_request_stops_its_generation(server: Server, sample_image: Path) -> None:
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    inputs = []
    for name, value, dtype in [
        ("image", np.array([[png_bytes(sample_image)]], dtype=np.object_), "BYTES"),
        ("prompt", np.array([[PROMPT.encode()]], dtype=np.object_), "BYTES"),
        ("max_new_tokens", np.array([[_longest(server.artifact)]], dtype=np.int32), "INT32"),
    ]:
        tensor = grpc.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client = grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    # the channel is connected first, and the deadline leaves the request time to reach the
    # model on a loaded machine: tiny-llava's ~4,000 tokens take over a second (1,000 took 0.2 s,
    # which a generation could finish before its cancellation was seen)
    assert client.is_model_ready("mllmc")
    with pytest.raises(InferenceServerException, match="Deadline"):
        client.infer("mllmc", inputs, client_timeout=0.5)
    deadline = time.monotonic() + 30
    while "stopped a generation: cancelled by the client" not in server.output():
        assert time.monotonic() < deadline, server.output()[-2000:]
        time.sleep(0.1)


@needs_server
def test_the_exported_repository_loads_in_pytritons_tritonserver(
    tiny_base_artifact: Path, engine, sample_image: Path, tmp_path: Path
) -> None:
    """What a team ships (the artifact copied into the repository) runs as written."""
    import tritonclient.http as http

    from mllmc.compiler.tools.serve import free_port, triton_server

    repo = write_model_repository(tiny_base_artifact, tmp_path / "repo", ServeSettings(threads=1))
    ports = [free_port("127.0.0.1") for _ in range(3)]
    triton = triton_server(repo, "127.0.0.1", tuple(ports), 5, tmp_path / "ws")
    triton.run()
    try:
        client = http.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        deadline = time.monotonic() + 120
        while not client.is_model_ready("mllmc"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        client.close()
        ids = ask(ports[0], http_inputs([png_bytes(sample_image)], PROMPT.encode(), 6))[1]
    finally:
        triton.stop()
    assert ids == engine.generate(sample_image, PROMPT, 6).token_ids


@needs_server
def test_sigterm_drains_requests_in_flight(
    tiny_base_artifact: Path, engine, sample_image: Path, tmp_path: Path
) -> None:
    import tritonclient.http as http

    s = Server(tiny_base_artifact, tmp_path / "server.log")
    client = http.InferenceServerClient(f"127.0.0.1:{s.port}")
    try:
        pending = client.async_infer("mllmc", http_inputs([png_bytes(sample_image)], b"Hi", 400))
        time.sleep(0.3)
        s.proc.send_signal(signal.SIGTERM)
        ids = pending.get_result().as_numpy("token_ids")[0].tolist()
    finally:
        client.close()  # Triton's shutdown waits for open HTTP connections too
    assert s.stop() == 0, s.output()[-2000:]
    assert ids == engine.generate(sample_image, "Hi", 400).token_ids
    assert "mllmc serve: stopped" in s.output()


def _descendants(pid: int) -> list[int]:
    """The ids of `pid`'s child processes, theirs, and so on (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@needs_server
def test_sigterm_cuts_what_outlasts_the_drain_and_leaves_no_process(
    tiny_base_artifact: Path, sample_image: Path, tmp_path: Path
) -> None:
    """A generation still running when --drain-timeout passes is answered with a one-line
    error, serve warns naming how many it cut, and no process of the run is left."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    longest = _longest(tiny_base_artifact)
    extra = ["--drain-timeout", "1", "--max-new-tokens-limit", str(longest)]
    s = Server(tiny_base_artifact, tmp_path / "server.log", *extra)
    client = http.InferenceServerClient(f"127.0.0.1:{s.port}", network_timeout=120, concurrency=16)
    errors = []
    try:  # 16 long generations decoding together: they outlast a 1 s drain
        inputs = http_inputs([png_bytes(sample_image)], b"Hi", longest)
        pending = [client.async_infer("mllmc", inputs) for _ in range(16)]
        time.sleep(1)
        run = _descendants(s.proc.pid)
        assert run, "tritonserver and its stub run under serve"
        s.proc.send_signal(signal.SIGTERM)
        for p in pending:
            try:
                p.get_result()
            except InferenceServerException as e:
                errors.append(str(e))
    finally:
        client.close()
    assert errors and all("drain timeout of 1 s passed" in e for e in errors), errors
    assert not any("\n" in e for e in errors)
    assert s.stop() == 0, s.output()[-2000:]
    want = f"{len(errors)} generation(s) still running after the drain timeout of 1 s"
    assert want in s.output(), s.output()[-2000:]
    assert "mllmc serve: stopped" in s.output()
    assert not [pid for pid in run if _alive(pid)], s.output()[-2000:]
