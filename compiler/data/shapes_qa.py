"""shapes-qa: a deterministic synthetic visual-QA task drawn with Pillow.

Each item is a 128 x 128 scene of 2-4 flat shapes (circle / square / triangle) in one of five
colours and two sizes on a light background, one shape per quadrant (placed at random inside
it: for a 16 px patch ViT each shape lies in one 4 x 4 block of patches), and one question with a
one-word answer:

    kind        question                                   answer           looks at
    colour      What colour is the circle?                 red ... purple   one small region
    count       How many squares are there?                zero ... three   the whole scene
    leftright   Is the circle left or right of the square? left / right     two regions
    largest     Which shape is largest?                     circle / ...     the whole scene

Only unambiguous questions are generated: a colour or left/right question names shapes that occur
exactly once, left/right needs a clear horizontal gap, "largest" needs one shape at least twice
the area of every other. `item(seed)` is a pure function of the seed (same seed -> same image
bytes, question and answer); the kinds cycle with the seed, so every split is balanced across
kinds. The train split draws seeds from [0, 10^7), the held-out split from [10^8, ...): disjoint.

    from mllmc.compiler.data.shapes_qa import items
    for it in items("heldout", 100):
        it.image, it.question, it.answer, it.kind      # PIL image (128x128 RGB), str, str, str

Used by `mllmc eval --task shapes-qa`, `mllmc calibrate --task shapes-qa`, the training script
benchmarks/train_shapes_llava.py and the trained-tiny-llava preset it wrote.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mllmc.runtime.errors import UserError

TASK_NAME = "shapes-qa"
IMAGE_SIZE = 128
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 195, 20),
    "purple": (140, 50, 185),
}
COUNT_WORDS = ("zero", "one", "two", "three")
KINDS = ("colour", "count", "leftright", "largest")
# radius (half the bounding box) of the two sizes, in pixels at IMAGE_SIZE
SMALL_RADIUS = (12, 16)
LARGE_RADIUS = (24, 29)
GRID = 2  # scenes are laid out on a 2 x 2 grid of 64 px cells, one shape per cell
LEFTRIGHT_MIN_GAP = 16  # pixels between the centres of the two shapes of a left/right question
BACKGROUND = (238, 238, 232)

SPLIT_SEEDS = {"train": (0, 10_000_000), "heldout": (100_000_000, 110_000_000)}

# Every word a question or an answer uses, and the words that make up the questions: the trained
# preset's tokenizer is trained on these so that each answer is one whole-word token.
ANSWER_WORDS = (*COLOURS, *COUNT_WORDS, "left", "right", *SHAPES)
QUESTION_TEMPLATES = {
    "colour": "What colour is the {shape}?",
    "count": "How many {shape}s are there?",
    "leftright": "Is the {a} left or right of the {b}?",
    "largest": "Which shape is largest?",
}


def tokenizer_corpus() -> str:
    """Every question and answer of the task as text: a tokenizer trained on it (with the preset
    corpus) spells each answer word as one token."""
    lines = [QUESTION_TEMPLATES["largest"]]
    for a in SHAPES:
        lines.append(QUESTION_TEMPLATES["colour"].format(shape=a))
        lines.append(QUESTION_TEMPLATES["count"].format(shape=a))
        lines += [QUESTION_TEMPLATES["leftright"].format(a=a, b=b) for b in SHAPES if b != a]
    lines += [f"ASSISTANT: {word}" for word in ANSWER_WORDS]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Shape:
    kind: str  # circle / square / triangle
    colour: str
    x: int  # centre, pixels
    y: int
    r: int  # half the bounding box, pixels

    @property
    def area(self) -> float:
        side = 2 * self.r
        return {"circle": 3.14159 * self.r**2, "square": side**2, "triangle": side**2 / 2}[
            self.kind
        ]


@dataclass(frozen=True)
class Item:
    """One shapes-qa example: a 128x128 RGB image, a question, its one-word answer, its kind."""

    image: Any  # PIL.Image.Image
    question: str
    answer: str
    kind: str
    seed: int
    shapes: tuple[Shape, ...] = ()  # the scene drawn in `image` (what training's dense labels use)


def _place(rng: random.Random, radii: list[int]) -> list[tuple[int, int]]:
    """Centres for shapes of radius `radii`, one per distinct cell of a GRID x GRID layout (so
    shapes never touch, and each stays inside its cell: a 2x2 block of 16 px patches)."""
    cell = IMAGE_SIZE // GRID
    cells = rng.sample(range(GRID * GRID), len(radii))
    centres = []
    for c, r in zip(cells, radii, strict=True):
        slack = cell // 2 - 1 - r
        x = (c % GRID) * cell + cell // 2 + rng.randint(-slack, slack)
        y = (c // GRID) * cell + cell // 2 + rng.randint(-slack, slack)
        centres.append((x, y))
    return centres


def _scene(rng: random.Random, kinds: list[str], large: list[bool]) -> list[Shape]:
    radii = [rng.randint(*(LARGE_RADIUS if big else SMALL_RADIUS)) for big in large]
    centres = _place(rng, radii)
    colours = [rng.choice(list(COLOURS)) for _ in kinds]
    return [
        Shape(k, c, x, y, r) for k, c, (x, y), r in zip(kinds, colours, centres, radii, strict=True)
    ]


def _draw(shapes: list[Shape] | tuple[Shape, ...], mask: bool = False) -> Any:
    """The scene as a 128 x 128 RGB image, or with `mask` as an "L" image whose pixels hold the
    index + 1 of the shape covering them (0 for background)."""
    from PIL import Image, ImageDraw

    img = (
        Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        if mask
        else (Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND))
    )
    draw = ImageDraw.Draw(img)
    for i, s in enumerate(shapes):
        box = (s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r)
        fill = i + 1 if mask else COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(
                [(s.x, s.y - s.r), (s.x + s.r, s.y + s.r), (s.x - s.r, s.y + s.r)], fill=fill
            )
    return img


def shape_mask(it: Item) -> Any:
    """Which shape of `it.shapes` covers each pixel of `it.image`: an "L" image holding the
    shape's index + 1, 0 for background (the dense labels the training script learns from)."""
    return _draw(it.shapes, mask=True)


