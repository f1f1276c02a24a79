"""`rtml evaluate`: how well the scored insights rank the frauds that feedback later confirmed.

Reads an insights file (`rtml tail --out`) and a feedback file (fraud-feedback JSON Lines, or a
replay file as `rtml simulate` writes it), labels every scored transaction with its latest report,
and computes the metrics of `rtml.metrics`. A line that cannot be used stops the evaluation with
an error naming the file and line: a metric over silently skipped data would mislead.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtml import events, metrics

_MICROS_PER_DAY = 86_400_000_000
_EPOCH_DAY = dt.date(1970, 1, 1)


class EvaluationInputError(ValueError):
    """A line of an input file that cannot be evaluated; the text names the file and line."""


@dataclass(frozen=True)
class ScoredTransaction:
    """What evaluation needs of one insight."""

    transaction_id: str
    customer_id: str
    event_time_us: int
    score: float

    @property
    def day(self) -> dt.date:
        """The UTC date of the transaction, the day card precision@k ranks it in."""
        return _EPOCH_DAY + dt.timedelta(days=self.event_time_us // _MICROS_PER_DAY)


@dataclass(frozen=True)
class Labels:
    """Fraud labels from feedback: the latest `is_fraud` per transaction, and reports per transaction."""

    is_fraud: dict[str, bool]
    reports: Counter[str]

    def label(self, transaction_id: str) -> int:
        """1 if the transaction's latest report says fraud, else 0 (also when it has no report)."""
        return int(self.is_fraud.get(transaction_id, False))


def read_insights(path: str | Path) -> tuple[list[ScoredTransaction], int]:
    """The insights of a file in file order, first one per transaction_id, and how many repeats were dropped."""
    scored: list[ScoredTransaction] = []
    seen: set[str] = set()
    duplicates = 0
    for number, obj in _objects(path):
        try:
            transaction_id = _text(obj, "transaction_id")
            customer_id = _text(obj, "customer_id")
            event_time_us = events.parse_timestamp(_text(obj, "event_time"), "event_time")
            score = _score(obj)
        except ValueError as err:
            raise EvaluationInputError(f"{path}:{number}: {err}") from None
        if transaction_id in seen:
            duplicates += 1
            continue
        seen.add(transaction_id)
        scored.append(ScoredTransaction(transaction_id, customer_id, event_time_us, score))
    return scored, duplicates


def read_labels(path: str | Path) -> Labels:
    """Labels from a feedback file; each line is a feedback object or a replay-file line.

    Replay lines of kind "transaction" are skipped. A transaction's label is the `is_fraud` of
    its report with the latest `reported_at`, so a later `false` retracts a fraud; between
    reports with the same `reported_at`, the later line wins (publication order).
    """
    latest: dict[str, tuple[int, bool]] = {}
    reports: Counter[str] = Counter()
    for number, obj in _objects(path):
        if "kind" in obj and "event" in obj:
            if obj["kind"] == "transaction":
                continue
            if obj["kind"] != "feedback" or not isinstance(obj["event"], dict):
                raise EvaluationInputError(
                    f'{path}:{number}: a replay line must be {{"kind": "transaction"|"feedback", "event": {{...}}}}'
                )
            obj = obj["event"]
        try:
            feedback = events.feedback_from_object(obj)
        except events.InvalidMessage as err:
            raise EvaluationInputError(f"{path}:{number}: {err}") from None
        reports[feedback.transaction_id] += 1
        previous = latest.get(feedback.transaction_id)
        if previous is None or feedback.reported_at_us >= previous[0]:
            latest[feedback.transaction_id] = (feedback.reported_at_us, feedback.is_fraud)
    return Labels({tx: is_fraud for tx, (_, is_fraud) in latest.items()}, reports)


def evaluate(insights_path: str | Path, feedback_path: str | Path, k: int = 100) -> dict[str, Any]:
    """The evaluation report of an insights file against a feedback file, as a JSON-ready dict.

    `auc_roc` and `average_precision` are None when the scored transactions hold no fraud (or
    only frauds), where they are undefined; the counts still say why.
    """
    scored, duplicates = read_insights(insights_path)
    if not scored:
        raise EvaluationInputError(f"{insights_path}: no insights to evaluate")
    labels = read_labels(feedback_path)
    y = [labels.label(item.transaction_id) for item in scored]
    scores = [item.score for item in scored]
    frauds = sum(y)
    both_classes = 0 < frauds < len(scored)
    scored_ids = {item.transaction_id for item in scored}
    daily = metrics.card_precision_at_k_by_day(
        [item.day for item in scored], [item.customer_id for item in scored], scores, y, k
    )
    return {
        "insights": len(scored),
        "duplicates_ignored": duplicates,
        "frauds": frauds,
        "fraud_rate": frauds / len(scored),
        "auc_roc": metrics.auc_roc(y, scores) if both_classes else None,
        "average_precision": metrics.average_precision(y, scores) if frauds else None,
        f"card_precision_at_{k}": sum(entry.precision for entry in daily) / len(daily),
        "days": len(daily),
        "reports_without_insight": sum(n for tx, n in labels.reports.items() if tx not in scored_ids),
    }


def _objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) for each non-blank line of a JSON Lines file (.gz allowed)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise EvaluationInputError(f"{path}:{number}: not valid UTF-8 ({err.reason})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as err:
                raise EvaluationInputError(f"{path}:{number}: not valid JSON ({err})") from None
            if not isinstance(obj, dict):
                kind = (
                    "an array" if isinstance(obj, list) else "a string" if isinstance(obj, str) else "a number or null"
                )
                raise EvaluationInputError(f"{path}:{number}: expected a JSON object, got {kind}")
            yield number, obj


def _text(obj: dict[str, Any], name: str) -> str:
    if name not in obj:
        raise ValueError(f"{name}: required field is missing")
    value = obj[name]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: expected a non-empty string, got {json.dumps(value)[:64]}")
    return value


def _score(obj: dict[str, Any]) -> float:
    if "score" not in obj:
        raise ValueError("score: required field is missing")
    value = obj["score"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"score: expected a finite number, got {json.dumps(value)[:64]}")
    return float(value)
