"""The oracle comparison itself: tolerance relative to the logits' size, token divergence."""

from __future__ import annotations

import numpy as np

from mllmc.compiler.verify import compare


def _logits(scale: float, steps: int = 4, vocab: int = 50) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((steps, vocab))
    x[:, 7] += 3  # a clear top-1 at every step
    return (x / np.abs(x).max() * scale).astype(np.float32)


def test_tolerance_scales_with_the_logits():
    tokens = [7, 7, 7, 7]
    small = _logits(0.5)
    assert compare(tokens, small + 9e-5, tokens, small).ok  # |logits| < 1: absolute 1e-4
    assert not compare(tokens, small + 2e-4, tokens, small).ok
    big = _logits(20.0)
    report = compare(tokens, big + 1.5e-3, tokens, big)
    assert report.ok and abs(report.scale - 20.0) < 1e-3  # 1e-4 x 20 = 2e-3
    assert "logit scale 20.0" in report.line()
    assert not compare(tokens, big + 3e-3, tokens, big).ok


def test_token_divergence_fails_unless_a_near_tie():
    ref = _logits(1.0)
    assert not compare([7, 7, 3, 7], ref, [7, 7, 7, 7], ref).ok
    tie = ref.copy()
    tie[2, 3] = tie[2, 7]  # two equal top logits at step 2: either token is right
    report = compare([7, 7, 3], tie[:3], [7, 7, 7], tie[:3])
    assert report.ok and report.near_tie_step == 2
