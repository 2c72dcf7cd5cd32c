"""The `mllmc` command line. Thin: each subcommand parses its arguments and calls one library
function. A user error prints one line on stderr and exits 2; a failed check (verify, golden
check) exits 1."""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mllmc.compiler.files.outputs import check_output_file, check_output_folder
from mllmc.compiler.tools.limits import MAX_ITEMS, MAX_REPEATS
from mllmc.runtime.engine import MAX_NEW_TOKENS, MIN_TEMPERATURE
from mllmc.runtime.errors import UserError
from mllmc.runtime.runners import DECODE_CACHES

EXAMPLES = """\
examples:
  mllmc preset tiny-llava -o models/tiny-llava
  mllmc compile models/tiny-llava --target onnx -o out/tiny
  mllmc compile models/tiny-llava --pass shortv:layers=[1,3,4] -o out/tiny-shortv
  mllmc compile MODEL --pass shortv:ratio=0.6,lc=lc.json -o out/shortv
  mllmc compile MODEL --pass fastervlm:keep=144 --pass shortv:ratio=0.6 -o out/both
  mllmc compile MODEL --pass fastv:k=2,ratio=0.5 --target aoti -o out/fastv-aoti
  mllmc compile MODEL --pass shortv --target aoti --device cuda --dtype bfloat16 -o out/gpu
  mllmc compile MODEL --pass shortv:ratio=0.6 --target trt --max-seq-len 4096 -o out/trt
  mllmc compile MODEL --quantize int4 --eval-task shapes-qa -n 400 -o out/int4
  mllmc compile MODEL --quantize int4 --target aoti --block-size 128 -o out/int4-aoti
  mllmc calibrate models/tiny-llava --pass shortv -o lc.json
  mllmc run out/tiny-shortv --image cat.png --prompt "Describe the image." --max-new-tokens 16
  mllmc verify out/tiny-shortv --against models/tiny-llava
  mllmc inspect out/tiny-shortv
  mllmc eval out/tiny-shortv --task shapes-qa -n 200
  mllmc golden record out/tiny --image cat.png --prompt "Describe the image." -o golden.json
  mllmc golden check out/tiny golden.json
  mllmc bench models/small-llava --pass shortv --target onnx
  mllmc bench MODEL --pass shortv --target aoti --device cuda --dtype bfloat16
  mllmc serve out/tiny-shortv --port 8000
  mllmc export-triton out/tiny-shortv -o triton-repo
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), as for every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _int_in(lo: int, hi: int | None = None, *, cap: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi] (one-line error, exit 2, otherwise); `cap`: an
    upper bound as well, named on its own ("must be >= lo" below, "at most cap" above)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        if cap is not None and value > cap:
            raise argparse.ArgumentTypeError(f"must be at most {cap}, got {value}")
        return value

    return parse


def _repeats(text: str) -> int:
    """argparse type of bench's --repeats: an integer from 1 to MAX_REPEATS."""
    return _int_in(1, cap=MAX_REPEATS)(text)


