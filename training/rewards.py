"""Scoring answers with a reward model: the second half of building training data as the paper does.

    answers file (or any routing data with responses) --reward model--> routing data with rewards

The reward model is a Hugging Face sequence-classification model in a local folder with one output
(OpenAssistant's reward-model-deberta-v3-large-v2, Skywork-Reward-Llama-3.1-8B, ...):
  - with a chat template, the pair is rendered as [user: query, assistant: answer] by that template;
  - without one, it is the tokenizer's text pair (query, answer), as encoder reward models expect.
An answer too long for the model is shortened from its end, keeping the query and the template's
closing tokens (decoder reward models read the score at the last token); each such pair is counted.

Pairs are batched by length and run on the GPU when there is one. Scores go to an append-only journal
(`OUT` with suffix `.scores.jsonl`) after each batch, so a killed run resumes where it stopped; the
output file is written at the end. Each row records the reward model's name under "reward_model", and
`OUT` with suffix `.provenance.json` records which model, how it was run, and what was skipped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from zooter.runtime.errors import UserError
from zooter.runtime.files import write_jsonl_atomic
from zooter.training.generate import Journal, journal_path, read_answers, text_sha


class RewardModel:
    """A local sequence-classification reward model: score(pairs) -> one float per (query, answer)."""

    def __init__(self, path: str | Path, device: str = "auto", dtype: str = "auto", max_length: int | None = None,
                 label: int | None = None, name: str | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise UserError(f"reward model {self.path}: not a Hugging Face model folder (no config.json)")
        config = AutoConfig.from_pretrained(self.path)
        if label is None and config.num_labels != 1:
            raise UserError(f"reward model {self.path} has {config.num_labels} outputs; a reward model has 1 "
                            f"(pass --label INDEX to read one of them as the reward)")
        if label is not None and not 0 <= label < config.num_labels:
            raise UserError(f"--label {label} is outside the model's {config.num_labels} outputs")
        self.label = label or 0
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {device}: this torch sees no CUDA GPU (use --device cpu or auto)")
        if dtype == "auto":
            if self.device.type == "cuda":
                dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
            else:
                dtype = "float32"
        self.dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=self.dtype)
        self.model.to(self.device).eval()
        if self.tokenizer.pad_token is None:
            # Decoder reward models often ship without a pad token; batching needs one, and the model must
            # know it to find each sequence's last real token.
            self.tokenizer.pad_token = self.tokenizer.eos_token
            if self.tokenizer.pad_token is None:
                raise UserError(f"reward model {self.path}: its tokenizer has neither a pad nor an eos token to batch with")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # We pad token lists we built ourselves (to shorten answers, not queries); the "use __call__" advice does not apply.
        self.tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True
        self.chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        limits = [n for n in (max_length, getattr(config, "max_position_embeddings", None),
                              self.tokenizer.model_max_length if self.tokenizer.model_max_length < 1_000_000 else None) if n]
        # 4096 keeps an 8B decoder within memory on one GPU; --max-length raises it.
        self.max_length = int(min(limits)) if max_length else int(min(limits + [4096]))
        self.name = name or self.path.resolve().name
        self.fingerprint = _fingerprint(self.path)

    def provenance(self) -> dict:
        return {"name": self.name, "path": str(self.path.resolve()), "fingerprint": self.fingerprint,
                "architecture": (self.model.config.architectures or [type(self.model).__name__])[0],
                "chat_template": self.chat_template, "max_length": self.max_length, "label": self.label,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", "")}

    # --- encoding -------------------------------------------------------------------------------
    def _templated(self, query: str, answer: str) -> list[int]:
        messages = [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        # The rendered template already carries its special tokens (BOS included); adding them again doubles BOS.
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode(self, query: str, answer: str) -> tuple[dict, bool]:
        """Token ids for one pair, and whether the answer had to be shortened to fit max_length."""
        tok = self.tokenizer
        if self.chat_template:
            ids = self._templated(query, answer)
            if len(ids) <= self.max_length:
                return {"input_ids": ids}, False
            answer_ids = tok(answer, add_special_tokens=False, verbose=False)["input_ids"]
            keep = max(0, len(answer_ids) - (len(ids) - self.max_length) - 8)  # 8: slack for merges at the cut
            ids = self._templated(query, tok.decode(answer_ids[:keep]))
            return {"input_ids": ids[: self.max_length]}, True
        full = tok(query, answer, verbose=False)
        if len(full["input_ids"]) <= self.max_length:
            return dict(full), False
        try:
            cut = tok(query, answer, truncation="only_second", max_length=self.max_length)
        except Exception:  # the query alone is longer than the model: cut both
            cut = tok(query, answer, truncation="longest_first", max_length=self.max_length)
        if len(cut["input_ids"]) > self.max_length:
            cut = tok(query, answer, truncation="longest_first", max_length=self.max_length)
        return dict(cut), True

    def score_encoded(self, encoded: list[dict]) -> list[float]:
        import torch

        batch = self.tokenizer.pad(encoded, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            logits = self.model(**batch).logits
        return [float(v) for v in logits[:, self.label].float().cpu()]

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        return self.score_encoded([self.encode(q, a)[0] for q, a in pairs])


def _fingerprint(path: Path) -> str:
    """Config plus weight-file names and sizes: tells two reward models apart without hashing gigabytes."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return digest.hexdigest()[:16]


