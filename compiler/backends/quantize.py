"""Weight-only int4 / int8 ONNX engines: onnxruntime's block quantizer on the exported graphs, and
the eager reference whose weights went through the same quantize -> dequantize round trip.

    cfg = quantize_config("int4", block_size=32, accuracy_level=4, keep=["lm_head"])
    quantize_segment(Path("out/prefill.onnx"), seg, cfg)   # after the export, after the passes
    with quantized_weights(model, cfg.record()):           # the eager oracle of that engine
        ...

Which weights: each MatMul / Gemm / Gather of a segment whose constant weight is one of the
segment's parameters, found by the parameter's bytes (the exporter folds a Linear's weight into a
transposed initializer and names it `val_<n>`), and assigned to a part by the parameter's module
path: `decoder` (the decoder layers' Linears), `lm_head`, `embedding` (the token embedding's
Gather), `projector`, `vision` (the tower's Linears). A Gemm (the exporter's form of a Linear on a
2-D input, e.g. lm_head on the last row) becomes a MatMul first. Then
`onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer` (symmetric, `block_size`,
`accuracy_level`) turns the chosen MatMuls into `MatMulNBits` and, for int4, the embedding's
Gather into `GatherBlockQuantized`; its quantizer writes GatherBlockQuantized for 4 bits only, so
an int8 artifact keeps the embedding in float32. The quantized tensors of prefill and decode are
byte-identical, so `onnx.share_weights` stores them once.

The round trip, exactly as onnxruntime computes it (MLAS `MlasQuantizeBlockwise`, symmetric), for
a MatMul weight W (N, K) in blocks of `block_size` along K (zero-padded at the end):
    a  = the block's value of largest magnitude, with its sign (max if |max| > |min|, else min)
    s  = fl32(a / -2^(bits-1))                             one scale per block, float32
    q  = clamp(roundf(fl32(fl32(w * fl32(1 / s)) + 2^(bits-1))), 0, 2^bits - 1)   (0 if s == 0)
    w' = (q - 2^(bits-1)) * s                              what MatMulNBits multiplies by
and for the int4 embedding E (V, d), in blocks along d (the quantizer's numpy code):
    s  = fl32(a / -8);  q = clip(round_half_even(w / s), -8, 7);  w' = q * s
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mllmc.runtime.errors import UserError
from mllmc.runtime.manifest import (
    FLOAT32_TOL,
    QUANTIZED_PARTS,
    QUANTIZED_WEIGHTS,
    SCHEMES,
    Precision,
)

log = logging.getLogger(__name__)

BITS = {"int4": 4, "int8": 8}
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two >= 16
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_BLOCK_SIZE = 32
# int8's default: onnxruntime's int8 MatMulNBits gains with the block on the CPU (one 626 x 2048
# x 5632 GEMM: 22.1 ms at block 32, 17.1 ms at 128, float32 29.8 ms), at no accuracy cost on
# shapes-qa (benchmarks/precision.py); int4 keeps genai's 32
DEFAULT_BLOCK_SIZES = {"int4": DEFAULT_BLOCK_SIZE, "int8": 128}
DEFAULT_ACCURACY_LEVEL = 4  # int8 activations on the CPU (onnxruntime-genai's CPU default)
# genai 0.18's CPU int4 quantizes decoder and lm_head and keeps the embedding float32; the
# embedding is a vocabulary x hidden table read a row per token: int4 shrinks the files
DEFAULT_PARTS = ("decoder", "lm_head", "embedding")
KEEPABLE = ("lm_head", "embedding")  # what --quantize-keep may hold in float
OPTIONAL_PARTS = ("vision", "projector")  # quantized only when --quantize-parts names them
assert tuple(BITS) == QUANTIZED_WEIGHTS and set(DEFAULT_PARTS + OPTIONAL_PARTS) == set(
    QUANTIZED_PARTS
)


@dataclass(frozen=True)
class QuantizeConfig:
    """How an ONNX artifact's weights are quantized (`quantize_config` checks the values)."""

    weights: str  # "int4" or "int8"
    block_size: int = DEFAULT_BLOCK_SIZE
    accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL  # None: torchao (bfloat16 activations)
    parts: tuple[str, ...] = DEFAULT_PARTS
    scheme: str = SCHEMES["onnx"]  # "matmulnbits" (onnx) or "torchao" (aoti)

    @property
    def bits(self) -> int:
        return BITS[self.weights]

    def record(self) -> Precision:
        """The manifest's record of this quantization."""
        return Precision(
            self.weights, self.block_size, self.accuracy_level, self.parts, self.scheme
        )


