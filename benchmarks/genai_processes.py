"""mllmc's decoder against onnxruntime-genai's, each engine alone in a process of its own.

    nice python benchmarks/genai_processes.py --artifact DIR --genai NAME=DIR [--genai NAME=DIR]
        [--prompt-tokens 643] [--decode-tokens 32] [--processes 16] [--runs 3] [--threads N]
        [--out benchmarks/results/qwen-genai-processes]

ARTIFACT is an unrewritten fp32 mllmc ONNX artifact (no pass, no --precision); each --genai is
onnxruntime-genai's fp32 build of the same decoder and lm_head. benchmarks/qwen.py writes both
for small-qwen2.5-vl (`--artifacts-dir DIR` keeps them, as MODEL-mllmc_onnx and
MODEL-genai_fp32); benchmarks/precision.py does the same for a LLaVA decoder. The prompt is the
text-only one of benchmarks/qwen.py (`genai_runner.text_layout`, the same ids for every engine).
Results in OUT are replaced.

In one process, two onnxruntime sessions of the same program need not run equally fast (see
`bench.LOADS` and benchmarks/session_order.py: whichever was created first decoded 3-9% slower
on a 2-core VM), a bias as large as the gap being measured. Here no engine shares its process:
each of `--processes` rounds starts one process per engine, in turn (the order reversed every
other round, as `bench.interleaved_rounds` does), and the process loads its engine, runs one
prefill and one decode untimed, then times `--runs` prefills and `--runs` decodes of
`--decode-tokens` greedy steps; a round's value is the median of its runs. Before the rounds,
one untimed process checks that the engines agree on the prompt (greedy tokens and prefill
logits within PARITY_TOL, `genai_runner.greedy_parity`), and the benchmark stops (one line,
exit 2) if they do not: the builds would not be of the same decoder.

Reported: each engine's median prefill ms and decode ms/token over the rounds, and mllmc's
speedup over each genai build (median of the per-round ratios, min-max, and a 95% confidence
interval of that median from the order statistics: the interval a sign test gives, no
assumption on how the ratios are distributed; with 8 rounds or fewer it is their whole range),
and the ratio of the two engines' median times. The goal, mllmc no slower, is met when both
the median ratio and the ratio of the medians are >= 1.0 for prefill and decode. The machine's load while each process ran is
recorded, and the rounds are flagged as `mllmc bench` flags them (`bench.trust_verdict`).
Writes OUT/genai_processes.json and OUT/genai_processes.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from genai_runner import (  # noqa: E402
    engine_text_entry,
    genai_entry,
    genai_model,
    greedy_parity,
    text_layout,
)

from mllmc.compiler.tools import bench  # noqa: E402
from mllmc.compiler.tools.cli import OneLineParser  # noqa: E402
from mllmc.runtime.errors import UserError  # noqa: E402
from mllmc.runtime.manifest import read_manifest  # noqa: E402

MLLMC = "mllmc_onnx"
PARITY_STEPS = 8
PARITY_TOL = 1e-4  # the largest |prefill logit difference| of two builds of one fp32 decoder
KEYS = ("llm_prefill_s", "decode_s_per_token")


# -- a child process: one engine, timed ------------------------------------------------------


def child_parity(args: argparse.Namespace) -> dict[str, Any]:
    """The prompt's ids (written to the --ids file for the timed processes) and the greedy
    parity of every genai build with the mllmc engine."""
    from mllmc.runtime import load

    engine = load(args.artifact, threads=args.threads)
    ids = text_layout(engine, args.prompt_tokens).input_ids[0]
    np.save(args.ids, ids)
    return {
        name: greedy_parity(
            engine, genai_model(path, args.threads), args.prompt_tokens, PARITY_STEPS
        )
        for name, path in args.genai
    }


def child_time(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Load one engine in this process and time it: its runs' prefill and decode seconds."""
    if name == MLLMC:
        entry = engine_text_entry(
            args.artifact, args.prompt_tokens, args.decode_tokens, args.threads
        )()
    else:
        ids = np.load(args.ids)
        entry = genai_entry(dict(args.genai)[name], ids, args.decode_tokens, args.threads)
    entry.timers["decode"]()  # warm-up (the prefill ran at load)
    out: dict[str, list[float]] = {"llm_prefill": [], "decode": []}
    for _ in range(args.runs):
        for metric, timer in entry.timers.items():
            time.sleep(0.1)  # as bench.interleaved_rounds: spinning pool threads settle
            out[metric].append(timer())
    return {"times": out, "prompt_tokens": entry.prompt_tokens, "rss_mb": entry.rss_mb}


