"""Train the `trained-tiny-llava` preset from scratch on shapes-qa and write its shipped weights.

    nice -n 5 .venv/bin/python benchmarks/train_shapes_llava.py --threads 2   # ~30 min, 2 CPU cores
    .venv/bin/python benchmarks/train_shapes_llava.py --steps 50 --scene-steps 50 \
        --distill-steps 50 -o /tmp/x                                            # smoke run

The model is built by the same code as every preset (mllmc.compiler.data.presets.build_model: CLIP ViT
with [CLS], feature layer -2, the "default" strategy, the GELU projector, a Llama decoder with
GQA), with random init and a tokenizer trained on the preset corpus plus every shapes-qa question
and answer word (each answer is one token). The inputs are exactly what the LlavaProcessor gives
for the chat-template prompt (the pixel values and the prompt ids with the 64 image tokens),
followed by the answer's token and EOS; the answer loss is on those tokens. Items are drawn fresh
from the train split (compiler/data/shapes_qa.py), never from the held-out split that the reported
accuracies use.

Trained end to end from pixels alone, the model stalls: vision and decoder have to find each other
from a one-word answer, and in every set-up tried (runs of 450 to 2400 steps; curricula, dense
patch probes, word-aligned probes, a frozen pretrained vision tower) colour stayed near 55% and
left/right at chance. So the training splits the problem in three, as LLaVA's own recipe trains
its parts in stages:

1. scene (`--scene-steps`): the decoder learns the task from *scene features*: each visual
   token replaced by a learned embedding of what the scene has under that patch (shape, colour,
   size, whether it holds the shape's centre, and the centre's x and y as a linear code), read
   from the generator's scene description. Later turns of the conversation ask more questions
   about the same image (`--turns`), which multiplies the answers per image.
2. distill (`--distill-steps`): the vision tower and projector learn to produce those scene
   features from the pixels (mean squared error per patch; the decoder is not run).
3. end to end (`--steps`): the whole model on pixels, with the answer loss and, at a smaller
   weight, the distillation loss to keep the visual tokens on the features the decoder reads.

The scene features exist only during training: the shipped model is a plain LLaVA that sees
pixels. At the end the weights are rounded to float16, written to
OUT/trained-tiny-llava.safetensors with OUT/trained-tiny-llava-tokenizer.json (OUT defaults to
compiler/data/assets/, where the preset reads them), and the held-out accuracy of the rounded model
(first generated token == answer token) is printed per question kind beside the majority-answer
baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from mllmc.compiler.core.capture import processor_inputs
from mllmc.compiler.data import shapes_qa
from mllmc.compiler.data.presets import ASSETS, PRESETS, build_model
from mllmc.compiler.tools.cli import OneLineParser

PRESET = "trained-tiny-llava"


class Batcher:
    """Turns shapes-qa items into padded training tensors with the model's own processor."""

    def __init__(self, processor, turns: int = 1, seed: int = 0) -> None:
        self.processor = processor
        self.turns = turns
        self.rng = random.Random(seed)
        self._turn_ids: dict[str, list[int]] = {}
        self.tokenizer = processor.tokenizer
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id
        ip = processor.image_processor
        self.grid = ip.crop_size["height"] // processor.patch_size
        self._prompt_ids: dict[str, list[int]] = {}
        self.answer_id = {}
        for word in shapes_qa.ANSWER_WORDS:
            ids = self.tokenizer.encode(" " + word, add_special_tokens=False)
            if len(ids) != 1:
                raise SystemExit(
                    f"answer {word!r} is {len(ids)} tokens; the tokenizer must spell it as one"
                )
            self.answer_id[word] = ids[0]

    def prompt_ids(self, image, question: str) -> list[int]:
        # The prompt ids depend on the question only (the image adds a fixed 64-token span).
        if question not in self._prompt_ids:
            inputs = processor_inputs(self.processor, image, question)
            self._prompt_ids[question] = inputs["input_ids"][0].tolist()
        return self._prompt_ids[question]

    def turn_ids(self, question: str) -> list[int]:
        """A later turn of the conversation: "USER: <question> ASSISTANT:" (no image)."""
        if question not in self._turn_ids:
            text = f"USER: {question} ASSISTANT:"
            self._turn_ids[question] = self.tokenizer.encode(text, add_special_tokens=False)
        return self._turn_ids[question]

    def __call__(self, items: list[shapes_qa.Item]) -> dict[str, torch.Tensor]:
        patch_labels = torch.stack([patch_labels_of(it, self.grid) for it in items])
        pixel_values = self.processor.image_processor(
            images=[it.image for it in items], return_tensors="pt"
        )["pixel_values"]  # (B, 3, 128, 128)
        seqs, prompt_lens, answer_at = [], [], []
        for it in items:
            p = self.prompt_ids(it.image, it.question)
            seq = p + [self.answer_id[it.answer], self.eos]
            at = [len(p)]
            if self.turns > 1:  # more questions about the same image, as later turns
                others = [q for q in shapes_qa.scene_questions(it.shapes) if q[1] != it.question]
                for _, question, answer in self.rng.sample(
                    others, min(self.turns - 1, len(others))
                ):
                    seq += self.turn_ids(question)
                    at.append(len(seq))
                    seq += [self.answer_id[answer], self.eos]
            seqs.append(seq)
            prompt_lens.append(len(p))
            answer_at.append(at)
        n = max(len(s) for s in seqs)
        input_ids = torch.full((len(items), n), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(items), n), dtype=torch.long)
        labels = torch.full((len(items), n), -100, dtype=torch.long)
        for i, (s, at) in enumerate(zip(seqs, answer_at, strict=True)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention_mask[i, : len(s)] = 1
            for a in at:  # each answer token + its EOS
                labels[i, a : a + 2] = torch.tensor(s[a : a + 2])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "labels": labels,
            "prompt_lens": torch.tensor(prompt_lens),
            "patch_labels": patch_labels,
        }


