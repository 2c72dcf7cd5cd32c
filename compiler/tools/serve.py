"""`mllmc serve` and `mllmc export-triton`: an artifact behind Triton Inference Server.

    write_model_repository("out/tiny", "triton-repo")     # config.pbtxt + model.py + artifact
    serve("out/tiny", port=8000)                          # the same model in PyTriton's server

Both use one Triton model repository holding one model, `mllmc`: a Python-backend model
(`triton_model.py`, copied as `mllmc/1/model.py`) that loads the artifact with mllmc's runtime
and batches generations across requests with `mllmc.runtime.batching.Scheduler`; Triton's
dynamic batcher groups requests that arrive together into one `execute` call. `serve` writes
the repository to a temporary directory (naming the artifact where it lies) and runs it in the
tritonserver binary and Python backend that PyTriton (`pip install 'mllmc[serve]'`) ships, on
loopback unless told otherwise; `export-triton` writes it for the stock Triton container, with
the artifact copied in.

Shutdown (SIGTERM, SIGINT, SIGHUP): `serve` drops a `stop` file in the run's control directory
(the model's `control_dir` parameter) and stops tritonserver, which takes no new requests. Each
model instance lets its generations run for up to `drain_timeout_s`, then cancels what is left:
each such request is answered with a one-line error, the instance writes how many it cut, and
`serve` warns naming that count. tritonserver waits a few seconds longer than the drain, so the
instances finalize and their stub processes exit; any process of the run still alive after
tritonserver stopped is killed (and named in a warning).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllmc.compiler.files import outputs
from mllmc.runtime.errors import UserError
from mllmc.runtime.manifest import check_files, read_manifest

from .triton_model import MODEL_NAME

SERVE_EXTRA = "pip install 'mllmc[serve]'"
REPO_HEADER = "# written by mllmc export-triton"
ARTIFACT_DIR = "artifact"  # the artifact's place in the model's version directory
# PyTriton gives tritonserver 30 s to exit after SIGINT, then kills it: draining takes less
MAX_DRAIN_S = 25
READY_TIMEOUT_S = 600  # loading a large artifact takes a while
# tritonserver waits this much longer than the drain, for the instances to answer what they cut
EXIT_MARGIN_S = 4
STOP_FILE = "stop"  # in the control directory: its appearance starts the drain
CUT_FILE_PREFIX = "cut-"  # cut-<pid>: how many generations that instance cancelled


@dataclass(frozen=True)
class ServeSettings:
    """How the served model runs. max_batch: the most requests one decode step batches (and
    Triton's max_batch_size); instances: model instances, each its own engine and scheduler
    (one process each); max_new_tokens_limit: the largest max_new_tokens a request may ask;
    request_timeout_s: a generation running longer is stopped; drain_timeout_s: how long a
    shutdown waits for generations in flight; threads: onnxruntime threads per instance (None:
    all cores); queue_delay_us: how long Triton's dynamic batcher waits to group requests."""

    max_batch: int = 16
    instances: int = 1
    max_new_tokens_limit: int = 1024
    request_timeout_s: float = 600.0
    drain_timeout_s: float = MAX_DRAIN_S
    threads: int | None = None
    queue_delay_us: int = 2000


def model_config(settings: ServeSettings, artifact: str, control_dir: str = "") -> str:
    """The `config.pbtxt` of the `mllmc` model; `artifact`: its path, absolute or relative to
    the model's version directory; `control_dir`: where `serve` signals a shutdown (none for
    an exported repository: the model drains in finalize)."""
    params = {
        "artifact": artifact,
        "max_batch": settings.max_batch,
        "max_new_tokens_limit": settings.max_new_tokens_limit,
        "request_timeout_s": settings.request_timeout_s,
        "drain_timeout_s": settings.drain_timeout_s,
        "threads": settings.threads or 0,
    }
    if control_dir:
        params["control_dir"] = control_dir
    parameters = "\n".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items()
    )
    return f"""{REPO_HEADER}: one request = one prompt and its images (batch dimension 1)
name: "{MODEL_NAME}"
backend: "python"
max_batch_size: {settings.max_batch}
dynamic_batching {{ max_queue_delay_microseconds: {settings.queue_delay_us} }}
input [
  {{ name: "image" data_type: TYPE_STRING dims: [ -1 ] allow_ragged_batch: true optional: true }},
  {{ name: "prompt" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "max_new_tokens" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "top_k" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }}
]
output [
  {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "token_ids" data_type: TYPE_INT64 dims: [ -1 ] }}
]
instance_group [ {{ count: {settings.instances} kind: KIND_CPU }} ]
{parameters}
"""


