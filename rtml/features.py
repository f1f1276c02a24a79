"""The contract's reference features, computed per event from small per-entity states (no Beam here).

A `CustomerState` and a `TerminalState` each hold one entity's recent transactions, sorted by
(event time, transaction_id), in parallel arrays (times, ids, amounts) searched with `bisect`.
`update` adds a transaction and returns that entity's features; `TerminalState.apply_feedback`
marks or unmarks a held transaction as fraud; `features_for` does both updates and returns all 15
features. The batch and streaming paths call the same code, so their features agree when events
arrive in the same order. Window sums are taken over the sorted content, so a state rebuilt from
`entries()`/`reports()` gives bit-identical features to one that never was.

Semantics (the contract's "Reference features" section fixes the definitions):

* Processing order is the order of `update`/`apply_feedback` calls. A transaction processed late
  (older than transactions already held) is placed at its event time and counts for every
  transaction processed after it whose window contains it; its own features come from what was
  processed before it (plus itself, for the customer windows).
* Duplicates: a transaction_id the state already holds is ignored; `update` returns None and
  changes nothing (the first copy wins, even if the copies differ). `features_for` returns None
  when the customer holds the id; if only the terminal does (the same id at another customer),
  the terminal features are computed without adding it again.
* Feedback: of all reports for one transaction, the one with the greatest `reported_at_us` wins;
  on a tie the one processed last wins. A report for a transaction the terminal does not hold yet
  is kept as pending and takes effect when that transaction arrives. `apply_feedback` returns
  True when the stored reports changed (so the caller knows to persist), False when the report
  lost to a newer one, repeated the current one, or was dropped (see below).
* Retention: `watermark_us` is the greatest event time of the transactions the state has stored
  (feedback does not move it). The horizon is `watermark_us - RETENTION_US` (37 days: the longest
  window plus the delay). A state behaves exactly as if it held only the transactions with event
  time > horizon, with their reports, plus the pending reports whose own `event_time_us` (normally
  their transaction's) > horizon; everything else is forgotten, including the transaction ids used
  for de-duplication. Consequences:
    - in event-time order (the contract's publication order) nothing needed is ever forgotten:
      the features equal the definitions exactly;
    - a customer feature is still exact for a transaction up to 7 days older than the watermark
      (its 30-day window lies above the horizon); a terminal feature of a transaction L older than
      the watermark misses only its windows' oldest part, (t - 37 days, t - 37 days + L];
    - a transaction with event time <= horizon is answered but not stored: its customer windows
      hold only itself (count 1, average = its amount) and its terminal windows are empty (count 0,
      risk 0.0). Its id is not remembered, so a later copy is answered again rather than being
      reported a duplicate (likewise for any copy arriving after the original was forgotten);
    - feedback for a transaction the state does not hold whose `event_time_us` <= horizon is
      dropped, and a pending report whose `event_time_us` <= horizon when its transaction arrives
      is not applied.
  Forgetting is eager for the logical content (amortised O(1) per transaction); the arrays are
  compacted in batches and stale pending reports are swept when their number doubles, so memory
  stays proportional to what is retained. The keyword `retention_us` moves the horizon (tests use it).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

DAY_US = 86_400 * 1_000_000
HOUR_US = 3_600 * 1_000_000
WINDOW_DAYS = (1, 7, 30)
DELAY_DAYS = 7
DELAY_US = DELAY_DAYS * DAY_US
RETENTION_US = (max(WINDOW_DAYS) + DELAY_DAYS) * DAY_US

CUSTOMER_FEATURES = (
    "customer_nb_tx_1d",
    "customer_avg_amount_1d",
    "customer_nb_tx_7d",
    "customer_avg_amount_7d",
    "customer_nb_tx_30d",
    "customer_avg_amount_30d",
)
TERMINAL_FEATURES = (
    "terminal_nb_tx_1d",
    "terminal_risk_1d",
    "terminal_nb_tx_7d",
    "terminal_risk_7d",
    "terminal_nb_tx_30d",
    "terminal_risk_30d",
)
TRANSACTION_FEATURES = ("amount", "tx_during_weekend", "tx_during_night")
FEATURE_NAMES = TRANSACTION_FEATURES + CUSTOMER_FEATURES + TERMINAL_FEATURES

# The window code below is unrolled for these three windows.
assert WINDOW_DAYS == (1, 7, 30)
_D1 = DAY_US
_D7 = 7 * DAY_US
_D30 = 30 * DAY_US
_NIGHT_END_US = 7 * HOUR_US  # hours 0..6 inclusive
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)
_COMPACT_AT = 32  # compact the arrays once this many pruned slots have piled up (or half of them)
_MIN_PENDING_SWEEP = 64


class Entry(NamedTuple):
    """One held transaction, as persisted."""

    event_time_us: int
    transaction_id: str
    amount: float


class Report(NamedTuple):
    """The winning fraud report of one transaction; `event_time_us` is the reported transaction's."""

    reported_at_us: int
    is_fraud: bool
    event_time_us: int