# Dense labels per image patch, from the scene the item was drawn from: what the shape covering
# the patch is, its colour and size, whether this patch holds the shape's centre, and the centre's
# coordinates (pixels; regressed as a single number each, so that "left of" is a comparison of
# two numbers the decoder can read). Background patches are labelled as such for kind, colour and
# size and ignored for the rest; patches a shape covers only a little of are ignored everywhere.
PATCH_LABELS = {"kind": 1 + len(shapes_qa.SHAPES), "colour": 1 + len(shapes_qa.COLOURS)}
PATCH_LABELS |= {"size": 3, "centre": 2, "x": 0, "y": 0}  # 0: a coordinate in pixels, not a class
COVERED = 0.25  # share of a patch a shape must cover to label it


def patch_labels_of(it: shapes_qa.Item, grid: int) -> torch.Tensor:
    """(grid * grid, len(PATCH_LABELS)) int64 labels for `it`'s patches, row-major like the ViT's
    (-100: ignored)."""
    mask = np.asarray(shapes_qa.shape_mask(it))
    side = mask.shape[0] // grid
    cells = mask.reshape(grid, side, grid, side).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    counts = np.stack([(cells == i + 1).sum(1) for i in range(len(it.shapes))], 1)  # (P, shapes)
    colours = list(shapes_qa.COLOURS)
    out = torch.full((grid * grid, len(PATCH_LABELS)), -100, dtype=torch.long)
    for p in range(grid * grid):
        if counts[p].sum() == 0:
            out[p, :3] = 0  # background
            continue
        k = int(counts[p].argmax())
        if counts[p, k] < COVERED * side * side:
            continue
        s = it.shapes[k]
        centre = min(s.y // side, grid - 1) * grid + min(s.x // side, grid - 1)
        out[p] = torch.tensor(
            [
                1 + shapes_qa.SHAPES.index(s.kind),
                1 + colours.index(s.colour),
                1 + int(s.r >= shapes_qa.LARGE_RADIUS[0]),
                int(p == centre),
                s.x,
                s.y,
            ]
        )
    return out


def sincos_positions(model, grid: int) -> None:
    """Initialise the ViT's learned position embeddings with a 2-D sine-cosine table (as MAE
    does), at the scale of the patch embeddings: with the default small random init the position
    signal sits far below the pixels' (a linear probe for where a shape is stayed at its prior
    over the first 125 steps; with the table it did not). The table stays trainable."""
    emb = model.get_submodule("model.vision_tower").embeddings
    dim = emb.position_embedding.weight.shape[1]
    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        angle = coord[:, None].float() * freq[None]
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, dim=1)  # (grid * grid, 4 * quarter)
    with torch.no_grad():
        w = emb.position_embedding.weight
        w.zero_()
        w[1:, : table.shape[1]] = table  # row 0 is [CLS]'s


