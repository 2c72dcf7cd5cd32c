"""Baseline row: the LLaVA-1.5 model exported by `transformers.exporters` (ONNX), run in onnxruntime.

What is used (transformers 5.23, `transformers/exporters/`)
-----------------------------------------------------------
* `OnnxExporter().export_for_generation(model, generate_kwargs, OnnxConfig(dynamic=True))`: the
  stock path. It calls `exporters.utils.decompose_for_generation`, which runs `model.generate()`
  for two new tokens, captures the forward kwargs of the prefill and of one decode step and, since
  LLaVA is multimodal, splits the prefill with `decompose_multimodal`. Every component goes through
  `torch.export` -> `torch.onnx.export` (onnxscript optimiser on, no ORT fusions by default), with
  every input axis `Dim.AUTO` (the sequence and past-length axes stay dynamic).
* `ExportedModel.save_pretrained(out_dir)`: one `<component>.onnx` + `<component>.onnx.data` per
  component, `export.json` (manifest: file and traced metadata per component), `config.json`,
  `generation_config.json`.
* Only with `vision=True` (a workaround, see below): `exporters.utils.decompose_multimodal` on a
  plain forward with `pixel_values`, then `OnnxExporter().export(submodule, kwargs, config)` per
  vision submodule, merged into the same `ExportedModel`.

What it exports for `LlavaForConditionalGeneration`
---------------------------------------------------
``language_model``  (`LlamaModel`, the LLM prefill; the empty cache and the `None` mask are pruned)
    in:  position_ids (1, n) int64, inputs_embeds (1, n, d) float32
    out: last_hidden_state (1, n, d), past_key_values.layers.{i}.{keys,values} (1, kv_heads, n, hd)
``lm_head``  (`nn.Linear`)
    in:  input (1, m, d)          out: output (1, m, vocab)
``decode``  (the whole `LlavaForConditionalGeneration`, one token, embedding included)
    in:  input_ids (1, 1), position_ids (1, 1), input.past_key_values.layers.{i}.{keys,values}
         (1, kv_heads, past, hd)
    out: logits (1, 1, vocab), output.past_key_values.layers.{i}.{keys,values}
         (1, kv_heads, past + 1, hd)

No graph takes an attention mask: batch 1, no padding. The token merge (text embeddings with the
image features scattered over the `<image>` positions) is, by design, outside every graph
(`decompose_multimodal`'s docstring: "the caller's responsibility"); `HFExportersRunner.embed` does
it in numpy with the embedding table read out of `decode.onnx`.

What it cannot export, and why
------------------------------
`export_for_generation` silently produces no ``image_encoder`` and no ``multi_modal_projector``
component. In 5.23 `generate()` encodes the images *before* the prefill
(`GenerationMixin._prepare_multimodal_encoder_kwargs_for_generation` calls
`get_image_features(pixel_values)` and pops `pixel_values`), so the captured prefill kwargs hold
`mm_encoder_outputs` instead of `pixel_values`. `decompose_multimodal` then re-runs that prefill
forward with hooks on the vision tower and projector, they are never called, and
`decompose_multimodal` drops submodules that were not called. No error is raised.

The exporter itself handles both modules: `export(..., vision=True)` captures their kwargs with
`decompose_multimodal` on a forward that does get `pixel_values`, and exports each with
`OnnxExporter.export`; `HFExportersRunner.encode_image` then does the glue that stays outside the
graphs (pick hidden state `vision_feature_layer`, drop CLS for the "default" strategy, project).

How the benchmark uses it
-------------------------
The benchmark times only the LLM for this row: prefill of a prompt of n = visual tokens + text
tokens (`HFExportersRunner.prefill` on precomputed `inputs_embeds`, or `prefill_tokens` on
`input_ids` + image features, which adds the numpy embed/splice) and per-token decode
(`decode_step`). The image features come from the HF eager vision tower (or mllmc's vision.onnx,
or `encode_image` when exported with `vision=True`); vision time is not part of this row.

Caveats
-------
* The decoder weights are stored twice (`language_model.onnx.data` and `decode.onnx.data`, which
  also holds the embedding table and lm_head), so the sessions hold ~1.8x the fp32 LLM weights.
* The default graphs are plain ONNX ops (MatMul/Softmax attention); `ort_fusions="cpu"` makes
  the exporter fuse them into ONNX Runtime contrib ops (GroupQueryAttention,
  SkipSimplifiedLayerNormalization), which is faster but is not the exporter's default.
* The output directory also loads with the stock `ExportedModel.from_pretrained(out_dir)`; this
  runner uses plain `onnxruntime.InferenceSession`s on the same files (numpy in/out, measured
  no slower than the stock IO-binding runner on CPU).

Run `python benchmarks/hf_exporters.py check MODEL_DIR` for the parity check and timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mllmc.compiler.tools.bench import median_time
from mllmc.compiler.tools.cli import OneLineParser

# Components `export_for_generation` yields for LLaVA, and the vision ones it does not.
LLM_COMPONENTS = ("language_model", "lm_head", "decode")
VISION_COMPONENTS = ("image_encoder", "multi_modal_projector")
SUMMARY_FILE = "hf_exporters.json"

Cache = dict[
    str, np.ndarray
]  # "past_key_values.layers.{i}.{keys,values}" -> (1, kv_heads, past, hd)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def sample_inputs(config: Any, n_text: int = 8, seed: int = 0) -> dict[str, Any]:
    """`generate()` kwargs for one image: input_ids (1, n) = [BOS, text..., <image> x n_img,
    text...], attention_mask (1, n), pixel_values (1, 3, H, W). Random text ids below the image
    token, random pixels: the exporter only needs shapes and a valid placeholder count."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n_img = int(config.image_seq_length)
    image_token = int(config.image_token_index)
    bos = int(config.text_config.bos_token_id or 1)
    head = max(1, n_text // 4)
    text = torch.randint(4, image_token, (n_text,), generator=g)
    ids = torch.cat(
        [
            torch.tensor([bos]),
            text[:head],
            torch.full((n_img,), image_token),
            text[head:],
        ]
    )[None]  # (1, 1 + n_img + n_text)
    size = int(config.vision_config.image_size)
    pixels = torch.randn(1, 3, size, size, generator=g)  # (1, 3, H, W)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def _describe_onnx(path: Path) -> dict[str, Any]:
    """Input/output names, shapes (ints or symbols) and element types of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def values(infos: Any) -> list[dict[str, Any]]:
        out = []
        for info in infos:
            t = info.type.tensor_type
            # a static axis may come back as a numeric dim_param ("128"): read it as an int
            shape = [
                int(d.dim_param) if d.dim_param.isdigit() else (d.dim_param or d.dim_value)
                for d in t.shape.dim
            ]
            out.append(
                {
                    "name": info.name,
                    "shape": shape,
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                }
            )
        return out

    return {"inputs": values(model.graph.input), "outputs": values(model.graph.output)}


def export(
    model_dir: str,
    out_dir: str,
    *,
    vision: bool = False,
    ort_fusions: str | None = None,
    n_text: int = 8,
) -> dict[str, Any]:
    """Export LLaVA at `model_dir` with `transformers.exporters` into `out_dir`.

    `vision=True` adds the image_encoder and multi_modal_projector that `export_for_generation`
    leaves out (module docstring). `ort_fusions` ("cpu", ...) is `OnnxConfig.ort_fusions`; the
    default `None` is the exporter's default. Returns (and writes to `out_dir/hf_exporters.json`)
    the components with their files and input/output names, and the export times.
    """
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.exporters import ExportedModel, OnnxConfig, OnnxExporter
    from transformers.exporters.utils import decompose_multimodal

    t0 = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    inputs = sample_inputs(model.config, n_text=n_text)
    config = OnnxConfig(dynamic=True, ort_fusions=ort_fusions)
    exporter = OnnxExporter()

    t0 = time.perf_counter()
    exported = exporter.export_for_generation(model, dict(inputs), config)
    times = {"load_s": load_s, "export_for_generation_s": time.perf_counter() - t0}
    components = dict(exported.components)
    not_exported = [name for name in VISION_COMPONENTS if name not in components]

    if vision:
        t0 = time.perf_counter()
        captured = decompose_multimodal(model, dict(inputs))
        for name in VISION_COMPONENTS:
            submodule, kwargs = captured[name]
            components[name] = exporter.export(submodule, kwargs, config).components["model"]
        times["vision_export_s"] = time.perf_counter() - t0

    merged = ExportedModel(
        components,
        exported.export_format,
        config=exported.config,
        generation_config=exported.generation_config,
    )
    t0 = time.perf_counter()
    merged.save_pretrained(out_dir)
    times["save_s"] = time.perf_counter() - t0

    out = Path(out_dir)
    manifest = json.loads((out / "export.json").read_text())
    summary = {
        "model_dir": str(model_dir),
        "api": "transformers.exporters.OnnxExporter.export_for_generation"
        + (" + utils.decompose_multimodal/OnnxExporter.export (vision)" if vision else ""),
        "export_config": json.loads(config.to_json_string()),
        "sample_prompt_tokens": int(inputs["input_ids"].shape[1]),
        "not_exported_by_export_for_generation": not_exported,
        "times": times,
        "components": {
            name: {"file": entry["file"], **_describe_onnx(out / entry["file"])}
            for name, entry in manifest["components"].items()
        },
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------


class HFExportersRunner:
    """onnxruntime (CPU) sessions over what `export` wrote; numpy in and out, batch 1.

    prefill(inputs_embeds (1, n, d)) -> (logits (1, vocab) at the last position, cache)
    decode_step(token, cache) -> (logits (1, vocab), cache one position longer)
    """

    def __init__(self, out_dir: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.out_dir = Path(out_dir)
        manifest = json.loads((self.out_dir / "export.json").read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.sessions: dict[str, ort.InferenceSession] = {
            name: ort.InferenceSession(
                str(self.out_dir / entry["file"]), options, providers=["CPUExecutionProvider"]
            )
            for name, entry in manifest["components"].items()
        }
        missing = [name for name in LLM_COMPONENTS if name not in self.sessions]
        if missing:
            raise ValueError(f"{self.out_dir} has no {missing} component(s): not an LLaVA export")
        self.inputs = {n: [i.name for i in s.get_inputs()] for n, s in self.sessions.items()}
        self.outputs = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}
        config = json.loads((self.out_dir / "config.json").read_text())
        self.config = config
        self.image_token_id = int(config.get("image_token_index", config.get("image_token_id")))
        self._embedding: np.ndarray | None = None

    @property
    def has_vision(self) -> bool:
        return all(name in self.sessions for name in VISION_COMPONENTS)

    def _run(self, component: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.outputs[component]
        return dict(zip(names, self.sessions[component].run(names, feed), strict=True))

    # -- token merge (outside every exported graph) --------------------------------------------

    def embedding_table(self) -> np.ndarray:
        """(vocab, d) float32: the initializer `decode.onnx` gathers `input_ids` from."""
        if self._embedding is None:
            import onnx_ir

            graph = onnx_ir.load(str(self.out_dir / "decode.onnx")).graph
            for node in graph:
                if (
                    node.op_type == "Gather"
                    and node.inputs[1] is not None
                    and node.inputs[1].name == "input_ids"
                    and node.inputs[0].const_value is not None
                ):
                    self._embedding = np.ascontiguousarray(node.inputs[0].const_value.numpy())
                    break
            else:
                raise ValueError("decode.onnx has no Gather over input_ids from a constant table")
        return self._embedding

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray) -> np.ndarray:
        """input_ids (1, n) + image_features (n_img, d) or (1, n_img, d) -> inputs_embeds
        (1, n, d): text embeddings, the image features in order over the <image> positions
        (what `LlavaModel.forward` does with `masked_scatter`)."""
        table = self.embedding_table()
        ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)  # (1, n)
        embeds = table[ids]  # (1, n, d)
        mask = ids == self.image_token_id  # (1, n)
        features = np.asarray(image_features, dtype=np.float32).reshape(-1, table.shape[1])
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"{int(mask.sum())} <image> tokens but {features.shape[0]} features")
        embeds[mask] = features
        return embeds

    # -- vision (only for exports made with vision=True) ---------------------------------------

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values (1, 3, H, W) -> image features (1, n_img, d), as
        `LlavaModel.get_image_features` (single int `vision_feature_layer`)."""
        if not self.has_vision:
            raise ValueError(f"{self.out_dir} was exported without vision=True")
        layer = int(self.config.get("vision_feature_layer", -2))
        n_layers = int(self.config["vision_config"]["num_hidden_layers"])
        index = layer if layer >= 0 else n_layers + 1 + layer  # into (embeddings, layer 1, ...)
        out = self._run("image_encoder", {"pixel_values": np.asarray(pixel_values, np.float32)})
        hidden = out[f"hidden_states.{index}"]  # (1, 1 + n_img, d_vision)
        if self.config.get("vision_feature_select_strategy", "default") == "default":
            hidden = hidden[:, 1:]  # drop CLS -> (1, n_img, d_vision)
        return self._run("multi_modal_projector", {"image_features": hidden})["output"]

    # -- LLM ----------------------------------------------------------------------------------

    def prefill(self, inputs_embeds: np.ndarray) -> tuple[np.ndarray, Cache]:
        """inputs_embeds (1, n, d) -> (logits (1, vocab) at position n - 1, cache of length n)."""
        embeds = np.asarray(inputs_embeds, dtype=np.float32)
        n = embeds.shape[1]
        feed = {"inputs_embeds": embeds, "position_ids": np.arange(n, dtype=np.int64)[None]}
        out = self._run(
            "language_model", {k: v for k, v in feed.items() if k in self.inputs["language_model"]}
        )
        last = out["last_hidden_state"][:, -1:]  # (1, 1, d)
        logits = self._run("lm_head", {"input": last})["output"][:, -1]  # (1, vocab)
        cache = {k: v for k, v in out.items() if k.startswith("past_key_values.")}
        return logits, cache

    def prefill_tokens(
        self, input_ids: np.ndarray, image_features: np.ndarray
    ) -> tuple[np.ndarray, Cache]:
        """`prefill(embed(input_ids, image_features))`: the same inputs mllmc's engine takes."""
        return self.prefill(self.embed(input_ids, image_features))

    def decode_step(
        self, token: int, cache: Cache, position: int | None = None
    ) -> tuple[np.ndarray, Cache]:
        """One token at `position` (default: the cache length) -> (logits (1, vocab), cache)."""
        past = next(iter(cache.values())).shape[2]
        feed = {
            "input_ids": np.array([[token]], dtype=np.int64),
            "position_ids": np.array([[past if position is None else position]], np.int64),
        }
        feed.update({f"input.{k}": v for k, v in cache.items()})
        out = self._run("decode", {k: v for k, v in feed.items() if k in self.inputs["decode"]})
        new_cache = {
            k.removeprefix("output."): v
            for k, v in out.items()
            if k.startswith("output.past_key_values.")
        }
        return out["logits"][:, -1], new_cache


# ---------------------------------------------------------------------------------------------
# Parity check and timings
# ---------------------------------------------------------------------------------------------


def check(
    model_dir: str,
    out_dir: str | None = None,
    *,
    vision: bool = True,
    ort_fusions: str | None = None,
    decode_steps: int = 4,
    n_text: int = 30,
    threads: int | None = None,
    repeats: int = 3,
    timed_decode_tokens: int = 16,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Export, then compare the ORT graphs' last-position logits with HF eager `model(...)`
    (full recompute, no cache) for the prefill and `decode_steps` greedy decode steps, on a
    prompt of n = image_seq_length + n_text + 1 tokens (a different length from the export's
    sample, so the dynamic axes are exercised). Prints and returns parity and timings."""
    import torch
    from transformers import LlavaForConditionalGeneration

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hf_exporters_")
        out_dir = tmp.name
    summary = export(model_dir, out_dir, vision=vision, ort_fusions=ort_fusions)
    runner = HFExportersRunner(out_dir, threads=threads)

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = sample_inputs(model.config, n_text=n_text, seed=1)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]  # (1, n), (1, 3, H, W)
    features, reference, tokens = _eager_reference(model, ids, pixels, decode_steps)
    feats = features.numpy()
    parity = _parity(runner, ids.numpy(), pixels.numpy(), feats, reference, tokens, atol)
    timings = _timings(
        runner,
        model,
        ids.numpy(),
        pixels.numpy(),
        feats,
        tokens,
        threads,
        repeats,
        timed_decode_tokens,
    )
    result = {
        "export": summary["times"],
        "components": list(summary["components"]),
        "not_exported_by_export_for_generation": summary["not_exported_by_export_for_generation"],
        "parity": parity,
        "timings": timings,
    }
    print(json.dumps(result, indent=2))
    if tmp is not None:
        del runner
        tmp.cleanup()
    return result


def _eager_reference(
    model: Any, ids: Any, pixels: Any, decode_steps: int
) -> tuple[Any, list[np.ndarray], list[int]]:
    """HF eager on the prompt `ids` (1, n) and image `pixels`: (the image features (1, n_img, d)
    that LlavaModel.forward scatters over the <image> positions, the last-position logits
    (1, vocab) of the prefill and of `decode_steps` greedy steps by full recompute, the greedy
    tokens)."""
    import torch

    n = ids.shape[1]
    with torch.no_grad():
        features = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)
        reference, seq = [], ids
        for _ in range(decode_steps + 1):
            logits = model(input_ids=seq, pixel_values=pixels).logits[:, -1]  # (1, vocab)
            reference.append(logits.numpy())
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return features, reference, seq[0, n:].tolist()


def _diff(a: np.ndarray, b: np.ndarray, logits: bool = True) -> dict[str, float | bool]:
    d: dict[str, float | bool] = {
        "max_abs": float(np.abs(a - b).max()),
        "ref_max_abs": float(np.abs(b).max()),
    }
    if logits:
        d["argmax_equal"] = bool(a.argmax() == b.argmax())
    return d


def _parity(
    runner: HFExportersRunner,
    ids: np.ndarray,
    pixels: np.ndarray,
    feats: np.ndarray,
    reference: list[np.ndarray],
    tokens: list[int],
    atol: float,
) -> dict[str, Any]:
    """The ORT graphs against the eager `reference` logits: the prefill on eager's image
    `feats`, then one decode step per reference step fed eager's greedy `tokens` (and, with
    the vision graphs, their features and the prefill on them)."""
    logits, cache = runner.prefill_tokens(ids, feats)
    steps = [_diff(logits, reference[0])]
    for k in range(len(reference) - 1):
        logits, cache = runner.decode_step(tokens[k], cache)
        steps.append(_diff(logits, reference[k + 1]))
    parity: dict[str, Any] = {"prefill": steps[0], "decode": steps[1:]}
    if runner.has_vision:
        ort_feats = runner.encode_image(pixels)
        vision_logits, _ = runner.prefill_tokens(ids, ort_feats)
        parity["vision_features"] = _diff(ort_feats, feats, logits=False)
        parity["prefill_with_ort_vision"] = _diff(vision_logits, reference[0])
    worst = max(s["max_abs"] for s in [*steps, parity.get("prefill_with_ort_vision", steps[0])])
    parity["worst_logits_max_abs"] = worst
    parity["ok"] = worst <= atol and all(s["argmax_equal"] for s in steps)
    return parity


def _timings(
    runner: HFExportersRunner,
    model: Any,
    ids: np.ndarray,
    pixels: np.ndarray,
    feats: np.ndarray,
    tokens: list[int],
    threads: int,
    repeats: int,
    timed_decode_tokens: int,
) -> dict[str, Any]:
    """ORT LLM prefill on precomputed embeds and ORT decode, with HF eager for context (median
    of `repeats`, after one warm-up of each decode)."""
    import torch

    embeds = runner.embed(ids, feats)  # (1, n, d)
    _, cache = runner.prefill(embeds)

    def ort_decode() -> float:
        c, t0 = cache, time.perf_counter()
        for k in range(timed_decode_tokens):
            _, c = runner.decode_step(tokens[k % len(tokens)], c)
        return (time.perf_counter() - t0) / timed_decode_tokens

    torch_embeds = torch.from_numpy(embeds)

    @torch.no_grad()
    def eager_prefill() -> Any:
        return model(inputs_embeds=torch_embeds, use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def eager_decode() -> float:
        c = eager_prefill().past_key_values
        t0 = time.perf_counter()
        for k in range(timed_decode_tokens):
            token = torch.tensor([[tokens[k % len(tokens)]]])
            c = model(
                input_ids=token, past_key_values=c, use_cache=True, logits_to_keep=1
            ).past_key_values
        return (time.perf_counter() - t0) / timed_decode_tokens

    ort_decode()
    eager_decode()
    n = ids.shape[1]
    timings = {
        "threads": threads,
        "prompt_tokens": n,
        "visual_tokens": int(model.config.image_seq_length),
        "ort_prefill_ms": 1e3 * median_time(lambda: runner.prefill(embeds), repeats),
        "ort_prefill_tokens_ms": 1e3
        * median_time(lambda: runner.prefill_tokens(ids, feats), repeats),
        "ort_decode_ms_per_token": 1e3 * statistics.median(ort_decode() for _ in range(repeats)),
        "eager_llm_prefill_ms": 1e3 * median_time(eager_prefill, repeats),
        "eager_decode_ms_per_token": 1e3
        * statistics.median(eager_decode() for _ in range(repeats)),
        "decode_past_tokens": n,
    }
    if runner.has_vision:
        timings["ort_vision_ms"] = 1e3 * median_time(lambda: runner.encode_image(pixels), repeats)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_export = sub.add_parser("export", help="export MODEL_DIR into OUT_DIR")
    p_export.add_argument("model_dir")
    p_export.add_argument("out_dir")
    p_check = sub.add_parser("check", help="export, compare with HF eager, time")
    p_check.add_argument("model_dir")
    p_check.add_argument("--out", default=None, help="keep the export here (default: temp dir)")
    p_check.add_argument("--threads", type=int, default=None)
    p_check.add_argument("--repeats", type=int, default=3)
    p_check.add_argument("--atol", type=float, default=1e-4)
    for p in (p_export, p_check):
        p.add_argument(
            "--vision",
            action=argparse.BooleanOptionalAction,
            default=p is p_check,
            help="also export the vision tower + projector",
        )
        p.add_argument("--ort-fusions", default=None, choices=["cpu", "cuda", "webgpu", "dml"])
    args = parser.parse_args(argv)
    if args.cmd == "export":
        summary = export(
            args.model_dir, args.out_dir, vision=args.vision, ort_fusions=args.ort_fusions
        )
        print(json.dumps(summary, indent=2))
        return 0
    result = check(
        args.model_dir,
        args.out,
        vision=args.vision,
        ort_fusions=args.ort_fusions,
        threads=args.threads,
        repeats=args.repeats,
        atol=args.atol,
    )
    return 0 if result["parity"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
