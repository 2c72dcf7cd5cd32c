"""Train the `trained-tiny-llava` preset from scratch on shapes-qa and write its shipped weights.

    nice -n 5 .venv/bin/python benchmarks/train_shapes_llava.py            # ~20 min on 2 CPU cores
    nice -n 5 .venv/bin/python benchmarks/train_shapes_llava.py --steps 50 -o /tmp/x   # smoke run

The model is built by the same code as every preset (mllmc.compiler.presets.build_model: CLIP ViT
with [CLS], feature layer -2, the "default" strategy, the GELU projector, a Llama decoder with
GQA), with random init and a tokenizer trained on the preset corpus plus every shapes-qa question
and answer word (each answer is one token). Training is teacher forcing with AdamW: the input is
exactly what the LlavaProcessor gives for the chat-template prompt (the pixel values and the
prompt ids with the 64 image tokens), followed by the answer's token and EOS; the loss is on
those two tokens only. Items are drawn fresh from the train split (compiler/shapes_qa.py), never
from the held-out split that the reported accuracies use. A curriculum mixes in one- and
two-shape scenes (shapes_qa.warmup_item) early on, a share of `--warmup-share` at step 0 falling to none
at `--curriculum` of the steps: without it the model sat at chance for 900 steps in a trial run.

At the end the weights are rounded to float16, written to OUT/trained-tiny-llava.safetensors with
OUT/trained-tiny-llava-tokenizer.json (OUT defaults to compiler/assets/, where the preset reads
them), and the held-out accuracy of the rounded model (first generated token == answer token) is
printed per question kind beside the majority-answer baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from mllmc.compiler import shapes_qa
from mllmc.compiler.presets import ASSETS, PRESETS, build_model
from mllmc.compiler.verify import processor_inputs

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
AUX_HEADS = {"kind": 1 + len(shapes_qa.SHAPES), "colour": 1 + len(shapes_qa.COLOURS)}
AUX_HEADS |= {"size": 3, "centre": 2, "x": 0, "y": 0}  # 0: a regression
COVERED = 0.25  # share of a patch a shape must cover to label it


def patch_labels_of(it: shapes_qa.Item, grid: int) -> torch.Tensor:
    """(grid * grid, len(AUX_HEADS)) int64 labels for `it`'s patches, row-major like the ViT's
    (-100: ignored)."""
    mask = np.asarray(shapes_qa.shape_mask(it))
    side = mask.shape[0] // grid
    cells = mask.reshape(grid, side, grid, side).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    counts = np.stack([(cells == i + 1).sum(1) for i in range(len(it.shapes))], 1)  # (P, shapes)
    colours = list(shapes_qa.COLOURS)
    out = torch.full((grid * grid, len(AUX_HEADS)), -100, dtype=torch.long)
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
    signal sits far below the pixels' and the model took thousands of steps to learn where
    anything is (left/right stayed at chance). The table stays trainable."""
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


