"""A Linear whose weight is int4 codes packed for torch's CPU int4 kernel, as one graph node.

    y = int4_linear(x, qdata, scale_and_zero, group_size, out_features, bias)
      = aten._weight_int4pack_mm_for_cpu(bf16(x.reshape(-1, K)), qdata, group_size, scale_and_zero)
            [:, :out_features].reshape(*x.shape[:-1], out_features).to(x.dtype) + bias

`qdata` (N', K/2) uint8 codes and `scale_and_zero` (K/group_size, N', 2) bfloat16 are torchao's
`Int4OpaqueTensor` fields (compiler/backends/torchao_int4.py fills them): per block of
`group_size` weights along K a scale and a zero point, N' >= N rows (the kernel's padding).

The activations enter the kernel in bfloat16 (torchao's A16W4: its CPU int4 is for bf16 models):
torch's kernel has a vectorized path for bfloat16 and only a scalar one for float32, which on an
AVX-512 CPU runs a 1 x 1024 x 2816 product in ~4 ms against bfloat16's 0.07 ms (float32 weights:
0.16 ms). So a float32 engine's int4 Linears compute in bfloat16, as onnxruntime's MatMulNBits
does at accuracy level 3, and the rest of the engine stays float32.

Why a custom op (`mllmc::int4_linear`), not torchao's tensor subclass on the Linear's weight:
torch.export takes a subclass weight apart into a reshape, the kernel call, an alias and a cast,
so a decoder layer's q_proj is no longer one node, and the locator (and every pass that rewires
what a projection reads) needs it to be one. The op is one node through capture and the passes;
the aoti backend decomposes it into the kernel call just before AOTInductor compiles
(`decompose`), which lowers that kernel natively. The eager module (`Int4Linear`) calls the same
op, so the eager model with these modules is the engine's reference, kernel for kernel.
"""

from __future__ import annotations

from typing import Any

import torch

COMPUTE_DTYPE = torch.bfloat16  # what the int4 kernel multiplies in (its scales' dtype too)


def decomposed(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale_and_zero: torch.Tensor,
    group_size: int,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op in aten ops (torchao's A16W4 linear, written out, in bfloat16): its eager
    implementation, and what `decompose` puts in its place."""
    a = x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, qdata, group_size, scale_and_zero)
    y = y[:, :out_features].reshape(*x.shape[:-1], out_features).to(x.dtype)
    return y + bias if bias is not None else y


def _fake(x, qdata, scale_and_zero, group_size, out_features, bias=None):  # noqa: ANN001, ANN202
    return x.new_empty((*x.shape[:-1], out_features))


int4_linear = torch.library.custom_op("mllmc::int4_linear", decomposed, mutates_args=())
int4_linear.register_fake(_fake)


OP = torch.ops.mllmc.int4_linear.default


def flops(x_shape: Any, qdata_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FlopCounterMode formula: a Linear's 2 FLOPs per multiply-add, M x K x N."""
    m = 1
    for d in x_shape[:-1]:
        m *= int(d)
    return 2 * m * int(x_shape[-1]) * int(out_shape[-1])


def decompose(program: Any) -> Any:
    """`program` with each int4_linear node replaced by its aten ops (`decomposed`); as it is
    when it has none."""
    if not any(n.target is OP for n in program.graph.nodes):
        return program
    return program.run_decompositions({OP: decomposed})


class Int4Linear(torch.nn.Module):
    """A Linear of int4 codes (`qdata`, `scale_and_zero`: buffers) calling `int4_linear`."""

    def __init__(
        self,
        qdata: torch.Tensor,
        scale_and_zero: torch.Tensor,
        group_size: int,
        in_features: int,
        out_features: int,
        bias: torch.nn.Parameter | None,
    ) -> None:
        super().__init__()
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale_and_zero", scale_and_zero)
        self.group_size = group_size
        self.in_features = in_features
        self.out_features = out_features
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(
            x, self.qdata, self.scale_and_zero, self.group_size, self.out_features, self.bias
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


class Int4Embedding(torch.nn.Module):
    """A token embedding of int4 codes: row r of the table is
    (codes[r] unpacked - 8) * scales[r] repeated over each block of `block_size` columns, the
    symmetric scheme of onnxruntime's GatherBlockQuantized (compiler/backends/quantize.py's
    `roundtrip_gather_weight` computes the same rows). The graph gathers the codes and scales of
    the ids' rows and dequantizes only those: codes (V, d/2) uint8, two columns a byte (the even
    column in the low nibble), scales (V, d/block_size) float32."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, block_size: int) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.block_size = block_size
        self.num_embeddings = int(codes.shape[0])
        self.embedding_dim = 2 * int(codes.shape[1])
        shifts = torch.tensor([0, 4], dtype=torch.uint8).repeat(self.embedding_dim // 2)
        self.register_buffer("shifts", shifts, persistent=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor, block_size: int) -> Int4Embedding:
        """The int4 table of `weight` (V, d): per block of `block_size` along d, s = a / -8 (a the
        block's value of largest magnitude, with its sign), q = clip(round_half_even(w / s),
        -8, 7), 0 where s is 0."""
        v, d = weight.shape
        w = weight.detach().to(torch.float32).reshape(v, d // block_size, block_size)
        hi, lo = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
        scale = torch.where(hi.abs() > lo.abs(), hi, lo) / -8.0
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.where(scale == 0, torch.zeros_like(w), torch.round(w / safe)).clamp(-8, 7)
        u = (q.reshape(v, d) + 8).to(torch.uint8)
        codes = u[:, 0::2] | (u[:, 1::2] << 4)
        return cls(codes.contiguous(), scale.reshape(v, d // block_size).contiguous(), block_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.codes[ids].repeat_interleave(2, dim=-1)  # (..., d): each byte twice
        q = (c >> self.shifts) & 15  # the even column's low nibble, the odd one's high
        s = self.scales[ids].repeat_interleave(self.block_size, dim=-1)  # (..., d)
        return (q.to(s.dtype) - 8.0) * s

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, block_size={self.block_size}, int4"
