"""`zooter bench` on a tiny bundle: the report's structure, the budget exit code, the plot (never the times)."""

from __future__ import annotations

import json

import pytest

from tiny import TEXTS
from zooter.cli import main


def test_bench_reports_all_engines_side_by_side(bundles, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "latency.png"
    args = ["bench", str(bundles["int8"]), "--queries", str(bundles["parity"]), "--lengths", "16", "64", "--batches", "1", "8",
            "--iters", "3", "--warmup", "1", "--threads", "1", "--json", str(out), "--plot", str(png)]
    assert main(args) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["engines"]) == {"torch", "fp32", "int8"} and report["skipped"] == {}
    assert report["engines"]["fp32"]["source"] == "re-exported from the run"
    assert all(e["cold_start_ms"] > 0 for e in report["engines"].values())
    cells = [(c["tokens_target"], c["batch"]) for c in report["cells"]]
    assert cells == [(16, 1), (64, 1), (64, 8)]
    for cell in report["cells"] + [report["queries"]]:
        assert set(cell["results"]) == {"torch", "fp32", "int8"}
        for r in cell["results"].values():
            assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["qps"] > 0 and r["n"] >= 3
    assert abs(report["cells"][1]["tokens"] - 64) <= 4 and abs(report["cells"][0]["tokens"] - 16) <= 2
    assert report["queries"]["n"] == len(set(TEXTS))  # the queries reader skips repeated lines
    ratios = report["ratios"]
    cell64 = report["cells"][1]["results"]
    assert ratios["int8_vs_torch_p50"] == pytest.approx(cell64["int8"]["p50_ms"] / cell64["torch"]["p50_ms"])
    assert ratios["fp32_vs_torch_p50"] == pytest.approx(cell64["fp32"]["p50_ms"] / cell64["torch"]["p50_ms"])
    assert "p50 vs PyTorch eager at" in table and "cold start" in table
    # A batch as route_batch runs it (each query alone) beside the padded batch it replaced.
    padded = report["cells"][2]["padded"]
    assert 0 < padded["p50_ms"] <= padded["p99_ms"] and padded["n"] >= 3 and "padded" not in report["cells"][0]
    assert "batch 8 at 64 tokens, int8: each query alone" in table and "one padded batch" in table
    inv = report["batch_invariance"]
    assert inv["n"] == report["queries"]["n"] and inv["route_batch"]["same_decision"] == inv["n"]
    assert inv["padded"]["same_decision"] < inv["n"]    # the tiny INT8 bundle's padded batches move its answers
    assert f"route_batch {inv['n']}/{inv['n']} the same decision" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_budget_and_missing_run(bundles, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--bundle", str(bundles["fp32"]), "--lengths", "16", "--batches", "1", "--iters", "2",
            "--warmup", "0", "--run", str(tmp_path / "no-run"), "--json", str(out)]
    assert main(args + ["--budget-ms", "0.001"]) == 1
    report = json.loads(out.read_text())
    assert set(report["engines"]) == {"fp32"} and "torch" in report["skipped"]
    assert report["ratios"]["int8_vs_torch_p50"] is None
    assert report["budget"]["passed"] is False and report["budget"]["engine"] == "fp32"
    assert "OVER" in capsys.readouterr().out
    assert main(args + ["--budget-ms", "1e9"]) == 0
    assert json.loads(out.read_text())["budget"]["passed"] is True


def test_read_queries(tmp_path):
    from zooter.runtime.queries import read_query_texts as read_queries

    (tmp_path / "q.txt").write_text("one\n\ntwo\n")
    assert read_queries(tmp_path / "q.txt") == ["one", "two"]
    (tmp_path / "q.jsonl").write_text('{"id": "a", "query": "x?", "rewards": {"m": 1}}\n{"question_id": 1, "turns": ["y?", "z"]}\n')
    assert read_queries(tmp_path / "q.jsonl") == ["x?", "y?"]


def test_read_queries_keeps_line_separator_characters_inside_a_query(tmp_path):
    # JSON writers leave U+0085 and U+2028 unescaped, and dcrouter has a query with U+0085: a query file
    # is split at newlines only, so such a query stays one query (found by `zooter bench --queries`).
    from zooter.runtime.queries import read_query_texts as read_queries

    texts = ["first\x85half", "a\u2028b", "plain"]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"query": t}, ensure_ascii=False) + "\r\n" for t in texts),
                                      encoding="utf-8")
    assert read_queries(tmp_path / "q.jsonl") == texts
    (tmp_path / "q.txt").write_text("one\x85line\ntwo\n", encoding="utf-8")
    assert read_queries(tmp_path / "q.txt") == ["one\x85line", "two"]