class AuxHeads(torch.nn.Module):
    """Probes on the projector's output (the visual tokens the decoder reads), trained with the
    answer loss and dropped afterwards: dense supervision that makes each visual token say what
    lies under it. The shape and colour probes score a token against the decoder's own input
    embeddings of the words ("circle", "red"), as LLaVA's first stage aligns visual tokens with
    word embeddings: the question's "circle" then finds the circle's tokens by similarity."""

    def __init__(self, model, tokenizer, align: bool = True) -> None:
        super().__init__()
        self.sizes = [max(n, 1) for n in AUX_HEADS.values()]
        self.head = torch.nn.Linear(model.config.text_config.hidden_size, sum(self.sizes))
        self._embed = [model.get_input_embeddings()]  # a list: not a submodule of the probes
        self.align = align

        def ids(words) -> list[int]:
            return [tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words]

        self.word_ids = {"kind": ids(shapes_qa.SHAPES), "colour": ids(shapes_qa.COLOURS)}
        self.features: torch.Tensor | None = None
        projector = model.get_submodule("model.multi_modal_projector")
        projector.register_forward_hook(lambda _m, _i, out: setattr(self, "features", out))

    def outputs(self) -> list[torch.Tensor]:
        out = list(self.head(self.features).split(self.sizes, dim=-1))  # each (B, P, classes)
        if self.align:
            for j, name in enumerate(AUX_HEADS):
                if name in self.word_ids:
                    words = self.features @ self._embed[0].weight[self.word_ids[name]].T
                    out[j] = torch.cat([out[j][..., :1], words], dim=-1)  # background, words
        return out

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional
        total = 0.0
        for j, (out, classes) in enumerate(zip(self.outputs(), AUX_HEADS.values(), strict=True)):
            target = labels[..., j]
            if classes:
                total = total + f.cross_entropy(
                    out.flatten(0, 1), target.flatten(), ignore_index=-100
                )
            else:
                keep = target != -100
                half = shapes_qa.IMAGE_SIZE / 2
                total = total + f.mse_loss(out[..., 0][keep], target[keep].float() / half - 1)
        return total / len(AUX_HEADS)


