"""What quantization costs in answers: `mllmc compile ... --quantize int4 --eval-task shapes-qa`.

The quantized artifact and a float twin (the same model and passes, compiled without --quantize
into a scratch directory) answer the same held-out items; the report gives both accuracies and
their difference in points, the measure the precision promise is stated in (docs/precision.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllmc.runtime.errors import UserError

from .evaluate import TASKS, EvalReport, check_count, evaluate


@dataclass(frozen=True)
class PrecisionEval:
    """Accuracy of an artifact and, for a quantized one, of its float twin on the same items."""

    artifact: EvalReport
    float_twin: EvalReport | None  # None: the artifact's weights are float already

    @property
    def points_lost(self) -> float | None:
        """Float accuracy minus the artifact's, in percentage points (None: no twin)."""
        if self.float_twin is None:
            return None
        return 100 * (self.float_twin.accuracy - self.artifact.accuracy)

    def line(self) -> str:
        a = self.artifact
        head = f"{a.items}, {a.n} items: accuracy {a.accuracy:.2%}"
        if self.float_twin is None or self.points_lost is None:
            return head
        lost = self.points_lost
        return (
            f"{head} quantized vs {self.float_twin.accuracy:.2%} float32 "
            f"({abs(lost):.2f} points {'lost' if lost >= 0 else 'gained'})"
        )

    def to_json(self) -> dict[str, Any]:
        def short(r: EvalReport | None) -> dict[str, Any] | None:
            if r is None:
                return None
            return {"accuracy": r.accuracy, "n": r.n, "items": r.items, "path": r.path}

        return {
            "artifact": short(self.artifact),
            "float_twin": short(self.float_twin),
            "points_lost": self.points_lost,
        }


def check_eval_options(task: str | None, n: int | None) -> None:
    """UserError for a task or item count `compile --eval-task` cannot run, before compiling."""
    if task is None:
        if n is not None:
            raise UserError("-n sets how many --eval-task items compile scores: give --eval-task")
        return
    if task not in TASKS:
        raise UserError(f"--eval-task: unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if n is not None:
        check_count(n)


def evaluate_precision(
    artifact: str | Path,
    model_dir: str | Path,
    passes: Sequence[Any],
    task: str,
    n: int,
    quantized: bool,
    progress: bool = False,
    target: str = "onnx",
) -> PrecisionEval:
    """Score `artifact` on `task`'s first `n` held-out items; when `quantized`, also a float32
    twin compiled from `model_dir` with the same `passes` for the same `target` (unvalidated: its own float
    validation is what compile checks every day) into a scratch directory."""
    from mllmc.compiler.files.outputs import scratch_directory
    from mllmc.compiler.pipeline import compile_model

    report = evaluate(artifact, task=task, n=n, progress=progress)
    if not quantized:
        return PrecisionEval(report, None)
    with scratch_directory("mllmc-float-twin-") as scratch:
        twin = Path(scratch) / "float32"
        compile_model(model_dir, twin, passes, target, validate=False, progress=False)
        float_report = evaluate(twin, task=task, n=n, progress=progress)
    return PrecisionEval(report, float_report)