# -- the parent: rounds of processes ---------------------------------------------------------


def spawn(args: argparse.Namespace, role: str) -> tuple[dict[str, Any], dict[str, float]]:
    """Run this script as a child in `role`; its JSON answer and the CPUs busy while it ran
    (its own and the other processes')."""
    cmd = [sys.executable, __file__, "--child", role, *args.forward]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0, _, busy0 = bench.cpu_clock()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    t1, _, busy1 = bench.cpu_clock()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"the {role} process failed (exit code {proc.returncode}): {last}")
    own = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    wall = max(t1 - t0, 1e-9)
    return json.loads(proc.stdout.strip().splitlines()[-1]), {
        "cpus_used": own / wall,
        "others_cpus": max(busy1 - busy0 - own, 0.0) / wall,
    }


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the order statistics (k, n-k+1)
    with P(Binomial(n, 1/2) < k) <= (1 - level) / 2 (the sign test's). With too few values for
    the level, the whole range."""
    xs, n = sorted(values), len(values)
    tail, k, below = (1 - level) / 2, 0, 0.0
    while k < n:
        below += math.comb(n, k) / 2**n  # P(X <= k)
        if below > tail:
            break
        k += 1
    if k == 0:
        return xs[0], xs[-1]
    return xs[k - 1], xs[n - k]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    names = [MLLMC, *(name for name, _ in args.genai)]
    print("checking that the engines agree on the prompt", flush=True)
    parity, _ = spawn(args, "parity")
    for name, p in parity.items():
        if not p["same_tokens"] or p["prefill_max_abs_logit_diff"] > PARITY_TOL:
            raise UserError(
                f"{name} and {args.artifact} are not the same decoder: greedy tokens "
                f"{p['genai_tokens']} against {p['mllmc_tokens']}, prefill logits up to "
                f"{p['prefill_max_abs_logit_diff']:.1e} apart (allowed {PARITY_TOL:.0e})"
            )
    samples: dict[str, dict[str, list[float]]] = {n: {k: [] for k in KEYS} for n in names}
    runs: dict[str, list[dict[str, list[float]]]] = {n: [] for n in names}  # each process's
    load: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    info: dict[str, dict[str, float]] = {}
    for r in range(args.processes):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            answer, cpus = spawn(args, name)
            times = answer["times"]
            runs[name].append(times)
            samples[name]["llm_prefill_s"].append(statistics.median(times["llm_prefill"]))
            samples[name]["decode_s_per_token"].append(statistics.median(times["decode"]))
            load[name].append(cpus)
            info.setdefault(
                name, {"prompt_tokens": answer["prompt_tokens"], "rss_mb": answer["rss_mb"]}
            )
        print(
            f"round {r + 1}/{args.processes}: decode ms/token "
            + ", ".join(f"{n} {samples[n]['decode_s_per_token'][-1] * 1e3:.2f}" for n in names),
            flush=True,
        )
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        others = max(c["others_cpus"] for c in load[name])
        rows[name] = {
            **info[name],
            **{key: statistics.median(v) for key, v in samples[name].items()},
            "rounds": samples[name],
            "process_runs": runs[name],
            "spread": {key: bench.spread(v) for key, v in samples[name].items()},
            "cpus_used": statistics.fmean(c["cpus_used"] for c in load[name]),
            "trust": bench.trust_verdict(
                samples[name], others, args.threads, rounds_option="--processes"
            ),
        }
    for name in names[1:]:
        for key, part in (("llm_prefill_s", "prefill"), ("decode_s_per_token", "decode")):
            ratios = [g / m for g, m in zip(samples[name][key], samples[MLLMC][key], strict=True)]
            lo, hi = median_interval(ratios)
            rows[name][f"mllmc_speedup_{part}"] = {
                **bench.spread(ratios),
                "ci95": [lo, hi],
                # unpaired: the engine's median time over mllmc's
                "of_medians": rows[name][key] / rows[MLLMC][key],
            }
    return {"parity": parity, "rows": rows}


def goal(rows: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """mllmc's decoder no slower than genai's `name` build: met when, for prefill and decode,
    both the median of the per-round speedups (paired) and the ratio of the two engines' median
    times (unpaired) are >= 1.0; the confidence intervals say how sure the first is."""
    parts = {p: rows[name][f"mllmc_speedup_{p}"] for p in ("prefill", "decode")}
    return {
        "goal": f"mllmc's decoder prefill and decode no slower than onnxruntime-genai's ({name})",
        "met": all(min(s["median"], s["of_medians"]) >= 1 for s in parts.values()),
        "detail": ", ".join(
            f"{p} {s['median']:.3f}x (95% CI of the median {s['ci95'][0]:.3f}-{s['ci95'][1]:.3f}; "
            f"of the median times {s['of_medians']:.3f}x)"
            for p, s in parts.items()
        ),
    }


def summary(report: dict[str, Any]) -> str:
    lines = [
        f"decoder alone, {report['prompt_tokens']}-token text prompt, each engine in its own "
        f"process: {report['processes']} round(s), {report['runs']} run(s) a process, "
        f"{report['threads']} threads",
        f"{'engine':28s} {'prefill ms':>10s} {'mllmc faster':>21s} {'decode ms/tok':>13s} "
        f"{'mllmc faster':>21s}",
    ]
    for name, row in report["rows"].items():
        cells = [
            bench.format_spread(row[f"mllmc_speedup_{p}"]) if f"mllmc_speedup_{p}" in row else ""
            for p in ("prefill", "decode")
        ]
        lines.append(
            f"{name:28s} {row['llm_prefill_s'] * 1e3:10.1f} {cells[0]:>21s} "
            f"{row['decode_s_per_token'] * 1e3:13.2f} {cells[1]:>21s}"
        )
    for name, p in report["parity"].items():
        lines.append(
            f"parity vs {name}: {p['steps']} greedy tokens "
            f"{'identical' if p['same_tokens'] else 'DIFFER'}, prefill max |dlogit| "
            f"{p['prefill_max_abs_logit_diff']:.1e}"
        )
    for g in report["goals"]:
        lines.append(f"goal {'MET' if g['met'] else 'NOT MET'}: {g['goal']}: {g['detail']}")
    for name, row in report["rows"].items():
        for reason in row["trust"]["reasons"]:
            lines.append(f"untrusted {name}: {reason}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Per-round decode ms/token of every engine (left) and mllmc's per-round speedups (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mllmc.compiler.files.outputs import write_figure

    rows = report["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for name, row in rows.items():
        ms = [v * 1e3 for v in row["rounds"]["decode_s_per_token"]]
        axes[0].plot(range(1, len(ms) + 1), ms, marker="o", label=name)
    axes[0].set_xlabel("round (one process per engine)")
    axes[0].set_ylabel("decode ms/token (median of the process's runs)")
    axes[0].legend(fontsize=8)
    labels, values = [], []
    for name, row in rows.items():
        for part in ("prefill", "decode"):
            s = row.get(f"mllmc_speedup_{part}")
            if s:
                labels.append(f"{part}\nvs {name}")
                values.append(s)
    x = np.arange(len(values))
    med = [s["median"] for s in values]
    err = [
        [m - s["ci95"][0] for m, s in zip(med, values, strict=True)],
        [s["ci95"][1] - m for m, s in zip(med, values, strict=True)],
    ]
    axes[1].bar(x, med, yerr=err, capsize=5, color="tab:blue")
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[1].set_xticks(x, labels, fontsize=8)
    axes[1].set_ylabel("mllmc speedup (median, 95% CI)")
    lo = min(s["ci95"][0] for s in values)
    axes[1].set_ylim(min(0.8, lo - 0.02), None)
    fig.suptitle(
        f"{report['prompt_tokens']}-token text prompt, {report['processes']} rounds of "
        f"processes, {report['threads']} threads, {report['device']}"
    )
    write_figure(fig, path, force=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, required=True, help="unrewritten mllmc ONNX artifact")
    ap.add_argument(
        "--genai",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="an onnxruntime-genai build of the same decoder (repeatable)",
    )
    ap.add_argument("--prompt-tokens", type=int, default=643, help="text prompt rows (default 643)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="greedy steps a decode")
    ap.add_argument("--processes", type=int, default=16, help="rounds: one process per engine each")
    ap.add_argument("--runs", type=int, default=3, help="timed prefills and decodes a process")
    ap.add_argument("--threads", type=int, help="every engine's threads (default: every CPU)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/qwen-genai-processes"))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # a child process: its role
    ap.add_argument("--ids", type=Path, help=argparse.SUPPRESS)  # a child's prompt ids (.npy)
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """UserError (one line) on an option that cannot apply; --genai becomes (name, path) pairs."""
    for option in ("processes", "runs"):
        value = getattr(args, option)
        if not 1 <= value <= bench.MAX_REPEATS:
            raise UserError(f"--{option} must be from 1 to {bench.MAX_REPEATS}, got {value}")
    for option in ("prompt_tokens", "decode_tokens"):
        if getattr(args, option) < 1:
            flag = "--" + option.replace("_", "-")
            raise UserError(f"{flag} must be >= 1, got {getattr(args, option)}")
    args.threads = bench.check_threads(args.threads)
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise UserError("onnxruntime-genai is not installed (pip install 'mllmc[bench]')")
    manifest = read_manifest(args.artifact)  # one line if it is not an artifact
    weights = manifest.precision.weights
    if manifest.target != "onnx" or manifest.passes or weights or manifest.dtype != "float32":
        what = [f"target {manifest.target}"] if manifest.target != "onnx" else []
        what += [f"passes {', '.join(p.name for p in manifest.passes)}"] if manifest.passes else []
        what += [f"{weights} weights"] if weights else []
        what += [f"dtype {manifest.dtype}"] if manifest.dtype != "float32" else []
        raise UserError(
            f"--artifact {args.artifact}: the decoder genai builds is the unrewritten fp32 one: "
            f"give an ONNX artifact compiled with no pass and no --precision (this one has "
            f"{'; '.join(what)})"
        )
    pairs = []
    for item in args.genai:
        name, sep, path = item.partition("=")
        if not sep or not name or name == MLLMC or not Path(path, "genai_config.json").is_file():
            raise UserError(
                f"--genai {item}: expected NAME=DIR, DIR an onnxruntime-genai build "
                f"(with genai_config.json), NAME not {MLLMC}"
            )
        pairs.append((name, Path(path)))
    if len({name for name, _ in pairs}) < len(pairs):
        raise UserError("--genai: every build needs a name of its own")
    args.genai = pairs
    roles = ("parity", MLLMC, *(name for name, _ in pairs))
    if args.child is not None and args.child not in roles:
        raise UserError(f"--child {args.child}: expected one of {', '.join(roles)}")


def main(argv: list[str] | None = None) -> int:
    from mllmc.compiler.files import outputs

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # what a child process is given: these options, without --child ROLE
    args.forward = [a for i, a in enumerate(argv) if "--child" not in (a, argv[i - 1] if i else "")]
    try:
        check_args(args)
        if args.child:
            answer = child_parity(args) if args.child == "parity" else child_time(args, args.child)
            print(json.dumps(answer))
            return 0
        out = outputs.check_output_folder(args.out, "benchmark results")
        with tempfile.TemporaryDirectory(prefix="mllmc-genai-processes-") as scratch:
            args.forward += ["--ids", str(Path(scratch) / "prompt_ids.npy")]
            measured = measure(args)
    except UserError as e:
        print(f"genai_processes.py: error: {e}", file=sys.stderr)
        return 2
    import onnxruntime
    import onnxruntime_genai

    report = {
        "artifact": str(args.artifact),
        "genai": {name: str(path) for name, path in args.genai},
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "processes": args.processes,
        "runs": args.runs,
        "threads": args.threads,
        "device": f"cpu ({platform.machine()}, {bench.available_cpus()} cores)",
        "versions": {
            "onnxruntime": onnxruntime.__version__,
            "onnxruntime-genai": onnxruntime_genai.__version__,
            "python": platform.python_version(),
        },
        "command": "python benchmarks/genai_processes.py " + shlex.join(argv),
        **measured,
    }
    report["goals"] = [goal(report["rows"], name) for name, _ in args.genai]
    outputs.write_file(out / "genai_processes.json", json.dumps(report, indent=1), force=True)
    plot(report, out / "genai_processes.png")
    print(summary(report))
    print(f"wrote {out / 'genai_processes.json'} and {out / 'genai_processes.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
