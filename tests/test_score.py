"""zooter score with a tiny randomly initialised reward model, built and saved here, loaded by the real code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zooter.runtime.errors import UserError
from zooter.training.dataset import RoutingDataset
from zooter.training.generate import journal_path
from zooter.training.rewards import RewardModel, score_file

# A ChatML-like template, as decoder reward models ship; it closes the answer with an end-of-turn marker.
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [end]{% endfor %}")


def build_reward_model(out: Path, template: str | None = None, num_labels: int = 1) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from zooter.training.model import default_backbone

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_backbone())
    if template:
        tokenizer.chat_template = template
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=num_labels)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    return build_reward_model(tmp_path_factory.mktemp("tiny_rm"))


@pytest.fixture(scope="module")
def templated_dir(tmp_path_factory) -> Path:
    return build_reward_model(tmp_path_factory.mktemp("tiny_rm_chat"), CHAT_TEMPLATE)


def answers_file(path: Path) -> Path:
    """What `zooter generate` writes: rewards null, one failed pair, one row where every candidate failed."""
    long_answer = " ".join(["this answer goes on and on"] * 200)
    rows = [
        {"id": "q1", "query": "What is two plus two?", "rewards": {"a": None, "b": None, "c": None}, "tags": ["math"],
         "responses": {"a": "Four.", "b": "It is 4, because 2 + 2 = 4.", "c": ""}, "source": "unit"},
        {"id": "q2", "query": "Name a colour.", "rewards": {"a": None, "b": None, "c": None}, "tags": [],
         "responses": {"a": "Blue.", "b": long_answer}, "source": "unit", "errors": {"c": "HTTP 500: boom"}},
        {"id": "q3", "query": "Say hello.", "rewards": {"a": None, "b": None, "c": None}, "tags": [],
         "responses": {}, "source": "unit", "errors": {"a": "x", "b": "y", "c": "z"}},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_score(model_dir: Path, query: str, answer: str) -> float:
    """A plain transformers forward pass, independent of rewards.py, to check what it computes."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        return float(model(**tok(query, answer, return_tensors="pt")).logits[0, 0])


def test_score_writes_contract_rewards_and_reports(tmp_path, reward_dir):
    data = answers_file(tmp_path / "answers.jsonl")
    out = tmp_path / "scored.jsonl"
    model = RewardModel(reward_dir, max_length=64)
    assert model.device.type in ("cpu", "cuda") and not model.chat_template and model.max_length == 64
    summary = score_file(data, model, out, batch_size=2, progress=False)

    ds = RoutingDataset.load(out)  # the output passes the routing-data contract
    assert [r.id for r in ds] == ["q1", "q2"] and ds.candidates == ["a", "b", "c"]
    assert summary.dropped == ["q3"] and summary.unanswered == 1  # q2/c failed; q3 dropped, not counted
    assert summary.empty == 1 and summary.truncated == 1 and summary.scored == 5
    q1, q2 = ds.rows
    assert q2.rewards["c"] is None and all(isinstance(v, float) for v in q1.rewards.values())
    assert q1.rewards["b"] == pytest.approx(reference_score(reward_dir, q1.query, q1.responses["b"]), abs=1e-5)
    assert q1.rewards["a"] != q1.rewards["b"]
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert raw[0]["reward_model"] == reward_dir.name and raw[1]["errors"] == {"c": "HTTP 500: boom"}
    provenance = json.loads(out.with_name("scored.provenance.json").read_text())
    assert provenance["reward_model"]["name"] == reward_dir.name and provenance["dropped_rows"] == ["q3"]
    assert provenance["reward_model"]["architecture"] == "BertForSequenceClassification"
    report = "\n".join(summary.lines())
    assert "1 answers shortened" in report and "1 rows dropped" in report and "1 empty answers" in report

    # The over-long answer was cut to fit: scored on the first 64 tokens, query kept whole.
    encoded, cut = model.encode(q2.query, q2.responses["b"])
    assert cut and len(encoded["input_ids"]) == 64
    assert q2.rewards["b"] == pytest.approx(model.score([(q2.query, q2.responses["b"])])[0], abs=1e-5)