def _names(value: str | Sequence[str] | None, option: str, valid: Sequence[str]) -> list[str]:
    """A comma-separated string or a list of names, each one of `valid` (UserError otherwise)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in items if str(n).strip()]
    for n in names:
        if n not in valid:
            raise UserError(f"{option}: unknown part {n!r}; valid: {', '.join(valid)}")
    return names


def quantize_config(
    weights: str | None,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    keep: str | Sequence[str] | None = None,
    parts: str | Sequence[str] | None = None,
    target: str = "onnx",
) -> QuantizeConfig | None:
    """The checked quantization options (None: float engines), UserError naming what is valid.

    `keep`: parts of the defaults to leave in float (lm_head, embedding); `parts`: the optional
    parts to quantize as well (vision, projector). int8 has no embedding gather (onnxruntime's
    quantizer writes GatherBlockQuantized for 4 bits only), so its embedding stays float.
    `target` "aoti": torchao's int4 weight-only for the Linears, the embedding in the int4 scheme
    of GatherBlockQuantized (`torchao_int4`), and no accuracy level (its kernel takes bfloat16
    activations)."""
    if weights is None:
        given = [
            opt
            for opt, v in (
                ("--block-size", block_size),
                ("--accuracy-level", accuracy_level),
                ("--quantize-keep", keep),
                ("--quantize-parts", parts),
            )
            if v is not None
        ]
        if given:
            raise UserError(f"{given[0]} sets how --quantize quantizes: give --quantize int4|int8")
        return None
    if weights not in BITS:
        raise UserError(f"--quantize: unknown precision {weights!r}; valid: {', '.join(BITS)}")
    if target == "aoti":
        from .torchao_int4 import torchao_config

        return torchao_config(weights, block_size, accuracy_level, keep, parts)
    block_size = one_of(block_size, DEFAULT_BLOCK_SIZES[weights], BLOCK_SIZES, "--block-size")
    level = one_of(
        accuracy_level, DEFAULT_ACCURACY_LEVEL, ACCURACY_LEVELS, "--accuracy-level",
        "(4: int8 activations)",
    )  # fmt: skip
    chosen = chosen_parts(keep, parts)
    if weights == "int8" and "embedding" in chosen:
        chosen.remove("embedding")
    return QuantizeConfig(weights, block_size, level, tuple(chosen))


def one_of(value: Any, default: int, valid: Sequence[int], option: str, note: str = "") -> int:
    """`value` (`default` where None) if it is one of `valid`, else UserError naming them."""
    value = default if value is None else value
    if isinstance(value, bool) or value not in valid:
        note = f" {note}" if note else ""
        raise UserError(
            f"{option} must be one of {', '.join(map(str, valid))}{note}, got {value!r}"
        )
    return int(value)


def chosen_parts(keep: str | Sequence[str] | None, parts: str | Sequence[str] | None) -> list[str]:
    """The parts quantized: the defaults but `keep`, and the optional `parts`."""
    kept = _names(keep, "--quantize-keep", KEEPABLE)
    extra = _names(parts, "--quantize-parts", OPTIONAL_PARTS)
    chosen = [p for p in (*DEFAULT_PARTS, *OPTIONAL_PARTS) if p not in kept]
    return [p for p in chosen if p in DEFAULT_PARTS or p in extra]


def part_of(path: str) -> str | None:
    """The part (QUANTIZED_PARTS) a module path belongs to, for the HF model
    ('model.language_model.layers.0.mlp.up_proj') and for a segment's parameters
    ('layers.0.mlp.up_proj', 'lm_head', 'embed_tokens', 'multi_modal_projector.linear_1')."""
    names = path.split(".")
    if "vision_tower" in names:
        return "vision"
    if "multi_modal_projector" in names:
        return "projector"
    if "lm_head" in names:
        return "lm_head"
    if "embed_tokens" in names:
        return "embedding"
    if "layers" in names:
        return "decoder"
    return None


# -- the round trip (eager reference) ----------------------------------------------------------


def roundtrip_matmul_weight(w: Any, bits: int, block_size: int) -> Any:
    """A Linear's weight (N, K) after MatMulNBits' symmetric quantize -> dequantize, blocks of
    `block_size` along K: bit-exact to onnxruntime's kernel (see the module docstring). Torch
    tensor in, float32 tensor of the same shape out."""
    import torch

    n, k = w.shape
    blocks = -(-k // block_size)
    mid = float(1 << (bits - 1))
    x = torch.zeros(n, blocks * block_size, dtype=torch.float32)
    x[:, :k] = w.detach().to(torch.float32).cpu()
    x = x.reshape(n, blocks, block_size)
    hi, lo = x.amax(-1), x.amin(-1)
    a = torch.where(hi.abs() > lo.abs(), hi, lo)  # a tie takes the min, as MLAS does
    scale = a / -mid  # float32 / float32
    recip = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    v = x * recip[..., None] + mid  # two float32 roundings, as the kernel's
    q = torch.floor(v.double() + 0.5).clamp(0, 2 * mid - 1)  # roundf: v >= 0 where it matters
    out = ((q - mid).float() * scale[..., None]).reshape(n, -1)[:, :k]
    return out.to(w.dtype).to(w.device)


def roundtrip_gather_weight(w: Any, block_size: int) -> Any:
    """An embedding table (V, d) after the quantizer's int4 GatherBlockQuantized round trip:
    blocks of `block_size` along d, s = a / -8, q = clip(round_half_even(w / s), -8, 7)."""
    import torch

    v, d = w.shape
    x = w.detach().to(torch.float32).cpu()
    out = torch.empty_like(x)
    for i in range(0, d, block_size):
        blk = x[:, i : i + block_size]
        hi, lo = blk.amax(1, keepdim=True), blk.amin(1, keepdim=True)
        scale = torch.where(hi.abs() > lo.abs(), hi, lo) / -8.0
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.where(scale == 0, torch.zeros_like(blk), torch.round(blk / safe)).clamp(-8, 7)
        out[:, i : i + block_size] = q * scale
    return out.to(w.dtype).to(w.device)


def eager_modules(model: Any, parts: Sequence[str]) -> Iterator[tuple[str, str, Any]]:
    """(module path, part, module) of each Linear (and the token Embedding) of the HF `model`
    whose part is one of `parts`."""
    import torch

    for name, module in model.named_modules():
        part = part_of(name)
        if part not in parts:
            continue
        wanted = torch.nn.Embedding if part == "embedding" else torch.nn.Linear
        if isinstance(module, wanted):
            yield name, part, module


@contextlib.contextmanager
def quantized_weights(model: Any, precision: Precision) -> Iterator[Any]:
    """`model` with the weights of `precision.parts` replaced by their round trip while the
    block runs, restored after; a float `precision` leaves it as it is. Each module gets a
    Parameter of its own for the block, so a weight tied between the embedding and lm_head
    takes each one's rule, as the engine's GatherBlockQuantized and MatMulNBits do. A torchao
    `precision` (aoti) swaps in torchao's int4 tensors instead (`torchao_int4.torchao_weights`):
    its kernel is the engine's, so the eager model quantized that way is the reference."""
    if precision.weights is None:
        yield model
        return
    if precision.method == "torchao":
        from .torchao_int4 import torchao_weights

        with torchao_weights(model, precision):
            yield model
        return
    import torch

    bits = BITS[precision.weights]
    block = int(precision.block_size or DEFAULT_BLOCK_SIZE)
    saved = []
    try:
        with torch.no_grad():
            for _, part, module in eager_modules(model, precision.parts):
                w = module.weight
                if part == "embedding":
                    new = roundtrip_gather_weight(w.data, block)
                else:
                    new = roundtrip_matmul_weight(w.data, bits, block)
                saved.append((module, w))
                module.weight = torch.nn.Parameter(new, requires_grad=w.requires_grad)
        yield model
    finally:
        for module, w in reversed(saved):
            module.weight = w


