"""Pipeline: capture -> ordered passes (linted after each) -> backend -> validated artifact.

`compile_model` is what `mllmc compile` calls. The artifact is written into a temporary directory
beside OUT and renamed into place only when every file is written and the compiled engine has
matched the eager reference on a probe input, so OUT is never left half-written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mllmc.compiler.core.pass_types import PassInfo, PassRecord
from mllmc.passes import config_to_json
from mllmc.runtime.errors import UserError
from mllmc.runtime.manifest import AppliedPass, Manifest

log = logging.getLogger(__name__)

PassList = Sequence[tuple[PassInfo, Any]]


def resolve_passes(passes: Sequence[str | tuple[PassInfo, Any]]) -> list[tuple[PassInfo, Any]]:
    """Accept pass specs as CLI strings ('shortv:layers=[1,2]') or parsed (PassInfo, config) pairs
    (from `mllmc.passes.parse_pass_spec`); TypeError for anything else, UserError for a bad
    spec or option."""
    from mllmc.compiler.core.pass_types import PassInfo
    from mllmc.passes import check_config, parse_pass_spec

    if isinstance(passes, (str, bytes)) or not isinstance(passes, Sequence):
        raise TypeError(
            f"passes must be a list of pass specs, e.g. ['shortv:ratio=0.6'], got "
            f"{type(passes).__name__} {passes!r:.60}"
        )
    out = []
    for p in passes:
        if isinstance(p, str):
            parsed = parse_pass_spec(p)
            if parsed is not None:
                out.append(parsed)
        elif isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], PassInfo):
            out.append((p[0], check_config(p[0], p[1])))
        else:
            raise TypeError(
                "each pass must be a spec string such as 'shortv:ratio=0.6' or a (PassInfo, "
                f"config) pair from mllmc.passes.parse_pass_spec, got {p!r:.60}"
            )
    return out


STAGE_ORDER = {"pre_llm": 0, "in_llm": 1}


def check_order(passes: PassList) -> None:
    """The order rules, each refused with one line naming it: each pass at most once (one config
    says it all); pre-LLM passes (they change N_v before the decoder) before in-LLM passes; at
    most one pruning pass per stage (two would choose conflicting spans); an in-LLM pruning pass
    (fastv, vte) before the in-LLM passes that rewrite layers for the rows they hold (shortv)."""
    seen: set[str] = set()
    for pass_info, _ in passes:
        if pass_info.name in seen:
            raise UserError(
                f"pass order refused: {pass_info.name!r} is given twice; a pass runs once per "
                f"pipeline: give one {pass_info.name} with all its options"
            )
        seen.add(pass_info.name)
    for (a, _), (b, _) in zip(passes, passes[1:], strict=False):
        if STAGE_ORDER[a.stage] > STAGE_ORDER[b.stage]:
            raise UserError(
                f"pass order refused: {b.name!r} changes the visual tokens before the LLM, so it "
                f"must come before {a.name!r}, which rewrites layers inside it"
            )
    for i, (b, _) in enumerate(passes):
        for a, _ in passes[:i]:
            if a.stage != b.stage or not b.prunes:
                continue
            if a.prunes:
                where = "enter the LLM" if b.stage == "pre_llm" else "later layers hold"
                raise UserError(
                    f"pass order refused: {a.name!r} and {b.name!r} both choose which visual "
                    f"tokens {where}; their pruned spans conflict: give one of them"
                )
            raise UserError(
                f"pass order refused: {b.name!r} drops visual rows, so it must come before "
                f"{a.name!r}, which rewrites layers for the rows they hold"
            )


def _signature(seg: Any) -> list[tuple[str, str, int]]:
    outs = [n for n in seg.program.graph.nodes if n.op == "output"][0].args[0]
    vals = [o.meta["val"] for o in outs]
    return [(name, str(v.dtype), v.dim()) for name, v in zip(seg.output_names, vals, strict=True)]


def lint(before: Any, after: Any, pass_name: str) -> None:
    """Invariants every pass keeps: same segments, same IO names, output dtypes and ranks (a
    pre-LLM pass may add outputs to the vision segment, after the ones it had: which patches a
    tile kept, for a family that packs tiles on the host)."""
    for old, new in zip(before, after, strict=True):
        was, now = _signature(old), _signature(new)
        if old.name == "vision":
            now = now[: len(was)]
        if old.input_names != new.input_names or was != now:
            raise RuntimeError(f"pass {pass_name} changed the signature of the {old.name} segment")
        new.program.graph.lint()


def prepare_passes(passes: PassList, model: Any, model_info: Any) -> list[tuple[PassInfo, Any]]:
    """Resolve what each pass needs from the eager model (e.g. ShortV's layer list), and check
    its options against the model, before anything is captured."""
    check_order(passes)
    return [(p, p.prepare(cfg, model, model_info) if p.prepare else cfg) for p, cfg in passes]


def run_passes(segments: Any, passes: PassList) -> tuple[Any, list[PassRecord]]:
    """Apply prepared `passes` in order; returns the rewritten segments and one record per pass."""
    check_order(passes)
    records = []
    for pass_info, cfg in passes:
        t0 = time.perf_counter()
        result = pass_info.fn(segments, cfg)
        lint(segments, result.segments, pass_info.name)
        segments = result.segments
        applied = AppliedPass(
            pass_info.name, config_to_json(cfg), result.stats, round(time.perf_counter() - t0, 3)
        )
        records.append(PassRecord(pass_info, cfg, applied))
        log.info("pass %s: %s", pass_info.name, result.stats)
    return segments, records


@dataclass
class CompileResult:
    out_dir: Path
    manifest: Manifest


def compile_model(
    model_dir: str | Path,
    out_dir: str | Path,
    passes: Sequence[str | tuple[PassInfo, Any]] = (),
    target: str = "onnx",
    validate: bool = True,
    force: bool = False,
    progress: bool = True,
    device: str = "cpu",
    dtype: str | None = None,
    max_seq_len: int | None = None,
    decode_cache: str | None = None,
    quantize: Any = None,
) -> CompileResult:
    """Compile the LLaVA model at `model_dir` into an artifact directory `out_dir`.

    `passes`: e.g. ["shortv:ratio=0.6"] or [(PassInfo, config), ...], applied in order. `target`:
    onnx (float32, CPU), aoti (`device` cpu or cuda, `dtype` float32 (default), bfloat16 or
    float16) or trt (cuda; float16 by default; `max_seq_len` bounds its shape profiles).
    `decode_cache` (aoti, onnx): "static" adds the decode step over fixed-capacity buffers,
    which the runtime replays as CUDA graphs on CUDA (the default there) or, for onnx (its
    default), runs over buffers it writes in place; "growing" does not. `quantize`: "int4" or
    "int8" (the defaults of `backends.quantize.quantize_config` for the target) or a
    `QuantizeConfig` from it. onnx: weight-only block quantization of the decoder's MatMuls
    after the passes, validated against eager with the same quantize -> dequantize round trip of
    its weights; aoti (CPU, int4): torchao's int4 weights swapped in before capture, validated
    against the eager model with the same torchao weights."""
    from mllmc.compiler.files import artifact

    from . import backends
    from .backends import export_cache

    # every check that needs no model runs before torch is imported: bad input costs no wait
    _check_arg_types(validate=validate, force=force, progress=progress, max_seq_len=max_seq_len)
    pass_list = resolve_passes(passes)
    options = backends.resolve_options(
        target,
        backends.TargetOptions(
            device, dtype, max_seq_len, decode_cache, _quantize_config(quantize, target)
        ),
    )
    config, out = _check_inputs(model_dir, out_dir, pass_list, force)
    if target == "onnx":
        export_cache.check_folder(export_cache.cache_dir(), out, Path(model_dir))
    backend = backends.build_backend(target, options)

    steps = ["load", "capture", "passes", "flops", target, "validate" if validate else "write"]
    bar = tqdm(total=len(steps), desc="compile", disable=not progress, unit="step")
    # staged from the start: a failure, Ctrl-C or SIGTERM at any step removes the temp dir
    try:
        with artifact.staged_directory(out, force=force) as tmp, fewer_gc_passes():
            manifest = _write_artifact(
                tmp, model_dir, config, pass_list, backend, target, validate, bar
            )
    finally:
        bar.close()
    return CompileResult(out, manifest)


# the garbage collector's thresholds while a compile runs (Python's default: 700, 10, 10)
COMPILE_GC_THRESHOLDS = (50_000, 20, 100)


@contextlib.contextmanager
def fewer_gc_passes() -> Iterator[None]:
    """Raise the garbage collector's thresholds for the block, restore them after it, and
    collect once at its end. Tracing and exporting the graphs makes millions of short-lived
    objects, and the collector's passes over them took ~10% of a compile (tiny-llava: 4.5 s of
    45 s, 16 of them full passes over the heap); reference counting still frees every object
    that is not in a cycle, and the cycles are collected when the block ends."""
    before = gc.get_threshold()
    gc.set_threshold(*COMPILE_GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.collect()


def check_model(model_dir: str | Path, passes: PassList = ()) -> dict[str, Any]:
    """The checks that need no model loaded (torch is not imported): pass order, the model
    directory's config, processor and tokenizer, and each pass's options against the model's
    shape. Returns the model's config."""
    from mllmc.compiler.core.model_dir import (
        check_processor,
        check_tokenizer,
        model_shape,
        read_config,
    )

    check_order(passes)
    config = read_config(model_dir)
    check_processor(model_dir, config)
    check_tokenizer(model_dir, config)
    shape = model_shape(config)
    for pass_info, cfg in passes:
        if pass_info.check is not None:
            pass_info.check(cfg, shape)
    return config


