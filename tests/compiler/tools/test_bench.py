"""`mllmc bench` tells the truth on a busy machine: every engine gets the same threads, each
ratio comes with its spread over rounds, untrustworthy timings are flagged, and no row shows
more than 100% of the roofline."""

from __future__ import annotations

import json

import pytest

from mllmc.compiler.tools import bench
from tests.compiler.tools.test_cli import mllmc, user_error


def test_spread_and_its_format():
    s = bench.spread([2.0, 1.0, 4.0])
    assert s == {"median": 2.0, "min": 1.0, "max": 4.0, "rel": 1.5, "rounds": 3}
    assert bench.format_spread(s) == "2.00x (1.00-4.00)"
    paired = bench.ratio_spread(
        {"rounds": {"t": [2.0, 4.0, 9.0]}, "t": 4.0},
        {"rounds": {"t": [1.0, 1.0, 3.0]}, "t": 1.0},
        "t",
    )
    assert (paired["median"], paired["min"], paired["max"]) == (3.0, 2.0, 4.0)
    assert bench.ratio_spread({"t": 6.0}, {"t": 2.0}, "t")["median"] == 3.0  # no rounds


def test_trust_verdict():
    steady = {"llm_prefill_s": [1.0, 1.05, 1.1], "decode_s_per_token": [0.1, 0.1, 0.1]}
    ok = bench.trust_verdict(steady, others_cpus=0.1, threads=2, cpus=2)
    assert ok["ok"] and ok["reasons"] == []
    busy = bench.trust_verdict(steady, others_cpus=1.6, threads=2, cpus=2)
    assert not busy["ok"] and "other processes kept 1.6 of 2 CPUs busy" in busy["reasons"][0]
    assert bench.trust_verdict(steady, others_cpus=1.5, threads=1, cpus=4)["ok"]  # spare CPUs
    noisy = bench.trust_verdict({"decode_s_per_token": [0.1, 0.3, 0.1]}, 0.0, 2, 2)
    assert noisy["reasons"] == ["decode_s_per_token varies 200% between rounds"]
    few = bench.trust_verdict({"decode_s_per_token": [0.1]}, 0.0, 2, 2)
    assert not few["ok"] and "too few" in few["reasons"][0]
    assert few["reasons"][0].endswith("(use --repeats 3 or more)")  # mllmc bench's option
    named = bench.trust_verdict({"decode_s_per_token": [0.1]}, 0.0, 2, 2, rounds_option="--rounds")
    assert named["reasons"][0].endswith("(use --rounds 3 or more)")  # a benchmark script's
    rows = {"a": {"trust": busy}, "b": {"trust": busy}, "c": {"trust": ok}}
    run = bench.run_trust(rows)
    assert not run["ok"] and run["reasons"][0].startswith("a, b: other processes")
    assert bench.run_trust({"a": {"trust": ok}})["ok"]


def test_interleaved_rounds_alternate_the_order():
    """One warm-up in order, then each round runs every engine once, every other round in the
    reverse order (a drift within a round falls on the first and the last engine alike)."""
    calls: list[str] = []

    def timer(name: str):
        return lambda: calls.append(name) or 1.0

    timers = {name: {"t": timer(name)} for name in "abc"}
    rounds = bench.interleaved_rounds(timers, 3, pause=0.0)
    assert calls == list("abcabccbaabc")
    assert rounds.times == {name: {"t": [1.0, 1.0, 1.0]} for name in "abc"}


@pytest.fixture
def frozen_heap():
    """The objects that exist already (those of every module this worker ran before) left out of
    the garbage collections the test makes and side_by_side makes: they are not the test's, and
    scanning them took seconds a collection late in a full run."""
    import gc

    gc.freeze()
    yield
    gc.unfreeze()