def transaction_features(tx: Any) -> dict[str, float]:
    """`amount`, `tx_during_weekend` and `tx_during_night` of one transaction (UTC)."""
    return {
        "amount": float(tx.amount),
        "tx_during_weekend": during_weekend(tx.event_time_us),
        "tx_during_night": during_night(tx.event_time_us),
    }


def during_weekend(event_time_us: int) -> int:
    """1 on Saturdays and Sundays (UTC), else 0."""
    return 1 if (event_time_us // DAY_US + _EPOCH_WEEKDAY) % 7 >= 5 else 0


def during_night(event_time_us: int) -> int:
    """1 from midnight to 06:59:59 (UTC), else 0."""
    return 1 if event_time_us % DAY_US < _NIGHT_END_US else 0


def _restore_rows(entries: Iterable[Any], retention_us: int) -> list[tuple[int, str, float]]:
    """Persisted entries de-duplicated (first copy wins), sorted, and cut at the horizon."""
    first: dict[str, tuple[int, str, float]] = {}
    for event_time_us, transaction_id, amount in entries:
        if transaction_id not in first:
            first[transaction_id] = (int(event_time_us), transaction_id, float(amount))
    rows = sorted(first.values())
    if rows:
        horizon = rows[-1][0] - retention_us
        cut = bisect_right([row[0] for row in rows], horizon)
        del rows[:cut]
    return rows


def _check_retention(retention_us: int) -> int:
    if retention_us <= 0:
        raise ValueError(f"retention_us must be positive, got {retention_us}")
    return retention_us


class CustomerState:
    """One customer's transactions of the last `RETENTION_US`, for the customer features."""

    __slots__ = ("_times", "_ids", "_amounts", "_start", "_known", "_retention_us", "watermark_us")

    def __init__(self, entries: Iterable[Entry] = (), *, retention_us: int = RETENTION_US):
        """Restore from persisted entries: any order, first copy of an id wins, horizon applied."""
        self._retention_us = _check_retention(retention_us)
        rows = _restore_rows(entries, retention_us)
        self._times = array("q", [row[0] for row in rows])
        self._ids: list[str] = [row[1] for row in rows]
        self._amounts = array("d", [row[2] for row in rows])
        self._start = 0  # entries before this index are pruned, awaiting compaction
        self._known: set[str] = set(self._ids)
        self.watermark_us: int | None = self._times[-1] if rows else None

    def __len__(self) -> int:
        return len(self._times) - self._start

    def entries(self) -> list[Entry]:
        """The held transactions, sorted by (event_time_us, transaction_id)."""
        start = self._start
        return [Entry(*row) for row in zip(self._times[start:], self._ids[start:], self._amounts[start:], strict=True)]

    def update(self, tx: Any) -> dict[str, float] | None:
        """Add `tx` and return its 6 customer features (`tx` included); None if a duplicate."""
        values = self.add(tx.transaction_id, tx.event_time_us, tx.amount)
        if values is None:
            return None
        return dict(zip(CUSTOMER_FEATURES, values, strict=True))

    def add(self, transaction_id: str, t: int, amount: float) -> tuple | None:
        """As `update`, from raw values; the feature values in feature-name order, None if a duplicate."""
        known = self._known
        if transaction_id in known:
            return None
        amount = float(amount)
        times = self._times
        amounts = self._amounts
        watermark = self.watermark_us
        if watermark is None or t > watermark:
            times.append(t)
            self._ids.append(transaction_id)
            amounts.append(amount)
            known.add(transaction_id)
            self.watermark_us = t
            horizon = t - self._retention_us
            start = self._start
            if times[start] <= horizon:
                start = self._prune(horizon)
            hi = len(times)
        else:
            if t <= watermark - self._retention_us:
                return (1, amount, 1, amount, 1, amount)  # beyond the horizon: answered, not stored
            ids = self._ids
            start = self._start
            pos = bisect_right(times, t, start)
            while pos > start and times[pos - 1] == t and ids[pos - 1] > transaction_id:
                pos -= 1
            times.insert(pos, t)
            ids.insert(pos, transaction_id)
            amounts.insert(pos, amount)
            known.add(transaction_id)
            hi = bisect_right(times, t, pos)
        lo1 = bisect_right(times, t - _D1, start, hi)
        lo7 = bisect_right(times, t - _D7, start, lo1)
        lo30 = bisect_right(times, t - _D30, start, lo7)
        n1 = hi - lo1
        s1 = amounts[lo1] if n1 == 1 else sum(amounts[lo1:hi])
        s7 = s1 + sum(amounts[lo7:lo1]) if lo7 < lo1 else s1
        s30 = s7 + sum(amounts[lo30:lo7]) if lo30 < lo7 else s7
        n7 = hi - lo7
        n30 = hi - lo30
        return (n1, s1 / n1, n7, s7 / n7, n30, s30 / n30)

    def _prune(self, horizon: int) -> int:
        """Forget entries with event time <= horizon; return the new start index."""
        times = self._times
        ids = self._ids
        known = self._known
        start = self._start
        end = len(times)
        while start < end and times[start] <= horizon:
            known.discard(ids[start])
            start += 1
        if start >= _COMPACT_AT or 2 * start >= end:
            del times[:start]
            del ids[:start]
            del self._amounts[:start]
            start = 0
        self._start = start
        return start


class TerminalState:
    """One terminal's transactions of the last `RETENTION_US` and their fraud reports."""

    __slots__ = (
        "_times",
        "_ids",
        "_amounts",
        "_start",
        "_known",
        "_fraud",
        "_reports",
        "_pending",
        "_pending_limit",
        "_retention_us",
        "watermark_us",
    )

    def __init__(
        self,
        entries: Iterable[Entry] = (),
        reports: Mapping[str, Report] | Iterable[tuple[str, Report]] = (),
        *,
        retention_us: int = RETENTION_US,
    ):
        """Restore from persisted entries (as `CustomerState`) and report cells.

        `reports` maps transaction_id to its report, or lists (transaction_id, report) cells, of
        which the one with the greatest reported_at wins (on a tie, the later one).
        """
        self._retention_us = _check_retention(retention_us)
        rows = _restore_rows(entries, retention_us)
        self._times = array("q", [row[0] for row in rows])
        self._ids: list[str] = [row[1] for row in rows]
        self._amounts = array("d", [row[2] for row in rows])
        self._start = 0
        self._known: dict[str, int] = {row[1]: row[0] for row in rows}  # id -> event time
        self.watermark_us: int | None = self._times[-1] if rows else None
        winners: dict[str, Report] = {}
        for transaction_id, report in reports.items() if isinstance(reports, Mapping) else reports:
            report = Report(int(report[0]), bool(report[1]), int(report[2]))
            old = winners.get(transaction_id)
            if old is None or report.reported_at_us >= old.reported_at_us:
                winners[transaction_id] = report
        horizon = None if self.watermark_us is None else self.watermark_us - retention_us
        self._reports: dict[str, Report] = {}  # reports of held transactions
        self._pending: dict[str, Report] = {}  # reports of transactions not held (yet)
        for transaction_id, report in winners.items():
            if transaction_id in self._known:
                self._reports[transaction_id] = report
            elif horizon is None or report.event_time_us > horizon:
                self._pending[transaction_id] = report
        # event times of the held transactions currently marked fraud, sorted
        self._fraud: list[int] = sorted(
            self._known[transaction_id] for transaction_id, report in self._reports.items() if report.is_fraud
        )
        self._pending_limit = max(_MIN_PENDING_SWEEP, 2 * len(self._pending))

    def __len__(self) -> int:
        return len(self._times) - self._start

    def entries(self) -> list[Entry]:
        """The held transactions, sorted by (event_time_us, transaction_id)."""
        start = self._start
        return [Entry(*row) for row in zip(self._times[start:], self._ids[start:], self._amounts[start:], strict=True)]

    def reports(self) -> dict[str, Report]:
        """The winning report of every held transaction that has one, and the pending reports."""
        result = dict(self._reports)
        horizon = self._horizon()
        for transaction_id, report in self._pending.items():
            if horizon is None or report.event_time_us > horizon:
                result[transaction_id] = report
        return result

    def update(self, tx: Any) -> dict[str, float] | None:
        """Return the 6 terminal features of `tx` (from what was processed before), then add it.

        None if the terminal already holds this transaction_id.
        """
        values = self.add(tx.transaction_id, tx.event_time_us, tx.amount)
        if values is None:
            return None
        return dict(zip(TERMINAL_FEATURES, values, strict=True))

    def features_at(self, event_time_us: int) -> dict[str, float]:
        """The 6 terminal features a transaction at `event_time_us` would get now; changes nothing."""
        return dict(zip(TERMINAL_FEATURES, self._window(event_time_us), strict=True))

    def apply_feedback(self, fb: Any) -> bool:
        """Record a fraud report (or retraction); True if the held reports changed."""
        transaction_id = fb.transaction_id
        report = Report(fb.reported_at_us, bool(fb.is_fraud), fb.event_time_us)
        event_time = self._known.get(transaction_id)
        if event_time is not None:
            old = self._reports.get(transaction_id)
            if old is not None and (report.reported_at_us < old.reported_at_us or report == old):
                return False
            self._reports[transaction_id] = report
            was_fraud = old is not None and old.is_fraud
            if report.is_fraud and not was_fraud:
                insort(self._fraud, event_time)
            elif was_fraud and not report.is_fraud:
                del self._fraud[bisect_left(self._fraud, event_time)]
            return True
        horizon = self._horizon()
        if horizon is not None and report.event_time_us <= horizon:
            return False  # its transaction is beyond the horizon
        pending = self._pending
        old = pending.get(transaction_id)
        if old is not None and (horizon is None or old.event_time_us > horizon):
            if report.reported_at_us < old.reported_at_us or report == old:
                return False
        pending[transaction_id] = report
        if len(pending) > self._pending_limit:
            self._sweep_pending()
        return True

    def _horizon(self) -> int | None:
        return None if self.watermark_us is None else self.watermark_us - self._retention_us

    def _sweep_pending(self) -> None:
        horizon = self._horizon()
        if horizon is not None:
            self._pending = {tid: rep for tid, rep in self._pending.items() if rep.event_time_us > horizon}
        self._pending_limit = max(_MIN_PENDING_SWEEP, 2 * len(self._pending))

    def _window(self, t: int) -> tuple:
        times = self._times
        start = self._start
        u = t - DELAY_US
        hi = bisect_right(times, u, start)
        if hi == start:
            return (0, 0.0, 0, 0.0, 0, 0.0)
        lo1 = bisect_right(times, u - _D1, start, hi)
        lo7 = bisect_right(times, u - _D7, start, lo1)
        lo30 = bisect_right(times, u - _D30, start, lo7)
        n1 = hi - lo1
        n7 = hi - lo7
        n30 = hi - lo30
        fraud = self._fraud
        if not fraud:
            return (n1, 0.0, n7, 0.0, n30, 0.0)
        fhi = bisect_right(fraud, u)
        f1 = fhi - bisect_right(fraud, u - _D1, 0, fhi)
        f7 = fhi - bisect_right(fraud, u - _D7, 0, fhi)
        f30 = fhi - bisect_right(fraud, u - _D30, 0, fhi)
        return (
            n1,
            f1 / n1 if n1 else 0.0,
            n7,
            f7 / n7 if n7 else 0.0,
            n30,
            f30 / n30 if n30 else 0.0,
        )

    def add(self, transaction_id: str, t: int, amount: float) -> tuple | None:
        """As `update`, from raw values; the feature values in feature-name order, None if a duplicate."""
        known = self._known
        if transaction_id in known:
            return None
        values = self._window(t)
        times = self._times
        watermark = self.watermark_us
        if watermark is None or t > watermark:
            times.append(t)
            self._ids.append(transaction_id)
            self._amounts.append(float(amount))
            known[transaction_id] = t
            self.watermark_us = t
            horizon = t - self._retention_us
            if times[self._start] <= horizon:
                self._prune(horizon)
        else:
            horizon = watermark - self._retention_us
            if t <= horizon:
                return values  # beyond the horizon: answered (windows empty), not stored
            ids = self._ids
            start = self._start
            pos = bisect_right(times, t, start)
            while pos > start and times[pos - 1] == t and ids[pos - 1] > transaction_id:
                pos -= 1
            times.insert(pos, t)
            ids.insert(pos, transaction_id)
            self._amounts.insert(pos, float(amount))
            known[transaction_id] = t
        if self._pending:
            report = self._pending.pop(transaction_id, None)
            if report is not None and report.event_time_us > horizon:
                self._reports[transaction_id] = report
                if report.is_fraud:
                    insort(self._fraud, t)
        return values

    def _prune(self, horizon: int) -> None:
        """Forget entries (and their reports) with event time <= horizon."""
        times = self._times
        ids = self._ids
        known = self._known
        reports = self._reports
        start = self._start
        end = len(times)
        while start < end and times[start] <= horizon:
            transaction_id = ids[start]
            del known[transaction_id]
            if reports:
                reports.pop(transaction_id, None)
            start += 1
        fraud = self._fraud
        if fraud and fraud[0] <= horizon:
            del fraud[: bisect_right(fraud, horizon)]
        if start >= _COMPACT_AT or 2 * start >= end:
            del times[:start]
            del ids[:start]
            del self._amounts[:start]
            start = 0
        self._start = start


def features_for(tx: Any, customer: CustomerState, terminal: TerminalState) -> dict[str, float] | None:
    """All 15 reference features of `tx`, updating both states; None if the customer holds it already.

    If only the terminal holds the id (the same id at another customer), the terminal features
    are computed without adding it again.
    """
    transaction_id = tx.transaction_id
    t = tx.event_time_us
    amount = tx.amount
    c = customer.add(transaction_id, t, amount)
    if c is None:
        return None
    m = terminal.add(transaction_id, t, amount)
    if m is None:
        m = terminal._window(t)
    cn1, ca1, cn7, ca7, cn30, ca30 = c
    mn1, mr1, mn7, mr7, mn30, mr30 = m
    days, in_day = divmod(t, DAY_US)
    return {
        "amount": float(amount),
        "tx_during_weekend": 1 if (days + _EPOCH_WEEKDAY) % 7 >= 5 else 0,
        "tx_during_night": 1 if in_day < _NIGHT_END_US else 0,
        "customer_nb_tx_1d": cn1,
        "customer_avg_amount_1d": ca1,
        "customer_nb_tx_7d": cn7,
        "customer_avg_amount_7d": ca7,
        "customer_nb_tx_30d": cn30,
        "customer_avg_amount_30d": ca30,
        "terminal_nb_tx_1d": mn1,
        "terminal_risk_1d": mr1,
        "terminal_nb_tx_7d": mn7,
        "terminal_risk_7d": mr7,
        "terminal_nb_tx_30d": mn30,
        "terminal_risk_30d": mr30,
    }