def pretrain_vision(
    model, batcher: Batcher, aux: AuxHeads, steps: int, lr: float, rng: random.Random, t0: float
) -> None:
    """Stage 1: the vision tower and projector alone, on the dense patch labels (the decoder is
    not run), so that the decoder then starts from visual tokens that already say what and where
    each shape is — the role LLaVA's first, alignment stage plays with a pretrained CLIP."""
    cfg = model.config
    params = [*model.get_submodule("model.vision_tower").parameters()]
    params += [*model.get_submodule("model.multi_modal_projector").parameters()]
    params += [*aux.parameters(), model.get_input_embeddings().weight]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    lo, hi = shapes_qa.SPLIT_SEEDS["train"]
    running = None
    for step in range(steps):
        batch = batcher([shapes_qa.item(rng.randrange(lo, hi)) for _ in range(64)])
        model.model.get_image_features(
            pixel_values=batch["pixel_values"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        loss = aux.loss(batch["patch_labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 50 == 0:
            el = time.perf_counter() - t0
            print(f"vision {step + 1:5d}  patch {running:.4f}  {el:.0f} s", flush=True)


def loss_fn(
    model, batch: dict[str, torch.Tensor], aux: AuxHeads | None = None, aux_weight: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer loss, auxiliary patch loss); the auxiliary one is 0 without `aux`."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    ).logits  # (B, n, V)
    answer = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )
    patch = aux.loss(batch["patch_labels"]) if aux is not None and aux_weight > 0 else 0 * answer
    return answer, patch


@torch.no_grad()
def accuracy(
    model, batcher: Batcher, items: list[shapes_qa.Item], bs: int = 64
) -> dict[str, float]:
    """Held-out accuracy per kind: the greedy first answer token (after the prompt) is right."""
    model.eval()
    hits = {k: [0, 0] for k in shapes_qa.KINDS}
    for i in range(0, len(items), bs):
        chunk = items[i : i + bs]
        b = batcher(chunk)
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
    out = {k: h / max(n, 1) for k, (h, n) in hits.items()}
    out["all"] = sum(h for h, _ in hits.values()) / max(sum(n for _, n in hits.values()), 1)
    return out


def fmt(acc: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in acc.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--warmup-share", type=float, default=0.8)
    ap.add_argument("--curriculum", type=float, default=0.4)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument(
        "--aux-weight", type=float, default=1.0, help="weight of the dense patch loss (0: off)"
    )
    ap.add_argument(
        "--no-align", action="store_true", help="plain linear probes, not word-embedding ones"
    )
    ap.add_argument(
        "--turns",
        type=int,
        default=1,
        help="questions per training image: the item's own, then up to TURNS-1 more as later turns",
    )
    ap.add_argument(
        "--vision-steps",
        type=int,
        default=0,
        help="first train the vision tower + projector alone on the patch labels for this many steps",
    )
    ap.add_argument(
        "--freeze-vision",
        action="store_true",
        help="keep the vision tower fixed after --vision-steps (the projector still trains)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-items", type=int, default=400, help="held-out items for the accuracies")
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("-o", "--output", type=Path, default=ASSETS, help="folder for the weights")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    spec = replace(PRESETS[PRESET], weights=None, tokenizer_file=None)
    model, processor = build_model(spec, seed=args.seed)
    model.train()
    batcher = Batcher(processor, turns=args.turns, seed=args.seed)
    eval_batcher = Batcher(processor)
    sincos_positions(model, batcher.grid)
    aux = AuxHeads(model, processor.tokenizer, align=not args.no_align)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{PRESET}: {n_params / 1e6:.2f}M params, {args.steps} steps x {args.batch_size}",
        flush=True,
    )

    heldout = list(shapes_qa.items("heldout", args.eval_items))
    baseline = shapes_qa.majority_baseline(heldout)
    print(f"majority-answer baseline (held-out): {fmt(baseline)}", flush=True)

    named = [*model.named_parameters(), *aux.named_parameters(prefix="aux")]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(args.steps - args.warmup, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(args.seed)
    lo, hi = shapes_qa.SPLIT_SEEDS["train"]
    running = None
    history = []
    if args.vision_steps:
        pretrain_vision(model, batcher, aux, args.vision_steps, args.lr, rng, t_start)
    if args.freeze_vision:  # as LLaVA-1.5 keeps its CLIP frozen while the decoder learns
        model.get_submodule("model.vision_tower").requires_grad_(False)
    for step in range(args.steps):
        share = args.warmup_share * max(0.0, 1 - step / (args.curriculum * args.steps))
        batch = batcher(
            [
                (shapes_qa.warmup_item if rng.random() < share else shapes_qa.item)(
                    rng.randrange(lo, hi)
                )
                for _ in range(args.batch_size)
            ]
        )
        answer, patch = loss_fn(model, batch, aux, args.aux_weight)
        loss = answer + args.aux_weight * patch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        now = torch.tensor([answer.item(), patch.item()])
        running = now if running is None else 0.95 * running + 0.05 * now
        if (step + 1) % 50 == 0:
            el = time.perf_counter() - t_start
            print(
                f"step {step + 1:5d}  loss {running[0]:.4f}  patch {running[1]:.4f}  lr {sched.get_last_lr()[0]:.2e}  {el:.0f} s",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            acc = accuracy(model, eval_batcher, heldout[:200])
            history.append(
                {
                    "step": step + 1,
                    "loss": running[0].item(),
                    "patch_loss": running[1].item(),
                    **acc,
                }
            )
            print(f"  held-out (200): {fmt(acc)}", flush=True)

    train_s = time.perf_counter() - t_start
    # Ship float16: round, reload into the float32 model, and measure what the preset will hold.
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})
    acc = accuracy(model, eval_batcher, heldout)
    args.output.mkdir(parents=True, exist_ok=True)
    shipped = PRESETS[PRESET]
    save_file(state, str(args.output / shipped.weights))
    processor.tokenizer.backend_tokenizer.save(str(args.output / shipped.tokenizer_file))
    total_s = time.perf_counter() - t_start
    report = {
        "preset": PRESET,
        "params": n_params,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(total_s, 1),
        "heldout_items": len(heldout),
        "heldout_accuracy_fp16": acc,
        "majority_baseline": baseline,
        "history": history,
    }
    (args.output / f"{PRESET}-training.json").write_text(json.dumps(report, indent=2))
    print(f"held-out accuracy ({len(heldout)} items, fp16 weights): {fmt(acc)}")
    print(f"majority-answer baseline:                   {fmt(baseline)}")
    print(f"trained in {train_s / 60:.1f} min ({args.threads} threads); wrote {args.output}")


if __name__ == "__main__":
    main()
