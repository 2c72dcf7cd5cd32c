"""`mllmc inspect`: what an artifact holds, read from its manifest alone."""

from __future__ import annotations

import json
from pathlib import Path

from mllmc.runtime.manifest import read_manifest


def _gflop(x: float) -> str:
    return f"{x / 1e9:.3f}"


def describe(artifact: str | Path, as_json: bool = False) -> str:
    m = read_manifest(artifact)
    if as_json:
        return json.dumps(
            {k: m[k] for k in ("model", "passes", "segments", "visual_tokens", "layers", "flops")},
            indent=2,
        )
    model, flops = m["model"], m["flops"]
    lines = [
        f"artifact   {artifact}  (format {m['format_version']}, mllmc {m['mllmc_version']}, "
        f"target {m.get('target', 'onnx')})",
        f"model      {model['model_type']}/{model['text_model_type']}  {model['source']}  "
        f"(config {model['config_hash']})",
        f"decoder    {model['num_layers']} layers, hidden {model['hidden_size']}, heads "
        f"{model['num_heads']}/{model['num_kv_heads']} kv, visual tokens {m['visual_tokens']['per_image']}",
        "passes     "
        + (", ".join(f"{p['name']}({_cfg(p['config'])})" for p in m["passes"]) or "none"),
    ]
    for p in m["passes"]:
        if p["name"] == "shortv":
            lines.append(
                f"           shortv frozen layers {p['stats']['frozen_layers']} "
                f"(order from {p['config'].get('order_from') or 'explicit'})"
            )
    lines.append("segments")
    for name, seg in m["segments"].items():
        ins = ", ".join(f"{i['name']}{i['shape']}" for i in seg["inputs"][:3])
        more = f" +{len(seg['inputs']) - 3} more" if len(seg["inputs"]) > 3 else ""
        lines.append(f"  {name:8s} {seg['file']:14s} in: {ins}{more}")
    lines.append("layers     index  visual tokens  visual rows computed")
    for layer in m["layers"]:
        computed = "no (frozen)" if layer.get("frozen_visual") else "yes"
        lines.append(f"           {layer['index']:5d}  {layer['visual_tokens']:13d}  {computed}")
    b, a = flops["before"], flops["after"]
    lines.append(
        f"FLOPs      at {a['reference_prompt_tokens']} prompt tokens "
        f"({a['reference_text_tokens']} text + {m['visual_tokens']['per_image']} visual), GFLOP:"
    )
    for seg in ("vision", "prefill", "decode_step"):
        cut = 1 - a[seg] / b[seg] if b[seg] else 0.0
        lines.append(
            f"  {seg:11s} before {_gflop(b[seg]):>10s}  after {_gflop(a[seg]):>10s}  ({cut:.1%} cut)"
        )
    val = m.get("validation")
    if val:
        lines.append(
            f"validation max |Δlogit| {val['max_abs_logit_diff']:.2e} over {val['steps']} steps, "
            f"tokens {'identical' if val['tokens_match'] else 'differ'}"
        )
    return "\n".join(lines)


def _cfg(cfg: dict) -> str:
    return ", ".join(
        f"{k}={v}" for k, v in cfg.items() if v not in (None, "") and k != "order_from"
    )