class SceneFeatures(torch.nn.Module):
    """What the scene has under each patch, as a visual token: a sum of learned embeddings of
    the patch labels (shape, colour, size, centre) plus the shape centre's x and y times two
    learned directions. Background and ignored patches share one vector."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        classes = [n for n in PATCH_LABELS.values() if n]
        self.tables = torch.nn.ModuleList(torch.nn.Embedding(n, hidden) for n in classes)
        for t in self.tables:
            torch.nn.init.normal_(t.weight, std=1.0)
        self.xy = torch.nn.Parameter(torch.randn(2, hidden))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # (B, P, heads) -> (B, P, hidden)
        out = sum(t(labels[..., j].clamp(min=0)) for j, t in enumerate(self.tables))
        half = shapes_qa.IMAGE_SIZE / 2
        for j, direction in zip((4, 5), self.xy, strict=True):
            v = labels[..., j]
            coord = torch.where(v == -100, 0.0, v.float() / half - 1)
            out = out + coord[..., None] * direction
        return out


class Projector:
    """Hooks the projector's output: keeps it (`features`) and, while `scene` is set, replaces
    it with the scene features of `labels` (stage 1)."""

    def __init__(self, model) -> None:
        self.features: torch.Tensor | None = None
        self.scene: SceneFeatures | None = None
        self.labels: torch.Tensor | None = None
        model.get_submodule("model.multi_modal_projector").register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, out: torch.Tensor) -> torch.Tensor:
        self.features = out
        if self.scene is not None:
            return self.scene(self.labels).to(out.dtype)
        return out


def distill_loss(features: torch.Tensor, scene: SceneFeatures, labels: torch.Tensor):
    """Mean squared error between the visual tokens and the scene features, on labelled patches
    (the ones a shape barely covers are left free)."""
    keep = labels[..., 0] != -100
    with torch.no_grad():
        target = scene(labels)
    return torch.nn.functional.mse_loss(features[keep], target[keep])


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    ).logits  # (B, n, V)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )


def schedule(opt, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to 5% of the peak."""

    def at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(steps - warmup, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, at)


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = list(params)
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n and "tables" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n and "tables" not in n)]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


@torch.no_grad()
def accuracy(
    model,
    batcher: Batcher,
    items: list[shapes_qa.Item],
    projector: Projector | None = None,
    scene: SceneFeatures | None = None,
    bs: int = 64,
) -> dict[str, float]:
    """Held-out accuracy per kind: the greedy first answer token (after the prompt) is right.
    With `projector` and `scene`, the decoder reads scene features instead of the pixels'."""
    model.eval()
    if projector is not None:
        projector.scene = scene
    hits = {k: [0, 0] for k in shapes_qa.KINDS}
    for i in range(0, len(items), bs):
        chunk = items[i : i + bs]
        b = batcher(chunk)
        if projector is not None:
            projector.labels = b["patch_labels"]
        logits = model(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            pixel_values=b["pixel_values"],
        ).logits
        pred = logits[torch.arange(len(chunk)), b["prompt_lens"] - 1].argmax(-1)
        for it, p in zip(chunk, pred.tolist(), strict=True):
            hits[it.kind][0] += int(p == batcher.answer_id[it.answer])
            hits[it.kind][1] += 1
    model.train()
    if projector is not None:
        projector.scene = None
    out = {k: h / max(n, 1) for k, (h, n) in hits.items()}
    out["all"] = sum(h for h, _ in hits.values()) / max(sum(n for _, n in hits.values()), 1)
    return out


def fmt(acc: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in acc.items())


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run = Training(args)
    run.scene_stage()
    run.distill_stage()
    run.end_to_end_stage()
    run.ship()


