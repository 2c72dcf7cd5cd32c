"""Accuracy of a model or an artifact on visual-QA items: `mllmc eval`.

    report = evaluate("out/shortv", task="shapes-qa", n=500)           # an mllmc artifact
    report = evaluate("models/trained-tiny-llava", data="my.jsonl")    # a Hugging Face model dir
    print(report.line(), report.per_kind)

Items come from a built-in task (`shapes-qa`, compiler/data/shapes_qa.py) or a JSON-lines file with
one {"image": ..., "prompt": ..., "answer": ...} object a line ("image" is a path relative to the
file, or absolute, or a list of them for a prompt about several images; an optional "kind"
groups the accuracy). An mllmc artifact runs through the
runtime Engine (greedy, `max_new_tokens` tokens, stops at EOS); a Hugging Face directory runs HF
eager (`model.generate`, greedy) with the same chat-template prompt, so one command scores the
source model and any artifact compiled from it on the same items.

A prediction is right when its normalised text equals the normalised answer: lowercase,
punctuation replaced by spaces, the first word (`normalise`). Prefill time is the time to the
first token's logits: the image encoder plus the LLM prefill (an artifact also reports the LLM
prefill alone, which is what in-LLM passes change). Times are medians over the items.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllmc.compiler.tools.limits import MAX_ITEMS
from mllmc.runtime.engine import MAX_NEW_TOKENS
from mllmc.runtime.errors import UserError

TASKS = ("shapes-qa",)
SPLITS = ("heldout", "train")


@dataclass(frozen=True)
class EvalItem:
    """One question about one image and its expected answer."""

    image: Any  # a PIL.Image.Image, or a list of them for a prompt with several
    prompt: str
    answer: str
    kind: str = ""


@dataclass(frozen=True)
class Prediction:
    text: str  # the generated text
    prompt_tokens: int
    prefill_s: float  # image encoder + LLM prefill
    llm_prefill_s: float | None = None  # LLM prefill alone, where the runner can separate it


@dataclass(frozen=True)
class EvalReport:
    """Accuracy and timings of one model or artifact on a list of items."""

    source: str  # "artifact" or "hf"
    path: str
    items: str  # e.g. "shapes-qa heldout" or the jsonl path
    n: int
    accuracy: float
    per_kind: dict[str, float]
    mean_prompt_tokens: float
    prefill_ms: float  # median, image encoder + LLM prefill
    llm_prefill_ms: float | None  # median, LLM prefill alone (artifacts)
    seconds: float
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "path": self.path,
            "items": self.items,
            "n": self.n,
            "accuracy": self.accuracy,
            "per_kind": self.per_kind,
            "mean_prompt_tokens": self.mean_prompt_tokens,
            "prefill_ms": self.prefill_ms,
            "llm_prefill_ms": self.llm_prefill_ms,
            "seconds": self.seconds,
            "predictions": self.predictions,
        }

    def line(self) -> str:
        kinds = "  ".join(f"{k} {v:.1%}" for k, v in self.per_kind.items())
        llm = (
            f", LLM prefill {self.llm_prefill_ms:.2f} ms" if self.llm_prefill_ms is not None else ""
        )
        return (
            f"{self.source} {self.path}: accuracy {self.accuracy:.1%} on {self.n} items "
            f"({self.items}){'  [' + kinds + ']' if kinds else ''}\n"
            f"mean prompt {self.mean_prompt_tokens:.1f} tokens | prefill {self.prefill_ms:.2f} ms"
            f"{llm} (medians) | {self.seconds:.1f} s"
        )


def normalise(text: str) -> str:
    """Lowercase, punctuation to spaces, first word ('' when there is none)."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return words[0] if words else ""


# -- items ------------------------------------------------------------------------------------

MAX_LINE_BYTES = 16 * 2**20  # the longest line of a JSON-lines data file


def check_count(n: Any, option: str = "-n") -> int:
    """`n` if it is an item count one run can take (1..MAX_ITEMS), UserError otherwise."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_ITEMS:
        raise UserError(
            f"{option} must be an integer from 1 to {MAX_ITEMS} (the most items one run takes), "
            f"got {n!r}"
        )
    return n


class Items:
    """A sized, lazy sequence of items: `len()` is known up front, each item (its image
    decoded) is made only when the iteration reaches it, so a long run holds one at a time."""

    def __init__(self, count: int, make: Callable[[], Iterator[Any]]):
        self.count = count
        self._make = make

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Any]:
        return self._make()

    def map(self, fn: Callable[[Any], Any]) -> Items:
        """The same items, each passed through `fn` as the iteration reaches it."""
        return Items(self.count, lambda: map(fn, self._make()))


def task_items(task: str, n: int, split: str = "heldout") -> Items:
    """The first `n` items of a built-in task's split (made as they are iterated)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    check_count(n)
    from mllmc.compiler.data import shapes_qa

    def make() -> Iterator[EvalItem]:
        for it in shapes_qa.items(split, n):
            yield EvalItem(it.image, it.question, it.answer, it.kind)

    return Items(n, make)