def _question(rng: random.Random, kind: str) -> tuple[list[Shape], str, str] | None:
    """A scene and an unambiguous (question, answer) of `kind`, or None to draw again."""
    if kind == "colour":
        target = rng.choice(SHAPES)
        others = [s for s in SHAPES if s != target]
        kinds = [target] + [rng.choice(others) for _ in range(rng.randint(1, 3))]
        rng.shuffle(kinds)
        shapes = _scene(rng, kinds, [rng.random() < 0.5 for _ in kinds])
        (hit,) = [s for s in shapes if s.kind == target]
        return shapes, QUESTION_TEMPLATES["colour"].format(shape=target), hit.colour
    if kind == "count":
        target = rng.choice(SHAPES)
        count = rng.randint(0, 3)
        total = rng.randint(max(count, 2), 4)
        others = [s for s in SHAPES if s != target]
        kinds = [target] * count + [rng.choice(others) for _ in range(total - count)]
        rng.shuffle(kinds)
        shapes = _scene(rng, kinds, [rng.random() < 0.4 for _ in kinds])
        return shapes, QUESTION_TEMPLATES["count"].format(shape=target), COUNT_WORDS[count]
    if kind == "leftright":
        a, b = rng.sample(SHAPES, 2)
        (c,) = [s for s in SHAPES if s not in (a, b)]
        kinds = [a, b] + [c] * rng.randint(0, 2)
        rng.shuffle(kinds)
        shapes = _scene(rng, kinds, [rng.random() < 0.5 for _ in kinds])
        (sa,) = [s for s in shapes if s.kind == a]
        (sb,) = [s for s in shapes if s.kind == b]
        if abs(sa.x - sb.x) < LEFTRIGHT_MIN_GAP:
            return None
        answer = "left" if sa.x < sb.x else "right"
        return shapes, QUESTION_TEMPLATES["leftright"].format(a=a, b=b), answer
    if kind == "largest":
        target = rng.choice(SHAPES)
        n = rng.randint(2, 4)
        kinds = [target] + [rng.choice(SHAPES) for _ in range(n - 1)]
        large = [True] + [False] * (n - 1)
        order = list(range(n))
        rng.shuffle(order)
        shapes = _scene(rng, [kinds[i] for i in order], [large[i] for i in order])
        areas = sorted((s.area for s in shapes), reverse=True)
        biggest = max(shapes, key=lambda s: s.area)
        if areas[0] < 2 * areas[1] or biggest.kind != target:
            return None
        return shapes, QUESTION_TEMPLATES["largest"], target
    raise UserError(f"unknown shapes-qa question kind {kind!r}; kinds: {', '.join(KINDS)}")


