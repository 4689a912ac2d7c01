"""The `zooter` command: every subcommand has a --help, and the data commands work end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from zooter.cli import build_parser, main


def subcommand_paths(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from subcommand_paths(sub, prefix + (name,))


def test_every_subcommand_has_help(capsys):
    paths = list(subcommand_paths(build_parser()))
    assert ("data", "import") in paths and ("data", "stats") in paths
    for path in paths:
        with pytest.raises(SystemExit) as info:
            main([*path, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: zooter " + " ".join(path)), path


def test_help_shows_percent_signs_once(capsys):
    """argparse %-formats help= strings but not descriptions: '%%' belongs in the first only."""
    shown = {}
    for path in subcommand_paths(build_parser()):
        with pytest.raises(SystemExit):
            main([*path, "--help"])
        shown[path] = " ".join(capsys.readouterr().out.split())
        assert "%%" not in shown[path], path
    assert "95% interval" in shown[("eval",)] and "10% of --data" in shown[("train",)]


def test_route_prints_a_header_that_its_help_names(bundles, capsys):
    with pytest.raises(SystemExit):
        main(["route", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "[--threads N] BUNDLE [TEXT ...] zooter route" in help_text and "...] ...]" not in help_text
    columns = ["candidate", "expected_reward", "confidence", "latency_ms", "query"]
    assert all(f"{name} (" in help_text for name in columns)
    assert main(["route", str(bundles["int8"]), "What is 17 times 23?", " "]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == columns and len(lines) == 3
    assert len(lines[1].split("\t")) == len(columns) and lines[1].split("\t")[-1] == "'What is 17 times 23?'"
    assert lines[2].startswith("error\t")
    assert main(["route", str(bundles["int8"]), "--json", "What is 17 times 23?"]) == 0
    assert json.loads(capsys.readouterr().out)["line"] == 1    # --json: no header


def test_cli_starts_without_heavy_imports():
    code = "import sys; from zooter.cli import build_parser; build_parser(); " \
           "print(sorted(m for m in ('torch', 'transformers', 'tritonclient', 'optimum', 'onnx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_data_commands(data_dir, tmp_path, capsys):
    out = tmp_path / "dc.jsonl"
    assert main(["data", "import", "scores", str(data_dir / "dcrouter" / "train.json"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["data", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == 5608 and stats["tags"] == {"cluster:0": 2183, "cluster:1": 1861, "cluster:2": 1564}
    prefix = tmp_path / "dc"
    assert main(["data", "split", str(out), "--out-prefix", str(prefix)]) == 0
    sizes = {n: sum(1 for _ in open(f"{prefix}.{n}.jsonl")) for n in ("train", "dev", "test")}
    assert sum(sizes.values()) == 5608
    clean = tmp_path / "clean.jsonl"
    assert main(["data", "dedupe", f"{prefix}.test.jsonl", "--against", f"{prefix}.train.jsonl", "--out", str(clean)]) == 0
    assert sum(1 for _ in open(clean)) == sizes["test"]  # split by query hash: nothing leaks
    assert main(["data", "dedupe", f"{prefix}.test.jsonl", "--against", str(out), "--out", str(clean)]) == 0
    assert f"removed {sizes['test']} of {sizes['test']}" in capsys.readouterr().out


def test_bad_file_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "query": "", "rewards": {"x": 1, "y": 0}}\n')
    assert main(["data", "stats", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: row 'a': empty query" in err and "Traceback" not in err
    assert main(["data", "stats", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such routing-data file" in capsys.readouterr().err