MAX_IMAGES_PER_ITEM = 64


def _jsonl_rows(p: Path) -> Iterator[tuple[int, list[Path], str, str, str]]:
    """(line number, image paths, prompt, answer, kind) of each non-blank line of `p`."""
    from mllmc.runtime.jsonfile import JSONError, loads

    try:
        f = p.open("rb")
    except OSError as e:
        raise UserError(f"cannot read data file {p}: {e.strerror or e}") from None
    with f:
        lineno = 0
        while True:
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)
            except OSError as e:
                raise UserError(f"cannot read data file {p}: {e.strerror or e}") from None
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise UserError(f"{p}:{lineno}: line longer than {MAX_LINE_BYTES} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{p}:{lineno}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                row = loads(line)
                if not isinstance(row, dict):
                    raise TypeError("not a JSON object")
                image, prompt, answer = row["image"], row["prompt"], row["answer"]
                kind = row.get("kind", "")
                images = image if isinstance(image, list) else [image]
                if not 1 <= len(images) <= MAX_IMAGES_PER_ITEM:
                    raise TypeError(f"image must be a path or a list of 1 to {MAX_IMAGES_PER_ITEM}")
                if not all(isinstance(v, str) for v in (*images, prompt, answer, kind)):
                    raise TypeError("image (each), prompt, answer (and kind) must be strings")
            except (JSONError, KeyError, TypeError) as e:
                raise UserError(
                    f"{p}:{lineno}: bad line ({type(e).__name__}: {e}); each line must be "
                    '{"image": PATH or [PATH, ...], "prompt": TEXT, "answer": TEXT}'
                ) from None
            paths = [Path(i) if Path(i).is_absolute() else p.parent / i for i in images]
            yield lineno, paths, prompt, answer, kind


def jsonl_items(path: str | Path, n: int | None = None) -> Items:
    """Items of a JSON-lines file (the first `n` when given). Every line is parsed and every
    image's header read up front, so a bad line, an unreadable image or one over the pixel
    limit fails before any model runs; the images are decoded as the iteration reaches them."""
    from mllmc.runtime.preprocess import load_image, open_image

    if n is not None:
        check_count(n)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file {p} " + ("is a directory" if p.is_dir() else "not found"))
    limit = MAX_ITEMS if n is None else n
    count = 0
    for lineno, image_paths, *_ in _jsonl_rows(p):
        if count == limit:
            if n is None:
                raise UserError(
                    f"data file {p} has more than {MAX_ITEMS} items (the most one run takes); "
                    "give -n or split the file"
                )
            break
        try:
            for image_path in image_paths:
                open_image(image_path).close()
        except UserError as e:
            raise UserError(f"{p}:{lineno}: {e}") from None
        count += 1
    if not count:
        raise UserError(f"data file {p} has no items")

    def make() -> Iterator[EvalItem]:
        rows = _jsonl_rows(p)
        for _ in range(count):
            lineno, image_paths, prompt, answer, kind = next(rows)
            try:
                images = [load_image(i, exif_transpose=False) for i in image_paths]
            except UserError as e:
                raise UserError(f"{p}:{lineno}: {e}") from None
            yield EvalItem(images[0] if len(images) == 1 else images, prompt, answer, kind)

    return Items(count, make)


def write_jsonl(items: list[EvalItem], path: str | Path) -> Path:
    """Write `items` as a JSON-lines file with PNG images in a folder beside it (for sharing a
    fixed evaluation set, or for trying `--data`)."""
    p = Path(path)
    img_dir = p.parent / f"{p.stem}-images"
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, it in enumerate(items):
        name = f"{i:05d}.png"
        it.image.save(img_dir / name)
        row = {"image": f"{img_dir.name}/{name}", "prompt": it.prompt, "answer": it.answer}
        if it.kind:
            row["kind"] = it.kind
        lines.append(json.dumps(row))
    p.write_text("\n".join(lines) + "\n")
    return p


# -- runners ----------------------------------------------------------------------------------


def artifact_runner(
    path: str | Path, max_new_tokens: int, threads: int | None = None
) -> Callable[[Any, str], Prediction]:
    """Greedy generation with the runtime Engine of an mllmc artifact."""
    from mllmc.runtime import load

    engine = load(path, threads=threads)

    def run(image: Any, prompt: str) -> Prediction:
        r = engine.generate(image, prompt, max_new_tokens=max_new_tokens)
        t = r.timings
        return Prediction(r.text, r.prompt_tokens, t["vision_s"] + t["prefill_s"], t["prefill_s"])

    return run


def hf_runner(
    path: str | Path, max_new_tokens: int, threads: int | None = None
) -> Callable[[Any, str], Prediction]:
    """Greedy HF eager generation (`model.generate`) of a Hugging Face LLaVA directory; the
    prefill time is one timed forward of the prompt (image encoder included). `threads` sets
    torch's intra-op threads for the whole process."""
    import torch

    from mllmc.compiler.core.capture import load_model, load_processor, processor_inputs

    if threads:
        torch.set_num_threads(threads)
    model, _ = load_model(path)
    processor = load_processor(path)
    warned: set[str] = set()  # another family's placeholder is warned about once, not per item

    def run(image: Any, prompt: str) -> Prediction:
        inputs = processor_inputs(processor, image, prompt, warned)
        n = inputs["input_ids"].shape[1]
        with torch.no_grad():
            t0 = time.perf_counter()
            model(**inputs, use_cache=True)
            prefill_s = time.perf_counter() - t0
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        text = processor.tokenizer.decode(out[0, n:].tolist(), skip_special_tokens=True)
        return Prediction(text, n, prefill_s)

    return run


def source_kind(path: str | Path) -> str:
    """'artifact' (an mllmc artifact: manifest.json) or 'hf' (a model directory: config.json)."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p} is not a directory (an mllmc artifact or a Hugging Face model dir)")
    if (p / "manifest.json").is_file():
        return "artifact"
    if (p / "config.json").is_file():
        return "hf"
    raise UserError(f"{p} has neither manifest.json (mllmc artifact) nor config.json (HF model)")


# -- the evaluation ---------------------------------------------------------------------------


def evaluate(
    path: str | Path,
    *,
    task: str | None = None,
    data: str | Path | None = None,
    n: int | None = None,
    split: str | None = None,
    max_new_tokens: int = 4,
    threads: int | None = None,
    progress: bool = False,
    runner: Callable[[Any, str], Prediction] | None = None,
) -> EvalReport:
    """Accuracy of the artifact or HF model at `path` on `task`'s items or a `data` JSONL file.

    `split`: the task's split (default heldout); refused with `data`, which has none.
    `runner` replaces the one `path` selects (e.g. a runner that is already loaded)."""
    from tqdm.auto import tqdm

    if (task is None) == (data is None):
        raise UserError("give exactly one of --task or --data")
    if data is not None and split is not None:
        raise UserError("--split chooses a --task split; a --data file has none: drop --split")
    split = "heldout" if split is None else split
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or not 1 <= max_new_tokens <= MAX_NEW_TOKENS
    ):
        raise UserError(
            f"--max-new-tokens must be an integer from 1 to {MAX_NEW_TOKENS}, got {max_new_tokens!r}"
        )
    kind = source_kind(path)
    if task is not None:
        eval_items, label = task_items(task, 500 if n is None else n, split), f"{task} {split}"
    else:
        eval_items, label = jsonl_items(data, n), str(data)
    if runner is None:
        if kind == "artifact":
            runner = artifact_runner(path, max_new_tokens, threads)
        else:
            runner = hf_runner(path, max_new_tokens, threads)
    t0 = time.perf_counter()
    preds: list[dict[str, Any]] = []
    prefill, llm_prefill, prompt_tokens = [], [], []
    for it in tqdm(eval_items, desc="eval", unit="item", disable=not progress):
        pred = runner(it.image, it.prompt)
        got, want = normalise(pred.text), normalise(it.answer)
        preds.append(
            {
                "prompt": it.prompt,
                "answer": it.answer,
                "kind": it.kind,
                "prediction": pred.text,
                "correct": got == want,
            }  # fmt: skip
        )
        prefill.append(pred.prefill_s)
        if pred.llm_prefill_s is not None:
            llm_prefill.append(pred.llm_prefill_s)
        prompt_tokens.append(pred.prompt_tokens)
    kinds: dict[str, list[bool]] = {}
    for p in preds:
        if p["kind"]:
            kinds.setdefault(p["kind"], []).append(p["correct"])
    return EvalReport(
        source=kind,
        path=str(path),
        items=label,
        n=len(preds),
        accuracy=sum(p["correct"] for p in preds) / len(preds),
        per_kind={k: sum(v) / len(v) for k, v in kinds.items()},
        mean_prompt_tokens=sum(prompt_tokens) / len(prompt_tokens),
        prefill_ms=statistics.median(prefill) * 1e3,
        llm_prefill_ms=statistics.median(llm_prefill) * 1e3 if llm_prefill else None,
        seconds=time.perf_counter() - t0,
        predictions=preds,
    )


def calibration_samples(task: str | None, data: str | Path | None, n: int) -> Items | None:
    """(image, prompt) calibration samples from a task or a JSONL file, made as they are
    iterated; None when neither is given (the caller then uses its own default samples)."""
    if task is None and data is None:
        return None
    if task is not None and data is not None:
        raise UserError("give at most one of --task or --data")
    items = task_items(task, n, "train") if task is not None else jsonl_items(data, n)
    return items.map(lambda it: (it.image, it.prompt))
