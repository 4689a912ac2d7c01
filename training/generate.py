"""Collecting every candidate's answer to every query: the first half of building training data as the paper does.

    queries file --(each candidate, through its `serve` entry)--> answers file (routing rows, rewards null)

Work is done pair by pair, (query, candidate). Each finished pair is appended at once, as one JSON line,
to the run's journal (`OUT` with suffix `.pairs.jsonl`), flushed and fsynced: a run killed at any moment
loses only the calls in flight, and running the same command again asks only for the pairs that have no
answer yet. The answers file itself is rewritten from the journal (atomically, by rename) whenever a run
ends, so it is never half written.

Answers file: routing-data rows whose rewards are all null ("not scored yet"):
    {"id", "query", "rewards": {candidate: null, ...}, "tags", "responses": {candidate: text},
     "source", "errors": {candidate: "final error"}?, "hit_max_tokens": [candidate]?}
RoutingDataset.load rejects it on purpose (a row with no reward has nothing to teach) until
`zooter score` fills the rewards; `read_answers` is its reader.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from zooter.runtime.errors import DataError, UserError
from zooter.runtime.files import json_error, read_jsonl, write_jsonl_atomic
from zooter.runtime.queries import Query, read_queries
from zooter.serving.candidates import Candidate
from zooter.serving.clients import Answer, CallError, Sampling, client_for

__all__ = ["Journal", "RetryPolicy", "GenerateSummary", "Query", "generate", "journal_path", "read_answers",
           "read_queries", "text_sha", "write_answers"]


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --- the journal ----------------------------------------------------------------------------------

class Journal:
    """An append-only JSONL file of finished work, safe against kills and against a second writer.

    Each record is written with one write() of a whole line, then flushed and fsynced. A line torn by a
    crash (no newline at the end, or not JSON) can only be the last one; it is cut off when the journal
    is opened again. An exclusive lock makes a second run on the same file fail at once instead of
    interleaving with the first.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+b")
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise UserError(f"{self.path} is in use by another running command; wait for it or choose another --out") from None
        self._lock = threading.Lock()
        self.repaired = self._cut_torn_tail()

    def _cut_torn_tail(self) -> bool:
        self._fh.seek(0)
        data = self._fh.read()
        good = len(data)
        if data and not data.endswith(b"\n"):
            good = data.rfind(b"\n") + 1
        else:
            # A complete last line that is not JSON was cut mid-record by a crash of the disk, not of us.
            last_start = data.rfind(b"\n", 0, max(len(data) - 1, 0)) + 1
            tail = data[last_start:].strip()
            if tail:
                try:
                    json.loads(tail)
                except json.JSONDecodeError:
                    good = last_start
        if good != len(data):
            self._fh.truncate(good)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            return True
        return False

    def records(self) -> list[dict]:
        self._fh.seek(0)
        out = []
        for lineno, line in enumerate(self._fh.read().splitlines(), start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(self.path, lineno, f"journal line is not JSON ({json_error(err, line=False)}); it was edited by hand?") from None
        return out

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self._fh.seek(0, os.SEEK_END)
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def journal_path(out: str | Path, kind: str) -> Path:
    out = Path(out)
    return out.with_name(out.stem + f".{kind}.jsonl")


# --- calling with retries -------------------------------------------------------------------------

@dataclass
class RetryPolicy:
    retries: int = 3          # extra attempts after the first
    backoff_s: float = 1.0    # first wait; doubles each time, with jitter
    max_wait_s: float = 30.0

    def wait_s(self, attempt: int, server_says: float | None = None) -> float:
        # Jitter spreads the retries of many workers that failed together, so they do not hit the server together.
        wait = min(self.max_wait_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random())
        # A server that says when to come back (Retry-After) knows better than our guess, within our cap.
        return max(wait, min(server_says, self.max_wait_s)) if server_says is not None else wait


def call_with_retries(complete: Callable[[str], Answer], prompt: str, policy: RetryPolicy,
                      stop: threading.Event) -> tuple[Answer | None, str | None, int]:
    """(answer, None, attempts) on success, (None, final error, attempts) when every attempt failed."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return complete(prompt), None, attempt
        except CallError as err:
            if not err.retryable or attempt > policy.retries or stop.is_set():
                return None, str(err), attempt
            server_says = err.retry_after_s
        except Exception as err:  # a client bug or an odd reply must cost one pair, not the run
            return None, f"{type(err).__name__}: {err}", attempt
        if stop.wait(policy.wait_s(attempt, server_says)):
            return None, "interrupted while waiting to retry", attempt


# --- the run --------------------------------------------------------------------------------------

@dataclass
class CandidateTally:
    answered: int = 0
    failed: int = 0
    empty: int = 0
    hit_max_tokens: int = 0
    retried: int = 0
    seconds: float = 0.0   # summed call latency
    started: float = 0.0
    finished: float = 0.0

    def rate(self) -> float:
        span = self.finished - self.started
        return (self.answered + self.failed) / span if span > 0 else 0.0


@dataclass
class GenerateSummary:
    queries: int
    pairs: int
    already_done: int
    asked: int
    tallies: dict[str, CandidateTally]
    answered_total: int
    failed_total: int
    journal: Path
    out: Path
    repaired_journal: bool
    foreign_records: int
    failures: list[tuple[str, str, str]]  # (query id, candidate, final error) of this run; lines() shows five

    def lines(self) -> list[str]:
        out = [f"{self.queries} queries x {len(self.tallies)} candidates = {self.pairs} pairs: "
               f"{self.already_done} already in the journal, {self.asked} asked this run; "
               f"{self.answered_total} answered, {self.failed_total} failed in total"]
        if self.repaired_journal:
            out.append(f"repaired {self.journal}: cut a line torn by an earlier crash")
        if self.foreign_records:
            out.append(f"{self.foreign_records} journal records belong to queries or candidates outside this run; left out of {self.out}")
        if not self.asked:
            return out
        out.append(f"{'candidate':<28} {'answered':>8} {'failed':>6} {'empty':>5} {'cut':>4} {'retried':>7} {'pairs/s':>8} {'mean s':>7}")
        for name, t in self.tallies.items():
            n = t.answered + t.failed
            mean = t.seconds / n if n else 0.0
            out.append(f"{name:<28} {t.answered:>8} {t.failed:>6} {t.empty:>5} {t.hit_max_tokens:>4} {t.retried:>7} {t.rate():>8.2f} {mean:>7.2f}")
        out.append("(counts are for this run; 'cut' = stopped at --max-tokens, 'empty' = answered with no text)")
        for rid, name, error in self.failures[:5]:
            out.append(f"failed: {rid} / {name}: {error}")
        if len(self.failures) > 5:
            out.append(f"... and {len(self.failures) - 5} more failures, each recorded in {self.journal} and under 'errors' in {self.out}")
        return out


def generate(queries: Sequence[Query], candidates: Sequence[Candidate], out: str | Path, *,
             sampling: Sampling | None = None, concurrency: int = 4, policy: RetryPolicy | None = None,
             source: str = "", progress: bool = True, clients: dict | None = None) -> GenerateSummary:
    """Ask every candidate to answer every query not yet answered in OUT's journal; rewrite OUT from the journal.

    Concurrency is per candidate: `concurrency`, or the candidate's serve.max_concurrency. Pairs whose
    last record is a failure are asked again; a pair that has an answer is never asked twice.
    `clients` ({name: object with complete(prompt)}) replaces the serve entries, for tests and embedding.
    """
    out = Path(out)
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise UserError(f"candidate names repeat: {names}")
    if clients is None:
        clients = {c.name: client_for(c.name, c.serve, sampling or Sampling()) for c in candidates}
    limits = _concurrency_limits(candidates, concurrency)
    if out.exists() and not journal_path(out, "pairs").exists():
        raise UserError(f"{out} exists but has no journal {journal_path(out, 'pairs').name} beside it, so it was not "
                        f"written by this command; delete it or choose another --out")
    with Journal(journal_path(out, "pairs")) as journal:
        pending = _pending(journal, queries, names)
        run = _PairRun(journal, clients, policy or RetryPolicy(), pending, progress)
        try:
            run.ask(limits)
        finally:
            run.close()
            records = journal.records()
            foreign = write_answers(queries, names, records, out, source)
            repaired = journal.repaired

    ids = {q.id for q in queries}
    answered_total = sum(1 for r in _latest(records).values() if r["error"] is None and r["id"] in ids and r["candidate"] in names)
    return GenerateSummary(
        queries=len(queries), pairs=len(queries) * len(names),
        already_done=len(queries) * len(names) - sum(len(p) for p in pending.values()),
        asked=sum(t.answered + t.failed for t in run.tallies.values()), tallies=run.tallies,
        answered_total=answered_total, failed_total=len(queries) * len(names) - answered_total,
        journal=journal.path, out=out, repaired_journal=repaired, foreign_records=foreign, failures=run.failures)


def _concurrency_limits(candidates: Sequence[Candidate], concurrency: int) -> dict[str, int]:
    """Calls in flight per candidate: its serve.max_concurrency, else `concurrency`."""
    limits = {}
    for c in candidates:
        limit = c.serve.get("max_concurrency", concurrency)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise UserError(f"candidate {c.name!r}: max_concurrency must be a positive integer, got {limit!r}")
        limits[c.name] = limit
    return limits


def _pending(journal: Journal, queries: Sequence[Query], names: Sequence[str]) -> dict[str, list[Query]]:
    """Each candidate's queries that have no answer in the journal yet, in query order."""
    by_id = {q.id: q for q in queries}
    answered: set[tuple[str, str]] = set()
    for rec in journal.records():
        q = by_id.get(rec.get("id"))
        if q is not None and rec.get("query_sha") != text_sha(q.text):
            raise UserError(f"{journal.path} holds an answer for id {q.id!r} to a different query text; "
                            f"ids must name the same query across runs (use a new --out for new queries)")
        if rec.get("error") is None:
            answered.add((rec.get("id"), rec.get("candidate")))
    return {name: [q for q in queries if (q.id, name) not in answered] for name in names}


class _PairRun:
    """One run's pairs: a thread pool per candidate asks, journals each finished pair, and counts it."""

    def __init__(self, journal: Journal, clients: dict, policy: RetryPolicy, pending: dict[str, list[Query]],
                 progress: bool):
        self.journal, self.clients, self.policy, self.pending = journal, clients, policy, pending
        self.tallies = {name: CandidateTally() for name in pending}
        self.failures: list[tuple[str, str, str]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.bars = {}
        if progress:
            from tqdm.auto import tqdm

            width = max(len(n) for n in pending)
            for i, name in enumerate(pending):
                self.bars[name] = tqdm(total=len(pending[name]), desc=name.ljust(width), unit="pair", position=i,
                                       mininterval=0.5, dynamic_ncols=True, leave=True)

    def ask(self, limits: dict[str, int]) -> None:
        """Every pending pair, candidates interleaved in query order, so a killed run leaves whole queries
        done, not whole candidates. A stop (Ctrl-C, a bug) cancels what has not started."""
        names = list(self.pending)
        pools = {name: ThreadPoolExecutor(max_workers=limits[name], thread_name_prefix=f"gen-{name}") for name in names}
        futures = []
        try:
            now = time.monotonic()
            for name in names:
                self.tallies[name].started = self.tallies[name].finished = now
            for i in range(max((len(p) for p in self.pending.values()), default=0)):
                for name in names:
                    if i < len(self.pending[name]):
                        futures.append(pools[name].submit(self.work, name, self.pending[name][i]))
            wait(futures)
            for future in futures:
                future.result()  # re-raise a bug in `work` itself (client errors never get here)
        except BaseException:
            self.stop.set()
            for pool in pools.values():
                pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            for pool in pools.values():
                pool.shutdown(wait=True)

    def work(self, name: str, query: Query) -> None:
        if self.stop.is_set():
            return
        start = time.monotonic()
        answer, error, attempts = call_with_retries(self.clients[name].complete, query.text, self.policy, self.stop)
        elapsed = time.monotonic() - start
        if error is not None and self.stop.is_set() and error.startswith("interrupted"):
            return  # not a real failure: the run is stopping; the pair stays pending
        record = {"id": query.id, "candidate": name, "query_sha": text_sha(query.text),
                  "response": None if answer is None else answer.text, "error": error,
                  "attempts": attempts, "latency_s": round(elapsed, 4), "finish_reason": None,
                  "output_tokens": None, "at": round(time.time(), 3)}
        if answer is not None:
            record["finish_reason"] = answer.finish_reason
            record["output_tokens"] = answer.output_tokens
        self.journal.append(record)
        self._count(name, query, answer, error, attempts, elapsed)

    def _count(self, name: str, query: Query, answer: Answer | None, error: str | None, attempts: int,
               elapsed: float) -> None:
        with self.lock:
            tally = self.tallies[name]
            tally.seconds += elapsed
            tally.retried += attempts > 1
            tally.finished = time.monotonic()
            if answer is None:
                tally.failed += 1
                self.failures.append((query.id, name, error))
            else:
                tally.answered += 1
                tally.empty += not answer.text.strip()
                tally.hit_max_tokens += answer.finish_reason == "length"
            if name in self.bars:
                self.bars[name].set_postfix_str(f"failed={tally.failed}", refresh=False)
                self.bars[name].update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _latest(records: Iterable[dict]) -> dict[tuple[str, str], dict]:
    """The record that counts for each pair: an answer beats any failure; among equals, the later wins."""
    best: dict[tuple[str, str], dict] = {}
    for rec in records:
        key = (rec.get("id"), rec.get("candidate"))
        previous = best.get(key)
        if previous is not None and previous.get("error") is None and rec.get("error") is not None:
            continue
        best[key] = rec
    return best


def write_answers(queries: Sequence[Query], names: Sequence[str], records: Iterable[dict], out: str | Path,
                  source: str = "") -> int:
    """Rewrite the answers file from journal records, in query order, one row per query with at least one
    finished pair; returns how many records were left out (other queries or candidates)."""
    latest = _latest(records)
    wanted_ids = {q.id for q in queries}
    wanted_names = set(names)
    foreign = sum(1 for (rid, name) in latest if rid not in wanted_ids or name not in wanted_names)

    def rows():
        for q in queries:
            if not any((q.id, name) in latest for name in names):
                continue  # not asked yet (an interrupted run): no row rather than an empty one
            responses, errors, cut = {}, {}, []
            for name in names:
                rec = latest.get((q.id, name))
                if rec is None:
                    continue
                if rec.get("error") is None:
                    responses[name] = rec.get("response") or ""
                    if rec.get("finish_reason") == "length":
                        cut.append(name)
                else:
                    errors[name] = rec["error"]
            row = {"id": q.id, "query": q.text, "rewards": {name: None for name in names}, "tags": q.tags,
                   "responses": responses, "source": source}
            if errors:
                row["errors"] = errors
            if cut:
                row["hit_max_tokens"] = cut
            yield row

    write_jsonl_atomic(rows(), out)
    return foreign


# --- reading answers back ------------------------------------------------------------------------

@dataclass
class AnswerRow:
    """A row of an answers file (or of any routing-data file with responses), before or after scoring."""
    id: str
    query: str
    candidates: list[str]
    responses: dict[str, str]
    tags: list[str]
    source: str
    extra: dict  # keys outside the contract (errors, hit_max_tokens), carried through


_CONTRACT_KEYS = {"id", "query", "rewards", "tags", "responses", "source", "reward_model"}


def read_answers(path: str | Path) -> list[AnswerRow]:
    """Read an answers file (rewards may all be null); every row needs an id, a query and a 'responses' object."""
    rows, ids = [], {}
    for lineno, obj in read_jsonl(path):
        if not isinstance(obj, dict):
            raise DataError(path, lineno, "expected a JSON object")
        rid = obj.get("id")
        if not isinstance(rid, str) or not rid:
            raise DataError(path, lineno, "'id' must be a non-empty string")
        if rid in ids:
            raise DataError(path, lineno, f"duplicate id {rid!r} (first seen on line {ids[rid]})")
        ids[rid] = lineno
        query = obj.get("query")
        if not isinstance(query, str) or not query.strip():
            raise DataError(path, lineno, f"row {rid!r}: empty query")
        responses = obj.get("responses")
        if not isinstance(responses, dict) or not all(isinstance(v, str) for v in responses.values()):
            raise DataError(path, lineno, f"row {rid!r}: needs 'responses' {{candidate: text}} to score (run `zooter generate` first)")
        rewards = obj.get("rewards") or {}
        if not isinstance(rewards, dict):
            raise DataError(path, lineno, f"row {rid!r}: 'rewards' must be an object")
        candidates = list(dict.fromkeys([*rewards, *responses]))
        tags = obj.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise DataError(path, lineno, f"row {rid!r}: 'tags' must be a list of strings")
        extra = {k: v for k, v in obj.items() if k not in _CONTRACT_KEYS}
        rows.append(AnswerRow(rid, query, candidates, dict(responses), list(tags), str(obj.get("source", "")), extra))
    if not rows:
        raise DataError(path, None, "no rows")
    return rows
