"""compile --eval-task's report (compiler/tools/precision.py): the quantized artifact's accuracy
beside its float32 twin's, in points, and the option checks made before anything compiles."""

from __future__ import annotations

import pytest

from mllmc.compiler.tools.evaluate import EvalReport
from mllmc.compiler.tools.precision import PrecisionEval, check_eval_options
from mllmc.runtime.errors import UserError


def _report(accuracy: float) -> EvalReport:
    return EvalReport(
        "artifact", "out/q", "shapes-qa heldout", 400, accuracy, {}, 90.0, 5.0, 4.0, 1.0
    )


def test_points_lost_and_gained():
    lost = PrecisionEval(_report(0.9925), _report(0.995))
    assert lost.points_lost == pytest.approx(0.25)
    assert lost.line().endswith("99.25% quantized vs 99.50% float32 (0.25 points lost)")
    gained = PrecisionEval(_report(1.0), _report(0.995))
    assert gained.line().endswith("(0.50 points gained)")
    alone = PrecisionEval(_report(0.99), None)
    assert alone.points_lost is None and alone.line().endswith("accuracy 99.00%")
    assert lost.to_json()["float_twin"]["accuracy"] == 0.995


@pytest.mark.parametrize(
    "task, n, says",
    [("vqa", None, "tasks: shapes-qa"), (None, 5, "give --eval-task"), ("shapes-qa", 0, "-n")],
)
def test_bad_eval_options(task, n, says):
    with pytest.raises(UserError, match=says):
        check_eval_options(task, n)
    check_eval_options("shapes-qa", 400)
    check_eval_options(None, None)