@dataclass
class ScoreSummary:
    rows_in: int
    rows_out: int
    pairs: int
    already_done: int
    scored: int
    truncated: int
    empty: int
    unanswered: int
    dropped: list[str]
    seconds: float
    out: Path
    provenance: Path
    reward_model: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        rate = self.scored / self.seconds if self.seconds > 0 else 0.0
        out = [f"reward model {self.reward_model.get('name')} ({self.reward_model.get('architecture')}, "
               f"chat template: {'yes' if self.reward_model.get('chat_template') else 'no'}, "
               f"max_length {self.reward_model.get('max_length')}, {self.reward_model.get('device')})",
               f"{self.pairs} answered pairs: {self.already_done} already scored, {self.scored} scored now "
               f"({rate:.1f} pairs/s)",
               f"{self.truncated} answers shortened to fit max_length; {self.empty} empty answers scored as they are; "
               f"{self.unanswered} pairs without an answer left null"]
        if self.dropped:
            shown = ", ".join(self.dropped[:5]) + (" ..." if len(self.dropped) > 5 else "")
            out.append(f"{len(self.dropped)} rows dropped: no candidate answered them, so nothing can be scored ({shown})")
        out.append(f"wrote {self.rows_out} rows to {self.out}; provenance in {self.provenance}")
        return out


def score_file(data: str | Path, reward_model: RewardModel, out: str | Path, batch_size: int = 16,
               progress: bool = True) -> ScoreSummary:
    """Score every (query, response) pair of DATA not yet in OUT's journal, then write OUT with the rewards.

    Existing rewards in DATA are replaced: the output holds this reward model's scores only. Pairs with no
    response (failed calls) get null; rows where every candidate failed are dropped and reported.
    """
    from tqdm.auto import tqdm

    rows = read_answers(data)
    out = Path(out)
    started = time.monotonic()
    ident = reward_model.fingerprint
    with Journal(journal_path(out, "scores")) as journal:
        done: dict[tuple[str, str, str], dict] = {}
        for rec in journal.records():
            if rec.get("reward_model") != ident:
                raise UserError(f"{journal.path} holds scores from another reward model ({rec.get('reward_model')}, "
                                f"this one is {ident}); choose another --out or delete that journal")
            done[(rec["id"], rec["candidate"], rec["response_sha"])] = rec
        pairs = [(row, name) for row in rows for name in row.candidates if name in row.responses]
        pending = [(row, name) for row, name in pairs
                   if (row.id, name, text_sha(row.responses[name])) not in done]
        # Sorting by length keeps padding, and so wasted compute, small within each batch.
        pending.sort(key=lambda p: len(p[0].query) + len(p[0].responses[p[1]]))
        bar = tqdm(total=len(pending), desc="scoring", unit="pair", disable=not progress, mininterval=0.5)
        try:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                encoded = [reward_model.encode(row.query, row.responses[name]) for row, name in chunk]
                scores = reward_model.score_encoded([e for e, _ in encoded])
                for (row, name), (_, cut), value in zip(chunk, encoded, scores):
                    rec = {"id": row.id, "candidate": name, "response_sha": text_sha(row.responses[name]),
                           "reward": value, "truncated": cut, "reward_model": ident}
                    journal.append(rec)
                    done[(row.id, name, rec["response_sha"])] = rec
                bar.update(len(chunk))
        finally:
            bar.close()

        truncated = empty = unanswered = 0
        dropped: list[str] = []
        out_rows = []
        for row in rows:
            found = {name: done.get((row.id, name, text_sha(row.responses[name]))) if name in row.responses else None
                     for name in row.candidates}
            rewards = {name: None if rec is None else rec["reward"] for name, rec in found.items()}
            if all(v is None for v in rewards.values()):
                dropped.append(row.id)
                continue
            unanswered += sum(rec is None for rec in found.values())
            truncated += sum(bool(rec and rec["truncated"]) for rec in found.values())
            empty += sum(rec is not None and not row.responses[name].strip() for name, rec in found.items())
            out_rows.append({"id": row.id, "query": row.query, "rewards": rewards, "tags": row.tags,
                             "responses": row.responses, "source": row.source, **row.extra,
                             "reward_model": reward_model.name})
        write_jsonl_atomic(out_rows, out)

    provenance_path = out.with_name(out.stem + ".provenance.json")
    summary = ScoreSummary(rows_in=len(rows), rows_out=len(out_rows), pairs=len(pairs),
                           already_done=len(pairs) - len(pending), scored=len(pending), truncated=truncated,
                           empty=empty, unanswered=unanswered, dropped=dropped,
                           seconds=time.monotonic() - started, out=out, provenance=provenance_path,
                           reward_model=reward_model.provenance())
    provenance_path.write_text(json.dumps({
        "reward_model": summary.reward_model, "data": str(Path(data).resolve()),
        "scored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows_in": summary.rows_in, "rows_out": summary.rows_out, "pairs": summary.pairs,
        "truncated_answers": truncated, "empty_answers": empty, "unanswered_pairs": unanswered,
        "dropped_rows": dropped}, indent=2) + "\n")
    return summary