def check_artifact(artifact: str | os.PathLike) -> Path:
    """UserError (one line) unless `artifact` is a complete mllmc artifact."""
    root = Path(artifact)
    if root.exists() and not root.is_dir():
        raise UserError(
            f"{root} is a file, not an artifact directory (make one with: mllmc compile MODEL "
            "-o DIR)"
        )
    check_files(root, read_manifest(root))
    return root.resolve()


def _model_source() -> str:
    return Path(__file__).with_name("triton_model.py").read_text()


def repository_replaceable(path: Path) -> str | None:
    """None if `path` is a model repository `export-triton` wrote (--force may replace it)."""
    config = path / MODEL_NAME / "config.pbtxt"
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return None  # an empty directory holds nothing to lose
    if entries != [MODEL_NAME] or not config.is_file():
        return "it is not a model repository mllmc export-triton wrote"
    with open(config, encoding="utf-8", errors="replace") as f:
        if not f.readline().startswith(REPO_HEADER):
            return f"its {MODEL_NAME}/config.pbtxt was not written by mllmc export-triton"
    return None


def _fill_repository(
    tmp: Path, root: Path, settings: ServeSettings, copy: bool, control_dir: str = ""
) -> None:
    version = tmp / MODEL_NAME / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(_model_source())
    if copy:
        shutil.copytree(root, version / ARTIFACT_DIR)
    artifact = ARTIFACT_DIR if copy else str(root)
    config = model_config(settings, artifact, control_dir)
    (tmp / MODEL_NAME / "config.pbtxt").write_text(config)


def write_model_repository(
    artifact: str | os.PathLike,
    out: str | os.PathLike,
    settings: ServeSettings = ServeSettings(),
    *,
    copy_artifact: bool = True,
    force: bool = False,
) -> Path:
    """Write a Triton model repository serving `artifact` to `out`, atomically (a temporary
    directory renamed into place): `out/mllmc/config.pbtxt` and `out/mllmc/1/model.py`, and
    the artifact copied to `out/mllmc/1/artifact/` (`copy_artifact=False`: named by its
    absolute path instead). --force replaces only a repository written here."""
    root = check_artifact(artifact)
    out = outputs.check_output_dir(
        out, force, repository_replaceable, what="model repository", protected=[root]
    )
    with outputs.staged_directory(out, force=force, replaceable=repository_replaceable) as tmp:
        _fill_repository(tmp, root, settings, copy_artifact)
    return out


def check_serve_requirements() -> None:
    """UserError unless PyTriton is installed with what its Python backend needs."""
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise UserError(f"mllmc serve needs PyTriton: {SERVE_EXTRA}") from None
    import numpy as np

    if int(np.__version__.split(".")[0]) >= 2:
        raise UserError(
            f"mllmc serve needs numpy < 2 (PyTriton 0.7's Python backend reads tensors wrongly "
            f"under numpy {np.__version__}): {SERVE_EXTRA}"
        )


def check_host(host: str) -> None:
    """UserError unless `host` is an address of this machine a server can listen on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as e:
            why = (e.strerror or str(e)).lower()
            raise UserError(
                f"--host {host}: {why}; give an address of this machine (127.0.0.1: this "
                "machine only, 0.0.0.0: every interface)"
            ) from None


def check_port(host: str, port: int, flag: str) -> None:
    """UserError unless `port` can be bound on `host`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            why = "in use" if e.errno == 98 else (e.strerror or str(e)).lower()
            raise UserError(f"{flag} {port} on {host}: {why}; choose another {flag}") from None


def free_port(host: str) -> int:
    """A port free on `host` now (the system picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pick_ports(host: str, port: int, grpc: int | None, metrics: int | None) -> tuple[int, int]:
    given = [p for p in (port, grpc, metrics) if p is not None]
    if len(set(given)) != len(given):
        raise UserError(f"--port, --grpc-port and --metrics-port must differ, got {given}")
    check_host(host)
    for flag, p in (("--port", port), ("--grpc-port", grpc), ("--metrics-port", metrics)):
        if p is not None:
            check_port(host, p, flag)
    taken = set(given)
    picked = []
    for p in (grpc, metrics):
        while p is None:  # a free one, none of the others
            p = free_port(host)
            p = None if p in taken else p
        taken.add(p)
        picked.append(p)
    return picked[0], picked[1]


def _library_path() -> None:
    """Put this interpreter's libpython first where tritonserver's Python stub looks for it: a
    pyenv or venv Python's own library, not the system's (whose _thread differs)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir).is_dir():
        old = os.environ.get("LD_LIBRARY_PATH", "")
        os.environ["LD_LIBRARY_PATH"] = libdir + (":" + old if old else "")


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM, SIGINT or SIGHUP while the block runs (handlers restored)."""
    stop = threading.Event()
    signums = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in signums}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _model_ready(host: str, port: int) -> bool:
    local = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    url = (
        f"http://{'[' + local + ']' if ':' in local else local}:{port}/v2/models/{MODEL_NAME}/ready"
    )
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(triton: Any, host: str, port: int, stop: threading.Event) -> bool:
    """Until the model answers ready (True), the server dies (UserError) or `stop` (False)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop.is_set():
        if _model_ready(host, port):
            return True
        if not triton.is_alive():
            raise UserError("tritonserver exited while loading the model; its log above says why")
        if time.monotonic() > deadline:
            raise UserError(f"the model was not ready after {READY_TIMEOUT_S} s")
        stop.wait(0.5)
    return False