def scene_questions(shapes: tuple[Shape, ...] | list[Shape]) -> list[tuple[str, str, str]]:
    """Every unambiguous (kind, question, answer) the task can ask about a scene, by the same
    rules as `item`: what multi-turn training asks beside an item's own question."""
    out = []
    kinds = [s.kind for s in shapes]
    single = [s for s in shapes if kinds.count(s.kind) == 1]
    for s in single:
        out.append(("colour", QUESTION_TEMPLATES["colour"].format(shape=s.kind), s.colour))
    for k in SHAPES:
        if kinds.count(k) < len(COUNT_WORDS):
            out.append(
                ("count", QUESTION_TEMPLATES["count"].format(shape=k), COUNT_WORDS[kinds.count(k)])
            )
    for sa in single:
        for sb in single:
            if sa is not sb and abs(sa.x - sb.x) >= LEFTRIGHT_MIN_GAP:
                question = QUESTION_TEMPLATES["leftright"].format(a=sa.kind, b=sb.kind)
                out.append(("leftright", question, "left" if sa.x < sb.x else "right"))
    areas = sorted((s.area for s in shapes), reverse=True)
    if len(shapes) > 1 and areas[0] >= 2 * areas[1]:
        biggest = max(shapes, key=lambda s: s.area)
        out.append(("largest", QUESTION_TEMPLATES["largest"], biggest.kind))
    return out


def item(seed: int) -> Item:
    """The shapes-qa item of `seed` (a pure function of the seed)."""
    rng = random.Random(seed)
    kind = KINDS[seed % len(KINDS)]
    while True:
        drawn = _question(rng, kind)
        if drawn is not None:
            shapes, question, answer = drawn
            return Item(_draw(shapes), question, answer, kind, seed, tuple(shapes))


def warmup_item(seed: int) -> Item:
    """An easier item that training mixes in early (a curriculum), so that the vision-to-answer
    path forms before the full task: a colour question about a scene of one or two shapes, or a
    left/right question about a scene of exactly two."""
    rng = random.Random(seed)
    while True:
        mode = rng.randrange(3)
        a, b = rng.sample(SHAPES, 2)
        kinds = [a] if mode == 0 else [a, b]
        shapes = _scene(rng, kinds, [rng.random() < 0.5 for _ in kinds])
        if mode < 2:
            question = QUESTION_TEMPLATES["colour"].format(shape=a)
            return Item(_draw(shapes), question, shapes[0].colour, "colour", seed, tuple(shapes))
        sa, sb = shapes
        if abs(sa.x - sb.x) >= LEFTRIGHT_MIN_GAP:
            question = QUESTION_TEMPLATES["leftright"].format(a=a, b=b)
            answer = "left" if sa.x < sb.x else "right"
            return Item(_draw(shapes), question, answer, "leftright", seed, tuple(shapes))


def items(split: str = "heldout", n: int = 500, start: int = 0) -> Iterator[Item]:
    """The first `n` items of `split` ("train" or "heldout"), from its `start`-th seed on."""
    if split not in SPLIT_SEEDS:
        raise UserError(f"unknown shapes-qa split {split!r}; splits: {', '.join(SPLIT_SEEDS)}")
    if n < 1:
        raise UserError(f"number of items must be >= 1, got {n}")
    lo, hi = SPLIT_SEEDS[split]
    if lo + start + n > hi:
        raise UserError(f"shapes-qa {split} split has {hi - lo} items; asked for {start + n}")
    for seed in range(lo + start, lo + start + n):
        yield item(seed)


def majority_baseline(split_items: list[Item]) -> dict[str, float]:
    """Accuracy of always answering each kind's most frequent answer, per kind and overall."""
    from collections import Counter

    out: dict[str, float] = {}
    hits = 0
    for kind in KINDS:
        answers = [it.answer for it in split_items if it.kind == kind]
        if answers:
            top = Counter(answers).most_common(1)[0][1]
            out[kind] = top / len(answers)
            hits += top
    out["all"] = hits / max(len(split_items), 1)
    return out
