"""Load order: identical engines loaded one after another in one process, decode timed side by
side.

    nice python benchmarks/session_order.py ARTIFACT [--copies 3] [--rounds 12] [--tokens 32]
        [--threads N] [--image-size 448] [--out benchmarks/results]

Loads the ONNX artifact ARTIFACT `--copies` times (`mllmc.runtime.load`: every copy has its own
onnxruntime sessions and prepacked weights, the same files), prefills the same prompt on each
(a probe image `--image-size` px high and ~64 tokens of filler text), and then times `--tokens`
greedy decode steps on every copy in each of `--rounds` rounds, the copies' order rotating from
round to round (round r starts with copy r mod copies) after a 0.1 s pause each, as
`mllmc bench` times engines. The first round is a warm-up. Reported per copy (by load order):
the median ms per token, and the median (min-max) of its per-round ratio to the last copy
loaded (> 1: slower). The copies compute the same thing; any difference is where the process
put them. `bench.side_by_side` loads the engines it compares `bench.LOADS` times in alternating
order for that reason. Writes OUT/session_order.json and OUT/session_order.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llava_next as lnx  # noqa: E402  (its decode timer: engine_decode)

from mllmc.compiler.tools.cli import OneLineParser  # noqa: E402


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every copy's decode, per round, and its ratio to the last copy loaded."""
    from mllmc.compiler.tools import bench
    from mllmc.compiler.verify import probe_image
    from mllmc.runtime import load

    image, prompt = probe_image(size=args.image_size), bench.prompt_for(64)
    engines, timers = [], []
    for _ in range(args.copies):
        engines.append(load(args.artifact, threads=args.threads))
        timers.append(lnx.engine_decode(engines[-1], image, prompt, args.tokens))
    times: list[list[float]] = [[] for _ in timers]
    for r in range(args.rounds + 1):
        for k in [(r + i) % args.copies for i in range(args.copies)]:
            time.sleep(0.1)
            times[k].append(timers[k]())
    del engines, timers
    gc.collect()
    last = times[-1][1:]
    rows = []
    for k, t in enumerate(times):
        t = t[1:]  # the warm-up round
        ratios = [a / b for a, b in zip(t, last, strict=True)]
        rows.append(
            {
                "load_order": k,
                "ms_per_token": statistics.median(t) * 1e3,
                "rounds_ms": [x * 1e3 for x in t],
                "vs_last_loaded": bench.spread(ratios),
            }
        )
    return {
        "artifact": str(args.artifact),
        "copies": args.copies,
        "rounds": args.rounds,
        "tokens": args.tokens,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Each copy's per-round ms per token, by load order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in report["rows"]:
        ax.plot(row["rounds_ms"], "o-", label=f"copy loaded {row['load_order'] + 1}.")
    ax.set(xlabel="round", ylabel="decode ms / token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.suptitle(f"identical engines by load order, {Path(report['artifact']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from mllmc.compiler.tools import bench
    from mllmc.runtime.errors import UserError

    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="an ONNX artifact dir (mllmc compile)")
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=448, help="the probe image's height")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    limits = (("copies", 2, 8), ("rounds", 1, 1000), ("tokens", 1, 4096), ("image_size", 16, 4096))
    for name, low, high in limits:
        value = getattr(args, name)
        if not low <= value <= high:
            flag = name.replace("_", "-")
            print(f"error: --{flag} must be {low} to {high}, got {value}", file=sys.stderr)
            return 2
    if not (args.artifact / "manifest.json").is_file():
        print(f"error: {args.artifact} is not an artifact dir (no manifest.json)", file=sys.stderr)
        return 2
    try:
        args.threads = bench.check_threads(args.threads)
        report = measure(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "session_order.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "session_order.png")
    for row in report["rows"]:
        print(
            f"copy loaded {row['load_order'] + 1}.: {row['ms_per_token']:6.2f} ms/token, "
            f"{bench.format_spread(row['vs_last_loaded'])} the last loaded's time"
        )
    print(f"wrote {args.out / 'session_order.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