def parse_args() -> argparse.Namespace:
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--scene-steps", type=int, default=2000, help="stage 1: decoder on scene features"
    )
    ap.add_argument(
        "--distill-steps", type=int, default=1500, help="stage 2: vision -> scene features"
    )
    ap.add_argument("--steps", type=int, default=1500, help="stage 3: end to end on pixels")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak lr of stages 1 and 2")
    ap.add_argument("--lr-end-to-end", type=float, default=3e-4, help="peak lr of stage 3")
    ap.add_argument("--distill-weight", type=float, default=0.1, help="stage 3's distillation loss")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument(
        "--turns",
        type=int,
        default=4,
        help="questions per training image: the item's own, then up to TURNS-1 more as later turns",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-items", type=int, default=400, help="held-out items for the accuracies")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("-o", "--output", type=Path, default=ASSETS, help="folder for the weights")
    return ap.parse_args()


Params = list[tuple[str, torch.nn.Parameter]]


class Training:
    """The model being trained with what its three stages share: batchers, scene features, the
    projector hook, the held-out items, the training-item draw and the accuracy history."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.perf_counter()
        spec = replace(PRESETS[PRESET], weights=None, tokenizer_file=None)
        self.model, self.processor = build_model(spec, seed=args.seed)
        self.model.train()
        self.batcher = Batcher(self.processor, turns=args.turns, seed=args.seed)
        self.eval_batcher = Batcher(self.processor)
        sincos_positions(self.model, self.batcher.grid)
        self.scene = SceneFeatures(self.model.config.text_config.hidden_size)
        self.projector = Projector(self.model)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        print(
            f"{PRESET}: {self.n_params / 1e6:.2f}M params; steps: scene {args.scene_steps}, "
            f"distill {args.distill_steps}, end to end {args.steps}; batch {args.batch_size}, "
            f"{args.turns} turns",
            flush=True,
        )
        self.heldout = list(shapes_qa.items("heldout", args.eval_items))
        self.baseline = shapes_qa.majority_baseline(self.heldout)
        print(f"majority-answer baseline (held-out): {fmt(self.baseline)}", flush=True)
        self.rng = random.Random(args.seed)
        self.history: list[dict] = []

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        """A batch of `n` items drawn fresh from the train split."""
        lo, hi = shapes_qa.SPLIT_SEEDS["train"]
        return self.batcher([shapes_qa.item(self.rng.randrange(lo, hi)) for _ in range(n)])

    def param_groups(self) -> tuple[Params, Params]:
        """(decoder parameters, vision tower + projector parameters)."""
        vision_parts = ("model.vision_tower", "model.multi_modal_projector")
        named = list(self.model.named_parameters())
        decoder = [(n, p) for n, p in named if not n.startswith(vision_parts)]
        vision = [(n, p) for n, p in named if n.startswith(vision_parts)]
        return decoder, vision

    def stage(
        self,
        name: str,
        steps: int,
        params: Params,
        lr: float,
        step_losses: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        after_step: Callable[[int], None] | None = None,
        clip: Params | None = None,
    ) -> None:
        """`steps` AdamW steps on `params`; `step_losses()` draws a batch and returns (loss to
        minimise, losses to log); the gradient norm of `clip` (default: `params`) is capped at 1."""
        opt = adamw(params, lr, self.args.weight_decay)
        sched = schedule(opt, steps, self.args.warmup)
        running = None
        for step in range(steps):
            loss, logged = step_losses()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in clip or params], 1.0)
            opt.step()
            sched.step()
            running = logged if running is None else 0.95 * running + 0.05 * logged
            if (step + 1) % 50 == 0:
                vals = "  ".join(f"{v:.4f}" for v in running.tolist())
                el = time.perf_counter() - self.t_start
                print(f"{name} {step + 1:5d}  loss {vals}  {el:.0f} s", flush=True)
            if after_step is not None:
                after_step(step)

    def scene_stage(self) -> None:
        """Stage 1: the decoder (and the scene embeddings) on scene features."""
        args, projector, scene = self.args, self.projector, self.scene

        def scene_step() -> tuple[torch.Tensor, torch.Tensor]:
            batch = self.draw(args.batch_size)
            projector.labels = batch["patch_labels"]
            loss = answer_loss(self.model, batch)
            return loss, loss.detach()[None]

        decoder, _ = self.param_groups()
        projector.scene = scene
        tables = list(scene.named_parameters(prefix="tables"))
        self.stage("scene", args.scene_steps, decoder + tables, args.lr, scene_step, clip=decoder)
        projector.scene = None
        scene.requires_grad_(False)
        if args.scene_steps:
            acc = accuracy(self.model, self.eval_batcher, self.heldout[:200], projector, scene)
            self.history.append({"stage": "scene", **acc})
            print(f"  held-out (200) with scene features: {fmt(acc)}", flush=True)

    def distill_stage(self) -> None:
        """Stage 2: vision tower + projector -> scene features (the decoder is not run)."""
        cfg = self.model.config

        def distill_step() -> tuple[torch.Tensor, torch.Tensor]:
            batch = self.draw(64)
            self.model.model.get_image_features(
                pixel_values=batch["pixel_values"],
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            )
            loss = distill_loss(self.projector.features, self.scene, batch["patch_labels"])
            return loss, loss.detach()[None]

        _, vision = self.param_groups()
        self.stage("distill", self.args.distill_steps, vision, self.args.lr, distill_step)
        if self.args.distill_steps:
            acc = accuracy(self.model, self.eval_batcher, self.heldout[:200])
            self.history.append({"stage": "distill", **acc})
            print(f"  held-out (200) from pixels: {fmt(acc)}", flush=True)

    def end_to_end_stage(self) -> None:
        """Stage 3: the whole model on pixels, the answer loss plus the weighted distill loss,
        with a held-out accuracy every `--eval-every` steps."""
        args = self.args

        def end_to_end_step() -> tuple[torch.Tensor, torch.Tensor]:
            batch = self.draw(args.batch_size)
            answer = answer_loss(self.model, batch)
            distill = distill_loss(self.projector.features, self.scene, batch["patch_labels"])
            return answer + args.distill_weight * distill, torch.stack([answer, distill]).detach()

        def evaluate_every(step: int) -> None:
            if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                acc = accuracy(self.model, self.eval_batcher, self.heldout[:200])
                self.history.append({"stage": "end-to-end", "step": step + 1, **acc})
                print(f"  held-out (200): {fmt(acc)}", flush=True)

        everything = list(self.model.named_parameters())
        self.stage(
            "end-to-end",
            args.steps,
            everything,
            args.lr_end_to_end,
            end_to_end_step,
            evaluate_every,
        )

    def ship(self) -> None:
        """Round the weights to float16, reload them into the float32 model, measure what the
        preset will hold, and write the weights, the tokenizer and the training report."""
        args, heldout = self.args, self.heldout
        train_s = time.perf_counter() - self.t_start
        state = {
            k: v.detach().to(torch.float16).contiguous() for k, v in self.model.state_dict().items()
        }
        self.model.load_state_dict({k: v.float() for k, v in state.items()})
        acc = accuracy(self.model, self.eval_batcher, heldout)
        args.output.mkdir(parents=True, exist_ok=True)
        shipped = PRESETS[PRESET]
        save_file(state, str(args.output / shipped.weights))
        self.processor.tokenizer.backend_tokenizer.save(str(args.output / shipped.tokenizer_file))
        total_s = time.perf_counter() - self.t_start
        report = {
            "preset": PRESET,
            "params": self.n_params,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "train_seconds": round(train_s, 1),
            "total_seconds": round(total_s, 1),
            "heldout_items": len(heldout),
            "heldout_accuracy_fp16": acc,
            "majority_baseline": self.baseline,
            "history": self.history,
        }
        (args.output / f"{PRESET}-training.json").write_text(json.dumps(report, indent=2))
        print(f"held-out accuracy ({len(heldout)} items, fp16 weights): {fmt(acc)}")
        print(f"majority-answer baseline:                   {fmt(self.baseline)}")
        print(f"trained in {train_s / 60:.1f} min ({args.threads} threads); wrote {args.output}")


if __name__ == "__main__":
    main()
