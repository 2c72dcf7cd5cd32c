"""The Triton Python-backend model that serves an mllmc artifact.

`mllmc export-triton` copies this file as `<repo>/mllmc/1/model.py`, and `mllmc serve` runs the
same repository in the tritonserver PyTriton ships. Inside Triton it imports only
`mllmc.runtime` (numpy, onnxruntime, tokenizers, PIL, jinja2) and the backend's own
`triton_python_backend_utils`, never the compiler.

One model instance owns one engine and one `Scheduler` (iteration-level batching). `execute`
returns at once: each request of the batch Triton's dynamic batcher hands it is checked and
submitted to the scheduler, and its one response is sent through the request's response sender
when its generation ends (the Python backend's non-decoupled response-sender mode). So a request
that arrives while others decode joins their running decode batch instead of waiting for the
instance, and a bad request gets its own one-line error while the rest of its batch goes on.

Per request (batch dimension 1, as Triton hands requests to the Python backend):
    inputs   image (BYTES, 1 x n): n encoded image files, in prompt order, 1 <= n <= MAX_IMAGES;
                   optional (absent or n = 0: a text-only prompt) where the artifact takes
                   text-only prompts (`Engine.text_only`, e.g. Qwen2-VL's)
             prompt (BYTES, 1 x 1): UTF-8, not empty, at most MAX_PROMPT_BYTES bytes
             max_new_tokens (INT32, 1 x 1): 1 .. the model's `max_new_tokens_limit` parameter
             temperature (FP32, 1 x 1), top_k (INT32, 1 x 1), seed (INT64, 1 x 1): optional
    outputs  text (BYTES, 1 x 1), token_ids (INT64, 1 x steps)

A watcher thread stops the generation of a request Triton marks cancelled (a gRPC client that
cancels or whose deadline passes) or that runs past the `request_timeout_s` parameter, at the
next decode step. Shutdown: when the `stop` file appears in the `control_dir` parameter's
directory (`mllmc serve` writes it on SIGTERM), or at the latest in `finalize` (model unload),
the generations in flight get up to `drain_timeout_s` to finish; those still running then are
cancelled, each answered with a one-line error, and their count is written to
`control_dir/cut-<pid>` and Triton's log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("mllmc.serve")

MODEL_NAME = "mllmc"
MAX_IMAGES = 16  # encoded images in one request
MAX_PROMPT_BYTES = 16384  # a prompt's UTF-8 bytes
WATCH_PERIOD_S = 0.05  # how often cancellation and deadlines are checked


def _user_error() -> type[Exception]:
    from mllmc.runtime.errors import UserError

    return UserError


def _scalar(arrays: dict[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """The one value of input `name` (shape (1, 1) or (1,)); `default` when it is absent."""
    value = arrays.get(name)
    if value is None:
        if default is None:
            raise _user_error()(f"input '{name}' is missing")
        return default
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise _user_error()(
            f"input '{name}' must hold one value per request, got shape {list(np.shape(value))}"
        )
    item = flat[0]
    if kind == "int":
        return int(item)
    if kind == "float":
        return float(item)
    return item


def _images(arrays: dict[str, Any], text_only: bool) -> list[bytes]:
    """The request's encoded image files (the scheduler decodes them: UserError if one does
    not); none where the artifact takes text-only prompts (`text_only`) and none came."""
    UserError = _user_error()
    value = arrays.get("image")
    if value is None:
        if text_only:
            return []
        raise UserError("input 'image' is missing: send the encoded image file(s) as BYTES")
    items = list(np.asarray(value, dtype=object).reshape(-1))
    if not (0 if text_only else 1) <= len(items) <= MAX_IMAGES:
        least = 0 if text_only else 1
        raise UserError(f"a request takes {least} to {MAX_IMAGES} images, got {len(items)}")
    for i, data in enumerate(items):
        if not isinstance(data, bytes) or not data:
            raise UserError(f"image {i} is empty: send the encoded image file's bytes")
    return items


def _prompt(arrays: dict[str, Any]) -> str:
    UserError = _user_error()
    raw = _scalar(arrays, "prompt", "raw")
    if not isinstance(raw, bytes):
        raise UserError("input 'prompt' must be BYTES (UTF-8 text)")
    if len(raw) > MAX_PROMPT_BYTES:
        raise UserError(f"the prompt has {len(raw)} bytes; at most {MAX_PROMPT_BYTES} are served")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError("the prompt is not valid UTF-8") from None
    if not text.strip():
        raise UserError("the prompt is empty: send the question or instruction as UTF-8 text")
    return text


def parse_request(
    arrays: dict[str, Any], max_new_tokens_limit: int, text_only: bool = False
) -> dict[str, Any]:
    """One request's input arrays (name -> numpy array, absent optional inputs missing) ->
    the keyword arguments of `mllmc.runtime.batching.Request` (images as encoded bytes);
    UserError (one line) for a bad request. `text_only`: the artifact takes prompts without
    images. Values are checked here, where the message can name the input; the scheduler's
    `submit` checks the rest (images decode, prompt fits)."""
    UserError = _user_error()
    images = _images(arrays, text_only)
    prompt = _prompt(arrays)
    max_new = _scalar(arrays, "max_new_tokens", "int")
    if not 1 <= max_new <= max_new_tokens_limit:
        raise UserError(
            f"max_new_tokens must be from 1 to {max_new_tokens_limit} here, got {max_new}"
        )
    temperature = _scalar(arrays, "temperature", "float", 0.0)
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature must be a finite number >= 0, got {temperature}")
    top_k = _scalar(arrays, "top_k", "int", 0)
    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (0: no cut), got {top_k}")
    seed = _scalar(arrays, "seed", "int", -1)
    return {
        "images": images,
        "prompt": prompt,
        "max_new_tokens": max_new,
        "temperature": temperature,
        "top_k": top_k,
        "seed": None if seed < 0 else seed,
    }


def error_line(e: BaseException) -> str:
    """What a client reads for a failed request: the UserError's line, or the exception's
    type and first line for anything else (the traceback goes to the server's log)."""
    if isinstance(e, _user_error()):
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    first = str(e).splitlines()[0] if str(e) else ""
    return f"internal error: {type(e).__name__}{': ' + first if first else ''}"


def _log_info(message: str) -> None:
    """One line in Triton's log."""
    import triton_python_backend_utils as pb_utils

    pb_utils.Logger.log_info(message)


def _code(e: BaseException, pb_utils: Any) -> Any:
    """Triton's error code for `e`: INVALID_ARG (HTTP 400) for a bad request, else INTERNAL."""
    bad = isinstance(e, _user_error())
    return pb_utils.TritonError.INVALID_ARG if bad else pb_utils.TritonError.INTERNAL


@dataclass
class _InFlight:
    request: Any  # pb_utils.InferenceRequest
    sender: Any  # its response sender
    future: Future
    deadline: float
    why: str = ""  # set when the server stops it: "cancelled by the client", "timed out"


def _parameters(model_config: dict[str, Any]) -> dict[str, str]:
    params = model_config.get("parameters") or {}
    return {k: v.get("string_value", "") for k, v in params.items()}


def _artifact_path(args: dict[str, Any], value: str) -> Path:
    """The artifact parameter: absolute, or relative to the model's version directory."""
    path = Path(value)
    if path.is_absolute():
        return path
    return Path(args["model_repository"]) / str(args["model_version"]) / path


class TritonPythonModel:
    """Triton's Python-backend entry points: initialize, execute, finalize."""

    def initialize(self, args: dict[str, Any]) -> None:
        from mllmc.runtime import load
        from mllmc.runtime.batching import Scheduler

        params = _parameters(json.loads(args["model_config"]))
        threads = int(params.get("threads") or 0) or None
        self.engine = load(
            _artifact_path(args, params.get("artifact", "artifact")), threads=threads
        )
        self.max_new_tokens_limit = int(params.get("max_new_tokens_limit") or 1024)
        self.timeout_s = float(params.get("request_timeout_s") or 600)
        self.drain_s = float(params.get("drain_timeout_s") or 30)
        self.scheduler = Scheduler(self.engine, max_batch=int(params.get("max_batch") or 16))
        self.control_dir = params.get("control_dir") or ""
        self._cut_at: float | None = None  # when the drain ends (the stop file was seen)
        self._cut = 0  # generations cancelled at the end of the drain
        self._lock = threading.Lock()
        self._inflight: list[_InFlight] = []
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="mllmc-watch", daemon=True)
        self._watcher.start()

    def execute(self, requests: list[Any]) -> None:
        """Submit each request to the scheduler; its response is sent when it finishes."""
        import triton_python_backend_utils as pb_utils

        for request in requests:
            sender = request.get_response_sender()
            try:
                future = self._submit(request, pb_utils)
            except Exception as e:  # a bad request: its own error, the others go on
                if not isinstance(e, _user_error()):
                    log.exception("mllmc: request failed")
                self._send_error(sender, error_line(e), pb_utils, _code(e, pb_utils))
                continue
            item = _InFlight(request, sender, future, time.monotonic() + self.timeout_s)
            with self._lock:
                self._inflight.append(item)
            future.add_done_callback(lambda _f, item=item: self._respond(item))
        return None

    def _submit(self, request: Any, pb_utils: Any) -> Future:
        from mllmc.runtime.batching import Request

        arrays = {}
        for name in ("image", "prompt", "max_new_tokens", "temperature", "top_k", "seed"):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                arrays[name] = tensor.as_numpy()
        for name, value in arrays.items():
            if value.ndim >= 1 and value.shape[0] != 1:
                raise _user_error()(
                    f"input '{name}' has batch size {value.shape[0]}: send one prompt per request"
                )
        kwargs = parse_request(arrays, self.max_new_tokens_limit, self.engine.text_only)
        return self.scheduler.submit(Request(**kwargs))

    def _respond(self, item: _InFlight) -> None:
        import triton_python_backend_utils as pb_utils

        with self._lock:
            if item in self._inflight:
                self._inflight.remove(item)
        if item.future.cancelled():  # by the watcher (a result that came first is sent)
            message = f"generation stopped: {item.why or 'cancelled'}"
            self._send_error(item.sender, message, pb_utils, pb_utils.TritonError.CANCELLED)
            return
        e = item.future.exception()
        if e is not None:
            if not isinstance(e, _user_error()):
                log.error("mllmc: generation failed: %r", e)
            self._send_error(item.sender, error_line(e), pb_utils, _code(e, pb_utils))
            return
        result = item.future.result()
        text = np.array([[result.text.encode("utf-8")]], dtype=np.object_)
        ids = np.array([result.token_ids], dtype=np.int64)
        response = pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("text", text), pb_utils.Tensor("token_ids", ids)]
        )
        item.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    @staticmethod
    def _send_error(sender: Any, message: str, pb_utils: Any, code: Any) -> None:
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
        try:
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # the request is gone (the server is stopping)
            log.warning("mllmc: could not send an error response: %r", e)

    def _watch(self) -> None:
        """Stop the generations whose client cancelled or whose time is up; at the end of a
        shutdown's drain, all of them."""
        while not self._stop.wait(WATCH_PERIOD_S):
            now = time.monotonic()
            if self._cut_at is None and self._stop_requested():
                self._cut_at = now + self.drain_s
            if self._cut_at is not None and now > self._cut_at:
                self._cut_all()
                continue
            with self._lock:
                items = list(self._inflight)
            for item in items:
                if item.future.done() or item.why:
                    continue
                if item.request.is_cancelled():
                    item.why = "cancelled by the client"
                elif now > item.deadline:
                    item.why = f"it ran past the server's limit of {self.timeout_s:g} s"
                else:
                    continue
                self.scheduler.cancel(item.future)
                _log_info(f"mllmc: stopped a generation: {item.why}")

    def _stop_requested(self) -> bool:
        return bool(self.control_dir) and os.path.exists(os.path.join(self.control_dir, "stop"))

    def _cut_all(self) -> None:
        """The drain is over: cancel every generation still in flight (each is answered with
        its one-line error) and record how many."""
        with self._lock:
            items = [item for item in self._inflight if not item.future.done()]
        why = f"the server is shutting down and its drain timeout of {self.drain_s:g} s passed"
        cut = 0
        for item in items:
            item.why = item.why or why
            cut += self.scheduler.cancel(item.future)
        if cut:
            self._record_cut(cut)

    def _record_cut(self, cut: int) -> None:
        """Add `cut` cancelled generations to this instance's count (log and control file)."""
        self._cut += cut
        _log_info(f"mllmc: shutdown cut {cut} generation(s) still running after the drain")
        if self.control_dir:
            path = os.path.join(self.control_dir, f"cut-{os.getpid()}")
            try:
                with open(path, "w") as f:
                    f.write(str(self._cut))
            except OSError as e:
                log.warning("mllmc: could not write %s: %r", path, e)

    def finalize(self) -> None:
        """Model unload or server shutdown: let what is in flight finish for up to
        `drain_timeout_s` (less what the shutdown's drain took already), cancel the rest (each
        answered with an error), then stop the scheduler and the watcher."""
        left = self.drain_s
        if self._cut_at is not None:
            left = max(0.0, self._cut_at - time.monotonic())
        self._stop.set()
        self._watcher.join(timeout=1)
        with self._lock:
            for item in self._inflight:
                why = f"the model was unloaded and its drain timeout of {self.drain_s:g} s passed"
                item.why = item.why or why
        cut = self.scheduler.close(drain=True, timeout=left)
        if cut:
            self._record_cut(cut)
