"""zooter generate against a real local HTTP server: answers, failures, retries, concurrency limits, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gateway_stubs import ServerThread
from zooter.bench.openai_stub import answer_text, stub_app
from zooter.runtime.errors import UserError
from zooter.serving.candidates import parse_candidates
from zooter.serving.clients import Sampling
from zooter.training.dataset import DataError, RoutingDataset
from zooter.runtime.queries import read_queries
from zooter.training.generate import RetryPolicy, generate, journal_path, read_answers


@pytest.fixture()
def server():
    """The stub server on a free port of 127.0.0.1, each request taking 20 ms."""
    server = ServerThread(stub_app(delay_s=0.02))
    yield server.url
    server.stop()


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/stats") as response:
        return json.loads(response.read())


def candidates_file(tmp_path: Path, url: str, names, **serve_extra) -> Path:
    path = tmp_path / "candidates.yaml"
    import yaml

    items = [{"name": n, "serve": {"openai_base_url": url + "/v1", **serve_extra.get(n, {})}} for n in names]
    path.write_text(yaml.safe_dump(items))
    return path


def queries_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "queries.txt"
    path.write_text("".join(f"question number {i}: what is {i} plus {i}?\n" for i in range(n)))
    return path


def pairs_in(journal: Path) -> list[tuple[str, str]]:
    return [(r["id"], r["candidate"]) for r in map(json.loads, journal.read_text().splitlines()) if r["error"] is None]


def test_answers_failures_retries_and_limits(tmp_path, server):
    names = ["alpha", "beta-verbose", "gamma-flaky", "delta-broken", "eps-empty-paired", "zeta-missing"]
    cands = parse_candidates(
        [{"name": n, "serve": {"openai_base_url": server + "/v1", **({"max_concurrency": 1} if n == "alpha" else {})}}
         for n in names])
    queries, _ = read_queries(queries_file(tmp_path, 6))
    out = tmp_path / "answers.jsonl"
    summary = generate(queries, cands, out, sampling=Sampling(max_tokens=12), concurrency=3,
                       policy=RetryPolicy(retries=2, backoff_s=0.01), source="unit", progress=False)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [q.id for q in queries]
    first = rows[0]
    # The exact deterministic answer came back through HTTP, cut at 12 words where the server said "length".
    assert first["responses"]["alpha"] == answer_text("alpha", queries[0].text)
    assert first["responses"]["eps-empty-paired"] == ""
    assert len(first["responses"]["beta-verbose"].split()) == 12
    assert first["hit_max_tokens"] == ["beta-verbose"]
    # flaky: 503 once per prompt, then answered after one retry.
    assert first["responses"]["gamma-flaky"].startswith("gamma-flaky answers:")
    # broken (500, retryable) and missing (404, not retryable) are recorded per pair with their final error.
    assert "HTTP 500" in first["errors"]["delta-broken"] and "HTTP 404" in first["errors"]["zeta-missing"]
    assert all(v is None for v in first["rewards"].values()) and first["source"] == "unit"

    t = summary.tallies
    assert (t["alpha"].answered, t["gamma-flaky"].retried, t["eps-empty-paired"].empty) == (6, 6, 6)
    assert (t["delta-broken"].failed, t["zeta-missing"].failed, t["beta-verbose"].hit_max_tokens) == (6, 6, 6)
    assert summary.answered_total == 24 and summary.failed_total == 12
    seen = stats(server)
    assert seen["requests"]["delta-broken"] == 6 * 3  # first try + 2 retries
    assert seen["requests"]["zeta-missing"] == 6      # a 404 is never retried
    assert seen["max_in_flight"]["alpha"] == 1        # the serve entry's max_concurrency
    assert 1 < seen["max_in_flight"]["eps-empty-paired"] <= 3
    text = "\n".join(summary.lines())
    assert "delta-broken" in text and "failed:" in text

    # The answers file is an intermediate: the routing-data loader refuses it until rewards exist.
    with pytest.raises(DataError, match="every reward is null"):
        RoutingDataset.load(out)
    assert len(read_answers(out)) == 6

    # A second run asks again only the failed pairs; answers are never asked twice.
    before = stats(server)["requests"]
    again = generate(queries, cands, out, sampling=Sampling(max_tokens=12), concurrency=3,
                     policy=RetryPolicy(retries=0, backoff_s=0.01), progress=False)
    after = stats(server)["requests"]
    assert again.already_done == 24 and again.asked == 12
    assert after["alpha"] == before["alpha"] and after["delta-broken"] == before["delta-broken"] + 6


def test_queries_formats(tmp_path, data_dir):
    mt, _ = read_queries(data_dir / "mt_bench" / "question.jsonl")
    assert len(mt) == 80 and mt[0].id == "81" and mt[0].tags == ["writing"]
    assert mt[0].text.startswith("Compose an engaging travel blog post")
    plain = tmp_path / "q.txt"
    plain.write_text("hello there\n\nhello there\nsecond one\n")
    queries, repeated = read_queries(plain)
    assert [q.text for q in queries] == ["hello there", "second one"] and repeated == 1
    assert queries[0].id == read_queries(plain)[0][0].id  # stable across reads
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "query": "x"}\n{"id": "a", "query": "y"}\n')
    with pytest.raises(DataError, match=r"dup.jsonl:2: duplicate id 'a'"):
        read_queries(dup)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "body": "x"}\n')
    with pytest.raises(DataError, match="no query"):
        read_queries(bad)


def test_torn_journal_line_is_cut_and_pair_redone(tmp_path, server):
    cands = parse_candidates([{"name": n, "serve": {"openai_base_url": server + "/v1"}} for n in ("a", "b")])
    queries, _ = read_queries(queries_file(tmp_path, 3))
    out = tmp_path / "answers.jsonl"
    generate(queries, cands, out, progress=False)
    journal = journal_path(out, "pairs")
    lines = journal.read_text().splitlines(keepends=True)
    # A crash in the middle of the last write: half a record, no newline.
    journal.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    summary = generate(queries, cands, out, progress=False)
    assert summary.repaired_journal and summary.asked == 1 and summary.already_done == 5
    pairs = pairs_in(journal)
    assert len(pairs) == 6 == len(set(pairs))


def test_cli_errors(tmp_path, server, capsys):
    from zooter.cli import main

    queries = queries_file(tmp_path, 2)
    no_serve = tmp_path / "noserve.yaml"
    no_serve.write_text("- name: a\n- name: b\n")
    with pytest.raises(UserError, match=r"no serve entry"):
        from zooter.cli import build_parser

        args = build_parser().parse_args(["generate", "--queries", str(queries), "--candidates", str(no_serve), "--out", str(tmp_path / "o.jsonl")])
        args.func(args)
    assert main(["generate", "--queries", str(queries), "--candidates", str(no_serve), "--out", str(tmp_path / "o.jsonl")]) == 2
    bad_url = tmp_path / "badurl.yaml"
    bad_url.write_text("- name: a\n  serve: {openai_base_url: 'localhost:1/v1'}\n- name: b\n  serve: {triton_model: m}\n")
    assert main(["generate", "--queries", str(queries), "--candidates", str(bad_url), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "openai_base_url must start with http://" in capsys.readouterr().err
    cands = candidates_file(tmp_path, server, ["a", "b"])
    assert main(["generate", "--queries", str(queries), "--candidates", str(cands), "--out", str(tmp_path / "o.jsonl"),
                 "--candidate", "nope"]) == 2
    # A query changed under an id already answered is refused rather than mixed.
    out = tmp_path / "o.jsonl"
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"id": "x", "query": "first text"}\n')
    assert main(["generate", "--queries", str(jsonl), "--candidates", str(cands), "--out", str(out), "--no-progress"]) == 0
    jsonl.write_text('{"id": "x", "query": "other text"}\n')
    assert main(["generate", "--queries", str(jsonl), "--candidates", str(cands), "--out", str(out), "--no-progress"]) == 2


def test_kill_mid_run_then_resume(tmp_path):
    """A real `zooter generate` process is SIGKILLed mid-run; the rerun completes every pair exactly once."""
    server = subprocess.Popen([sys.executable, "-m", "zooter.cli", "stub-llm", "--delay", "0.2"],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split()[-1].removesuffix("/v1")
        n_queries, names = 24, ["a", "b", "c"]
        cands = candidates_file(tmp_path, url, names)
        queries = queries_file(tmp_path, n_queries)
        out = tmp_path / "answers.jsonl"
        journal = journal_path(out, "pairs")
        cmd = [sys.executable, "-m", "zooter.cli", "generate", "--queries", str(queries), "--candidates", str(cands),
               "--out", str(out), "--concurrency", "2", "--no-progress"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not journal.exists() or journal.read_text().count("\n") < 15):
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        kept = pairs_in(journal)
        total = n_queries * len(names)
        assert 15 <= len(kept) < total, "the kill should land mid-run"
        assert not out.exists()  # the answers file is written whole at the end, never half

        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        assert f"{len(kept)} already in the journal, {total - len(kept)} asked this run" in second.stdout
        pairs = pairs_in(journal)
        assert len(pairs) == total and len(set(pairs)) == total  # nothing lost, nothing duplicated
        rows = read_answers(out)
        assert len(rows) == n_queries and all(set(r.responses) == set(names) for r in rows)
        for row in rows:
            assert row.responses["b"] == answer_text("b", row.query)
        with urllib.request.urlopen(url + "/stats") as response:
            requests = sum(json.loads(response.read())["requests"].values())
        # Only the calls in flight at the kill (at most 2 per candidate) were asked twice.
        assert total <= requests <= total + 2 * len(names)
    finally:
        server.terminate()
        server.wait()


def test_api_key_from_environment(tmp_path, server, monkeypatch):
    queries, _ = read_queries(queries_file(tmp_path, 2))
    serve = {"openai_base_url": server + "/v1", "model": "the-private-one", "api_key_env": "ZOOTER_TEST_KEY"}
    cands = parse_candidates([{"name": "keyed", "serve": serve},
                              {"name": "keyless", "serve": {"openai_base_url": server + "/v1", "model": "private-too"}}])
    with pytest.raises(UserError, match="ZOOTER_TEST_KEY is not set"):
        generate(queries, cands, tmp_path / "a.jsonl", progress=False)
    monkeypatch.setenv("ZOOTER_TEST_KEY", "test-key")
    summary = generate(queries, cands, tmp_path / "b.jsonl", policy=RetryPolicy(retries=2, backoff_s=0.01), progress=False)
    assert summary.tallies["keyed"].answered == 2
    assert summary.tallies["keyless"].failed == 2 and "HTTP 401" in summary.failures[0][2]
    assert stats(server)["requests"]["private-too"] == 2  # a 401 is not retried


def test_retry_after_is_honoured(tmp_path, server):
    queries, _ = read_queries(queries_file(tmp_path, 2))
    cands = parse_candidates([{"name": n, "serve": {"openai_base_url": server + "/v1"}} for n in ("a", "b-limited")])
    summary = generate(queries, cands, tmp_path / "a.jsonl", policy=RetryPolicy(retries=2, backoff_s=0.01),
                       progress=False)
    limited = summary.tallies["b-limited"]
    assert limited.answered == 2 and limited.retried == 2
    # Each pair waited the server's 1 s, not the policy's ~10 ms.
    assert limited.seconds >= 2 * 1.0