def _number(*, positive: bool) -> Callable[[str], float]:
    """argparse type: a finite float, > 0 (positive) or >= 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'> 0' if positive else '>= 0'}, got {text}"
            )
        return value

    return parse


def _passes(args: argparse.Namespace) -> list[tuple[Any, Any]]:
    from mllmc.passes import parse_pass_spec, parse_recipe

    passes = []
    if getattr(args, "recipe", None):
        passes += parse_recipe(args.recipe)
    for spec in getattr(args, "passes", None) or []:
        parsed = parse_pass_spec(spec)
        if parsed is not None:
            passes.append(parsed)
    return passes


def cmd_preset(args: argparse.Namespace) -> int:
    from mllmc.compiler.data.presets import write_preset

    if args.device != "cpu":
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UserError(f"unknown device {args.device!r}; e.g. cpu, cuda, cuda:1") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device on this machine")
    out = write_preset(args.name, args.output, seed=args.seed, force=args.force, device=args.device)
    print(f"wrote {args.name} to {out}")
    return 0


def _use_export_cache(path: str, target: str) -> None:
    """Point this process's ONNX exports at the cache folder `path` (`export_cache`; the
    pipeline checks the folder with the other outputs)."""
    from mllmc.compiler.backends import export_cache

    if target != "onnx":
        raise UserError(f"--cache-dir caches ONNX exports: it does not apply to --target {target}")
    folder = Path(path).expanduser()
    if not path or (folder.exists() and not folder.is_dir()):
        raise UserError(f"--cache-dir {path!r} is not a folder")
    os.environ[export_cache.ENV] = str(folder)


def cmd_compile(args: argparse.Namespace) -> int:
    from mllmc.compiler.backends.quantize import quantize_config
    from mllmc.compiler.pipeline import compile_model

    from .precision import check_eval_options

    quantize = quantize_config(
        args.quantize,
        args.block_size,
        args.accuracy_level,
        args.quantize_keep,
        args.quantize_parts,
        target=args.target,
    )
    check_eval_options(args.eval_task, args.eval_items)
    passes = _passes(args)
    if args.cache_dir is not None:
        _use_export_cache(args.cache_dir, args.target)
    result = compile_model(
        args.model,
        args.output,
        passes,
        target=args.target,
        device=args.device,
        dtype=args.dtype,
        max_seq_len=args.max_seq_len,
        decode_cache=args.decode_cache,
        validate=not args.no_validate,
        force=args.force,
        progress=not args.quiet,
        quantize=quantize,
    )
    from .inspect_artifact import percent_cut

    m = result.manifest
    before, after = m.flops["before"], m.flops["after"]
    val = m.validation
    print(f"wrote {result.out_dir}  ({', '.join(p.name for p in m.passes) or 'no passes'})")
    print(
        f"prefill FLOPs for one image + {after['reference_text_tokens']} text tokens: "
        f"{before['prefill'] / 1e9:.3f} -> {after['prefill'] / 1e9:.3f} GFLOP "
        f"({percent_cut(before['prefill'], after['prefill'])})"
    )
    if val:
        print(
            f"validated against eager: max |Δlogit| {val['max_abs_logit_diff']:.2e}, "
            f"tokens {'identical' if val['tokens_match'] else 'near-tie'}"
        )
    if quantize is not None:
        print(f"weights: {m.precision.describe()}")
    if args.eval_task:
        from .precision import evaluate_precision

        n = 400 if args.eval_items is None else args.eval_items
        report = evaluate_precision(
            result.out_dir, args.model, passes, args.eval_task, n, quantize is not None,
            progress=not args.quiet, target=args.target,
        )  # fmt: skip
        print(f"eval: {report.line()}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from mllmc.compiler.pipeline import check_model

    # checks that need no model first: a bad option is refused before torch loads
    if args.pass_name not in ("shortv", "vte"):
        raise UserError(f"calibrate supports --pass shortv or vte, got {args.pass_name!r}")
    check_model(args.model)
    if args.pass_name != "vte" and args.threshold is not None:
        raise UserError(
            f"--threshold is for --pass vte (the exit layer's KL bound); --pass "
            f"{args.pass_name} takes none: drop --threshold"
        )
    if args.pass_name == "vte":
        if args.threshold is None:
            raise UserError(
                "calibrate --pass vte needs --threshold T (the largest mean KL allowed)"
            )
        check_output_file(args.output, args.force, "exit file")
        from .calibrate import calibrate_exit_cli

        calibrate_exit_cli(
            args.model,
            args.output,
            args.threshold,
            images=args.images,
            prompts=args.prompts,
            n=args.num_samples,
            progress=not args.quiet,
            task=args.task,
            data=args.data,
            force=args.force,
        )
        return 0
    check_output_file(args.output, args.force, "LC file")
    if not args.no_plot:
        check_output_file(Path(args.output).with_suffix(".png"), args.force, "LC chart")
    from .calibrate import calibrate_cli

    calibrate_cli(
        args.model,
        args.output,
        images=args.images,
        prompts=args.prompts,
        n=args.num_samples,
        plot=not args.no_plot,
        progress=not args.quiet,
        task=args.task,
        data=args.data,
        force=args.force,
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    report = evaluate(
        args.path,
        task=args.task,
        data=args.data,
        n=args.num_items,
        split=args.split,
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(report.line())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from mllmc.compiler.files.outputs import write_file
    from mllmc.runtime import load

    check_output_file(args.save_logits, args.force, "logits")
    engine = load(
        args.artifact,
        providers=args.providers,
        threads=args.threads,
        cuda_graphs=False if args.no_cuda_graphs else None,
        decode_cache=args.decode_cache,
    )
    if not args.image and not engine.text_only:
        passes = [p.name for p in engine.manifest.passes]
        why = (
            f"its passes ({', '.join(passes)}) need visual rows"
            if engine.manifest.min_visual_rows and passes
            else f"a {engine.manifest.model.model_type} model's prompt holds at least one image"
        )
        raise UserError(f"{args.artifact} needs an image (give --image FILE): {why}")
    result = engine.generate(
        args.image or None,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        strict=args.strict,
    )
    if args.save_logits:
        buf = io.BytesIO()
        np.save(buf, result.logits.astype(np.float32))
        write_file(args.save_logits, buf.getvalue(), force=args.force)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        t = result.timings
        print(result.text)
        print(f"tokens: {result.token_ids}")
        print(
            f"prompt {result.prompt_tokens} tokens | vision {t['vision_s'] * 1e3:.1f} ms | "
            f"prefill {t['prefill_s'] * 1e3:.1f} ms | decode {t['decode_s_per_token'] * 1e3:.2f} ms/token"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from mllmc.compiler.verify import verify_artifact

    report = verify_artifact(
        args.artifact,
        args.against,
        image=args.image,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        tol=args.tol,
    )
    print(report.line())
    return 0 if report.ok else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect_artifact import describe

    print(describe(args.artifact, as_json=args.json))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import describe, plan, plan_json

    result = plan(args.config, args.passes, args.visual_rows, args.text_tokens)
    print(plan_json(result) if args.json else describe(result))
    return 0


def cmd_golden(args: argparse.Namespace) -> int:
    from mllmc.compiler.files.outputs import write_file
    from mllmc.runtime import golden

    if args.golden_cmd == "record":
        if len(args.image) != 1:
            raise UserError(
                f"golden record takes one --image, got {len(args.image)}: a golden file records "
                "one image and prompt"
            )
        args.image = args.image[0]
        check_output_file(args.output, args.force, "golden file")
        g = golden.record(
            args.artifact, args.image, args.prompt, args.max_new_tokens, golden_path=args.output
        )
        write_file(args.output, json.dumps(g, indent=2) + "\n", force=args.force)
        print(f"recorded {len(g['token_ids'])} tokens to {args.output}")
        return 0
    problems = golden.check(args.artifact, golden.read_golden(args.golden), tol=args.tol)
    if problems:
        print(f"golden check FAILED: {'; '.join(problems)}")
        return 1
    print("golden check passed")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mllmc.compiler.backends import TargetOptions, resolve_options
    from mllmc.compiler.pipeline import check_model

    passes = _passes(args)
    resolve_options(args.target, TargetOptions(args.device, args.dtype))
    check_model(args.model, passes)  # what compile checks before torch loads
    if args.output is not None:
        check_output_file(args.output, args.force, "benchmark report")
        check_output_file(Path(args.output).with_suffix(".png"), args.force, "benchmark plot")
    if args.artifacts_dir is not None:
        check_output_folder(args.artifacts_dir, "benchmark artifacts")
    from .bench import bench_cli

    bench_cli(
        args.model,
        passes,
        target=args.target,
        output=args.output,
        n_text=args.text_tokens,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        device=args.device,
        dtype=args.dtype,
        artifacts_dir=args.artifacts_dir,
        force=args.force,
        threads=args.threads,
    )
    return 0


def _serve_settings(args: argparse.Namespace) -> Any:
    from .serve import ServeSettings

    return ServeSettings(
        max_batch=args.max_batch,
        instances=args.instances,
        max_new_tokens_limit=args.max_new_tokens_limit,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        threads=args.threads,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    return serve(
        args.artifact,
        port=args.port,
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        settings=_serve_settings(args),
    )


def cmd_export_triton(args: argparse.Namespace) -> int:
    from .serve import write_model_repository

    out = write_model_repository(
        args.artifact,
        args.output,
        _serve_settings(args),
        copy_artifact=not args.no_copy,
        force=args.force,
    )
    print(f"wrote the Triton model repository {out} (model 'mllmc'; see docs/serving.md)")
    return 0


def _subparser(
    sub: Any, name: str, help: str, fn: Callable[[argparse.Namespace], int], examples: str
) -> argparse.ArgumentParser:
    """One subcommand whose `--help` ends with its own examples."""
    sp = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.set_defaults(fn=fn)
    return sp


def _add_preset_parser(sub: Any) -> None:
    from mllmc.compiler.data.presets import PRESETS

    def kind(spec: Any) -> str:
        return "trained" if spec.weights is not None else "random init"

    sp = _subparser(
        sub,
        "preset",
        "write a preset model directory (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL; for tests, benchmarks and the demo): "
        "random-init presets, and trained-tiny-llava, trained on shapes-qa",
        cmd_preset,
        "  mllmc preset tiny-llava -o models/tiny-llava\n"
        "  mllmc preset trained-tiny-llava -o models/trained-tiny-llava\n"
        "  mllmc preset small-llava -o models/small-llava --seed 1\n"
        "  mllmc preset llava-7b-shape -o models/llava-7b-shape --device cuda\n",
    )
    sp.add_argument(
        "name",
        help="; ".join(
            f"{name} ({kind(spec)}): {spec.description}" for name, spec in PRESETS.items()
        ),
    )
    sp.add_argument("-o", "--output", required=True, help="model directory to write")
    sp.add_argument(
        "--seed",
        type=_int_in(0, 2**63 - 1),
        default=0,
        help="seed of the random weights (a trained preset's weights do not depend on it)",
    )
    sp.add_argument(
        "--device",
        default="cpu",
        help="where the random weights are drawn (cuda draws a 7B model in seconds; the same "
        "seed gives other weights on another device)",
    )
    sp.add_argument(
        "--force",
        action="store_true",
        help="replace a preset directory mllmc wrote before (never another directory)",
    )


def _passes_text() -> str:
    """The passes and their options, for `compile --help` (docs/passes.md has what each does)."""
    import dataclasses

    from mllmc.passes import NO_PASS, REGISTRY

    lines = ["\npasses (--pass NAME:OPTION=VALUE,...; docs/passes.md):"]
    for name, info in sorted(REGISTRY.items()):
        options = "|".join(f.name for f in dataclasses.fields(info.config_cls))
        lines.append(f"  {name}:{options}".ljust(36) + f" {info.summary}")
    lines.append(f"  {' / '.join(NO_PASS)}".ljust(36) + " no pass (the unrewritten model)")
    return "\n".join(lines) + "\n"


def _add_compile_parser(sub: Any) -> None:
    sp = _subparser(
        sub,
        "compile",
        "compile a Hugging Face model directory (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) into an engine artifact",
        cmd_compile,
        "  mllmc compile models/tiny-llava -o out/tiny\n"
        "  mllmc compile models/tiny-llava --pass shortv:layers=[1,3,4] -o out/tiny-shortv\n"
        "  mllmc compile MODEL --pass shortv:ratio=0.6,lc=lc.json -o out/shortv\n"
        "  mllmc compile MODEL --pass fastervlm:keep=144 --pass shortv:ratio=0.6 -o out/both\n"
        "  mllmc compile MODEL --recipe recipe.toml -o out/recipe\n"
        "  mllmc compile MODEL --pass fastv:k=2,ratio=0.5 --target aoti -o out/fastv-aoti\n"
        "  mllmc compile MODEL --pass shortv --target aoti --device cuda --dtype bfloat16 "
        "-o out/gpu\n"
        "  mllmc compile MODEL --pass shortv:ratio=0.6 --target trt --max-seq-len 4096 "
        "-o out/trt\n"
        "  mllmc compile MODEL --quantize int4 --eval-task shapes-qa -n 400 -o out/int4\n"
        "  mllmc compile MODEL --quantize int4 --target aoti --block-size 128 -o out/int4-aoti\n"
        + _passes_text(),
    )
    sp.add_argument("model", help="Hugging Face model directory (config.json, *.safetensors, ...)")
    sp.add_argument("-o", "--output", required=True, help="artifact directory to write")
    sp.add_argument(
        "--pass",
        dest="passes",
        action="append",
        metavar="NAME[:K=V,...]",
        help="a pass and its options, e.g. shortv:layers=[1,3]; repeat for a pipeline",
    )
    sp.add_argument("--recipe", metavar="FILE.toml", help="[[pass]] tables with name and options")
    sp.add_argument(
        "--target",
        default="onnx",
        help="onnx (default; onnxruntime, float32 CPU), aoti (AOTInductor .pt2 packages) or trt "
        "(TensorRT via torch-tensorrt; written for, not run on, a GPU here)",
    )
    sp.add_argument("--device", default="cpu", help="aoti: cpu (default) or cuda; trt: cuda")
    sp.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16 (default: float32; trt: float16)",
    )
    sp.add_argument(
        "--max-seq-len",
        type=_int_in(2),
        metavar="N",
        help="trt: the longest prompt + generated tokens its engines accept (default: 8192)",
    )
    sp.add_argument(
        "--decode-cache",
        choices=DECODE_CACHES,
        default=None,
        help="'static' adds a decode step over fixed-capacity cache buffers: onnx writes each "
        "step's rows into them in place (default for onnx), aoti replays it as a CUDA graph per "
        "step on CUDA (default there); 'growing' (default for aoti on the CPU, the only one for "
        "trt) copies each layer's cache one row longer per step",
    )
    _add_quantize_arguments(sp)
    sp.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="onnx: keep each exported segment in DIR and copy an equal one from there instead "
        "of exporting it again (another pass list on the same model re-exports only what the "
        "passes changed); default: $MLLMC_CACHE_DIR, else no cache",
    )
    sp.add_argument("--no-validate", action="store_true", help="skip the check against eager")
    sp.add_argument(
        "--force",
        action="store_true",
        help="replace an existing mllmc artifact (never another directory, a file, or the model)",
    )
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_quantize_arguments(sp: Any) -> None:
    """compile's weight-precision options (checked by `quantize.quantize_config`) and its
    accuracy report (docs/precision.md)."""
    sp.add_argument(
        "--quantize",
        metavar="int4|int8",
        help="weight-only block quantization of the decoder, lm_head and (int4) the embedding: "
        "onnx int4|int8 (MatMulNBits, after the passes), aoti int4 (torchao, CPU; "
        "pip install 'mllmc[torchao]')",
    )
    sp.add_argument(
        "--block-size",
        type=_int_in(-(2**63)),
        metavar="N",
        help="--quantize: weights per scale: 32 (int4's default), 64, 128 (int8's default); "
        "onnx also 16 and 256",
    )
    sp.add_argument(
        "--accuracy-level",
        type=_int_in(-(2**63)),
        metavar="N",
        help="--quantize on onnx: MatMulNBits compute, 0-4 (default 4: int8 activations)",
    )
    sp.add_argument(
        "--quantize-keep", metavar="PARTS", help="--quantize: keep in float: lm_head,embedding"
    )
    sp.add_argument(
        "--quantize-parts", metavar="PARTS", help="--quantize: quantize too: vision,projector"
    )
    sp.add_argument(
        "--eval-task",
        metavar="TASK",
        help="after compiling, score the artifact on a task (shapes-qa), a quantized one beside "
        "its float32 twin",
    )
    sp.add_argument(
        "-n", dest="eval_items", type=_int_in(1), metavar="N", help="--eval-task items (400)"
    )


def _add_calibrate_parser(sub: Any, max_items: int) -> None:
    sp = _subparser(
        sub,
        "calibrate",
        "measure ShortV Layer Contribution (or VTE's exit layer) on calibration data",
        cmd_calibrate,
        "  mllmc calibrate models/tiny-llava -o lc.json\n"
        "  mllmc calibrate models/trained-tiny-llava --task shapes-qa -n 32 -o lc.json\n"
        "  mllmc calibrate MODEL --images photos/ --prompts prompts.txt -o lc.json --no-plot\n"
        "  mllmc calibrate MODEL --pass vte --threshold 0.05 -o exit.json\n"
        "  mllmc compile MODEL --pass shortv:ratio=0.6,lc=lc.json -o out/shortv  # then\n",
    )
    sp.add_argument("model")
    sp.add_argument("--pass", dest="pass_name", default="shortv", help="shortv or vte")
    sp.add_argument(
        "--threshold",
        type=_number(positive=True),
        help="vte: the largest mean output KL the exit layer may cause",
    )
    sp.add_argument("--images", help="directory of images (default: built-in generated images)")
    sp.add_argument("--prompts", help="text file, one prompt per line (default: built-in)")
    sp.add_argument("--task", help="a built-in task's train split instead: shapes-qa")
    sp.add_argument(
        "--data", metavar="FILE.jsonl", help="the images and prompts of a JSONL file (as eval)"
    )
    sp.add_argument("-n", "--num-samples", type=_int_in(1, max_items), default=40)
    sp.add_argument(
        "-o", "--output", required=True, help="LC file (.json); a .png chart is written beside it"
    )
    sp.add_argument("--no-plot", action="store_true")
    sp.add_argument("--force", action="store_true", help="replace an existing LC file and chart")
    sp.add_argument("-q", "--quiet", action="store_true")


def _add_eval_parser(sub: Any, max_items: int) -> None:
    sp = _subparser(
        sub,
        "eval",
        "accuracy of an artifact (runtime engine) or a HF model dir (HF eager) on QA items",
        cmd_eval,
        "  mllmc eval out/tiny-shortv --task shapes-qa -n 200\n"
        "  mllmc eval models/trained-tiny-llava --task shapes-qa -n 200  # HF eager\n"
        "  mllmc eval out/tiny-shortv --data items.jsonl --json\n",
    )
    sp.add_argument("path", help="an mllmc artifact or a Hugging Face model directory")
    sp.add_argument("--task", help="a built-in task: shapes-qa")
    sp.add_argument(
        "--data",
        metavar="FILE.jsonl",
        help='lines of {"image": PATH or [PATH, ...], "prompt": ..., "answer": ...}',
    )
    sp.add_argument(
        "-n",
        "--num-items",
        type=_int_in(1, max_items),
        default=None,
        help="default: 500 / all lines",
    )
    sp.add_argument("--split", default=None, help="--task split: heldout (default) or train")
    sp.add_argument("--max-new-tokens", type=_int_in(1, cap=MAX_NEW_TOKENS), default=4)
    sp.add_argument(
        "--threads",
        type=_int_in(1, os.cpu_count() or 1),
        default=None,
        help="onnxruntime (artifact) or torch (HF) threads (artifact default: $MLLMC_THREADS, "
        "else all cores)",
    )
    sp.add_argument(
        "--json", action="store_true", help="print the report (and each answer) as JSON"
    )
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_run_parser(sub: Any) -> None:
    sp = _subparser(
        sub,
        "run",
        "generate text for an image and a prompt with a compiled artifact",
        cmd_run,
        '  mllmc run out/tiny-shortv --image cat.png --prompt "Describe the image." '
        "--max-new-tokens 16\n"
        '  mllmc run out/tiny --image cat.png --prompt "USER: <image>\\nHi ASSISTANT:" --json\n'
        '  mllmc run out/tiny --image cat.png --prompt "What is it?" --save-logits l.npy\n'
        '  mllmc run out/tiny --image a.png --image b.png --prompt "What differs?"\n',
    )
    sp.add_argument("artifact")
    sp.add_argument(
        "--image",
        action="append",
        help="an image file; give --image once per image, in prompt order (none: a text-only "
        "prompt, where the model takes one: Qwen2-VL, Qwen2.5-VL)",
    )
    sp.add_argument(
        "--prompt",
        required=True,
        help="with one image placeholder per image (<image>; Qwen: <|image_pad|>), or plain text for the chat template (images first)",
    )
    sp.add_argument("--max-new-tokens", type=_int_in(1, cap=MAX_NEW_TOKENS), default=32)
    sp.add_argument(
        "--temperature",
        type=_number(positive=False),
        default=0.0,
        help=f"0 = greedy (default); below {MIN_TEMPERATURE:g} also greedy",
    )
    sp.add_argument("--top-k", type=_int_in(0), default=0, help="0 = no top-k cut (default)")
    sp.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=None)
    sp.add_argument("--json", action="store_true", help="print {token_ids, text, timings} as JSON")
    sp.add_argument("--save-logits", metavar="F.npy", help="save (steps x vocab) float32 logits")
    sp.add_argument("--force", action="store_true", help="replace an existing --save-logits file")
    sp.add_argument(
        "--strict",
        action="store_true",
        help="refuse (exit 2) a prompt + new tokens past the model's max_position_embeddings "
        "instead of warning",
    )
    sp.add_argument("--providers", nargs="+", help="onnxruntime execution providers")
    sp.add_argument(
        "--threads",
        type=_int_in(1, os.cpu_count() or 1),
        default=None,
        help=f"onnxruntime threads, 1..{os.cpu_count() or 1} (default: $MLLMC_THREADS, else all "
        "cores)",
    )
    sp.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="aoti artifacts on CUDA: launch each op from the host instead of replaying CUDA "
        "graphs (the default there)",
    )
    sp.add_argument(
        "--decode-cache",
        choices=DECODE_CACHES,
        default=None,
        help="onnx / aoti: 'growing' runs the artifact's growing-cache decode even where it "
        "also holds a static one (an older artifact's static decode, say); 'static' requires "
        "one (default: the artifact's own choice)",
    )


def _add_verify_parser(sub: Any) -> None:
    sp = _subparser(
        sub,
        "verify",
        "compare a compiled artifact with the eager model (+ pass references)",
        cmd_verify,
        "  mllmc verify out/tiny-shortv --against models/tiny-llava\n"
        '  mllmc verify out/tiny --against models/tiny-llava --image cat.png --prompt "Hi"\n'
        "  mllmc verify out/gpu --against MODEL --max-new-tokens 32 --tol 1e-2\n",
    )
    sp.add_argument("artifact")
    sp.add_argument("--against", required=True, help="the source model directory")
    sp.add_argument(
        "--image",
        default=None,
        action="append",
        help="an image file, once per image (default: a built-in synthetic image)",
    )
    sp.add_argument(
        "--prompt",
        help="default: 'Describe the image.' (after the image placeholders where the model has "
        "no chat template)",
    )
    sp.add_argument("--max-new-tokens", type=_int_in(1, cap=MAX_NEW_TOKENS), default=16)
    sp.add_argument(
        "--tol",
        type=_number(positive=True),
        default=None,
        help="logit tolerance (x the logits' scale); default: the one the artifact records for "
        "its dtype (1e-4 for float32)",
    )


def _add_inspect_parser(sub: Any) -> None:
    sp = _subparser(
        sub,
        "inspect",
        "show an artifact's segments, passes, visual tokens per layer and FLOPs",
        cmd_inspect,
        "  mllmc inspect out/tiny-shortv\n  mllmc inspect out/tiny-shortv --json\n",
    )
    sp.add_argument("artifact")
    sp.add_argument("--json", action="store_true")


def _add_plan_parser(sub: Any) -> None:
    sp = _subparser(
        sub,
        "plan",
        "a pass pipeline's layer plan and prefill FLOPs from a config.json alone (no weights)",
        cmd_plan,
        "  mllmc plan llava-next-13b/config.json --pass shortv\n"
        "  mllmc plan models/tiny-llava --pass fastv --pass shortv:layers=[0,3] --json\n"
        "  mllmc plan models/small-qwen2.5-vl --pass fastv --visual-rows 576 --text-tokens 67\n",
    )
    sp.add_argument("config", help="a config.json, or a model directory holding one")
    sp.add_argument(
        "--pass", dest="passes", action="append", default=[], help="as for compile; repeatable"
    )
    sp.add_argument(
        "--visual-rows",
        type=int,
        help="Qwen2-VL / Qwen2.5-VL: the image's merged rows (its size's), instead of the "
        "reference image's",
    )
    sp.add_argument(
        "--text-tokens",
        type=int,
        help="the prompt's text tokens (default 64, the reference prompt's)",
    )
    sp.add_argument("--json", action="store_true")


def _add_golden_parser(sub: Any) -> None:
    sp = _subparser(
        sub,
        "golden",
        "record or check golden outputs of an artifact",
        cmd_golden,
        '  mllmc golden record out/tiny --image cat.png --prompt "Describe the image." '
        "-o golden.json\n"
        "  mllmc golden check out/tiny golden.json\n",
    )
    gsub = sp.add_subparsers(dest="golden_cmd", required=True, parser_class=OneLineParser)
    g = gsub.add_parser("record", help="record a golden file")
    g.add_argument("artifact")
    g.add_argument("--image", required=True, action="append", help="the image (one)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_int_in(1, cap=MAX_NEW_TOKENS), default=16)
    g.add_argument("-o", "--output", required=True)
    g.add_argument("--force", action="store_true", help="replace an existing golden file")
    g = gsub.add_parser(
        "check", help="check an artifact against a golden file (exit 1 on mismatch)"
    )
    g.add_argument("artifact")
    g.add_argument("golden")
    g.add_argument("--tol", type=_number(positive=True), default=1e-3)


def _add_bench_parser(sub: Any) -> None:
    sp = _subparser(
        sub,
        "bench",
        "benchmark an artifact side by side with Hugging Face eager (compiles it first)",
        cmd_bench,
        "  mllmc bench models/small-llava --pass shortv --target onnx\n"
        "  mllmc bench MODEL --pass shortv:ratio=0.5 --threads 2 --repeats 5 -o bench.json\n"
        "  mllmc bench MODEL --pass fastv --artifacts-dir out/bench-artifacts\n"
        "  mllmc bench MODEL --pass shortv --target aoti --device cuda --dtype bfloat16\n",
    )
    sp.add_argument("model")
    sp.add_argument("--pass", dest="passes", action="append", metavar="NAME[:K=V,...]")
    sp.add_argument("--recipe")
    sp.add_argument("--target", default="onnx", help="onnx (default), aoti or trt")
    sp.add_argument(
        "--device", default="cpu", help="as for compile; HF eager runs there too (aoti: cuda)"
    )
    sp.add_argument("--dtype", default=None, help="as for compile; HF eager runs in it too")
    sp.add_argument("--text-tokens", type=_int_in(1), default=32)
    sp.add_argument("--decode-tokens", type=_int_in(1, cap=MAX_NEW_TOKENS), default=32)
    sp.add_argument(
        "--repeats",
        type=_repeats,
        default=3,
        help="timed rounds, each running every engine in turn; shared between two loads of the "
        "engines in alternating order, each after a warm-up round (default 3)",
    )
    sp.add_argument(
        "--threads",
        type=_int_in(1),
        default=None,
        help="CPU threads of every engine alike, torch and onnxruntime (default: all)",
    )
    sp.add_argument(
        "-o",
        "--output",
        metavar="FILE.json",
        help="optional: also write the report here, and its chart beside it (.png); "
        "default: print only",
    )
    sp.add_argument(
        "--artifacts-dir",
        metavar="DIR",
        help="keep the compiled artifacts in DIR (default: a temporary directory, removed "
        "afterwards)",
    )
    sp.add_argument(
        "--force",
        action="store_true",
        help="replace an existing report and chart, and artifacts mllmc wrote in --artifacts-dir",
    )


def _add_model_settings(sp: Any) -> None:
    """The served model's settings, shared by serve and export-triton."""
    from mllmc.compiler.tools.serve import MAX_DRAIN_S
    from mllmc.runtime.batching import MAX_SCHEDULER_BATCH

    sp.add_argument(
        "--max-batch",
        type=_int_in(1, MAX_SCHEDULER_BATCH),
        default=16,
        metavar="N",
        help="the most requests one decode step batches, and Triton's max_batch_size (16)",
    )
    sp.add_argument(
        "--instances",
        type=_int_in(1, 64),
        default=1,
        metavar="N",
        help="model instances, each its own engine, scheduler and process (1: one scheduler "
        "batches every request)",
    )
    sp.add_argument(
        "--max-new-tokens-limit",
        type=_int_in(1, cap=MAX_NEW_TOKENS),
        default=1024,
        metavar="N",
        help="the largest max_new_tokens a request may ask for (1024)",
    )
    sp.add_argument(
        "--request-timeout",
        type=_number(positive=True),
        default=600.0,
        metavar="S",
        help="stop a generation that runs longer than S seconds (600)",
    )
    sp.add_argument(
        "--drain-timeout",
        type=_int_in(1, MAX_DRAIN_S),
        default=MAX_DRAIN_S,
        metavar="S",
        help=f"on SIGTERM, wait up to S seconds for requests in flight ({MAX_DRAIN_S})",
    )
    sp.add_argument(
        "--threads",
        type=_int_in(1, os.cpu_count() or 1),
        default=None,
        help="onnxruntime threads per instance (default: $MLLMC_THREADS, else all cores)",
    )


