"""The pass registry: one explicit table of every graph pass mllmc knows.

A pass is one file with one public function `fn(segments, cfg) -> PassResult` and one frozen
config dataclass whose defaults come from the paper. Each registry entry also names:
- `check(cfg, shape)`: refuses options that config.json alone rules out (a layer index past the
  model's depth), before the model loads; `prepare` checks the same against the loaded model.
- `prepare(cfg, model, info) -> cfg`: resolves what needs the eager model (e.g. ShortV's layer
  order from calibration) before the rewrite; the rewrite itself sees only graphs.
- `reference(model, info, cfg)`: a context manager that makes the HF model compute what the
  rewritten graph computes (hooks), used only by tests and `mllmc verify`.
- `stage`: "pre_llm" passes change the visual tokens before the decoder, "in_llm" passes rewrite
  decoder layers; the pipeline refuses an in-LLM pass before a pre-LLM one.
- `prunes`: the pass chooses which visual tokens remain (fastervlm / vtc_cls / vispruner
  before the LLM, fastv / vte inside it); two pruning passes of one stage conflict, and an in-LLM pruning pass
  must precede the in-LLM passes that rewrite layers for the rows they hold (shortv).
"""

from __future__ import annotations

import ast
import dataclasses
import math
import types
import typing
from typing import TYPE_CHECKING

# re-exported: the pass types live in the compiler core (see pass_types.py)
from mllmc.compiler.core.pass_types import PassInfo as PassInfo
from mllmc.compiler.core.pass_types import PassRecord as PassRecord
from mllmc.compiler.core.pass_types import PassResult as PassResult
from mllmc.runtime.errors import UserError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance as PassConfig  # a pass's frozen config dataclass

REGISTRY: dict[str, PassInfo] = {}
NO_PASS = ("none", "identity")


def register(info: PassInfo) -> PassInfo:
    if info.name in REGISTRY or info.name in NO_PASS:
        raise ValueError(f"pass {info.name!r} is registered twice")
    REGISTRY[info.name] = info
    return info


def valid_names() -> str:
    return ", ".join([*sorted(REGISTRY), *NO_PASS])


def get_pass(name: str) -> PassInfo:
    if name not in REGISTRY:
        raise UserError(f"unknown pass {name!r}; valid passes: {valid_names()}")
    return REGISTRY[name]


def _split_options(text: str) -> list[str]:
    """Split 'a=1,b=[1,2],c=x' at top-level commas (not inside brackets or quotes)."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _literal(value: str) -> object:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value  # a bare word or a path


def _type_text(tp: object) -> str:
    """A field type in words, for error messages."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in args if a is not type(None))
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_text(args[0]).removeprefix('an ').removeprefix('a ')}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(tp: object, value: object) -> tuple[bool, object]:
    """(True, `value` as field type `tp`) -- a list for a tuple, an integer for a float -- or
    (False, None) when it is not of that type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return True, None
        for option in typing.get_args(tp):
            if option is not type(None):
                ok, out = _coerce(option, value)
                if ok:
                    return True, out
        return False, None
    if origin is tuple:
        item = typing.get_args(tp)[0]
        items = value if isinstance(value, (list, tuple)) else [value]  # one value: a 1-list
        coerced = [_coerce(item, v) for v in items]
        if all(ok for ok, _ in coerced):
            return True, tuple(v for _, v in coerced)
        return False, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (True, float(value)) if ok and math.isfinite(value) else (False, None)
    if tp is str:
        return isinstance(value, str), value
    return True, value  # a type this check does not know: the config checks it itself


def check_options(info: PassInfo, options: dict[str, object]) -> dict[str, object]:
    """`options` checked against the fields of the pass's config class: each key a field, each
    value of the field's type (a list where it takes a list; an integer where it takes a
    number); UserError naming the first that is not. Returns them coerced to the field types."""
    fields = {f.name: f for f in dataclasses.fields(info.config_cls)}
    hints = typing.get_type_hints(info.config_cls)
    out = {}
    for key, value in options.items():
        if key not in fields:
            raise UserError(
                f"unknown option {key!r} for pass {info.name!r}; valid options: "
                f"{', '.join(fields) or '(none)'}"
            )
        ok, out[key] = _coerce(hints[key], value)
        if not ok:
            quote = hints[key] in (str, str | None) and isinstance(value, (int, float))
            hint = f" (to mean the text, quote it: {key}='{value}')" if quote else ""
            raise UserError(
                f"bad options for pass {info.name!r}: {key} must be {_type_text(hints[key])}, "
                f"got {value!r}{hint}"
            )
    return out


def make_config(info: PassInfo, options: dict[str, object]) -> PassConfig:
    """The pass's config from `options` (checked by `check_options`); UserError if invalid."""
    options = check_options(info, options)
    try:
        return info.config_cls(**options)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad options for pass {info.name!r}: {e}") from None