def test_side_by_side_reloads_engines_in_alternating_order(monkeypatch, frozen_heap):
    """Engines given as loaders are loaded LOADS times, in the given order then the reverse,
    each load's engines dropped before the next; the rounds are shared out between the loads
    (3, then 2), keep alternating their order across loads, and are pooled per row in step, so
    that round i of every row is the same moment. An Entry (HF eager) is loaded once and timed
    in every round."""
    import gc
    import weakref

    monkeypatch.setattr(bench, "interleaved_rounds", _no_pause(bench.interleaved_rounds))
    loads: list[str] = []
    alive: list[weakref.ref] = []
    calls: list[str] = []  # decode timers, in the order they ran

    class Engine:  # what an entry keeps alive until its timers have run
        pass

    def loader(name: str, seconds: float):
        def load() -> bench.Entry:
            gc.collect()
            earlier = alive[: len(alive) // 2 * 2]  # two engines a load: the earlier loads'
            assert all(ref() is None for ref in earlier), "an earlier load's engine is held"
            loads.append(name)
            engine = Engine()
            alive.append(weakref.ref(engine))
            value = seconds + 10 * (len(loads) > 2)  # the second load's engines time 10 s more
            decode = lambda: calls.append(name) or value  # noqa: E731
            return bench.Entry({"llm_prefill": lambda: 3.0, "decode": decode}, 5, 1.0, engine)

        return load

    eager = bench.Entry(
        {"llm_prefill": lambda: 3.0, "decode": lambda: calls.append("E") or 4.0}, 5, 2.0
    )
    rows = bench.side_by_side(
        {"hf_eager": eager, "a": loader("a", 1.0), "b": loader("b", 2.0)}, 5, threads=1
    )
    gc.collect()
    assert all(ref() is None for ref in alive)  # the last load's engines are dropped too
    assert loads == ["a", "b", "b", "a"]
    fwd, rev = ["E", "a", "b"], ["b", "a", "E"]
    # load 1: warm-up, rounds 0-2; load 2: warm-up, rounds 3-4 (round 3 reversed, as it follows 2)
    assert calls == fwd + fwd + rev + fwd + fwd + rev + fwd
    assert [rows[n]["loads"] for n in ("hf_eager", "a", "b")] == [1, 2, 2]
    assert rows["a"]["rounds"]["decode_s_per_token"] == [1.0, 1.0, 1.0, 11.0, 11.0]
    assert rows["b"]["rounds"]["decode_s_per_token"] == [2.0, 2.0, 2.0, 12.0, 12.0]
    assert rows["hf_eager"]["rounds"]["decode_s_per_token"] == [4.0] * 5
    assert bench.ratio_spread(rows["b"], rows["a"], "decode_s_per_token")["max"] == 2.0
    assert (rows["hf_eager"]["rss_mb"], rows["a"]["rss_mb"]) == (2.0, 1.0)
    assert 0.0 <= rows["a"]["cpus_used"] and rows["a"]["trust"]["rounds"] == 5
    loads.clear()
    bench.side_by_side({"a": loader("a", 1.0), "b": loader("b", 2.0)}, 1, threads=1)
    assert loads == ["a", "b"]  # one round: one load


def _no_pause(rounds):
    return lambda timers, repeats, pause=0.1, first=0: rounds(timers, repeats, 0.0, first)


def test_roofline_is_raised_to_a_faster_row():
    peak = {"gemm_gflops": 221.0, "mem_read_gbs": 10.0}
    assert bench.raise_roof(peak, "gemm_gflops", {"hf_eager": 50.0, "onnx": 407.0}) == "onnx"
    assert peak == {
        "gemm_gflops": 407.0,
        "gemm_gflops_measured": 221.0,
        "gemm_gflops_raised_by": "onnx",
        "mem_read_gbs": 10.0,
    }
    assert bench.raise_roof(peak, "mem_read_gbs", {"onnx": 9.0, "x": float("nan")}) is None
    assert peak["mem_read_gbs"] == 10.0
    assert "GEMM limit raised to onnx's measured 407.0" in "\n".join(bench.roofline_lines(peak))


def test_bench_report_has_threads_spread_and_trust(tiny_model_dir, tmp_path):
    """A tiny bench through the console script (2 rounds: too few to trust, so it must warn)."""
    user_error("bench", tiny_model_dir, "--threads", "4096", match="--threads must be an integer")
    out = tmp_path / "bench.json"
    proc = mllmc(
        "bench", tiny_model_dir, "--repeats", "2", "--decode-tokens", "2", "--threads", "1",
        "-o", out,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["threads"] == 1
    assert report["thread_settings"] == {
        "torch.set_num_threads": 1,
        "onnxruntime intra_op_num_threads": 1,
    }
    assert report["trust"]["ok"] is False and "too few" in report["trust"]["reasons"][0]
    assert set(report["roofline"]["gemm_gflops_by"]) == {"torch", "numpy", "onnxruntime"}
    for name, row in report["rows"].items():
        assert row["spread"]["llm_prefill_s"]["rounds"] == 2, name
        assert len(row["rounds"]["decode_s_per_token"]) == 2, name
        s = row["llm_prefill_speedup_vs_eager_spread"]
        assert s["min"] <= row["llm_prefill_speedup_vs_eager"] <= s["max"], name
        assert row["trust"]["ok"] is False, name
        assert (
            row["prefill_fraction_of_gemm_peak"] <= 1 and row["decode_fraction_of_bandwidth"] <= 1
        )
    assert "WARNING: these timings are not trustworthy" in proc.stdout
    assert "1.00x (1.00-1.00)" in proc.stdout  # eager against itself, with its range