def _add_serve_parser(sub: Any) -> None:
    sp = _subparser(
        sub,
        "serve",
        "serve an artifact as the Triton Inference Server model 'mllmc' (PyTriton's "
        "tritonserver; pip install 'mllmc[serve]')",
        cmd_serve,
        "  mllmc serve out/tiny-shortv --port 8000\n"
        "  mllmc serve out/tiny --port 8000 --grpc-port 8001 --metrics-port 8002 --max-batch 8\n"
        "  mllmc serve out/tiny --host 0.0.0.0 --port 8000  # reachable from other machines\n"
        "  curl -s localhost:8000/v2/health/ready && curl -s localhost:8002/metrics\n",
    )
    sp.add_argument("artifact")
    sp.add_argument("--port", type=_int_in(1, 65535), required=True, help="HTTP port")
    sp.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)"
    )
    sp.add_argument("--grpc-port", type=_int_in(1, 65535), help="gRPC port (default: a free one)")
    sp.add_argument(
        "--metrics-port", type=_int_in(1, 65535), help="Prometheus port (default: a free one)"
    )
    _add_model_settings(sp)


def _add_export_triton_parser(sub: Any) -> None:
    sp = _subparser(
        sub,
        "export-triton",
        "write a Triton model repository (config.pbtxt + Python-backend model.py + the "
        "artifact) for the stock Triton container",
        cmd_export_triton,
        "  mllmc export-triton out/tiny-shortv -o triton-repo\n"
        "  mllmc export-triton out/tiny -o triton-repo --max-batch 32 --instances 2 --force\n"
        "  tritonserver --model-repository triton-repo  # in the container (docs/serving.md)\n",
    )
    sp.add_argument("artifact")
    sp.add_argument("-o", "--output", required=True, help="model repository directory to write")
    sp.add_argument(
        "--no-copy",
        action="store_true",
        help="name the artifact by its absolute path instead of copying it into the repository",
    )
    sp.add_argument(
        "--force", action="store_true", help="replace a repository export-triton wrote before"
    )
    _add_model_settings(sp)


