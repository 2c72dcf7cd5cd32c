"""The fused static decode step's small inputs, computed on the host (runtime/step_inputs.py):
the rotary tables equal the model's rotary embedding (1-D and M-RoPE, with attention scaling),
the bias masks left padding and sliding windows as the unfused step does, step after step; the
manifest records how to compute them and refuses records that cannot hold; the compiled program
computes none of them itself; an artifact whose fused program computed them is refused in one
line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from mllmc.compiler.core.capture import Rope
from mllmc.compiler.core.qwen_vl import MRope
from mllmc.runtime import UserError, load
from mllmc.runtime.manifest import FUSED_STEP_INPUTS, StepInputs, read_manifest
from mllmc.runtime.step_inputs import HostStepInputs, fused_input_names

HALF = 8  # rotary frequencies: head_dim 16
INV_FREQ = 1.0 / (10000.0 ** (torch.arange(0, 2 * HALF, 2, dtype=torch.float32) / (2 * HALF)))


def rotary(section: list[int] | None = None, scaling: float = 1.0) -> SimpleNamespace:
    """What `Rope` / `MRope` read of an HF rotary embedding."""
    emb = SimpleNamespace(inv_freq=INV_FREQ.clone(), attention_scaling=scaling)
    if section is not None:
        emb.mrope_section = section
    return emb


def host_for(rope: Rope | MRope, layers: int, batch: int, capacity: int, windows=()) -> Any:
    axes = ()
    if isinstance(rope, MRope):
        axes = tuple(i % 3 for i, size in enumerate(rope.section) for _ in range(size))
    spec = StepInputs(
        inv_freq=tuple(float(f) for f in rope.inv_freq),
        rope_scaling=rope.attention_scaling,
        rope_axes=axes,
        windows=tuple(windows) or (None,) * layers,
    )
    return HostStepInputs(spec, layers, batch, capacity, np.dtype(np.float32))


@pytest.mark.parametrize("scaling", [1.0, 0.75])
def test_rotary_tables_equal_the_models_rotary_embedding(scaling):
    """1-D positions (B, 1) through `Rope`, 3-D ones (3, B, 1) with different temporal, height
    and width positions through `MRope`: the host's rows are the first half of the tables the
    unfused step computes (the second repeats it), then zero rows; each sample reads its row."""
    layers, batch, capacity = 2, 3, 10
    cases = [
        (Rope(rotary(scaling=scaling)), torch.tensor([[7], [130], [4096]])),
        (
            MRope(rotary([2, 3, 3], scaling)),
            torch.tensor([[[5], [40], [900]], [[6], [41], [17]], [[9], [3], [901]]]),
        ),
    ]
    for rope, positions in cases:
        host = host_for(rope, layers, batch, capacity)
        zero_pad = np.zeros((layers, batch), np.int64)
        host.fill(np.array([[1], [2], [3]]), positions.numpy(), np.full(layers, 6), zero_pad)
        cos, sin = rope(positions, torch.float32)  # (B, 1, 1, 2 * HALF)
        assert torch.equal(cos[:, 0, 0, :HALF], cos[:, 0, 0, HALF:])  # halves repeat
        np.testing.assert_allclose(host.cos[:batch], cos[:, 0, 0, :HALF].numpy(), atol=2e-7)
        np.testing.assert_allclose(host.sin[:batch], sin[:, 0, 0, :HALF].numpy(), atol=2e-7)
        assert host.cos.shape == (batch + capacity, HALF) and not host.cos[batch:].any()
        assert host.rows[:, 0].tolist() == [0, 1, 2] and int(host.total) == capacity
        assert host.input_ids[:, 0].tolist() == [1, 2, 3]


def allowed(pad: np.ndarray, lens: np.ndarray, windows: list[int | None], capacity: int) -> Any:
    """Which buffer rows each layer's attention reads, as the unfused step's mask says
    (compiler/core/capture.py `attend_static_cache`): from the sample's padding on, and with a
    window W only the W - 1 rows before the new one."""
    out = np.zeros((len(lens), pad.shape[1], capacity), bool)
    for layer, window in enumerate(windows):
        for b in range(pad.shape[1]):
            for key in range(capacity):
                near = window is None or lens[layer] - key < window
                out[layer, b, key] = key >= pad[layer, b] and near
    return out


def test_bias_masks_padding_and_windows_step_after_step():
    """Layer 1 has a 3-row window: its bias moves with the cache each step; the padding's
    columns change only when the padding does, and go back to 0 when it is gone."""
    windows, capacity = [None, 3, None], 12
    host = host_for(Rope(rotary()), 3, 2, capacity, windows)
    floor = np.finfo(np.float32).min
    pads = [[[0, 2]] * 3, [[0, 2]] * 3, [[1, 0]] * 3, [[0, 0]] * 3]
    for step, pad in enumerate(pads):
        pad = np.array(pad, np.int64).reshape(3, 2)
        lens = np.array([6, 6, 6]) + step
        host.fill(np.ones((2, 1), np.int64), np.full((2, 1), 6 + step), lens, pad)
        want = np.where(allowed(pad, lens, windows, capacity), 0.0, floor)
        np.testing.assert_array_equal(host.bias[:, :, 0, 0], want)
        np.testing.assert_array_equal(host.seqlens, np.repeat(lens[:, None], 2, axis=1))
        assert host.seqlens.dtype == np.int32
    assert not host.bias[0].any() and not host.bias[2].any()  # no window, no padding left


def test_bound_arrays_are_the_filled_ones_in_the_programs_order():
    host = host_for(Rope(rotary()), 2, 1, 4)
    arrays = host.arrays()
    assert list(arrays) == fused_input_names(2) == [
        *FUSED_STEP_INPUTS, "seqlens.0", "seqlens.1", "bias.0", "bias.1"
    ]  # fmt: skip
    assert all(a.flags.c_contiguous for a in arrays.values())  # bound in place, no copy
    host.fill(np.array([[9]]), np.array([[3]]), np.array([3, 2]), np.array([[1], [0]]))
    assert arrays["seqlens.1"].tolist() == [2] and arrays["input_ids"].tolist() == [[9]]
    assert arrays["bias.0"][0, 0, 0, 0] < 0 and not arrays["bias.1"].any()
    with pytest.raises(ValueError, match="cache_pad of shape"):  # another batch's padding
        host.fill(np.array([[9]]), np.array([[3]]), np.array([3, 2]), np.zeros((2, 2), np.int64))


def test_the_fused_program_computes_none_of_them(tiny_base_artifact):
    """The ONNX target's fused decode takes the operator's inputs: no rotary angles, masks or
    index ranges are computed in its graph, and its manifest says how the host makes them."""
    manifest = read_manifest(tiny_base_artifact)
    entry = manifest.segments["decode_static"]
    assert [t.name for t in entry.inputs][: 5 + 2 * manifest.model.num_layers] == (
        fused_input_names(manifest.model.num_layers)
    )
    assert entry.step_inputs is not None
    assert 2 * len(entry.step_inputs.inv_freq) == manifest.model.head_dim
    for file in (entry.file, entry.packed_file):
        ops = {
            n.op_type
            for n in onnx.load(tiny_base_artifact / file, load_external_data=False).graph.node
        }
        assert "GroupQueryAttention" in ops
        assert not ops & {"Cos", "Sin", "Range", "Where", "Pad", "Expand", "GreaterOrEqual"}


def copied(artifact: Path, tmp_path: Path) -> Path:
    out = tmp_path / "artifact"
    shutil.copytree(artifact, out)
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: s["step_inputs"].update(rope_axes=[0, 1]),
            "rope_axes must give an axis 0-2 to each frequency",
        ),
        (lambda s: s["step_inputs"].update(windows=[None]), "windows for"),
        (lambda s: s["step_inputs"].update(inv_freq=[1.0, 0.5]), "rotary frequencies for head_dim"),
        (lambda s: s["step_inputs"].update(windows=[0, None]), "a window must be None or >= 1"),
        (
            lambda s: s["step_inputs"].update(rope_axes=[0] * len(s["step_inputs"]["inv_freq"])),
            "rope_axes must be given exactly when the model has M-RoPE",
        ),
        (lambda s: s.pop("step_inputs"), "the fused decode_static has no step_inputs"),
    ],
)
def test_step_inputs_that_cannot_hold_are_refused(tiny_base_artifact, tmp_path, edit, message):
    art = copied(tiny_base_artifact, tmp_path)
    path = art / "manifest.json"
    data = json.loads(path.read_text())
    edit(data["segments"]["decode_static"])
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        load(art)


def test_an_older_fused_program_is_refused_in_one_line(tiny_base_artifact, tmp_path, sample_image):
    """A format-6 artifact's fused program computed these inputs itself from position_ids,
    cache_len and cache_pad: its static decode asks for a recompile, its growing one runs."""
    art = copied(tiny_base_artifact, tmp_path)
    path = art / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 6
    data["segments"]["decode_static"].pop("step_inputs")
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="written by an older mllmc") as e:
        load(art)
    assert "\n" not in str(e.value) and "decode_cache='growing'" in str(e.value)
    engine = load(art, decode_cache="growing")
    assert len(engine.generate(sample_image, "Hi", max_new_tokens=2).token_ids) == 2
    cli = [sys.executable, "-m", "mllmc.compiler.tools.cli", "run", str(art), "--image",
           str(sample_image), "--prompt", "Hi", "--max-new-tokens", "2", "--json"]  # fmt: skip
    refused = subprocess.run(cli, capture_output=True, text=True)
    assert refused.returncode == 2 and "--decode-cache growing" in refused.stderr, refused.stderr
    ran = subprocess.run([*cli, "--decode-cache", "growing"], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert len(json.loads(ran.stdout)["token_ids"]) == 2