def test_score_resumes_after_a_crash(tmp_path, reward_dir, monkeypatch):
    data = answers_file(tmp_path / "answers.jsonl")
    out = tmp_path / "scored.jsonl"
    model = RewardModel(reward_dir, max_length=64)
    real = model.score_encoded
    calls = []

    def crash_on_second_batch(encoded):
        calls.append(len(encoded))
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(encoded)

    monkeypatch.setattr(model, "score_encoded", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        score_file(data, model, out, batch_size=2, progress=False)
    assert not out.exists()
    journal = journal_path(out, "scores")
    assert len(journal.read_text().splitlines()) == 2  # the first batch survived

    monkeypatch.setattr(model, "score_encoded", real)
    summary = score_file(data, model, out, batch_size=2, progress=False)
    assert summary.already_done == 2 and summary.scored == 3
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    keys = [(r["id"], r["candidate"]) for r in records]
    assert len(keys) == 5 == len(set(keys))
    fresh = tmp_path / "fresh.jsonl"
    score_file(data, model, fresh, batch_size=5, progress=False)
    assert RoutingDataset.load(out).rewards() == pytest.approx(RoutingDataset.load(fresh).rewards(), nan_ok=True, abs=1e-5)


def test_chat_template_is_used_and_survives_truncation(tmp_path, templated_dir):
    model = RewardModel(templated_dir, max_length=48)
    assert model.chat_template
    tok = model.tokenizer
    short, cut = model.encode("Name a colour.", "Blue.")
    assert not cut
    assert tok.decode(short["input_ids"]) == "[ user ] name a colour. [ end ] [ assistant ] blue. [ end ]"
    long, cut = model.encode("Name a colour.", " ".join(["blue and green"] * 100))
    text = tok.decode(long["input_ids"])
    assert cut and len(long["input_ids"]) <= 48
    assert text.startswith("[ user ] name a colour. [ end ] [ assistant ] blue and green")
    assert text.endswith("[ end ]")  # the closing marker is kept: the answer was shortened, not the template
    data = answers_file(tmp_path / "answers.jsonl")
    summary = score_file(data, model, tmp_path / "scored.jsonl", progress=False)
    assert summary.reward_model["chat_template"] and summary.truncated == 1


def test_cli_score_and_its_errors(tmp_path, reward_dir):
    from zooter.cli import main

    data = answers_file(tmp_path / "answers.jsonl")
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--data", str(data), "--reward-model", str(reward_dir), "--out", str(out),
                 "--name", "tiny-rm", "--no-progress"]) == 0
    assert json.loads(out.read_text().splitlines()[0])["reward_model"] == "tiny-rm"
    assert main(["score", "--data", str(data), "--reward-model", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    two = build_reward_model(tmp_path / "two_labels", num_labels=2)
    with pytest.raises(UserError, match="has 2 outputs"):
        RewardModel(two)
    assert RewardModel(two, label=1).label == 1
    # A journal from another reward model is refused instead of mixing two models' scores.
    assert main(["score", "--data", str(data), "--reward-model", str(two), "--label", "1", "--out", str(out),
                 "--no-progress"]) == 2
    not_answers = tmp_path / "plain.jsonl"
    not_answers.write_text('{"id": "a", "query": "q", "rewards": {"a": 1.0, "b": 0.0}}\n')
    assert main(["score", "--data", str(not_answers), "--reward-model", str(reward_dir), "--out", str(tmp_path / "x.jsonl")]) == 2


def test_decoder_reward_model_without_pad_token_scores_the_same_batched(tmp_path):
    """A Llama-style reward model reads its score at the last real token; with no pad token of its own,
    padding a batch must not change any pair's score."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from zooter.training.model import default_backbone

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_backbone())
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.eos_token = "[SEP]"
    tokenizer.pad_token = None
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, num_labels=1)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")

    model = RewardModel(tmp_path / "rm")
    assert model.chat_template and model.max_length == 256 and model.model.config.pad_token_id is not None
    pairs = [("Name a colour.", "Blue."), ("What is two plus two?", "It is four, since two and two make four."),
             ("Say hello.", "")]
    batched = model.score(pairs)
    alone = [model.score([pair])[0] for pair in pairs]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(v, 6) for v in batched)) == 3