def build_parser() -> argparse.ArgumentParser:
    """The `mllmc` parser: `mllmc --help` lists every subcommand and examples of all of them;
    each subcommand's `--help` ends with its own examples."""
    from mllmc.runtime import __version__

    p = OneLineParser(
        prog="mllmc",
        description="Compile multimodal LLMs (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL) into fast "
        "engines with "
        "visual-token freezing, pruning and early exit as graph rewrites.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"mllmc {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser, metavar="COMMAND")
    _add_preset_parser(sub)
    _add_compile_parser(sub)
    _add_calibrate_parser(sub, MAX_ITEMS)
    _add_eval_parser(sub, MAX_ITEMS)
    _add_run_parser(sub)
    _add_verify_parser(sub)
    _add_inspect_parser(sub)
    _add_plan_parser(sub)
    _add_golden_parser(sub)
    _add_bench_parser(sub)
    _add_serve_parser(sub)
    _add_export_triton_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "mllmc: %(message)s",
    )
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for name in ("transformers", "torch", "onnxscript", "onnx_ir", "torchao"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        _disable_hf_progress_bars()
    try:
        with StopSignals():
            return args.fn(args)
    except UserError as e:
        sys.stderr.write(f"mllmc: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("mllmc: interrupted\n")
        return 130
    except Terminated as e:
        sys.stderr.write(f"mllmc: stopped by {signal.Signals(e.signum).name}\n")
        return 128 + e.signum


def _disable_hf_progress_bars() -> None:
    """No Hugging Face progress bars ("Loading weights", downloads) under -q or where stderr is
    not a terminal: an error then stays the one line on stderr. Set through the environment
    so that transformers is not imported for it; called directly where it already is."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class Terminated(BaseException):
    """SIGTERM / SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that every `finally` and
    staged directory cleans up before the process exits."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
REDELIVERY_DELAY_S = 0.01


class StopSignals:
    """For the duration of a `with` block, SIGTERM and SIGHUP raise `Terminated`, and no stop
    is lost.

    Python runs a signal handler between two bytecodes of the main thread, wherever it is. If
    that is inside a `__del__` or a weakref callback (importlib's module locks have one), the
    exception it raises is printed as "Exception ignored in ..." and dropped, and the work would
    go on as if the signal never came. The `sys.unraisablehook` installed here sees such a
    dropped `Terminated` or `KeyboardInterrupt` and sends its signal to the main thread again a
    moment later, from a timer thread (sent from the hook, the handler would run inside the
    hook, whose exceptions are dropped too; a real signal also wakes a blocking call). The
    handler then raises it in the code that follows, where it unwinds through every `finally`.
    A dropped stop is not sent again while another stop is already unwinding (its clean-up goes
    on), nor while the main thread is still inside the hook (on a loaded machine it can be, when
    the timer fires: the stop would be dropped there for good), and one still waiting when the
    block ends is raised there."""

    def __init__(self) -> None:
        self.redelivered = 0  # dropped stops sent again
        self._lock = threading.Lock()
        self._active = False
        self._raised = 0  # Terminated raised by the handler and not dropped
        self._pending: int | None = None  # a dropped stop's signal, not yet sent again
        self._timers: list[threading.Timer] = []
        self._in_hook = False  # the main thread is in `_hook`: a stop raised there is lost
        self._previous_hook = sys.unraisablehook
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self._previous_hook = sys.unraisablehook
        self._previous = {s: signal.signal(s, self._terminate) for s in STOP_SIGNALS}
        sys.unraisablehook = self._hook
        self._active = True
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            with self._lock:
                self._active = False
                for timer in self._timers:
                    timer.cancel()
                pending, self._pending = self._pending, None
        finally:
            sys.unraisablehook = self._previous_hook
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        if exc_type is None and pending is not None:
            raise KeyboardInterrupt if pending == signal.SIGINT else Terminated(pending)

    def _terminate(self, signum: int, _frame: Any) -> None:
        self._raised += 1
        raise Terminated(signum)

    def _hook(self, unraisable: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            self._dropped(unraisable)  # signal handlers run on the main thread only
            return
        self._in_hook = True
        try:
            self._dropped(unraisable)
        finally:
            self._in_hook = False

    def _dropped(self, unraisable: Any) -> None:
        exc = unraisable.exc_value
        if not isinstance(exc, Terminated | KeyboardInterrupt):
            self._previous_hook(unraisable)
            return
        if isinstance(exc, Terminated):
            self._raised -= 1  # this one unwinds nothing
        if self._raised > 0:
            return  # another stop is unwinding: let its clean-up finish
        with self._lock:
            if not self._active:
                return
            self._pending = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
            timer = self._timer()
        timer.start()

    def _timer(self, delay: float | None = None) -> threading.Timer:
        """A timer that sends the pending stop in a moment (the caller holds the lock)."""
        timer = threading.Timer(REDELIVERY_DELAY_S if delay is None else delay, self._send_pending)
        timer.daemon = True
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        return timer

    def _send_pending(self) -> None:
        with self._lock:
            if not self._active or self._pending is None:
                return
            if self._in_hook:  # the main thread has not left the hook yet: a moment more
                timer = self._timer(max(REDELIVERY_DELAY_S, 0.001))
                timer.start()
                return
            signum, self._pending = self._pending, None
            self.redelivered += 1
            signal.pthread_kill(threading.main_thread().ident, signum)


if __name__ == "__main__":
    sys.exit(main())
