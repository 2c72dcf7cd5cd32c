"""Accuracy vs prefill speed on trained-tiny-llava: what each pass costs in answers.

    nice -n 5 .venv/bin/python benchmarks/accuracy.py [-n 300] [--repeats 15]

One set of shapes-qa held-out items; every row answers the same items greedily:
- HF eager on the preset directory (`mllmc eval MODEL_DIR`);
- the artifact compiled without passes (the runtime Engine, `mllmc eval ARTIFACT`);
- ShortV at ratios 0.2 ... 0.8 with the LC order calibrated on shapes-qa *train* items, and the
  same number of frozen layers drawn at random (`--random-draws` draws; the paper's ablation);
- every other pass in mllmc.passes.REGISTRY that has a sweep in OTHER_SWEEPS.

Speed: the LLM prefill (what an in-LLM pass changes) of each artifact on one fixed item, median
over `--repeats` rounds in which every engine runs once in turn (so the machine's load falls on
all of them alike); HF eager is timed the same way on its whole forward (image encoder included,
as is `time to first logits` for the artifacts, reported beside it). The FLOPs cut is the
analytic one from each artifact's manifest at the reference prompt length.

Writes benchmarks/results/accuracy.json and accuracy.png, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mllmc.compiler.data import shapes_qa
from mllmc.compiler.data.presets import write_preset
from mllmc.compiler.pipeline import compile_model
from mllmc.compiler.tools.cli import OneLineParser
from mllmc.compiler.tools.evaluate import artifact_runner, calibration_samples, evaluate, hf_runner
from mllmc.passes import REGISTRY
from mllmc.runtime import load

RESULTS = Path(__file__).parent / "results"
SHORTV_RATIOS = (0.2, 0.3, 0.5, 0.6, 0.8)  # 1, 2, 3, 4, 5 of the 6 decoder layers
RANDOM_RATIOS = (0.5, 0.6)  # where random layer orders are drawn too (a compile each)
# Other passes at a small sweep each (pass specs as `mllmc compile --pass` takes them).
OTHER_SWEEPS: dict[str, list[str]] = {
    "fastv": ["fastv:k=2,ratio=0.5", "fastv:k=2,ratio=0.75"],
    "fastervlm": ["fastervlm:ratio=0.75"],
    "vtc_cls": ["vtc_cls:ratio=0.75"],
    "vte": ["vte:k=3"],
}


Variant = tuple[str, str, float | None, list[str]]  # (label, family, ShortV ratio, pass specs)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = args.work
    model_dir = write_preset("trained-tiny-llava", work / "model", force=True)
    items = list(shapes_qa.items("heldout", args.n))

    hf = evaluate(model_dir, task="shapes-qa", n=args.n, threads=args.threads, progress=True)
    print(hf.line(), flush=True)
    lc, lc_path, num_layers = calibrate_lc(model_dir, work, args.calibration_items)
    variants, skipped = build_variants(args, lc_path, num_layers)
    rows, engines = compile_and_evaluate(variants, model_dir, work, args, skipped)
    hf_ms = time_engines(engines, rows, model_dir, items[0], args.repeats)

    report = {
        "model": "trained-tiny-llava",
        "items": f"shapes-qa heldout, first {args.n}",
        "majority_baseline": shapes_qa.majority_baseline(items),
        "threads": args.threads or torch.get_num_threads(),
        "hf_eager": {
            "accuracy": hf.accuracy,
            "per_kind": hf.per_kind,
            "forward_ms": hf_ms,
        },
        "lc": {"order": lc["order"], "lc_visual": lc["lc_visual"], "samples": lc["samples"]},
        "rows": rows,
        "shortv_lc_vs_random": lc_vs_random(rows, args.ratios),
        "skipped": skipped,
        "repeats": args.repeats,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    plot(report, args.output.with_suffix(".png"))
    print(table(report))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')} ({report['seconds']} s)")


def parse_args() -> argparse.Namespace:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=300, help="held-out items")
    ap.add_argument("--calibration-items", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--random-draws", type=int, default=2)
    ap.add_argument("--ratios", type=float, nargs="+", default=SHORTV_RATIOS)
    ap.add_argument("--random-ratios", type=float, nargs="+", default=RANDOM_RATIOS)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime / torch threads")
    ap.add_argument(
        "--other-passes", nargs="*", default=None, help="passes besides shortv (default: all)"
    )
    ap.add_argument("--work", type=Path, default=Path("out/accuracy"))
    ap.add_argument("-o", "--output", type=Path, default=RESULTS / "accuracy.json")
    return ap.parse_args()


def calibrate_lc(model_dir: Path, work: Path, n_items: int) -> tuple[dict, Path, int]:
    """ShortV's layer contribution on `n_items` shapes-qa *train* items, written to
    WORK/lc-shapes-qa.json: (the LC result, its file, the decoder's layer count)."""
    from mllmc.compiler.core.capture import load_model
    from mllmc.passes.calibration import layer_contribution

    model, info = load_model(model_dir)
    samples = calibration_samples("shapes-qa", None, n_items)
    lc = layer_contribution(model, info, samples, progress=True)
    lc_path = work / "lc-shapes-qa.json"
    lc_path.write_text(json.dumps(lc, indent=2))
    print(f"LC order (freeze first): {lc['order']}  ({lc['samples']} train items)", flush=True)
    return lc, lc_path, info.num_layers


def build_variants(
    args: argparse.Namespace, lc_path: Path, num_layers: int
) -> tuple[list[Variant], dict[str, str]]:
    """Every artifact to compile (the unrewritten one first, then ShortV with the LC order and
    random orders, then the other passes' sweeps), and the passes skipped with the reason."""
    variants: list[Variant] = [("artifact", "none", None, [])]
    rng = random.Random(0)
    for r in args.ratios:
        k = round(r * num_layers)
        variants.append(
            (f"shortv-lc r={r}", "shortv (LC order)", r, [f"shortv:ratio={r},lc={lc_path}"])
        )
        for d in range(args.random_draws if r in args.random_ratios else 0):
            layers = sorted(rng.sample(range(num_layers), k))
            variants.append(
                (
                    f"shortv-random r={r} #{d}",
                    "shortv (random order)",
                    r,
                    [f"shortv:layers={layers}"],
                )
            )
    skipped = {}
    for name in sorted(REGISTRY):
        if name == "shortv":
            continue
        if args.other_passes is not None and name not in args.other_passes:
            continue
        if name not in OTHER_SWEEPS:
            skipped[name] = "no sweep defined in benchmarks/accuracy.py"
            continue
        for spec in OTHER_SWEEPS[name]:
            variants.append((spec, name, None, [spec]))
    return variants, skipped


def compile_and_evaluate(
    variants: list[Variant],
    model_dir: Path,
    work: Path,
    args: argparse.Namespace,
    skipped: dict[str, str],
) -> tuple[list[dict], dict[str, Any]]:
    """Compile each variant under WORK and answer the held-out items with it: (one row per
    variant compiled, its loaded engine by label). A variant that fails to compile is added to
    `skipped`."""
    rows: list[dict] = []
    engines = {}
    for label, family, ratio, passes in variants:
        out = work / label.replace(" ", "_").replace("=", "").replace("#", "")
        try:
            res = compile_model(model_dir, out, passes, validate=False, force=True, progress=False)
        except Exception as e:  # a pass that cannot apply to this model is reported, not fatal
            skipped[label] = f"{type(e).__name__}: {e}"
            print(f"skip {label}: {skipped[label]}", flush=True)
            continue
        m = res.manifest
        engine = load(res.out_dir, threads=args.threads)
        runner = artifact_runner(res.out_dir, 4, args.threads)
        rep = evaluate(res.out_dir, task="shapes-qa", n=args.n, runner=runner)
        frozen = [layer.index for layer in m.layers if not layer.visual_computed]
        cut = 1 - m.flops["after"]["prefill"] / m.flops["before"]["prefill"]
        rows.append(
            {
                "name": label,
                "family": family,
                "ratio": ratio,
                "passes": passes,
                "frozen_layers": frozen,
                "accuracy": rep.accuracy,
                "per_kind": rep.per_kind,
                "flops_cut": cut,
            }
        )
        engines[label] = engine
        print(
            f"{label:28s} acc {rep.accuracy:.3f}  {rep.per_kind}  FLOPs cut {cut:.1%}", flush=True
        )
    return rows, engines


def time_engines(
    engines: dict[str, Any], rows: list[dict], model_dir: Path, probe: Any, repeats: int
) -> float:
    """Interleaved rounds on `probe` (round 0 warms up): each row gets its median LLM prefill
    and first-logits times and its prefill speedup over the unrewritten artifact. Returns HF
    eager's median whole-forward time (ms)."""
    feeds = {}
    for label, e in engines.items():
        features, counts = e.encode_images(probe.image)
        feeds[label] = (e.encode_prompt(probe.question, counts), features)
    hf_run = hf_runner(model_dir, 1)
    times: dict[str, list[float]] = {label: [] for label in engines}
    ttft: dict[str, list[float]] = {label: [] for label in engines}
    hf_times: list[float] = []
    for rnd in range(repeats + 1):
        for label, e in engines.items():
            layout, _ = feeds[label]
            t0 = time.perf_counter()
            f, _ = e.encode_images(probe.image)
            t1 = time.perf_counter()
            e.prefill(layout, f)
            t2 = time.perf_counter()
            if rnd:  # round 0 warms up
                times[label].append(t2 - t1)
                ttft[label].append(t2 - t0)
        p = hf_run(probe.image, probe.question)
        if rnd:
            hf_times.append(p.prefill_s)
    base = statistics.median(times["artifact"])
    for row in rows:
        t = statistics.median(times[row["name"]])
        row["llm_prefill_ms"] = t * 1e3
        row["first_logits_ms"] = statistics.median(ttft[row["name"]]) * 1e3
        row["llm_prefill_speedup"] = base / t
    return statistics.median(hf_times) * 1e3


def lc_vs_random(rows: list[dict], ratios: list[float]) -> list[dict]:
    """Per ShortV ratio: the LC-order row beside the mean of the random-order draws."""
    summary = []
    for r in ratios:
        lc_row = next(x for x in rows if x["family"] == "shortv (LC order)" and x["ratio"] == r)
        rand = [x for x in rows if x["family"] == "shortv (random order)" and x["ratio"] == r]
        summary.append(
            {
                "ratio": r,
                "frozen": len(lc_row["frozen_layers"]),
                "lc_layers": lc_row["frozen_layers"],
                "lc_accuracy": lc_row["accuracy"],
                "random_accuracy_mean": statistics.mean(x["accuracy"] for x in rand)
                if rand
                else None,
                "random_layers": [x["frozen_layers"] for x in rand],
                "random_accuracies": [x["accuracy"] for x in rand],
                "flops_cut": lc_row["flops_cut"],
                "llm_prefill_speedup": lc_row["llm_prefill_speedup"],
            }
        )
    return summary


def table(report: dict) -> str:
    hf = report["hf_eager"]
    lines = [
        "| model / pass | frozen layers | accuracy | colour | count | left/right | largest "
        "| FLOPs cut | LLM prefill ms | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| majority answer | | {report['majority_baseline']['all']:.1%} | "
        + " | ".join(f"{report['majority_baseline'][k]:.1%}" for k in shapes_qa.KINDS)
        + " | | | |",
        f"| HF eager | | {hf['accuracy']:.1%} | "
        + " | ".join(f"{hf['per_kind'].get(k, 0):.1%}" for k in shapes_qa.KINDS)
        + f" | | {hf['forward_ms']:.2f} (whole forward) | |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['frozen_layers'] or ''} | {r['accuracy']:.1%} | "
            + " | ".join(f"{r['per_kind'].get(k, 0):.1%}" for k in shapes_qa.KINDS)
            + f" | {r['flops_cut']:.1%} | {r['llm_prefill_ms']:.2f} | {r['llm_prefill_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    families: dict[str, list[dict]] = {}
    for r in report["rows"]:
        families.setdefault(r["family"], []).append(r)
    for ax, key, xlabel in (
        (
            axes[0],
            "llm_prefill_speedup",
            "measured LLM prefill speedup vs the unrewritten artifact",
        ),
        (axes[1], "flops_ideal", "FLOPs-ideal prefill speedup (1 / (1 - FLOPs cut))"),
    ):
        for fam, rs in families.items():
            if fam == "shortv (random order)":
                by_ratio: dict[float, list[dict]] = {}
                for r in rs:
                    by_ratio.setdefault(r["ratio"], []).append(r)
                pts = sorted(
                    (
                        statistics.mean(_x(r, key) for r in v),
                        statistics.mean(r["accuracy"] for r in v),
                    )
                    for v in by_ratio.values()
                )
                label = f"{fam}, mean of {len(next(iter(by_ratio.values())))} draws"
            else:
                pts = sorted((_x(r, key), r["accuracy"]) for r in rs)
                label = fam
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ax.axhline(report["hf_eager"]["accuracy"], color="gray", ls="--", lw=1, label="HF eager")
        ax.axhline(
            report["majority_baseline"]["all"], color="red", ls=":", lw=1, label="majority answer"
        )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("shapes-qa held-out accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"trained-tiny-llava, {report['items']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _x(row: dict, key: str) -> float:
    if key == "flops_ideal":
        return 1 / (1 - row["flops_cut"])
    return row[key]


if __name__ == "__main__":
    main()