# -- the ONNX side -----------------------------------------------------------------------------


def _digest(a: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).digest() + str(a.shape).encode()


def parameter_parts(seg: Any) -> dict[bytes, set[str]]:
    """The parts of a segment's 2-D parameters by their bytes, as stored (W (N, K)) and
    transposed (W^T, a MatMul's B): what the ONNX initializer of each weight holds."""
    out: dict[bytes, set[str]] = {}
    for key, t in seg.program.state_dict.items():
        part = part_of(key.rsplit(".", 1)[0])
        if part is None or t.dim() != 2:
            continue
        w = t.detach().float().cpu().numpy()
        for a in (w, w.T):
            out.setdefault(_digest(a), set()).add(part)
    return out


def _gemm_to_matmul(graph: Any, node: Any, weights: dict[str, Any]) -> list[Any]:
    """Gemm(A, B, C?) with alpha 1, transA 0 -> MatMul(A, B^T if transB) [+ Add(C)]; the
    transposed weight is a new initializer. [] when the Gemm is not of that form."""
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return []
    b = onnx.numpy_helper.to_array(weights[node.input[1]])
    if attrs.get("transB", 0):
        b = np.ascontiguousarray(b.T)
    b_name = f"{node.input[1]}_matmul_b"
    if b_name not in {i.name for i in graph.initializer}:
        graph.initializer.append(onnx.numpy_helper.from_array(b, b_name))
    has_c = len(node.input) > 2 and node.input[2]
    out = f"{node.output[0]}_matmul" if has_c else node.output[0]
    nodes = [onnx.helper.make_node("MatMul", [node.input[0], b_name], [out], name=node.name)]
    if has_c:
        nodes.append(
            onnx.helper.make_node(
                "Add", [out, node.input[2]], [node.output[0]], name=f"{node.name}_bias"
            )
        )
    return nodes


WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Gather": 0}  # the input a constant weight comes in
INT4_OPSET = 21  # int4 initializers (the embedding's GatherBlockQuantized) need opset 21


def _name_nodes(graph: Any) -> None:
    """Give every node a unique name (the quantizer includes and excludes nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}_q"
        seen.add(node.name)


def _node_part(node: Any, weights: dict[str, Any], table: dict[bytes, set[str]]) -> str | None:
    """The part of the parameter `node` multiplies by (or gathers from), None for any other
    node (no constant 2-D weight, or one that is no parameter of a known part)."""
    import onnx

    slot = WEIGHT_INPUT.get(node.op_type)
    if slot is None or len(node.input) <= slot or node.input[slot] not in weights:
        return None
    a = onnx.numpy_helper.to_array(weights[node.input[slot]])
    if a.ndim != 2 or a.dtype != np.float32:
        return None
    found = table.get(_digest(a), set())
    if node.op_type == "Gather":
        return "embedding" if "embedding" in found else None
    found = found - {"embedding"}
    return "lm_head" if "lm_head" in found else next(iter(sorted(found)), None)


def select_nodes(model: Any, seg: Any, parts: Sequence[str]) -> dict[str, str]:
    """Node name -> part, for the MatMul / Gemm / Gather nodes of `model` (an exported segment)
    whose weight is a parameter of one of `parts`."""
    _name_nodes(model.graph)
    weights = {i.name: i for i in model.graph.initializer}
    table = parameter_parts(seg)
    chosen = {}
    for node in model.graph.node:
        part = _node_part(node, weights, table)
        if part in parts:
            chosen[node.name] = part
    return chosen


def _gemms_to_matmuls(model: Any, chosen: dict[str, str]) -> None:
    """Rewrite the chosen Gemm nodes as MatMul (+ Add), in place; a Gemm of another form is
    dropped from `chosen` (it stays float)."""
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type == "Gemm" and node.name in chosen:
            new = _gemm_to_matmul(graph, node, weights)
            if not new:
                log.warning("quantize: %s is a Gemm of another form; it stays float", node.name)
                del chosen[node.name]
            nodes.extend(new or [node])
        else:
            nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)


def _run_quantizer(model: Any, cfg: QuantizeConfig, chosen: dict[str, str]) -> Any:
    """onnxruntime's MatMulNBitsQuantizer on the `chosen` MatMul / Gather nodes of `model`
    (every other MatMul and Gather excluded by name); returns the quantized ModelProto."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    gathers = any(p == "embedding" for p in chosen.values())
    exclude = [
        n.name for n in model.graph.node if n.op_type in WEIGHT_INPUT and n.name not in chosen
    ]
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=cfg.bits,
        block_size=cfg.block_size,
        is_symmetric=True,
        accuracy_level=cfg.accuracy_level,
        nodes_to_exclude=exclude,
        op_types_to_quantize=("MatMul", "Gather") if gathers else ("MatMul",),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with np.errstate(invalid="ignore"):  # an all-zero block (a pad row): 0 / 0, then 0
            quantizer.process()
    finally:
        logger.setLevel(level)
    return quantizer.model.model