def check_config(info: PassInfo, cfg: PassConfig) -> PassConfig:
    """A config object given directly (the Python API): TypeError unless it is the pass's
    config class; its values checked as `make_config` checks options."""
    if not isinstance(cfg, info.config_cls):
        raise TypeError(
            f"the config of pass {info.name!r} must be a {info.config_cls.__name__}, got "
            f"{type(cfg).__name__}"
        )
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return make_config(info, values)


def parse_pass_spec(spec: str) -> tuple[PassInfo, PassConfig] | None:
    """'NAME[:KEY=VALUE[,KEY=VALUE...]]' -> (PassInfo, config); None for 'none'/'identity'.
    Each key at most once, each value of its option's type (`check_options`)."""
    if not isinstance(spec, str):
        raise TypeError(f"a pass spec is a string such as 'shortv:ratio=0.6', got {spec!r:.60}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name in NO_PASS:
        if rest.strip():
            raise UserError(f"pass {name!r} takes no options")
        return None
    info = get_pass(name)
    options: dict[str, object] = {}
    for item in _split_options(rest):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"bad pass option {item!r} in {spec!r}: expected KEY=VALUE")
        if key in options:
            raise UserError(f"option {key!r} is given twice in {spec!r}: give it once")
        options[key] = _literal(value.strip())
    return info, make_config(info, options)


def parse_recipe(path: str) -> list[tuple[PassInfo, PassConfig]]:
    """A TOML recipe: [[pass]] tables, each with `name` and the pass's options."""
    import tomllib
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe {path} not found")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"bad recipe {path}: {e}") from None
    unknown = sorted(set(data) - {"pass"})
    if unknown:
        raise UserError(
            f"bad recipe {path}: unknown key {unknown[0]!r}; a recipe holds [[pass]] tables"
        )
    tables = data.get("pass", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise UserError(
            f"bad recipe {path}: 'pass' must be [[pass]] tables (one per pass, each with a "
            f"name and the pass's options), got {_toml_kind(tables)}"
        )
    out = []
    for table in tables:
        table = dict(table)
        name = table.pop("name", None)
        if name is None:
            raise UserError(f"bad recipe {path}: every [[pass]] needs a name")
        if not isinstance(name, str):
            raise UserError(
                f'bad recipe {path}: a [[pass]] name must be a string, e.g. name = "shortv"; '
                f"got {name!r}"
            )
        if name in NO_PASS:
            if table:
                raise UserError(f"bad recipe {path}: pass {name!r} takes no options")
            continue
        info = get_pass(name)
        out.append((info, make_config(info, table)))
    return out


def _toml_kind(value: object) -> str:
    """What a TOML value is, in words: `[pass]` is one table, `pass = ...` a value."""
    if isinstance(value, dict):
        return "one [pass] table (write [[pass]], with two brackets)"
    if isinstance(value, list):
        return f"a list of values {value!r}"[:80]
    return f"the value {value!r}"[:80]


def config_to_json(cfg: PassConfig) -> dict[str, object]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def _register_builtin() -> None:
    from . import fastervlm, fastv, shortv, vispruner, vtc_cls, vte

    register(shortv.PASS)
    register(fastv.PASS)
    register(vte.PASS)
    register(fastervlm.PASS)
    register(vtc_cls.PASS)
    register(vispruner.PASS)


_register_builtin()
