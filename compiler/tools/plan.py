"""`mllmc plan`: a pass pipeline's layer plan and prefill FLOPs from a config.json alone.

    mllmc plan llava-next-13b/config.json --pass shortv
    mllmc plan models/small-llava-next --pass fastv --pass shortv:layers=[0,3] --json

No weights are read, so a 13B model's plan is known before its 26 GB are downloaded: the counts
come from the same rules the passes apply (a published ShortV layer list when the model matches
one, FastV's round(V·(1-R)) kept rows, VTE's exit, the pre-LLM passes' keep per tile) and the
FLOPs from the decoder's formula (`flops.analytic_prefill_flops`: matmuls and attention at the
reference prompt, one image at the family's reference size plus 64 text tokens). A compiled
artifact's FLOPs are counted on its graphs instead (`mllmc inspect`); the suite checks that the
two agree (tests/compiler/tools/test_plan.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mllmc.runtime.errors import UserError
from mllmc.runtime.manifest import LayerPlan, keep_count

REFERENCE_TEXT_TOKENS = 64
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")  # whose image rows follow the image's size


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the plan and the FLOPs formula need of a model, from its config.json."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    image_size: int
    visual_tokens: int  # per tile
    reference_visual_rows: int  # of the reference image entering the LLM
    reference_tiles: int  # the vision tiles of that image


def read_shape(path: str | Path) -> tuple[Shape, dict[str, Any]]:
    """The shape of the model whose config.json is `path` (or lies in directory `path`), and
    the config itself."""
    from mllmc.compiler.core.families import family
    from mllmc.compiler.core.model_dir import check_qwen_config, check_sizes, visual_token_count
    from mllmc.runtime.jsonfile import JSONError, read_json

    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"{path}: no config.json there")
    try:
        cfg = read_json(p)
    except JSONError as e:
        raise UserError(f"corrupt {p}: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"corrupt {p}: not a JSON object")
    fam = family(str(cfg.get("model_type")))
    if fam.mrope:
        check_qwen_config(cfg, p)
    else:
        check_sizes(cfg, p)
    fam.check_config(cfg, p)
    import transformers

    config = getattr(transformers, fam.hf_class.replace("ForConditionalGeneration", "Config"))(
        **{k: v for k, v in cfg.items() if k != "model_type"}
    )
    tc, vc = config.text_config, config.vision_config
    if fam.mrope:
        return _qwen_shape(fam.model_type, config, p.parent), cfg
    per_tile = visual_token_count(
        vc.image_size, vc.patch_size, config.vision_feature_select_strategy
    )
    reference, tiles = fam.reference(config)
    shape = Shape(
        model_type=fam.model_type,
        num_layers=tc.num_hidden_layers,
        hidden_size=tc.hidden_size,
        num_heads=tc.num_attention_heads,
        num_kv_heads=tc.num_key_value_heads or tc.num_attention_heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
        intermediate_size=tc.intermediate_size,
        vocab_size=tc.vocab_size,
        image_size=vc.image_size,
        visual_tokens=per_tile or 0,
        reference_visual_rows=reference or per_tile or 0,
        reference_tiles=tiles,
    )
    return shape, cfg


def _qwen_shape(model_type: str, config: Any, model_dir: Path) -> Shape:
    """A Qwen2-VL / Qwen2.5-VL model's shape: one image at the reference size (its rows from
    its size and the processor's pixel bounds in `model_dir`, when its config is there)."""
    from mllmc.compiler.core.qwen_vl import reference_grid

    tc, vc = config.text_config, config.vision_config
    t, h, w = reference_grid(config, model_dir)
    rows = t * h * w // vc.spatial_merge_size**2
    return Shape(
        model_type=model_type,
        num_layers=tc.num_hidden_layers,
        hidden_size=tc.hidden_size,
        num_heads=tc.num_attention_heads,
        num_kv_heads=tc.num_key_value_heads or tc.num_attention_heads,
        head_dim=tc.hidden_size // tc.num_attention_heads,
        intermediate_size=tc.intermediate_size,
        vocab_size=tc.vocab_size,
        image_size=h * vc.patch_size,
        visual_tokens=rows,
        reference_visual_rows=rows,
        reference_tiles=1,
    )


def _apply(plan: list[LayerPlan], shape: Shape, name: str, cfg: Any) -> tuple[list, list, str]:
    """The plan after pass `name` with config `cfg`, the layers it scores, and a note."""
    entering = plan[0].visual_tokens
    if name == "shortv":
        layers, note = _shortv_layers(shape, cfg)
        frozen = set(layers)
        new = [
            dataclasses.replace(p, visual_computed=False) if p.index in frozen else p for p in plan
        ]
        return new, [], f"{note}: layers {sorted(frozen)} frozen"
    if name in ("fastv", "vte"):
        k = cfg.k
        if k is None:
            raise UserError("plan: vte needs k= (an exit file's layer is chosen on the weights)")
        rule = "0" if name == "vte" else _fastv_rule(cfg.ratio)
        kept = keep_count(entering, rule)
        new = [
            dataclasses.replace(p, visual_tokens=kept, kv_visual_tokens=kept, kv_visual_keep=rule)
            if p.index >= k
            else p
            for p in plan
        ]
        return new, ([k - 1] if name == "fastv" else []), f"layers >= {k} hold {kept} visual rows"
    if name == "vispruner":  # the reference image keeps `kept` of its merged tokens
        kept = cfg.kept(shape.visual_tokens)
        new = [dataclasses.replace(p, visual_tokens=kept, kv_visual_tokens=kept) for p in plan]
        return new, [], f"the image keeps {kept} of its {shape.visual_tokens} merged tokens"
    # fastervlm, vtc_cls: each tile keeps `kept` of its rows
    from mllmc.passes.cls_attention import resolve_keep

    kept = resolve_keep(name, cfg.keep, cfg.ratio, shape.visual_tokens)
    # the reference image's rows: each tile's kept patches, and the rows that are not a tile's
    # patches (LLaVA-NeXT's newlines) as they were
    tiles = shape.reference_tiles
    rows = kept * tiles + shape.reference_visual_rows - shape.visual_tokens * tiles
    new = [dataclasses.replace(p, visual_tokens=rows, kv_visual_tokens=rows) for p in plan]
    return new, [], f"each tile keeps {kept} of {shape.visual_tokens} rows ({rows} in all)"


