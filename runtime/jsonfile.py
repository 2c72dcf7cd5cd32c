"""The one JSON reader for every file mllmc reads: strict, bounded, one-line errors.

    data = read_json(path)        # JSONError (a ValueError) with a one-line reason
    row = loads(line)             # the same rules for one line of a JSON-lines file

Strict: NaN, Infinity and -Infinity (which Python's json accepts) are refused, and so is every
number that does not fit a float64 (`1e400`, a 400-digit integer): each would turn into an
infinite or unconvertible value later; so is an object that names a key twice (JSON would keep
the last silently). Bounded: a file larger than `MAX_JSON_BYTES`, an integer
longer than Python's 4300 digits and nesting deeper than Python's recursion limit are refused
with a one-line reason instead of exhausting memory or the stack.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 64 * 2**20  # the largest JSON file read whole (configs, calibration, goldens)


class JSONError(ValueError):
    """A JSON file or text mllmc refuses; the message is one line (the reason)."""


def _constant(name: str) -> Any:
    raise JSONError(f"{name} is not a number JSON allows")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONError(f"number {text[:40]} is out of range")
    return value


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise JSONError(f"an integer of {len(text)} digits is out of range") from None
    try:
        float(value)
    except OverflowError:
        raise JSONError(f"an integer of {len(text)} digits is out of range") from None
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise JSONError(f"key {key[:60]!r} appears twice in one object")
        obj[key] = value
    return obj


def loads(text: str | bytes, allow_nan: bool = False) -> Any:
    """Parse JSON text by the rules above (JSONError otherwise). `allow_nan` reads NaN,
    Infinity and -Infinity as floats, for files in which mllmc itself records them."""
    constant = float if allow_nan else _constant
    try:
        return json.loads(
            text,
            parse_constant=constant,
            parse_float=_float,
            parse_int=_int,
            object_pairs_hook=_object,
        )
    except JSONError:
        raise
    except RecursionError:
        raise JSONError("nested too deeply") from None
    except UnicodeDecodeError as e:
        raise JSONError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # json.JSONDecodeError and friends
        raise JSONError(str(e).splitlines()[0] if str(e).strip() else type(e).__name__) from None


def read_json(
    path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES, allow_nan: bool = False
) -> Any:
    """Read and parse a JSON file (JSONError with a one-line reason on any problem)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise JSONError(f"{size} bytes, more than the {max_bytes} a JSON file may have")
        raw = p.read_bytes()
    except OSError as e:
        raise JSONError(e.strerror or type(e).__name__) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    return loads(text, allow_nan)