def triton_server(
    repository: Path,
    host: str,
    ports: tuple[int, int, int],
    drain_timeout_s: float,
    workspace: Path,
) -> Any:
    """A PyTriton `Triton` (not started: call .run(), then .stop()) that runs tritonserver on
    the model repository `repository`, HTTP, gRPC and metrics on `ports` of `host`, waiting
    up to `drain_timeout_s` (and EXIT_MARGIN_S) for requests in flight when stopped; its files
    in `workspace`."""
    _library_path()
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(
        model_repository=repository,
        http_address=host,
        http_port=ports[0],
        grpc_address=host,
        grpc_port=ports[1],
        metrics_address=host,
        metrics_port=ports[2],
        exit_timeout_secs=int(drain_timeout_s) + EXIT_MARGIN_S,
        allow_gpu_metrics=False,
    )
    return Triton(config=config, workspace=workspace)


def serve(
    artifact: str | os.PathLike,
    *,
    port: int,
    host: str = "127.0.0.1",
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    settings: ServeSettings = ServeSettings(),
    say: Callable[[str], None] = lambda line: print(line, flush=True),
) -> int:
    """Serve `artifact` as the Triton model `mllmc` (HTTP on `port`, gRPC and metrics on the
    given or free ports, all on `host`) until SIGTERM / SIGINT / SIGHUP, which drain the
    requests in flight (at most settings.drain_timeout_s; what is left then is cancelled, each
    answered with an error, and a warning names how many) and return 0."""
    root = check_artifact(artifact)
    grpc_port, metrics_port = _pick_ports(host, port, grpc_port, metrics_port)
    check_serve_requirements()
    with outputs.scratch_directory("mllmc-serve-") as scratch, _stop_on_signals() as stop:
        control = Path(scratch) / "control"
        control.mkdir()
        repo = Path(scratch) / "repository"
        repo.mkdir()
        _fill_repository(repo, root, settings, copy=False, control_dir=str(control))
        ports = (port, grpc_port, metrics_port)
        triton = triton_server(repo, host, ports, settings.drain_timeout_s, Path(scratch) / "ws")
        try:
            triton.run()
            if _wait_ready(triton, host, port, stop):
                say(
                    f"serving {root} as model '{MODEL_NAME}': HTTP {host}:{port}, gRPC "
                    f"{host}:{grpc_port}, metrics http://{host}:{metrics_port}/metrics "
                    "(SIGTERM drains and exits)"
                )
            while not stop.wait(0.5):
                if not triton.is_alive():
                    raise UserError("tritonserver exited; its log above says why")
        finally:
            (control / STOP_FILE).touch()  # the instances start their drain
            triton.stop()
            killed = kill_leftovers(str(scratch))
            cut = generations_cut(control)
    if cut:
        say(
            f"mllmc serve: warning: {cut} generation(s) still running after the drain timeout "
            f"of {settings.drain_timeout_s:g} s were cut (each answered with an error)"
        )
    if killed:
        say(f"mllmc serve: warning: killed {killed} model process(es) left running")
    say("mllmc serve: stopped")
    return 0


def generations_cut(control: Path) -> int:
    """How many generations the model instances cancelled at the end of the drain (each
    instance writes `cut-<pid>` in the control directory)."""
    total = 0
    for path in control.glob(CUT_FILE_PREFIX + "*"):
        with contextlib.suppress(OSError, ValueError):
            total += int(path.read_text().strip() or 0)
    return total


def run_processes(marker: str) -> list[int]:
    """The ids of this user's processes whose command line names `marker` (the run's scratch
    directory: tritonserver's Python stubs take their model.py's path), this one excepted."""
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not re.fullmatch(r"\d+", entry.name) or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_uid == os.getuid():
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                if marker.encode() in cmdline:
                    pids.append(int(entry.name))
    return pids


def kill_leftovers(marker: str, grace_s: float = 5.0) -> int:
    """Wait up to `grace_s` for the run's processes (`run_processes(marker)`) to exit, then
    kill those left -> how many were killed."""
    deadline = time.monotonic() + grace_s
    while (pids := run_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)
