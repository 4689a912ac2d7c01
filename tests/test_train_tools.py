"""The k-means tagger, the LLM tag parser, and `zooter reproduce` on a tiny encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zooter.cli import main
from zooter.training.dataset import RoutingDataset
from zooter.training.tags import kmeans, nearest, parse_llm_tags


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centers = np.eye(4)[:3] * 5
    x = np.vstack([c + rng.normal(0, 0.3, size=(20, 4)) for c in centers])
    c = kmeans(x, 3, seed=0)
    assign = nearest(x, c, 1)[:, 0]
    # Each true cluster maps to one centroid, and different clusters to different centroids.
    groups = [set(assign[i * 20:(i + 1) * 20]) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3
    two = nearest(x, c, 2)
    assert two.shape == (60, 2) and (two[:, 0] != two[:, 1]).all()


def test_parse_llm_tags():
    assert parse_llm_tags("Math, Word Problems.\n") == ["llm:math", "llm:word-problems"]
    assert parse_llm_tags("a, b, c, d") == ["llm:a", "llm:b", "llm:c"]


def test_cli_tag_adds_kmeans_tags_and_reuses_centroids(routing_files, tiny_backbone, tmp_path, capsys):
    out, centroids = tmp_path / "tagged.jsonl", tmp_path / "centroids.npz"
    assert main(["tag", str(routing_files["train"]), "--out", str(out), "--k", "4", "--per-query", "2",
                 "--backbone", str(tiny_backbone), "--centroids", str(centroids)]) == 0
    data = RoutingDataset.load(out)
    for row in data.rows:
        kt = [t for t in row.tags if t.startswith("kmeans:")]
        assert len(kt) == 2 and row.tags[0].startswith("topic:")  # existing tags kept, two nearest centroids added
    assert centroids.is_file()
    assert main(["tag", str(routing_files["dev"]), "--out", str(tmp_path / "dev.jsonl"), "--replace", "--per-query", "1",
                 "--backbone", str(tiny_backbone), "--centroids", str(centroids)]) == 0
    assert "loaded from" in capsys.readouterr().out
    dev = RoutingDataset.load(tmp_path / "dev.jsonl")
    assert all(len(r.tags) == 1 and r.tags[0] in {f"kmeans:{j}" for j in range(4)} for r in dev.rows)


def test_cli_reproduce_table_and_its_default_row(routing_files, tiny_backbone, tmp_path, capsys):
    out = tmp_path / "repro"
    flags = ["--backbone", str(tiny_backbone), "--frozen", "--epochs", "5", "--lr", "0.03", "--max-length", "32"]
    assert main(["reproduce", "--data", str(routing_files["train"]), "--dev", str(routing_files["dev"]),
                 "--test", str(routing_files["test"]), "--out", str(out), "--betas", "0.5", *flags]) == 0
    table = json.loads((out / "table.json").read_text())
    assert [v["variant"] for v in table["variants"]] == ["default", "hard", "beta=1", "beta=0.3", "beta=0.5"]
    assert [v["guard"] for v in table["variants"]] == [True, False, False, False, False]
    assert sorted(p.name for p in (out / "reports").iterdir()) == ["beta0.3.json", "beta0.5.json", "beta1.json",
                                                                   "default.json", "hard.json"]
    assert not (out / "runs").exists()  # deleted once evaluated (no --keep-runs)
    assert all(v["n"] == 30 and 0 <= v["mean_reward"] <= 1 for v in table["variants"])
    for v in table["variants"]:
        lo, hi = v["vs_best_single"]["ci95"]
        assert lo <= v["vs_best_single"]["mean"] <= hi
        assert v["vs_best_single"]["mean"] == pytest.approx(v["mean_reward"] - v["best_single"])
    printed = capsys.readouterr().out
    assert "95% CI" in printed and "beta=0.5" in printed and "default" in printed

    # The default row is what `zooter train` with the same flags, then `zooter eval`, gives on the split.
    run = tmp_path / "run"
    assert main(["train", "--data", str(routing_files["train"]), "--dev", str(routing_files["dev"]), "--out", str(run),
                 *flags]) == 0
    assert main(["eval", str(run), "--data", str(routing_files["test"]), "--json", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    default = table["variants"][0]
    assert report["router"]["mean_reward"] == pytest.approx(default["mean_reward"], abs=1e-9)
    assert report["win_tie_loss_vs_best_single"] == default["win_tie_loss_vs_best_single"]
    assert default["calibration_ece"] == pytest.approx(report["calibration"]["ece"], abs=1e-9)
    assert default["confidence_ece"] == pytest.approx(report["confidence_calibration"]["ece"], abs=1e-9)


def test_cli_reproduce_cross_validation(routing_files, tiny_backbone, tmp_path):
    out = tmp_path / "cv"
    assert main(["reproduce", "--data", str(routing_files["train"]), "--folds", "3", "--out", str(out), "--backbone",
                 str(tiny_backbone), "--frozen", "--epochs", "3", "--max-length", "32", "--betas", "",
                 "--candidates", str(routing_files["candidates"])]) == 0
    table = json.loads((out / "table.json").read_text())
    # Every row is held out exactly once across the folds.
    assert table["folds"] == 3 and all(v["n"] == 120 for v in table["variants"])
    # The tolerance sweep pooled over folds is the row-weighted mean of the folds' sweeps.
    reports = [json.loads((out / "reports" / f"default-fold{f}.json").read_text()) for f in range(3)]
    default = table["variants"][0]
    n = [r["n"] for r in reports]
    for i, point in enumerate(default["pareto"]):
        assert point["mean_reward"] == pytest.approx(sum(k * r["pareto"][i]["mean_reward"] for k, r in zip(n, reports)) / 120)
        assert point["mean_cost"] == pytest.approx(sum(k * r["pareto"][i]["mean_cost"] for k, r in zip(n, reports)) / 120)
    assert default["pareto"][0]["mean_reward"] == pytest.approx(default["mean_reward"])  # tolerance 0: the router
    assert 0 <= default["calibration_ece"] <= 1


def test_llm_tagger_against_a_local_openai_compatible_endpoint(routing_files, tmp_path):
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body["model"], body["messages"][0]["content"]))
            answer = "Math, Arithmetic" if "solve" in body["messages"][0]["content"] else "writing"
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        small = tmp_path / "small.jsonl"
        RoutingDataset.load(routing_files["test"]).subset(range(6)).save(small)
        out = tmp_path / "llm.jsonl"
        assert main(["tag", str(small), "--out", str(out), "--replace", "--llm-url",
                     f"http://127.0.0.1:{server.server_port}/v1", "--llm-model", "tagger"]) == 0
    finally:
        server.shutdown()
    rows = RoutingDataset.load(out).rows
    assert len(seen) == 6 and seen[0][0] == "/v1/chat/completions" and seen[0][1] == "tagger"
    for row in rows:
        assert row.tags == (["llm:math", "llm:arithmetic"] if "solve" in row.query else ["llm:writing"])