# --- the one report type every bench writes (bench/report.py) -----------------------------------------------
def test_prometheus_text_is_read_with_labels_escapes_and_sums():
    """The one reader of /metrics (Triton's, the gateway's): every bench and test uses it."""
    from zooter.bench.report import metric_samples, metric_value

    text = ('# HELP nv_inference_request_success Number of successful inference requests\n'
            '# TYPE nv_inference_request_success counter\n'
            'nv_inference_request_success{model="zooter_route",version="1"} 16\n'
            'nv_inference_request_success{model="zooter_decide",version="1"} 4\n'
            'zooter_gateway_requests_total{endpoint="/v1/chat/completions",candidate="a \\"b\\"",status="200"} 3.0\n'
            'zooter_gateway_requests_total{endpoint="/v1/chat/completions",candidate="c",status="200"} 2.0\n'
            'zooter_gateway_routing_seconds_bucket{router="r",le="+Inf"} 7.0\n'
            'zooter_gateway_in_flight_requests 0.0\n')
    samples = metric_samples(text)
    assert len(samples) == 6 and samples[0] == ("nv_inference_request_success", {"model": "zooter_route", "version": "1"}, 16.0)
    assert samples[2][1]["candidate"] == 'a "b"'
    assert metric_value(text, "zooter_gateway_requests_total", status="200") == 5.0       # summed over candidates
    assert metric_value(text, "zooter_gateway_requests_total", candidate='a "b"') == 3.0
    assert metric_value(text, "zooter_gateway_routing_seconds_bucket", le="+Inf") == 7.0
    assert metric_value(text, "zooter_gateway_in_flight_requests") == 0.0
    assert metric_value(text, "absent_total") == 0.0


def test_report_cells_tables_and_the_atomic_json_write(tmp_path, monkeypatch):
    from zooter.bench.report import Column, Table, find_cell, p50, write_json

    cells = [{"engine": "a", "concurrency": 1, "n": 0}, {"engine": "a", "concurrency": 1, "n": 3, "p50_ms": 2.0},
             {"engine": "b", "concurrency": 8, "n": 3, "p50_ms": 5.0}]
    assert p50(cells, engine="a", concurrency=1) == 2.0          # a cell that measured nothing is passed over
    assert p50(cells, engine="b", concurrency=1) is None and find_cell(cells, engine="b")["concurrency"] == 8
    table = Table(Column("engine", 8, "<"), Column("p50", 7, fmt=".2f"), Column("x", 5, fmt="+.1f"),
                  Column("note", align="<", sep="  "))
    assert table.header() == "engine       p50     x  note"
    assert table.row("a", 2.0, 0.5, "ok") == "a           2.00  +0.5  ok"
    assert table.row("b", float("nan"), "-", "") == "b            nan     -  "
    out = tmp_path / "report.json"
    write_json({"cells": cells}, out)
    assert json.loads(out.read_text()) == {"cells": cells} and out.read_text().endswith("}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]      # no temporary file left beside it

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", lambda *a, **k: "half a report")
    import os
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json({"cells": []}, out)
    assert json.loads(out.read_text()) == {"cells": cells}               # the old report stands whole
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_gateway_bench_reports_cpu_per_request_of_the_gateway_and_of_routing(bundles, tmp_path, capsys):
    """`zooter bench --gateway`: the gateway's CPU per request served and the same requests' routing CPU in
    process, per cell, in the JSON and as columns of the table (issue 24); their values are never asserted."""
    from zooter.bench.gateway import bench_gateway

    out = tmp_path / "gateway.json"
    report = bench_gateway(bundles["int8"], TEXTS, out, requests=8, rounds=2, concurrency=(1, 4), stream_clients=2,
                           stream_requests=2)
    table = capsys.readouterr().out
    saved = json.loads(out.read_text())
    cells = ["answer@1", "answer@4", "stream@1"]
    for key in ("gateway_cpu_ms_per_request", "routing_cpu_ms_per_request", "proxy_cpu_ms_per_request"):
        assert sorted(saved[key]) == sorted(cells) and all(saved[key][c] > 0 for c in cells), key
    assert saved["gateway_cpu_over_routing_ms"]["answer@1"] == pytest.approx(
        saved["gateway_cpu_ms_per_request"]["answer@1"] - saved["routing_cpu_ms_per_request"]["answer@1"])
    assert "gateway_cpu_at_answer_4_within_routing_cpu_plus_1ms" in saved["targets"]
    assert all(c["errors"] == 0 for c in saved["cells"]) and saved["soak"]["errors"] == 0
    assert report["routing_cpu_ms_per_request"] == saved["routing_cpu_ms_per_request"]
    assert "gw cpu" in table and "route cpu" in table