def _fastv_rule(ratio: float) -> str:
    from mllmc.passes.fastv import keep_rule

    return keep_rule(ratio)


def _shortv_layers(shape: Shape, cfg: Any) -> tuple[tuple[int, ...], str]:
    from mllmc.passes.shortv import DEFAULT_RATIO, frozen_count, published_order

    if cfg.layers is not None:
        return cfg.layers, "explicit layers"
    if cfg.lc is not None:
        raise UserError("plan: an LC file orders the layers of a loaded model; give layers=")
    ratio = DEFAULT_RATIO if cfg.ratio is None else cfg.ratio
    match = published_order(shape.model_type, shape)
    if match is None:
        raise UserError(
            "plan: shortv without layers= needs a published layer list (the model matches none) "
            "or a calibration run on the weights: give layers=[...]"
        )
    name, order = match
    k = frozen_count(ratio, shape.num_layers)
    if k > len(order):
        raise UserError(f"plan: ratio {ratio} freezes {k} layers; the {name} list has {len(order)}")
    return tuple(sorted(order[:k])), f"published list for {name}, ratio {ratio}"


def plan(
    path: str | Path,
    specs: list[str],
    visual_rows: int | None = None,
    text_tokens: int | None = None,
) -> dict[str, Any]:
    """The layer plan and prefill FLOPs (before / after) of `specs` on the model at `path`, for
    a prompt of `text_tokens` text rows (None: the reference prompt's) and one image.
    `visual_rows`: that image's rows (the merged tokens of a Qwen2-VL image of another size
    than the reference; a model whose image makes a fixed number of rows takes None), else the
    reference image's. The result's "reference_prompt" is the prompt the counts are for."""
    from mllmc.compiler.core.flops import analytic_prefill_flops
    from mllmc.compiler.core.model_dir import model_shape
    from mllmc.compiler.pipeline import check_order, resolve_passes

    passes = resolve_passes(specs)
    check_order(passes)
    for name, value in (("visual_rows", visual_rows), ("text_tokens", text_tokens)):
        if value is not None and (type(value) is not int or value < 1):
            raise UserError(
                f"plan: {name.replace('_', ' ')} must be an integer >= 1, got {value!r}"
            )
    shape, config = read_shape(path)
    if visual_rows is not None and visual_rows != shape.reference_visual_rows:
        if shape.model_type not in QWEN_TYPES:
            raise UserError(
                f"plan: a {shape.model_type} image always makes {shape.reference_visual_rows} "
                "rows (only a Qwen2-VL image's rows follow its size)"
            )
        shape = dataclasses.replace(
            shape, visual_tokens=visual_rows, reference_visual_rows=visual_rows
        )
    for info, cfg in passes:  # the option checks compile runs against config.json
        if info.check is not None:
            info.check(cfg, model_shape(config))
    ref = shape.reference_visual_rows
    layers = [LayerPlan(i, ref, ref) for i in range(shape.num_layers)]
    base = list(layers)
    scored: list[int] = []
    notes: list[str] = []
    for info, cfg in passes:
        layers, score, note = _apply(layers, shape, info.name, cfg)
        scored += score
        notes.append(f"{info.name}: {note}")
    n_text = REFERENCE_TEXT_TOKENS if text_tokens is None else text_tokens
    before = analytic_prefill_flops(shape, n_text, plan=base)
    after = analytic_prefill_flops(shape, n_text, plan=layers, scored_layers=scored)
    return {
        "model_type": shape.model_type,
        "reference_prompt": {"visual_rows": ref, "text_tokens": n_text},
        "passes": notes,
        "layers": [dataclasses.asdict(p) for p in layers],
        "prefill_flops": {"before": before, "after": after, "cut": 1 - after / before},
    }


def describe(result: dict[str, Any]) -> str:
    """The plan as lines of text."""
    ref = result["reference_prompt"]
    flops = result["prefill_flops"]
    lines = [
        f"model      {result['model_type']}; prompt: one image of "
        f"{ref['visual_rows']} visual rows + {ref['text_tokens']} text tokens",
        *(f"pass       {note}" for note in result["passes"] or ["none"]),
        "layers     index  visual rows  visual rows computed",
    ]
    for p in result["layers"]:
        computed = "yes" if p["visual_computed"] else "no (frozen)"
        lines.append(f"           {p['index']:5d}  {p['visual_tokens']:11d}  {computed}")
    lines.append(
        f"prefill    {flops['before'] / 1e9:.3f} -> {flops['after'] / 1e9:.3f} GFLOP "
        f"({100 * flops['cut']:.1f}% cut)"
    )
    return "\n".join(lines)


def plan_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)