def quantize_segment(path: Path, seg: Any, cfg: QuantizeConfig) -> dict[str, int]:
    """Quantize the exported segment `path` (its graph after the passes) in place: the weights
    of `cfg.parts` to MatMulNBits / GatherBlockQuantized. The weights go to
    `<path>.data` (external data, for `share_weights` to merge); returns {part: nodes}."""
    import onnx
    import onnx.version_converter

    model = onnx.load(str(path), load_external_data=False)
    onnx.load_external_data_for_model(model, str(path.parent))
    chosen = select_nodes(model, seg, cfg.parts)
    if not chosen:
        return {}
    if "embedding" in chosen.values() and _opset(model) < INT4_OPSET:
        model = _to_opset(model, path)
        chosen = select_nodes(model, seg, cfg.parts)
    _gemms_to_matmuls(model, chosen)
    model = _run_quantizer(model, cfg, chosen)
    quantized = ("MatMulNBits", "GatherBlockQuantized")
    done = {
        n.name.removesuffix(f"_Q{cfg.bits}").removesuffix("_Q4")
        for n in model.graph.node
        if n.op_type in quantized
    }
    missed = sorted(set(chosen) - done)
    if missed:
        raise RuntimeError(f"quantize: onnxruntime's quantizer left {missed[:3]} in float")
    counts: dict[str, int] = {}
    for part in chosen.values():
        counts[part] = counts.get(part, 0) + 1
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    onnx.checker.check_model(str(path))
    log.info("quantized %s to %s: %s", seg.name, cfg.weights, counts)
    return counts


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _to_opset(model: Any, path: Path) -> Any:
    """`model` converted to INT4_OPSET by onnx's version converter (run on the graph alone, so
    a model past protobuf's 2 GB converts too), its weights loaded again after."""
    import onnx
    import onnx.version_converter

    graph_only = onnx.load(str(path), load_external_data=False)
    if any(i.data_location != onnx.TensorProto.EXTERNAL for i in graph_only.graph.initializer):
        converted = onnx.version_converter.convert_version(model, INT4_OPSET)
    else:
        converted = onnx.version_converter.convert_version(graph_only, INT4_OPSET)
        onnx.load_external_data_for_model(converted, str(path.parent))
    return converted


def quantized_export(cfg: QuantizeConfig, seg: Any, out_dir: Path) -> Any:
    """The ONNX backend's export of `seg`, then its weights quantized (`quantize_segment`);
    returns the segment's manifest entry."""
    import dataclasses

    from .onnx import export_segment

    entry = export_segment(seg, out_dir)
    counts = quantize_segment(out_dir / entry.file, seg, cfg)
    if not counts:
        return entry
    return dataclasses.replace(entry, external_data=entry.file + ".data")


# the logit tolerance (x max(1, max |eager logit|), as `verify` applies it) of a quantized engine
# against the round-trip eager reference, by MatMulNBits accuracy level (see `quantized_tol`)
ACCURACY_LEVEL_TOL = {0: FLOAT32_TOL, 1: FLOAT32_TOL, 2: 0.05, 3: 0.05, 4: 0.05}


def quantized_tol(precision: Precision) -> float:
    """The logit tolerance of a quantized engine against eager with the same weight round trip.

    The round trip reproduces the engine's weights bit for bit, so what is left is how
    MatMulNBits computes. Levels 0 and 1 multiply in float32: measured max |Δlogit| / scale
    2e-7 to 8e-7 (tiny-llava and trained-tiny-llava, int4 and int8, blocks 32 and 128, two
    images, 8 steps each), held to the float32 tolerance 1e-4. Levels 2 and 3 (float16,
    bfloat16 compute, where the CPU has it) are held to a 16-bit engine's 0.05. Level 4 first
    quantizes each block of `block_size` activations along K to int8 (scale max |x| / 127):
    every activation moves by up to half a step, 1/254 of its block's largest magnitude, so each
    MatMul's output carries a relative error of a few tenths of a percent, and the decoder's
    ~7 MatMuls a layer add them up (the norms keep them from growing): measured 0.3% to 1.9%
    of the logit scale over the same grid. 0.05 leaves 2.5x that; the int4 round trip itself
    moves the logits by 5% to 29% of the scale, so the check still fails an int4 engine whose
    weights differ from the reference's. int8's own round trip moves them 0.4% to 3.5%, inside
    level 4's noise: an int8 engine's weights are checked at level 0 (the tests do)."""
    if precision.method == "torchao":
        from .torchao_int4 import TORCHAO_TOL

        return TORCHAO_TOL
    return ACCURACY_LEVEL_TOL[int(precision.accuracy_level or 0)]
