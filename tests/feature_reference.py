"""A deliberately naive reference for the contract's features, to test `rtml.features` against.

Given events (`Transaction` / `Feedback`) in processing order, it recomputes every transaction's
15 features from scratch by scanning what was processed before it: O(n^2), no sorting, no
bisection, no incremental state, no shared code with `rtml.features` (weekday and hour come
from `datetime`).

* `reference_stream(events)` -> one entry per transaction, in order: its features, or None when
  the same transaction_id was already processed for the same customer.
* `reference_features(events)` -> {transaction_id: features} for the first copy of every id.

Definitions (windows N in 1, 7, 30 days, delay D = 7 days), for T of customer C at terminal M
at time t: customer windows hold C's transactions processed so far, T included, with time in
(t - N days, t]; terminal windows hold M's transactions processed before T with time in
(t - D - N days, t - D]; the risk is the share of those whose latest report (greatest
reported_at; ties: processed last) among the feedback processed before T says fraud. Each
transaction_id counts once per customer and once per terminal (the first copy).

`retention_us` (default None: remember everything) models the documented retention of the
states instead: with W the greatest event time of an entity's counted transactions, only those
with time > W - retention_us are remembered (also for de-duplication), a transaction that is
itself that old counts only for its own customer windows, and a report that arrived before its
transaction (pending) survives only if its event_time > the terminal's W - retention_us when the
transaction arrives.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from typing import NamedTuple

from rtml.events import Feedback, Transaction

DAY = 86_400_000_000
WINDOWS = (1, 7, 30)
DELAY = 7 * DAY
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class _Counted(NamedTuple):
    position: int  # index in the event list
    tx: Transaction
    horizon: int | None  # the entity's horizon right after this transaction was counted


def _horizon(times: list[int], retention_us: int | None) -> int | None:
    if retention_us is None or not times:
        return None
    return max(times) - retention_us


def _remembered(item: _Counted, horizon: int | None) -> bool:
    return horizon is None or item.tx.event_time_us > horizon


def _calendar_flags(t: int) -> tuple[int, int]:
    moment = _EPOCH + dt.timedelta(microseconds=t)
    return (1 if moment.weekday() >= 5 else 0), (1 if moment.hour <= 6 else 0)


def reference_stream(events: Iterable[Transaction | Feedback], retention_us: int | None = None) -> list:
    """Features (or None for a duplicate) of every transaction in `events`, in order."""
    events = list(events)
    by_customer: dict[str, list[_Counted]] = defaultdict(list)
    by_terminal: dict[str, list[_Counted]] = defaultdict(list)
    feedback: dict[tuple[str, str], list[tuple[int, Feedback]]] = defaultdict(list)
    for position, event in enumerate(events):
        if isinstance(event, Feedback):
            feedback[(event.terminal_id, event.transaction_id)].append((position, event))
    out: list[dict | None] = []
    for position, tx in enumerate(events):
        if not isinstance(tx, Transaction):
            continue
        t = tx.event_time_us

        # customer: T included
        counted = by_customer[tx.customer_id]
        before = _horizon([c.tx.event_time_us for c in counted], retention_us)
        if any(c.tx.transaction_id == tx.transaction_id and _remembered(c, before) for c in counted):
            out.append(None)
            continue
        after = _horizon([c.tx.event_time_us for c in counted] + [t], retention_us)
        me = _Counted(position, tx, after)
        members = [c.tx for c in counted if _remembered(c, after)] + [tx]
        counted.append(me)
        features: dict[str, float] = {"amount": float(tx.amount)}
        features["tx_during_weekend"], features["tx_during_night"] = _calendar_flags(t)
        for n in WINDOWS:
            amounts = [m.amount for m in members if t - n * DAY < m.event_time_us <= t]
            features[f"customer_nb_tx_{n}d"] = len(amounts)
            features[f"customer_avg_amount_{n}d"] = sum(amounts) / len(amounts) if amounts else 0.0

        # terminal: processed before T
        counted = by_terminal[tx.terminal_id]
        before = _horizon([c.tx.event_time_us for c in counted], retention_us)
        members_t = [c for c in counted if _remembered(c, before)]
        for n in WINDOWS:
            window = [c for c in members_t if t - DELAY - n * DAY < c.tx.event_time_us <= t - DELAY]
            fraud = sum(1 for c in window if _marked(c, tx.terminal_id, position, feedback))
            features[f"terminal_nb_tx_{n}d"] = len(window)
            features[f"terminal_risk_{n}d"] = fraud / len(window) if window else 0.0
        if not any(c.tx.transaction_id == tx.transaction_id for c in members_t):
            after = _horizon([c.tx.event_time_us for c in counted] + [t], retention_us)
            counted.append(_Counted(position, tx, after))
        out.append(features)
    return out


def _marked(item: _Counted, terminal_id: str, now: int, feedback: dict) -> bool:
    """Whether the latest report on `item` processed before position `now` says fraud."""
    reports = [
        (fb.reported_at_us, position, fb.is_fraud)
        for position, fb in feedback[(terminal_id, item.tx.transaction_id)]
        if position < now and (position > item.position or item.horizon is None or fb.event_time_us > item.horizon)
    ]
    return max(reports)[2] if reports else False


def reference_features(events: Iterable[Transaction | Feedback], retention_us: int | None = None) -> dict:
    """{transaction_id: features} of the first processed copy of every transaction_id."""
    events = list(events)
    result: dict[str, dict] = {}
    transactions = [e for e in events if isinstance(e, Transaction)]
    for tx, features in zip(transactions, reference_stream(events, retention_us), strict=True):
        if tx.transaction_id not in result and features is not None:
            result[tx.transaction_id] = features
    return result
