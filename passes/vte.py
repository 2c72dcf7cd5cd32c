"""vte — static visual-token exit at layer K (DyVTE, arXiv 2411.19628, static form).

Contract (docs/passes.md): layers >= K hold no visual tokens: at layer K's input the visual rows of
the hidden state are dropped, so those layers, and their KV caches, hold the text rows only. K
follows FastV's convention (layers < K see every row). K = L is the identity (no layer after the
exit; the rewrite still runs and gathers the final hidden state, whose last row is unchanged);
K = 0 drops the visual tokens before the first layer.

Graph change on the prefill segment (decode unchanged; positions continue at n):

    keep index = text rows (n - V,), from the visual rows (a running count, no NonZero)
    layers >= K: h, cos/sin, causal mask gathered at it (passes/row_pruning.py, the same gather
                 machinery as fastv): (1, n, d) -> (1, n - N_v, d); present K/V (1, kvh, n - N_v, hd)

Which detail follows which source: the exit as "remove all visual tokens from the hidden states
and the KV cache from layer K on, text tokens keep their positions" follows the DyVTE paper
(arXiv 2411.19628, the visual-token exit applied to LLaVA-1.5); its learned per-layer gate is the
dynamic form and is not implemented here. K is given (`k=K`) or chosen on calibration data as the
earliest layer whose mean output KL stays below a threshold (`mllmc calibrate MODEL --pass vte
--threshold T -o exit.json`, then `vte:calib=exit.json`; see passes/calibration.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mllmc.compiler.core.pass_types import PassInfo, PassResult
from mllmc.runtime.errors import UserError

from .rewrite import GraphEdit, replan, uniform_visual_tokens
from .row_pruning import drop_rows, pruned_forward, refuse_sliding_window, text_rows

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

    from mllmc.compiler.core.capture import Segments
    from mllmc.compiler.core.model_dir import ModelShape
    from mllmc.runtime.manifest import ModelInfo

SUMMARY = "visual-token exit: layers >= K hold text rows only (static DyVTE)"


@dataclass(frozen=True)
class VTEConfig:
    """k: the first layer without visual tokens (0..L; L is the identity), or calib: an exit
    file from `mllmc calibrate --pass vte` that names it. threshold: filled in from the file."""

    k: int | None = None
    calib: str | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.k is not None and (
            not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 0
        ):
            raise ValueError(f"k must be an integer layer index >= 0, got {self.k!r}")
        if self.calib is not None and not isinstance(self.calib, str):
            raise ValueError(f"calib must be a file path, got {self.calib!r}")
        t = self.threshold
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf")
        ):
            raise ValueError(f"threshold must be a finite number > 0, got {t!r}")


def check_k(k: int, num_layers: int) -> None:
    if not 0 <= k <= num_layers:
        raise UserError(
            f"vte: k={k} out of range; layers >= k hold no visual tokens, so k must be in "
            f"0..{num_layers} ({num_layers} = no exit) for this {num_layers}-layer model"
        )


def check(cfg: VTEConfig, shape: ModelShape) -> None:
    if cfg.k is not None and shape.num_layers is not None:
        check_k(cfg.k, shape.num_layers)


def prepare(cfg: VTEConfig, model: LlavaForConditionalGeneration, info: ModelInfo) -> VTEConfig:
    """Resolve K from `calib` when it is not given, and check it against the model."""
    if cfg.k is None:
        if cfg.calib is None:
            raise UserError(
                "vte: give the exit layer (vte:k=K) or a calibration file (vte:calib=FILE from "
                "`mllmc calibrate MODEL --pass vte --threshold T -o FILE`)"
            )
        from .calibration import read_exit_file

        k, threshold = read_exit_file(cfg.calib, info)
        cfg = dataclasses.replace(cfg, k=k, threshold=threshold)
    check_k(cfg.k, info.num_layers)
    refuse_sliding_window("vte", model, cfg.k)
    return cfg


def vte(segments: Segments, cfg: VTEConfig) -> PassResult:
    """Drop the visual rows of prefill layers >= cfg.k."""
    if cfg.k is None:
        raise ValueError("vte: resolve cfg.k with prepare() before the rewrite")
    info = segments.info
    check_k(cfg.k, info.num_layers)
    num_visual = uniform_visual_tokens(segments, "vte")

    edit = GraphEdit.open(segments, "prefill")
    inputs = edit.inputs
    with edit.graph.inserting_after(edit.last_input):
        keep = edit.graph.call_function(text_rows, (inputs["input_ids"], inputs["visual_rows"]))
    gathers = drop_rows(edit.graph, edit.layers, cfg.k, keep)
    exited = range(cfg.k, info.num_layers)
    return PassResult(
        replan(edit.finish(), exited, visual_tokens=0, kv_visual_tokens=0, kv_visual_keep="0"),
        {
            "exit_layer": cfg.k,
            "layers_without_visual_tokens": info.num_layers - cfg.k,
            "visual_tokens": num_visual,
            "gathers": gathers,
        },
    )


def reference(
    model: LlavaForConditionalGeneration, info: ModelInfo, cfg: VTEConfig
) -> contextlib.AbstractContextManager[None]:
    if cfg.k is None:
        raise ValueError("vte: resolve cfg.k with prepare() before building the reference")
    return pruned_forward(model, cfg.k)


# the registry entry: the rewrite, its config, preparation, option check and eager reference
PASS = PassInfo("vte", vte, VTEConfig, SUMMARY, "in_llm", prepare, check, reference, prunes=True)
