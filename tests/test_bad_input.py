"""Bad input gets one clear line and exit status 2, never a wrong answer and never a traceback;
nothing the user had is lost or mixed (issue 10, items 2-4)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tiny import LABELS, TEXTS
from zooter.cli import main
from zooter.runtime.bundle import BundleError
from zooter.runtime.errors import SettingError


@pytest.fixture()
def bundle_copy(bundles, tmp_path):
    made = []

    def make(kind="int8") -> Path:
        made.append(kind)
        dest = tmp_path / f"copy-{kind}-{len(made)}"
        shutil.copytree(bundles[kind], dest)
        return dest
    return make


def edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "router.json").read_text())
    change(manifest)
    (bundle / "router.json").write_text(json.dumps(manifest))


# --- cost weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.5"])
def test_a_cost_weight_that_is_not_a_finite_non_negative_number_is_refused_everywhere(bundles, tmp_path, capsys, value):
    from zooter.runtime.router import Router

    number = float(value)
    assert main(["route", f"--lambda={value}", str(bundles["int8"]), "Prove that sqrt 2 is irrational"]) == 2
    err = capsys.readouterr().err
    assert "lambda must be a finite number >= 0" in err and "Traceback" not in err
    with pytest.raises(SettingError, match="lambda"):
        Router.load(bundles["int8"], lam=number)
    router = Router.load(bundles["int8"])
    with pytest.raises(SettingError, match="lambda"):
        router.route(TEXTS[0], lam=number)
    with pytest.raises(SettingError, match="lambda"):
        router.route_batch(TEXTS[:2], lam=number)
    assert main(["eval", str(bundles["int8"]), "--data", str(bundles["parity"].with_suffix(".jsonl")), f"--lambda={value}",
                 "--json", str(tmp_path / "r.json"), "--best-single", LABELS[0]]) == 2
    assert "lambda" in capsys.readouterr().err
    assert main(["export", str(bundles["run"]), "--out", str(tmp_path / "b"), f"--lambda={value}"]) == 2
    assert "lambda" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main(["triton", "build", str(bundles["int8"]), "--candidates", str(bundles["candidates"]),
                 "--out", str(tmp_path / "repo"), f"--lambda={value}"]) == 2
    assert "lambda must be a finite number >= 0" in capsys.readouterr().err and not (tmp_path / "repo").exists()


def test_router_json_cost_knobs_and_margin_must_be_finite(bundle_copy):
    from zooter.runtime.bundle import manifest_digest
    from zooter.runtime.router import Router


    for key, value in (("lambda", math.nan), ("tolerance", -0.1), ("margin", math.inf)):
        def bad(m):
            m["decision"][key] = value
            m["manifest_sha256"] = manifest_digest(m)   # even a consistently signed bad value is refused
        copy = bundle_copy()
        edit_manifest(copy, bad)
        with pytest.raises(BundleError, match=f"decision.{key} must be a finite number"):
            Router.load(copy)


# --- router.json ----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(labels=[LABELS[0]] * 4), "'labels' repeats"),
    (lambda m: m.update(labels="abcd"), "'labels' must be a list"),
    (lambda m: m.update(max_length=-5), "'max_length' must be an integer"),
    (lambda m: m.update(labels=[LABELS[1], LABELS[0], *LABELS[2:]]), "was modified after export"),
    (lambda m: m.update(files={"../escape.onnx": {"sha256": "0" * 64}}), "not a plain file name"),
    (lambda m: m.pop("manifest_sha256"), "no 'manifest_sha256'"),
])
def test_router_json_is_validated_strictly_naming_the_key(bundle_copy, capsys, change, message):
    bundle = bundle_copy()
    edit_manifest(bundle, change)
    assert main(["route", str(bundle), "hello"]) == 2
    err = capsys.readouterr().err
    assert message in err and "router.json" in err and "Traceback" not in err


def test_router_json_that_is_a_list_or_not_json(bundle_copy, capsys):
    bundle = bundle_copy()
    (bundle / "router.json").write_text("[1, 2, 3]")
    assert main(["route", str(bundle), "hello"]) == 2
    assert "expected a JSON object, got list" in capsys.readouterr().err
    (bundle / "router.json").write_bytes(b"\xff\xfe junk")
    assert main(["route", str(bundle), "hello"]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


# --- text the tokenizer cannot take ---------------------------------------------------------------------
def test_lone_surrogates_are_replaced_and_routed(bundles):
    from zooter.runtime.router import Router

    router = Router.load(bundles["int8"])
    replaced = router.route("caf\ufffd au lait")
    assert router.route("caf\udce9 au lait").candidate == replaced.candidate
    assert router.route_batch(["\ud800 lone high surrogate", TEXTS[0]])[0].candidate == router.route("\ufffd lone high surrogate").candidate


def test_route_batch_names_the_bad_row_and_checks_batch_size(bundles):
    from zooter.runtime.router import Router
    from zooter.runtime.tokenize import EmptyQueryError

    router = Router.load(bundles["int8"])
    with pytest.raises(EmptyQueryError, match="query 2: empty query"):
        router.route_batch([TEXTS[0], TEXTS[1], "  ", TEXTS[2]])
    with pytest.raises(TypeError, match="query 1: a query must be a str"):
        router.route_batch([TEXTS[0], None])
    for size in (0, -1, 1.5):
        with pytest.raises(SettingError, match="batch_size must be a positive integer"):
            router.route_batch(TEXTS[:3], batch_size=size)


@pytest.mark.parametrize("content, reason", [
    (b'{"id": "a", "query": "caf\xe9", "rewards": {"x": 1, "y": 0}}\n', "not valid UTF-8"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not valid UTF-8"),   # binary junk
    (b'{"id": "a", "query": "\\udcff", "rewards": {"x": 1, "y": 0}}\n', "lone surrogate"),
])
def test_bad_bytes_in_data_files_name_the_line(tmp_path, capsys, content, reason):
    good = b'{"id": "ok", "query": "fine", "rewards": {"x": 0.5, "y": 0.2}}\n'
    data = tmp_path / "data.jsonl"
    data.write_bytes(good + content)
    assert main(["data", "import", "jsonl", str(data), "--out", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "data.jsonl:2: " in err and reason in err and "Traceback" not in err
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--frozen"]) == 2
    err = capsys.readouterr().err
    assert "data.jsonl:2: " in err and reason in err and not (tmp_path / "run").exists()


def test_out_pointing_at_a_folder_leaves_nothing_behind(routing_files, tmp_path, capsys):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert main(["data", "import", "jsonl", str(routing_files["test"]), "--out", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert list(folder.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["a-folder"]


def test_unreadable_bundle_and_data_are_one_line_errors(bundles, routing_files):
    """Without the right to read (root gives up its override of file permissions): permission denied,
    named, exit 2."""
    base = Path(tempfile.mkdtemp(prefix="zooter-perm-"))
    try:
        os.chmod(base, 0o755)
        bundle, data = base / "bundle", base / "data.jsonl"
        shutil.copytree(bundles["int8"], bundle)
        shutil.copy(routing_files["test"], data)
        os.chmod(bundle / "router.json", 0)
        os.chmod(data, 0)
        prefix = []
        if os.geteuid() == 0:   # root reads everything: drop the capabilities that let it
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: cannot take away the right to read")
            prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
        for args, expected in ((["route", str(bundle), "hello"], "permission denied"),
                               (["data", "stats", str(data)], "permission denied")):
            done = subprocess.run([*prefix, sys.executable, "-m", "zooter.cli", *args], capture_output=True, text=True,
                                  cwd=base)
            assert done.returncode == 2, done.stderr
            assert expected in done.stderr and "Traceback" not in done.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_missing_extras_name_the_extra_to_install(bundles, routing_files, monkeypatch, capsys):
    for module in ("tritonclient", "tritonclient.http", "tritonclient.grpc", "tritonclient.utils"):
        monkeypatch.setitem(sys.modules, module, None)   # import fails as in a venv without the extra
    assert main(["route", "--triton", "127.0.0.1:9", "hello"]) == 2
    assert "pip install 'zooter[triton]'" in capsys.readouterr().err
    for module in ("torch", "torch.nn", "transformers", "accelerate"):
        monkeypatch.setitem(sys.modules, module, None)
    for module in [m for m in sys.modules if m.startswith(("zooter.training.model", "zooter.convert.int8_encoder"))]:
        monkeypatch.delitem(sys.modules, module)   # imported by earlier tests: import them afresh
    assert main(["train", "--data", str(routing_files["train"]), "--out", "/nonexistent/run", "--frozen"]) == 2
    assert "pip install 'zooter[train]'" in capsys.readouterr().err


def test_route_through_triton_refused_port_empty_and_long_text(capsys):
    from zooter.servers.tritonserver import free_port

    port = free_port()   # nothing listens there
    assert main(["route", "--triton", f"127.0.0.1:{port}", "hello"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach Triton at 127.0.0.1:{port}" in err and "Traceback" not in err
    assert main(["route", "--triton", f"127.0.0.1:{port}", "--json", "  ", "x" * 70000]) == 2
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in rows] == [1, 2]
    assert "empty text" in rows[0]["error"] and "70000 bytes is over" in rows[1]["error"]


# --- nothing lost, nothing mixed ------------------------------------------------------------------------
def test_train_refuses_an_existing_run_and_never_mixes_one(routing_files, tiny_backbone, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["train", "--data", str(routing_files["train"]), "--dev", str(routing_files["dev"]), "--out", str(out),
            "--backbone", str(tiny_backbone), "--frozen", "--epochs", "2", "--max-length", "32", "--int8-consistency", "0"]
    assert main(args) == 0
    first = (out / "head.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    assert "a trained run is already there; pass --force" in capsys.readouterr().err
    assert (out / "head.safetensors").read_bytes() == first

    # Ctrl-C while replacing it, after its first epoch was saved: the old run stays whole; the new one
    # waits in .run.partial.
    interrupt_at_epoch(monkeypatch, 2)
    assert main(args + ["--force", "--seed", "5"]) == 130
    assert (out / "head.safetensors").read_bytes() == first and json.loads((out / "run.json").read_text())["seed"] == 0
    assert (tmp_path / ".run.partial").is_dir()
    monkeypatch.undo()
    assert main(args + ["--seed", "5"]) == 2
    assert "an interrupted run" in capsys.readouterr().err
    assert main(args + ["--force", "--seed", "5"]) == 0
    assert json.loads((out / "run.json").read_text())["seed"] == 5 and not (tmp_path / ".run.partial").exists()


def interrupt_at_epoch(monkeypatch, epoch: int) -> None:
    """Ctrl-C as a head-only run scores epoch `epoch` on dev: the epochs before it are saved."""
    import zooter.training.train as loop

    real, calls = loop.routed_reward, []

    def scored(*a):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(loop, "routed_reward", scored)


def train_args(routing_files, tiny_backbone, out: Path) -> list[str]:
    return ["train", "--data", str(routing_files["train"]), "--dev", str(routing_files["dev"]), "--out", str(out),
            "--backbone", str(tiny_backbone), "--frozen", "--epochs", "2", "--max-length", "32", "--int8-consistency", "0",
            "--oof-folds", "0"]


@pytest.mark.parametrize("flags, message", [
    (["--layers", "0"], "--layers must be between 1 and 2"),
    (["--layers", "99"], "--layers must be between 1 and 2"),
    (["--train-layers", "99", "--epochs", "1"], "--train-layers must be between 0 and 2"),
])
def test_a_refused_train_writes_nothing_and_the_corrected_run_just_works(routing_files, tiny_backbone, tmp_path, capsys,
                                                                          flags, message):
    args = train_args(routing_files, tiny_backbone, tmp_path / "run")
    if "--train-layers" in flags:
        args.remove("--frozen")   # --train-layers applies to fine-tuning
        args[args.index("--int8-consistency"):args.index("--int8-consistency") + 2] = []
    assert main(args + flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []        # no .run.partial asking for a --resume
    assert main(args) == 0 and (tmp_path / "run" / "run.json").is_file()


def test_ctrl_c_before_the_first_epoch_leaves_nothing_to_resume_and_the_next_run_just_works(
        routing_files, tiny_backbone, tmp_path, capsys, monkeypatch):
    import zooter.training.embed as embed

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(embed, "embed_texts", interrupted)
    args = train_args(routing_files, tiny_backbone, tmp_path / "run")
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted before the first epoch was saved: nothing to resume" in err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert main(args + ["--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    # A partial folder without saved state (left by a kill -9 during embedding) is reused without asking.
    (tmp_path / ".run.partial").mkdir()
    (tmp_path / ".run.partial" / "config.json").write_text("{}")
    assert main(args) == 0 and not (tmp_path / ".run.partial").exists()


def test_ctrl_c_after_an_epoch_says_resume_and_resume_finishes_the_run(routing_files, tiny_backbone, tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "run"
    args = train_args(routing_files, tiny_backbone, out)
    interrupt_at_epoch(monkeypatch, 2)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "(1 epoch saved)" in err and f"zooter train --out {out} --resume" in err
    assert (tmp_path / ".run.partial" / "state.pt").is_file() and not out.exists()
    monkeypatch.undo()
    assert main(args) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "run.json").read_text())["curves"][-1]["epoch"] == 2
    assert not (tmp_path / ".run.partial").exists()


# --- a damaged run ----------------------------------------------------------------------------------
def _truncate_head(run: Path) -> str:
    head = run / "head.safetensors"
    head.write_bytes(head.read_bytes()[:300])
    return "head.safetensors: the head cannot be read: truncated or corrupt"


def _corrupt_run_json(run: Path) -> str:
    (run / "run.json").write_text('{"labels": ["alpha-7b",')
    return "run.json: not valid JSON"


def _drop_encoder(run: Path) -> str:
    shutil.rmtree(run / "encoder")
    return "encoder: missing or incomplete (no config.json)"


def _truncate_encoder(run: Path) -> str:
    weights = run / "encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    return "encoder: the encoder cannot be read: truncated or corrupt"


def _labels_not_a_list(run: Path) -> str:
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(dict(info, labels="alpha-7b")))
    return "run.json: 'labels' must be a list"


@pytest.mark.parametrize("damage", [_truncate_head, _corrupt_run_json, _drop_encoder, _truncate_encoder, _labels_not_a_list])
def test_a_damaged_run_is_one_line_for_eval_and_export(bundles, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(bundles["run"], run)
    expected = damage(run)
    data = str(bundles["parity"].with_suffix(".jsonl"))
    assert main(["eval", str(run), "--data", data, "--json", str(tmp_path / "report.json")]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(run) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(run), "--out", str(tmp_path / "bundle"), "--parity-data", str(bundles["parity"])]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --- rewards ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reward, shown", [("1e308", "1e+308"), ("-1e308", "-1e+308"), ("1000001", "1000001.0"),
                                           ("1" + "0" * 400, "beyond a float's range")])
def test_rewards_beyond_the_bound_are_refused_naming_line_and_candidate(tmp_path, capsys, reward, shown):
    data = tmp_path / "data.jsonl"
    data.write_text('{"id": "a", "query": "one", "rewards": {"x": 0.5, "y": 0.2}}\n'
                    f'{{"id": "b", "query": "two", "rewards": {{"x": 0.5, "y": {reward}}}}}\n')
    assert main(["data", "stats", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"data.jsonl:2: reward for 'y' is {shown}, outside the accepted range [-1e+06, 1e+06]" in err
    assert "Traceback" not in err


def test_eval_prints_rewards_at_the_bound_with_four_significant_digits_and_no_warnings(bundles, tmp_path, capsys):
    import re
    import warnings

    rng = __import__("random").Random(0)
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "query": text, "rewards": {
        name: rng.choice([1e6, -1e6, rng.uniform(-1e6, 1e6)]) for name in LABELS}}) + "\n" for i, text in enumerate(TEXTS)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert main(["eval", str(bundles["fp32"]), "--data", str(data), "--json", str(tmp_path / "r.json"),
                     "--best-single", LABELS[0]]) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines()[1:len(LABELS) + 5]]   # method [*] reward cost MTR
    significant = lambda text: len(re.sub(r"\D", "", text.split("e")[0]).lstrip("0"))
    assert all(significant(row[-3]) == 4 for row in table), table
    ci = re.search(r"router - best single = (\S+) \[95% CI (\S+), (\S+)\]", out).groups()
    assert all(significant(figure) == 4 for figure in ci), ci


def test_eval_of_a_candidate_scored_on_no_row_prints_no_runtime_warning(bundles, tmp_path, capsys):
    import warnings

    rows = [json.loads(line) for line in bundles["parity"].with_suffix(".jsonl").read_text().splitlines()]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(dict(row, rewards=dict(row["rewards"], **{LABELS[-1]: None}))) + "\n" for row in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert main(["eval", str(bundles["fp32"]), "--data", str(data), "--json", str(tmp_path / "r.json"),
                     "--best-single", LABELS[0]]) == 0
    unscored = [line for line in capsys.readouterr().out.splitlines() if line.startswith(LABELS[-1])]
    assert unscored and unscored[0].split()[1] == "-"


# --- JSON errors ----------------------------------------------------------------------------------------
def test_invalid_json_is_quoted_whole_with_its_column(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"id": "a", "query": "one", "rewards": {"x": 0.5, "y": 0.2}}\n'
                    '{"id": "b", "query": "tab\there", "rewards": {"x": 0.5, "y": 0.2}}\n')
    assert main(["data", "stats", str(data)]) == 2
    assert "data.jsonl:2: invalid JSON: Invalid control character at column 26\n" in capsys.readouterr().err
    data.write_text('{"id": "a", "query": "one", "rewards": {"x": 0.5, "y": 0.2},}\n')
    assert main(["data", "stats", str(data)]) == 2
    assert "data.jsonl:1: invalid JSON: Expecting property name enclosed in double quotes at column 61\n" in capsys.readouterr().err