def _quantize_config(quantize: Any, target: str) -> Any:
    """`compile_model`'s `quantize` as a QuantizeConfig (None: float weights)."""
    from .backends.quantize import QuantizeConfig, quantize_config

    if quantize is None or isinstance(quantize, QuantizeConfig):
        return quantize
    if not isinstance(quantize, str):
        raise TypeError(f"quantize must be 'int4', 'int8' or a QuantizeConfig, got {quantize!r}")
    return quantize_config(quantize, target=target)


def _check_arg_types(*, max_seq_len: Any, **flags: Any) -> None:
    """TypeError unless each of `flags` is a real bool (a string such as 'no' is truthy) and
    `max_seq_len` is None or an integer."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if max_seq_len is not None and (
        isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
    ):
        raise TypeError(f"max_seq_len must be None or an integer, got {max_seq_len!r}")


def _check_inputs(
    model_dir: str | Path, out_dir: str | Path, passes: PassList, force: bool
) -> tuple[dict[str, Any], Path]:
    """`check_model`, then the output directory. Returns the model's config and the output
    path."""
    from mllmc.compiler.files import artifact, outputs

    config = check_model(model_dir, passes)
    out = outputs.check_output_dir(
        out_dir, force, artifact.replaceable, what="artifact", protected=[model_dir]
    )
    return config, out


def _write_artifact(
    tmp: Path,
    model_dir: str | Path,
    config: dict[str, Any],
    passes: PassList,
    backend: Any,
    target: str,
    validate: bool,
    bar: Any,
) -> Manifest:
    """Load, capture, rewrite, compile and (if `validate`) check the model into the staging
    directory `tmp`, advancing `bar` one step per stage; returns the manifest written there."""
    from mllmc.compiler.core import capture, flops
    from mllmc.compiler.core.model_dir import check_processor
    from mllmc.compiler.files import artifact

    bar.set_postfix_str("load")
    model, model_info = capture.load_model(model_dir)
    check_processor(model_dir, config, model_info.image_size)
    model = backend.prepare(model)
    passes = prepare_passes(passes, model, model_info)
    bar.update()
    bar.set_postfix_str("capture")
    segments = capture.capture(
        model, model_info, backend.options.decode_cache == "static", backend.fused_attention
    )
    base_flops = flops.segment_flops(segments)
    bar.update()
    bar.set_postfix_str("passes")
    segments, records = run_passes(segments, passes)
    bar.update()
    bar.set_postfix_str("flops")
    new_flops = flops.segment_flops(segments)
    bar.update()
    bar.set_postfix_str(target)
    entries = _compile_segments(tmp, segments, backend)
    bar.update()
    manifest = artifact.build_manifest(
        model_info,
        segments,
        records,
        entries,
        {"before": base_flops, "after": new_flops},
        backend.settings,
        tol=backend.tol,
    )
    artifact.copy_preprocessing(model_dir, tmp)
    artifact.write_manifest(tmp, manifest)
    if validate:
        bar.set_postfix_str("validate")
        manifest = _validate(tmp, model, model_info, records, manifest)
    bar.update()
    return manifest


def _compile_segments(tmp: Path, segments: Any, backend: Any) -> dict[str, Any]:
    """Compile every segment (and the static-cache decode step, when captured) into `tmp`;
    returns the backend's manifest entries by segment name."""
    entries = {seg.name: backend(seg, tmp) for seg in segments}
    if segments.static_decode is not None:
        entries[segments.static_decode.name] = backend(segments.static_decode, tmp)
    return backend.finish_artifact(tmp, entries)


def _validate(
    tmp: Path, model: Any, model_info: Any, records: list[PassRecord], manifest: Manifest
) -> Manifest:
    """Run the staged artifact against the eager model (and the passes' references), record
    the result in its manifest, and refuse it (UserError) when they do not match."""
    from mllmc.compiler.files import artifact

    from . import verify

    report = verify.verify(tmp, model, model_info, records, max_new_tokens=4, tol=manifest.tol)
    manifest = dataclasses.replace(manifest, validation=report.summary())
    artifact.write_manifest(tmp, manifest)
    if not report.ok:
        raise UserError(f"compiled engine does not match the eager model: {report.line()}")
    return manifest
