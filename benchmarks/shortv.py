"""ShortV benchmark: small-llava, 576 visual tokens, ratio 0.6, in one process:
prefill time of HF eager, the unrewritten ONNX engine and the ShortV ONNX engine; measured
speedup vs the FLOPs-ideal speedup.

    python benchmarks/shortv.py [--model models/small-llava] [--samples 2]

The frozen layers come from an LC calibration (`mllmc calibrate`, --samples images of the
built-in set); which layers are frozen does not change the speed, only how many. Writes
results/shortv.json, results/shortv.png and results/shortv-lc.json/png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mllmc.compiler.data.presets import write_preset
from mllmc.compiler.tools import bench
from mllmc.compiler.tools.calibrate import calibrate_cli
from mllmc.compiler.tools.cli import OneLineParser


def main() -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/small-llava")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--samples", type=int, default=2, help="calibration samples for the LC order")
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        write_preset("small-llava", model_dir)
    lc_path = out / "shortv-lc.json"
    if not lc_path.is_file():
        calibrate_cli(str(model_dir), str(lc_path), images=None, prompts=None, n=args.samples)
    from mllmc.passes import parse_pass_spec

    passes = [parse_pass_spec(f"shortv:ratio={args.ratio},lc={lc_path}")]
    report = bench.bench(
        str(model_dir),
        passes,
        "onnx",
        out / "artifacts",
        args.text_tokens,
        args.decode_tokens,
        args.repeats,
        force=True,
    )
    report["lc_file"] = str(lc_path)
    (out / "shortv.json").write_text(json.dumps(report, indent=2))
    bench.plot(report, out / "shortv.png")
    print(bench.format_table(report))
    print(f"wrote {out / 'shortv.json'} and {out / 'shortv.png'}")
    sys.exit(0)


if __name__ == "__main__":
    main()
