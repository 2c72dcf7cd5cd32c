"""Pipeline: capture -> ordered passes (linted after each) -> backend -> validated artifact.

`compile_model` is what `mllmc compile` calls. The artifact is written into a temporary directory
beside OUT and renamed into place only when every file is written and the compiled engine has
matched the eager reference on a probe input, so OUT is never left half-written.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
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
    """Accept pass specs as CLI strings ('shortv:layers=[1,2]') or parsed (info, config) pairs
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
                "each pass must be a spec string such as 'shortv:ratio=0.6' or an (info, "
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
    for info, _ in passes:
        if info.name in seen:
            raise UserError(
                f"pass order refused: {info.name!r} is given twice; a pass runs once per "
                f"pipeline: give one {info.name} with all its options"
            )
        seen.add(info.name)
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
    """Invariants every pass keeps: same segments, same IO names, output dtypes and ranks."""
    for old, new in zip(before, after, strict=True):
        if old.input_names != new.input_names or _signature(old) != _signature(new):
            raise RuntimeError(f"pass {pass_name} changed the signature of the {old.name} segment")
        new.program.graph.lint()


def prepare_passes(passes: PassList, model: Any, info: Any) -> list[tuple[PassInfo, Any]]:
    """Resolve what each pass needs from the eager model (e.g. ShortV's layer list), and check
    its options against the model, before anything is captured."""
    check_order(passes)
    return [(p, p.prepare(cfg, model, info) if p.prepare else cfg) for p, cfg in passes]


def run_passes(segments: Any, passes: PassList) -> tuple[Any, list[PassRecord]]:
    """Apply prepared `passes` in order; returns the rewritten segments and one record per pass."""
    check_order(passes)
    records = []
    for info, cfg in passes:
        t0 = time.perf_counter()
        result = info.fn(segments, cfg)
        lint(segments, result.segments, info.name)
        segments = result.segments
        applied = AppliedPass(
            info.name, config_to_json(cfg), result.stats, round(time.perf_counter() - t0, 3)
        )
        records.append(PassRecord(info, cfg, applied))
        log.info("pass %s: %s", info.name, result.stats)
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
) -> CompileResult:
    """Compile the LLaVA model at `model_dir` into an artifact directory `out_dir`.

    `passes`: e.g. ["shortv:ratio=0.6"] or [(info, config), ...], applied in order. `target`:
    onnx (float32, CPU), aoti (`device` cpu or cuda, `dtype` float32 (default), bfloat16 or
    float16) or trt (cuda; float16 by default; `max_seq_len` bounds its shape profiles).
    `decode_cache` (aoti): "static" adds the decode step over fixed-capacity buffers, which the
    runtime replays as CUDA graphs on CUDA (the default there); "growing" (the default on the
    CPU) does not."""
    from mllmc.compiler.core.model_dir import check_processor, model_shape, read_config
    from mllmc.compiler.files import artifact, outputs

    from . import backends

    # every check that needs no model runs before torch is imported: bad input costs no wait
    passes = resolve_passes(passes)
    options = backends.resolve_options(
        target, backends.TargetOptions(device, dtype, max_seq_len, decode_cache)
    )
    check_order(passes)
    config = read_config(model_dir)
    check_processor(model_dir, config)
    shape = model_shape(config)
    for info, cfg in passes:
        if info.check is not None:
            info.check(cfg, shape)
    out = outputs.check_output_dir(
        out_dir, force, artifact.replaceable, what="artifact", protected=[model_dir]
    )
    from mllmc.compiler.core import capture, flops

    from . import verify

    backend = backends.build_backend(target, options)

    steps = ["load", "capture", "passes", "flops", target, "validate" if validate else "write"]
    bar = tqdm(total=len(steps), desc="compile", disable=not progress, unit="step")

    def step(name: str) -> None:
        bar.set_postfix_str(name)

    # staged from the start: a failure, Ctrl-C or SIGTERM at any step removes the temp dir
    try:
        with artifact.staged_directory(out, force=force) as tmp:
            step("load")
            model, info = capture.load_model(model_dir)
            check_processor(model_dir, config, info.image_size)
            model = backend.prepare(model)
            passes = prepare_passes(passes, model, info)
            bar.update()
            step("capture")
            segments = capture.capture(model, info, options.decode_cache == "static")
            base_flops = flops.segment_flops(segments)
            bar.update()
            step("passes")
            segments, records = run_passes(segments, passes)
            bar.update()
            step("flops")
            new_flops = flops.segment_flops(segments)
            bar.update()
            step(target)
            entries = {seg.name: backend(seg, tmp) for seg in segments}
            if segments.static_decode is not None:
                entries[segments.static_decode.name] = backend(segments.static_decode, tmp)
            entries = backend.finish_artifact(tmp, entries)
            bar.update()
            manifest = artifact.build_manifest(
                info,
                segments,
                records,
                entries,
                {"before": base_flops, "after": new_flops},
                target,
                backend.extra,
                dtype=str(backend.options.dtype),
                tol=backend.tol,
            )
            artifact.copy_preprocessing(model_dir, tmp)
            artifact.write_manifest(tmp, manifest)
            if validate:
                step("validate")
                report = verify.verify(
                    tmp, model, info, records, max_new_tokens=4, tol=manifest.tol
                )
                manifest = dataclasses.replace(manifest, validation=report.summary())
                artifact.write_manifest(tmp, manifest)
                if not report.ok:
                    raise UserError(
                        f"compiled engine does not match the eager model: {report.line()}"
                    )
            bar.update()
    finally:
        bar.close()
    return CompileResult(out, manifest)
