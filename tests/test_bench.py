"""Benchmark records: strict JSON (no NaN), memory rows with byte fields, the train bench's breakdown."""

import json

import pytest

from sae_fast.benchmarks import common
from sae_fast.benchmarks import train as train_bench


def test_record_has_no_nan():
    row = common.record("x", {}, "cpu", 1.0, float("nan"), extra={"a": float("inf"), "b": [float("nan"), 2.0]})
    assert row["reference_s"] is None and row["speedup"] is None
    assert row["extra"] == {"a": None, "b": [None, 2.0]}
    json.dumps(row, allow_nan=False)
    assert common.record("x", {}, "cpu", 2.0, 3.0)["speedup"] == pytest.approx(1.5)


def test_format_table_takes_missing_times():
    rows = [common.record("a", {}, "cpu", 1.0, 2.0), common.record("m", {}, "cpu", None, None, ours_bytes=5)]
    lines = common.format_table(rows).splitlines()
    assert len(lines) == 3 and "2.00x" in lines[1] and lines[2].split()[-3:] == ["-", "-", "-"]


def test_train_bench_rows(monkeypatch):
    """Quick sizes; the fresh-process peaks are stubbed (they are the slow part), the timing is real."""
    peaks = {"ours": 300, "reference": 900}
    monkeypatch.setattr(train_bench, "_peak", lambda which, s: peaks[which])
    monkeypatch.setattr(train_bench, "peak_rss_of", lambda code: 100)
    rows = train_bench.run(quick=True)
    json.dumps(rows, allow_nan=False)
    main = rows[0]
    pieces = main["breakdown_s"]
    assert {"encode_gemm", "topk_select", "decode", "decode_backward", "encode_backward",
            "decoder_grad_projection", "adam", "decoder_norm"} <= set(pieces)
    assert sum(pieces.values()) == pytest.approx(main["ours_s"])  # the rest closes the sum
    assert main["floor_ratio"] == pytest.approx(main["ours_s"] / main["floor_s"])
    assert main["load"]["before"]["cores"] >= 1
    solo = main["one_thread_cpu_time"]  # the load-independent view: one thread, this process's CPU time
    assert solo["floor_ratio"] == pytest.approx(solo["ours_s"] / solo["floor_s"])
    assert sum(solo["breakdown_s"].values()) == pytest.approx(solo["ours_s"])
    mem = next(r for r in rows if r["bench"] == "train-mem")
    assert mem["ours_s"] is None and mem["ours_bytes"] == 300 and mem["reference_bytes"] == 900
    assert mem["memory_ratio"] == pytest.approx(1 / 3) and mem["memory_ratio_net"] == pytest.approx(0.25)
    skipped = [r for r in rows if r.get("skipped")]
    assert skipped and all(r["reference_s"] is None and r["speedup"] is None for r in skipped)
