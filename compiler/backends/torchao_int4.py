"""AOTInductor's weight-only int4: torchao's CPU int4 (`Int4OpaqueTensor`) as `Int4Linear`s.

    cfg = quantize_config("int4", block_size=32, target="aoti")  # a QuantizeConfig, torchao
    quantize_model(model, cfg.record())        # before capture: the Linears become int4
    with torchao_weights(fresh_model, cfg.record()):   # the eager reference, restored after
        ...

Before capture, each Linear of the chosen parts (decoder and lm_head by default) is swapped for
an `Int4Linear` (compiler/core/int4_linear.py) holding torchao's int4 codes of its weight:
`Int4OpaqueTensor.from_hp(weight, [1, block])`, torchao's tinygemm scheme (per block of `block`
weights along K a float scale and zero point, the 4-bit codes packed for torch's
`aten._weight_int4pack_mm_for_cpu`). The module calls one custom op that the locator and the
passes see as a Linear; the aoti backend decomposes it into that kernel before AOTInductor
compiles, and stores the codes once in the shared weights file. The engine needs no torchao at
run time: the kernel is torch's own. The eager model with the same modules runs the same kernel
on the same codes, so it is the reference, held to `TORCHAO_TOL`.

The token embedding (a default part, as on the onnx target) becomes an `Int4Embedding`: the
symmetric int4 scheme of onnxruntime's GatherBlockQuantized, its codes and scales gathered for
the prompt's ids and dequantized in the graph.

torchao is the optional extra `mllmc[torchao]`, needed to build (it computes the codes); without
it `--quantize` on `--target aoti` is a one-line refusal. There is no accuracy level: the
kernel takes the activations in bfloat16 (`int4_linear.COMPUTE_DTYPE`), the rest of the engine
runs in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from mllmc.runtime.errors import UserError
from mllmc.runtime.manifest import SCHEMES, TORCHAO_BLOCK_SIZES, Precision

TORCHAO_VERSION = "0.18.0"  # the release built and tested against (the `torchao` extra's pin)
BLOCK_SIZES = TORCHAO_BLOCK_SIZES  # the group sizes torchao's CPU int4 takes
DEFAULT_BLOCK_SIZE = 32
# the logit tolerance (x max(1, max |eager logit|)) against the eager model with the same int4
# Linears: both run torch's int4 kernel on the same codes, but its bfloat16 activations and
# output round the float32 values AOTInductor computes around it (fused differently from eager)
# to 8 bits of mantissa, so a value a hair from a rounding boundary lands one bfloat16 step
# (2^-8 relative) away, and the steps add up over the layers: held, like MatMulNBits at
# accuracy level 3 (bfloat16 compute), to a 16-bit engine's 0.05. tiny-llava measures 0.4% of
# the logit scale (one step of its largest logit); int4 itself moves the logits far more
TORCHAO_TOL = 0.05


def _torchao() -> Any:
    """torchao's CPU int4 tensor (UserError naming the install where torchao is missing)."""
    try:
        from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
    except ImportError:
        raise UserError(
            "--quantize on --target aoti needs torchao: pip install 'mllmc[torchao]' "
            f"(torchao=={TORCHAO_VERSION}), or build --target onnx"
        ) from None
    return Int4OpaqueTensor


def torchao_config(
    weights: str,
    block_size: int | None,
    accuracy_level: int | None,
    keep: str | Sequence[str] | None,
    parts: str | Sequence[str] | None,
) -> Any:
    """The checked QuantizeConfig of an aoti artifact (UserError naming what is valid)."""
    from .quantize import QuantizeConfig, chosen_parts, one_of

    if weights != "int4":
        raise UserError(
            f"--quantize {weights}: --target aoti quantizes int4 (torchao's weight-only int4); "
            "int8 builds for --target onnx"
        )
    if accuracy_level is not None:
        raise UserError(
            "--accuracy-level sets onnxruntime's MatMulNBits compute (--target onnx); torchao's "
            "int4 on --target aoti takes bfloat16 activations"
        )
    block = one_of(
        block_size, DEFAULT_BLOCK_SIZE, BLOCK_SIZES, "--block-size on --target aoti",
        "(torchao's int4 group sizes)",
    )  # fmt: skip
    chosen = chosen_parts(keep, parts)
    _torchao()
    return QuantizeConfig(weights, block, None, tuple(chosen), SCHEMES["aoti"])


def _modules(model: Any, precision: Precision) -> list[tuple[str, str, Any]]:
    """(path, part, module) of the Linears (and the token Embedding) `precision` quantizes, each
    checked against the block."""
    from .quantize import eager_modules

    block = int(precision.block_size or DEFAULT_BLOCK_SIZE)
    found = []
    for path, part, module in eager_modules(model, precision.parts):
        width = module.embedding_dim if part == "embedding" else module.in_features
        if width % block:
            raise UserError(
                f"--block-size {block}: {path} has {width} inputs, not a multiple of it; use a "
                f"block size that divides it ({', '.join(map(str, BLOCK_SIZES))}) or leave its "
                "part float (--quantize-keep, --quantize-parts)"
            )
        found.append((path, part, module))
    return found


def int4_module(linear: Any, block: int) -> Any:
    """An `Int4Linear` with torchao's int4 codes of `linear`'s weight (its bias kept float)."""
    import torch

    from mllmc.compiler.core.int4_linear import COMPUTE_DTYPE, Int4Linear

    with torch.no_grad():
        w = _torchao().from_hp(linear.weight.detach().float(), [1, block])
    scales = w.scale_and_zero.to(COMPUTE_DTYPE)
    return Int4Linear(w.qdata, scales, block, linear.in_features, linear.out_features, linear.bias)


def quantize_model(model: Any, precision: Precision) -> list[tuple[Any, str, Any]]:
    """Swap each Linear of `precision.parts` in `model` for an `Int4Linear` of its torchao int4
    codes, and the token embedding (part "embedding") for an `Int4Embedding`, in place; returns
    (parent, attribute, module) for each swap (a module swapped already is left as it is)."""
    from mllmc.compiler.core.int4_linear import Int4Embedding

    _torchao()  # before the first swap: a missing torchao leaves the model as it was
    block = int(precision.block_size or DEFAULT_BLOCK_SIZE)
    swapped: list[tuple[Any, str, Any]] = []
    try:
        for path, part, module in _modules(model, precision):
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            if part == "embedding":
                new = Int4Embedding.quantize(module.weight, block)
            else:
                new = int4_module(module, block)
            setattr(parent, attr, new)
            swapped.append((parent, attr, module))
    except BaseException:
        restore(swapped)
        raise
    return swapped


def restore(swapped: list[tuple[Any, str, Any]]) -> None:
    """Put back the modules `quantize_model` swapped out."""
    for parent, attr, module in reversed(swapped):
        setattr(parent, attr, module)


@contextlib.contextmanager
def torchao_weights(model: Any, precision: Precision) -> Iterator[Any]:
    """`model` with int4 Linears (and embedding) while the block runs, its float modules restored
    after (a model quantized already, as the compile pipeline's, is used as it is)."""
    swapped = quantize_model(model, precision)
    try:
        yield model
    finally:
        restore(swapped)
