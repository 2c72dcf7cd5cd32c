"""Qwen2.5-VL's windowed vision attention (`qwen_vl.WindowLayout`): attending window by window
over the padded layout equals attending under the N x N block-diagonal mask, for partial, empty
and single windows, eagerly and in one exported graph (W dynamic, down to one window)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mllmc.compiler.core.qwen_vl import WindowLayout, segment_mask

ROWS, HEADS, HD = 16, 2, 8


class Windowed(torch.nn.Module):
    """x (N, H*hd) attending to itself within the windows of cu (W + 1,), through the layout."""

    def __init__(self) -> None:
        super().__init__()
        self.layout = WindowLayout(ROWS)

    def forward(self, x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        index, bias, slot = self.layout(cu, n, x.dtype)
        t = x.reshape(n, HEADS, HD).index_select(0, index).reshape(-1, ROWS, HEADS, HD)
        t = t.transpose(1, 2)  # (W + 1, H, rows, hd)
        o = F.scaled_dot_product_attention(t, t, t, attn_mask=bias)
        return o.transpose(1, 2).reshape(-1, HEADS, HD).index_select(0, slot).reshape(n, -1)


def masked(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    t = x.reshape(n, HEADS, HD).transpose(0, 1)[None]
    o = F.scaled_dot_product_attention(t, t, t, attn_mask=segment_mask(cu, n, x.dtype))
    return o[0].transpose(0, 1).reshape(n, -1)


CASES = {
    "full windows": [0, 16, 32],
    "a partial window": [0, 16, 32, 40],
    "one window": [0, 7],
    "one full window": [0, 16],
    "an empty window": [0, 16, 16, 30],
    "small windows": [0, 1, 2, 3, 4],
}


@pytest.fixture(scope="module")
def exported():
    x = torch.randn(40, HEADS * HD, generator=torch.Generator().manual_seed(0))
    cu = torch.tensor(CASES["a partial window"], dtype=torch.int32)
    dims = (
        {0: torch.export.Dim("n", min=1, max=4096)},
        {0: torch.export.Dim("bounds", min=2, max=4096)},
    )
    return torch.export.export(Windowed(), (x, cu), dynamic_shapes=dims, strict=False).module()


@pytest.mark.parametrize("bounds", CASES.values(), ids=CASES.keys())
def test_windowed_attention_equals_the_block_diagonal_mask(exported, bounds):
    cu = torch.tensor(bounds, dtype=torch.int32)
    x = torch.randn(bounds[-1], HEADS * HD, generator=torch.Generator().manual_seed(len(bounds)))
    expected = masked(x, cu)
    torch.testing.assert_close(Windowed()(x, cu), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(exported(x, cu), expected, atol=1e-6, rtol=1e-6)


def test_layout_slots_are_each_patchs_own():
    cu = torch.tensor(CASES["an empty window"], dtype=torch.int32)
    index, bias, slot = WindowLayout(ROWS)(cu, 30, torch.float32)
    assert index.shape == (4 * ROWS,) and bias.shape == (4, 1, 1, ROWS)
    # each patch's slot reads that patch, and every slot the bias leaves open reads a patch
    assert torch.equal(index[slot], torch.arange(30))
    assert torch.equal(torch.sort(slot).values, torch.nonzero(bias.reshape(-1) == 0).flatten())


@pytest.mark.parametrize(
    ("grids", "largest"),
    [
        ([(1, 8, 8)], 64),
        ([(1, 12, 20), (1, 6, 4)], 64),
        ([(3, 10, 14)], 64),
        ([(2, 4, 4), (1, 30, 2)], 16),
    ],
    ids=["one window", "two images", "frames", "frames and a strip"],
)
def test_no_window_of_hf_exceeds_the_layouts_rows(grids, largest):
    """HF's windows (over images and frames) never hold more patches than the layout pads to:
    `QwenVisionSegment` pads to side² merged tokens, side = window // merge // patch (64
    patches for 112 px windows), and a grid of 8 x 8 patches or more fills one."""
    from transformers.vision_utils import get_vision_window_index

    merge, window, patch = 2, 112, 14
    side = window // merge // patch
    _, cu = get_vision_window_index(torch.tensor(grids), merge, window, patch)
    assert int(cu[-1]) == sum(t * h * w for t, h, w in grids)
    assert int(torch.diff(cu).max()) == largest <= side * side * merge * merge
