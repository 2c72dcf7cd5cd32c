"""`mllmc inspect`: what an artifact holds, read from its manifest alone.

Generic over the layer plan: every pass records what it did in the per-layer `LayerPlan`
(visual rows in the layer's input and KV cache, whether the layer computes them), so nothing here
knows one pass from another. An artifact `load()` would refuse (a corrupt manifest, engine files
the directory lacks, a target this mllmc has no runner for, a processor config the vision tower
cannot take) is refused here too, with the same one-line UserError (exit 2); only the engine
files themselves are not opened.
"""

from __future__ import annotations

import json
from pathlib import Path

from mllmc.runtime.manifest import MANIFEST_NAME, Manifest, check_files, read_manifest
from mllmc.runtime.preprocess import check_image_size, read_image_processor_config
from mllmc.runtime.runners import check_target


def _gflop(x: float) -> str:
    return f"{x / 1e9:.3f}"


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_cache_bytes(m: Manifest, n_text: int, visual: int | None = None) -> dict[str, int]:
    """KV-cache bytes at the end of a prompt of `n_text` text tokens (+ the image span), and per
    generated token, from the plan (layer l caches n_text + kv_visual_tokens rows; with `visual`,
    the visual rows entering the LLM, n_text + its `kv_visual_rows(visual)`) and the engines'
    dtype (`target_settings.dtype`)."""
    info = m.model
    bytes_per_value = DTYPE_BYTES[m.target_settings.dtype]
    row = 2 * info.num_kv_heads * info.head_dim * bytes_per_value  # key + value, one row, one layer
    cached = [
        layer.kv_visual_tokens if visual is None else layer.kv_visual_rows(visual)
        for layer in m.layers
    ]
    prompt = sum((n_text + rows) * row for rows in cached)
    return {"prompt": prompt, "per_token": row * len(m.layers)}


def engine_bytes(root: str | Path, m: Manifest) -> int:
    """Bytes of the engine files the manifest names (each file once: the segments of an ONNX
    artifact share one weights file)."""
    files = {f for seg in m.segments.values() for f in seg.files()}
    return sum((Path(root) / f).stat().st_size for f in files)


def check_artifact(artifact: str | Path) -> Manifest:
    """The artifact's manifest, after the checks `load()` makes short of opening its engines."""
    root = Path(artifact)
    m = read_manifest(root)
    check_files(root, m)
    check_target(root, m.target)
    m.check_dims(str(root / MANIFEST_NAME))
    check_image_size(read_image_processor_config(root), m.model.image_size, root)
    return m


def describe(artifact: str | Path, as_json: bool = False) -> str:
    m = check_artifact(artifact)
    n_text = m.flops["after"]["reference_text_tokens"]
    kv = kv_cache_bytes(m, n_text)
    if as_json:
        data = m.to_json()
        data["kv_cache_bytes"] = {"reference_text_tokens": n_text, **kv}
        data["engine_bytes"] = engine_bytes(artifact, m)
        return json.dumps(data, indent=2)
    model, flops, ts = m.model, m.flops, m.target_settings
    max_seq = f", max_seq_len {ts.max_seq_len}" if ts.max_seq_len is not None else ""
    per, reference = "", ""
    if model.mrope_section:  # Qwen-VL: no tiles; an image's rows follow its size
        per = f"for the reference image ({model.image_size} px square) "
    elif model.reference_visual_rows:
        per = "per tile "
        reference = (
            f"; the reference image ({model.reference_tiles} tiles) takes "
            f"{model.reference_visual_rows} rows"
        )
    lines = [
        f"artifact   {artifact}  (format {m.format_version}, mllmc {m.mllmc_version}, "
        f"target {ts.target}, device {ts.device}, dtype {ts.dtype}, decode cache "
        f"{ts.decode_cache}{max_seq})",
        f"model      {model.model_type}/{model.text_model_type}  {model.model_dir}  "
        f"(config {model.config_hash})",
        f"decoder    {model.num_layers} layers, hidden {model.hidden_size}, heads "
        f"{model.num_heads}/{model.num_kv_heads} kv, visual tokens {model.visual_tokens} "
        f"{per}from the vision tower, {m.visual_tokens} enter the LLM{reference}",
        "passes     " + (", ".join(f"{p.name}({_cfg(p.config)})" for p in m.passes) or "none"),
    ]
    for p in m.passes:
        stats = ", ".join(f"{k}={v}" for k, v in p.stats.items() if k != "order_from")
        origin = (
            f" (layer order from {p.config['order_from']})" if p.config.get("order_from") else ""
        )
        lines.append(f"           {p.name}: {stats}{origin}")
    lines.append(
        f"weights    {m.precision.describe() if m.precision.weights else ts.dtype}; engine files "
        f"{engine_bytes(artifact, m) / 2**20:.2f} MiB"
    )
    lines.append("segments")
    width = max(len(name) for name in m.segments)
    file_width = max(len(seg.file) for seg in m.segments.values())
    for name, seg in m.segments.items():
        ins = ", ".join(f"{i.name}{list(i.shape)}" for i in seg.inputs[:3])
        more = f" +{len(seg.inputs) - 3} more" if len(seg.inputs) > 3 else ""
        lines.append(f"  {name:{width}s} {seg.file:{file_width}s} in: {ins}{more}")
        if seg.packed_file:
            lines.append(
                f"  {'':{width}s} {seg.packed_file} (the same step, its projections packed: what load() runs)"
            )
    lines.append("layers     index  visual tokens  KV visual rows  visual rows computed")
    for layer in m.layers:
        computed = "yes" if layer.visual_computed else "no (frozen)"
        if layer.visual_tokens == 0:
            computed = "- (none left)"
        lines.append(
            f"           {layer.index:5d}  {layer.visual_tokens:13d}  {layer.kv_visual_tokens:14d}"
            f"  {computed}"
        )
    lines.append(
        f"KV cache   {kv['prompt'] / 2**20:.2f} MiB at the end of a {n_text}-text-token prompt, "
        f"{kv['per_token'] / 2**10:.1f} KiB per generated token "
        f"({ts.dtype})"
    )
    b, a = flops["before"], flops["after"]
    lines.append(
        f"FLOPs      for one image + {n_text} text tokens (prompt into the LLM: "
        f"{b['reference_prompt_tokens']} tokens before the passes, "
        f"{a['reference_prompt_tokens']} after), GFLOP:"
    )
    for seg in ("vision", "prefill", "decode_step"):
        lines.append(
            f"  {seg:11s} before {_gflop(b[seg]):>10s}  after {_gflop(a[seg]):>10s}  "
            f"({percent_cut(b[seg], a[seg])})"
        )
    val = m.validation
    if val:
        lines.append(
            f"validation max |Δlogit| {val['max_abs_logit_diff']:.2e} over {val['steps']} steps, "
            f"tokens {'identical' if val['tokens_match'] else 'differ'}"
        )
    return "\n".join(lines)


def percent_cut(before: float, after: float) -> str:
    """`after` against `before` to 0.1%: "38.2% cut", "0.0% cut" (never "-0.0%"), or "1.5%
    more" where the passes added work."""
    pct = round(100 * (1 - after / before), 1) if before else 0.0
    if pct < 0:
        return f"{-pct:.1f}% more"
    return f"{pct + 0.0:.1f}% cut"  # + 0.0: a rounded -0.0 prints as 0.0


def _cfg(cfg: dict) -> str:
    return ", ".join(
        f"{k}={v}" for k, v in cfg.items() if v not in (None, "") and k != "order_from"
    )
