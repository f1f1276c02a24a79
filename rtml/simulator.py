"""Synthetic card-payment generator producing a *replay file*.

This module simulates a population of card holders (customers) paying at
merchant terminals, injects four kinds of fraud, and writes the result as a
replay file that the streaming pipelines consume. Everything is vectorised with
numpy and fully deterministic: one configuration (including ``seed``) always
gives a byte-identical file.

Replay file format
==================
JSON Lines. Each line is one object ``{"kind": ..., "event": {...}}`` where
``kind`` is ``"transaction"`` or ``"feedback"``. Lines are in *publication
order*:

* a transaction is published at its ``event_time``;
* a feedback event is published at its ``reported_at``;
* at the same instant, transactions come before feedback; within the same kind
  and instant, lines are ordered by ``transaction_id``.

Transaction event fields::

    transaction_id  string, e.g. "tx00000000123"
    event_time      RFC 3339 UTC, second precision, e.g. "2026-01-01T00:01:14Z"
    customer_id     string, e.g. "C000123"
    terminal_id     string, e.g. "T0004567"
    amount          number >= 0, rounded to cents

Feedback event fields::

    transaction_id, customer_id, terminal_id   as on the transaction
    event_time      the transaction's own event_time
    reported_at     event_time + feedback_delay_days (RFC 3339 UTC)
    is_fraud        true

Ids are zero padded so that they sort lexicographically in numeric order; the
default widths (6 digits for customers, 7 for terminals, 11 for transactions)
grow if the configured population needs more digits. Transaction ids are
assigned in time order (ties broken by generation order), so ``tx00000000000``
is the earliest payment.

Genuine behaviour
=================
* **Customers** get a home location uniform on a 100 x 100 grid, a mean payment
  amount uniform in [5, 100], an amount standard deviation of half that mean,
  and a mean number of payments per day uniform in [0, 4].
* **Terminals** get a location uniform on the same grid.
* Each customer pays only at terminals within distance 5 of home (uniformly at
  random among them); a customer with no terminal in that radius uses the
  single nearest terminal. Distances are computed in float32 over chunks of
  customers, so large populations never build a dense float64 matrix.
* The number of payments of a customer on a given day is Poisson with the
  customer's daily mean. The time of day is normal around noon with a standard
  deviation of 5.5 hours, truncated to the day (values outside
  [00:00:00, 23:59:59] are redrawn), at second precision.
* Amounts are normal(mean, std) of the customer. Negative draws are redrawn
  (a handful of rounds; anything still negative becomes 0.01). Amounts are
  rounded to cents and are at least 0.01.

Fraud scenarios
===============
Each transaction carries a scenario code: ``0`` genuine, ``1``..``4`` fraud.
Per-day event counts are Poisson and scale with the population size so the
fraud rate does not depend much on it; the numbers quoted are for the default
5,000 customers and 10,000 terminals.

1. **large_amount** -- any payment whose amount is over 220 is fraud.
2. **compromised_terminal** -- every day about 2 random terminals
   (``terminals / 5000`` on average) are compromised. Every payment at a
   compromised terminal from the start of the compromise day and during the
   following 28 days (a window of 28 x 24 h) is fraud.
3. **compromised_card** -- every day about 3 random customers
   (``3 * customers / 5000`` on average) are compromised. During the 14 days
   starting with the compromise day, each of their payments is, with
   probability 1/3 (so one third of them on average), fraudulent: its amount is
   multiplied by 5 and it is labelled fraud.
4. **card_testing** -- every day about one random customer
   (``customers / 5000`` on average) suffers a card-testing burst: 5 to 15
   extra small payments (uniform 0.50 to 3.00) within 5 minutes, each at a
   uniformly random terminal (not restricted to the customer's area). All of
   them are fraud.

Labelling precedence for a payment that matches several scenarios: card-testing
payments are always ``4``; otherwise ``3`` (compromised card, the amount was
multiplied) beats ``2`` (compromised terminal) which beats ``1`` (amount over
220 before any multiplication). Consequently every payment with an amount over
220 is fraud, and every scenario-1 payment has an amount over 220.

With these settings the overall fraud rate is roughly 0.6 to 1 percent; it is a
little lower on short runs because the compromise windows ramp up during the
first four weeks.

Feedback
========
Every fraudulent transaction gets exactly one feedback event reported
``feedback_delay_days`` (default 7, rounded to the second) after its
``event_time``. Feedback events reported after the last simulated day are still
written (they end up at the end of the file). Genuine transactions get no
feedback.

Usage
=====
From Python::

    from rtml.simulator import SimulationConfig, simulate_to_file
    summary = simulate_to_file(SimulationConfig(days=30), "replay.jsonl")

or from the command line::

    python -m rtml.simulator --days 90 --out replay.jsonl --progress
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime
import math
import os
import time
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SCENARIO_NAMES",
    "Simulation",
    "SimulationConfig",
    "SimulationSummary",
    "simulate",
    "simulate_to_file",
    "write_replay",
]

# ---------------------------------------------------------------------------
# Model constants
# ---------------------------------------------------------------------------
GRID_SIZE = 100.0
TERMINAL_RADIUS = 5.0
MEAN_AMOUNT_RANGE = (5.0, 100.0)
MEAN_TX_PER_DAY_RANGE = (0.0, 4.0)
TIME_OF_DAY_MEAN = 12 * 3600.0
TIME_OF_DAY_STD = 5.5 * 3600.0

LARGE_AMOUNT_THRESHOLD = 220.0
COMPROMISED_TERMINALS_PER_TERMINAL_DAY = 2.0 / 10000.0
COMPROMISED_TERMINAL_DAYS = 28
COMPROMISED_CARDS_PER_CUSTOMER_DAY = 3.0 / 5000.0
COMPROMISED_CARD_DAYS = 14
COMPROMISED_CARD_FRACTION = 1.0 / 3.0
COMPROMISED_CARD_MULTIPLIER = 5
CARD_TESTING_PER_CUSTOMER_DAY = 1.0 / 5000.0
CARD_TESTING_BURST_SIZE = (5, 15)  # inclusive
CARD_TESTING_AMOUNT_CENTS = (50, 300)  # inclusive
CARD_TESTING_WINDOW_SECONDS = 300

SECONDS_PER_DAY = 86400

SCENARIO_GENUINE = 0
SCENARIO_LARGE_AMOUNT = 1
SCENARIO_COMPROMISED_TERMINAL = 2
SCENARIO_COMPROMISED_CARD = 3
SCENARIO_CARD_TESTING = 4

#: Scenario code -> name used in :class:`SimulationSummary`.
SCENARIO_NAMES: dict[int, str] = {
    SCENARIO_LARGE_AMOUNT: "large_amount",
    SCENARIO_COMPROMISED_TERMINAL: "compromised_terminal",
    SCENARIO_COMPROMISED_CARD: "compromised_card",
    SCENARIO_CARD_TESTING: "card_testing",
}

_CUSTOMER_ID_WIDTH = 6
_TERMINAL_ID_WIDTH = 7
_TRANSACTION_ID_WIDTH = 11
_WRITE_CHUNK = 100_000


# ---------------------------------------------------------------------------
# Public data classes
# ---------------------------------------------------------------------------
def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class SimulationConfig:
    """Parameters of one simulation run (see the module docstring)."""

    days: int = 90
    customers: int = 5000
    terminals: int = 10000
    start: datetime.date = datetime.date(2026, 1, 1)
    seed: int = 42
    feedback_delay_days: float = 7.0

    def __post_init__(self) -> None:
        for name in ("days", "customers", "terminals"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.start, datetime.date):
            raise TypeError(f"start must be a datetime.date, got {self.start!r}")
        if isinstance(self.start, datetime.datetime):
            object.__setattr__(self, "start", self.start.date())
        delay = self.feedback_delay_days
        if (
            isinstance(delay, (bool, np.bool_))
            or not isinstance(delay, (int, float, np.integer, np.floating))
            or not math.isfinite(float(delay))
            or delay < 0
        ):
            raise ValueError(f"feedback_delay_days must be a finite number >= 0, got {delay!r}")

    @property
    def start_epoch(self) -> int:
        """Seconds since the Unix epoch of ``start`` at 00:00:00 UTC."""
        return calendar.timegm(self.start.timetuple())

    @property
    def feedback_delay_seconds(self) -> int:
        return round(float(self.feedback_delay_days) * SECONDS_PER_DAY)


@dataclass
class Simulation:
    """Simulated transactions, sorted by time; index ``i`` is transaction ``i``.

    All per-transaction arrays have the same length. ``event_time`` is int64
    seconds since the Unix epoch (non-decreasing), ``customer`` / ``terminal``
    are integer indices, ``amount_cents`` is the amount in cents (``amount`` is
    the same in currency units), ``scenario`` is the fraud scenario code
    (0 genuine) and ``is_fraud`` is ``scenario > 0``. The ``*_events`` arrays
    record the injected fraud events (day index counted from ``config.start``)
    so that labels can be audited.
    """

    config: SimulationConfig
    transaction_id: np.ndarray  # int64, == arange(n)
    event_time: np.ndarray  # int64 seconds since epoch
    customer: np.ndarray  # int64
    terminal: np.ndarray  # int64
    amount_cents: np.ndarray  # int64
    amount: np.ndarray  # float64
    scenario: np.ndarray  # int8
    is_fraud: np.ndarray  # bool
    customer_xy: np.ndarray  # (customers, 2) float64 home locations
    terminal_xy: np.ndarray  # (terminals, 2) float64 locations
    #: fraud events as (day index, terminal) rows: compromise starts that day
    compromised_terminal_events: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros((0, 2), dtype=np.int64)
    )
    #: fraud events as (day index, customer) rows: compromise starts that day
    compromised_card_events: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    #: card-testing bursts as (day index, customer, burst size) rows
    card_testing_events: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    generation_seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.event_time.shape[0])

    @property
    def reported_at(self) -> np.ndarray:
        """Feedback time (seconds since epoch) of every transaction."""
        return self.event_time + self.config.feedback_delay_seconds

    @property
    def id_widths(self) -> tuple[int, int, int]:
        """Digits of (transaction, customer, terminal) ids."""
        n = len(self)
        return (
            max(_TRANSACTION_ID_WIDTH, len(str(max(n - 1, 0)))),
            max(_CUSTOMER_ID_WIDTH, len(str(self.config.customers - 1))),
            max(_TERMINAL_ID_WIDTH, len(str(self.config.terminals - 1))),
        )

    def transaction_id_str(self, i: int) -> str:
        return f"tx{int(i):0{self.id_widths[0]}d}"

    def customer_id_str(self, c: int) -> str:
        return f"C{int(c):0{self.id_widths[1]}d}"

    def terminal_id_str(self, t: int) -> str:
        return f"T{int(t):0{self.id_widths[2]}d}"


@dataclass
class SimulationSummary:
    """What :func:`write_replay` wrote."""

    transactions: int
    feedback: int
    frauds_by_scenario: dict[str, int]
    fraud_rate: float
    first_event_time: str
    last_event_time: str
    seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------
def _reachable_terminals(customer_xy: np.ndarray, terminal_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR lists of the terminals each customer uses: (offsets, flat terminals)."""
    n_cust = customer_xy.shape[0]
    n_term = terminal_xy.shape[0]
    cxy = customer_xy.astype(np.float32)
    tx = terminal_xy[:, 0].astype(np.float32)
    ty = terminal_xy[:, 1].astype(np.float32)
    r2 = np.float32(TERMINAL_RADIUS * TERMINAL_RADIUS)
    # keep each float32 block at about 16 MB
    chunk = max(1, min(n_cust, 4_000_000 // max(n_term, 1)))
    counts = np.empty(n_cust, dtype=np.int64)
    pieces: list[np.ndarray] = []
    for lo in range(0, n_cust, chunk):
        hi = min(n_cust, lo + chunk)
        dx = cxy[lo:hi, 0:1] - tx[None, :]
        dy = cxy[lo:hi, 1:2] - ty[None, :]
        d2 = dx * dx
        d2 += dy * dy
        within = d2 <= r2
        row_counts = within.sum(axis=1)
        rows, cols = np.nonzero(within)  # row-major: sorted by customer
        empty = np.flatnonzero(row_counts == 0)
        if empty.size:
            nearest = np.argmin(d2[empty], axis=1)
            rows = np.concatenate([rows, empty])
            cols = np.concatenate([cols, nearest])
            order = np.argsort(rows, kind="stable")
            cols = cols[order]
            row_counts[empty] = 1
        counts[lo:hi] = row_counts
        pieces.append(cols.astype(np.int64))
    offsets = np.zeros(n_cust + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return offsets, flat


def _truncated_time_of_day(rng: np.random.Generator, n: int) -> np.ndarray:
    tod = rng.normal(TIME_OF_DAY_MEAN, TIME_OF_DAY_STD, size=n)
    for _ in range(20):
        bad = np.flatnonzero((tod < 0) | (tod >= SECONDS_PER_DAY))
        if bad.size == 0:
            break
        tod[bad] = rng.normal(TIME_OF_DAY_MEAN, TIME_OF_DAY_STD, size=bad.size)
    return np.clip(np.floor(tod), 0, SECONDS_PER_DAY - 1).astype(np.int64)


def _positive_normal(rng: np.random.Generator, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    values = rng.normal(mean, std)
    for _ in range(10):
        bad = np.flatnonzero(values < 0)
        if bad.size == 0:
            break
        values[bad] = rng.normal(mean[bad], std[bad])
    values[values < 0] = 0.01
    return values


def _window_mask(
    key_sorted: np.ndarray,
    group_span: int,
    groups: np.ndarray,
    starts: np.ndarray,
    length: int,
) -> np.ndarray:
    """Mask over the sorted composite keys ``group * group_span + rel_time``
    covered by any window ``[start, start + length)`` of its group."""
    n = key_sorted.shape[0]
    if groups.size == 0 or n == 0:
        return np.zeros(n, dtype=bool)
    lo = np.searchsorted(key_sorted, groups * group_span + starts, side="left")
    hi = np.searchsorted(
        key_sorted,
        groups * group_span + np.minimum(starts + length, group_span),
        side="left",
    )
    diff = np.zeros(n + 1, dtype=np.int64)
    np.add.at(diff, lo, 1)
    np.add.at(diff, hi, -1)
    return np.cumsum(diff[:-1]) > 0


def _daily_picks(
    rng: np.random.Generator, days: int, population: int, mean_per_day: float
) -> tuple[np.ndarray, np.ndarray]:
    """For each day draw Poisson(mean) distinct members: (day, member) arrays."""
    counts = np.minimum(rng.poisson(mean_per_day, size=days), population)
    day_list: list[np.ndarray] = []
    member_list: list[np.ndarray] = []
    for day, k in enumerate(counts.tolist()):
        if k:
            member_list.append(rng.choice(population, size=k, replace=False))
            day_list.append(np.full(k, day, dtype=np.int64))
    if not member_list:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(day_list), np.concatenate(member_list).astype(np.int64)


def simulate(config: SimulationConfig) -> Simulation:
    """Generate all transactions of ``config`` (no I/O)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    days, n_cust, n_term = config.days, config.customers, config.terminals
    span = days * SECONDS_PER_DAY  # relative times lie in [0, span)

    # --- population -------------------------------------------------------
    customer_xy = rng.uniform(0.0, GRID_SIZE, size=(n_cust, 2))
    mean_amount = rng.uniform(*MEAN_AMOUNT_RANGE, size=n_cust)
    std_amount = mean_amount / 2.0
    tx_per_day = rng.uniform(*MEAN_TX_PER_DAY_RANGE, size=n_cust)
    terminal_xy = rng.uniform(0.0, GRID_SIZE, size=(n_term, 2))
    offsets, flat_terms = _reachable_terminals(customer_xy, terminal_xy)
    n_reach = np.diff(offsets)

    # --- genuine payments -------------------------------------------------
    per_day = rng.poisson(tx_per_day, size=(days, n_cust))
    cust = np.repeat(np.tile(np.arange(n_cust, dtype=np.int64), days), per_day.ravel())
    day = np.repeat(np.arange(days, dtype=np.int64), per_day.sum(axis=1))
    del per_day
    n = cust.shape[0]
    rel_time = day * SECONDS_PER_DAY + _truncated_time_of_day(rng, n)
    del day
    pick = (rng.random(n) * n_reach[cust]).astype(np.int64)
    np.minimum(pick, n_reach[cust] - 1, out=pick)
    term = flat_terms[offsets[cust] + pick]
    del pick
    amount = _positive_normal(rng, mean_amount[cust], std_amount[cust])
    cents = np.maximum(np.rint(amount * 100.0).astype(np.int64), 1)
    del amount
    scenario = np.zeros(n, dtype=np.int8)

    # 1. large amounts
    scenario[cents > int(LARGE_AMOUNT_THRESHOLD * 100)] = SCENARIO_LARGE_AMOUNT

    # 2. compromised terminals
    c_days, c_terms = _daily_picks(rng, days, n_term, n_term * COMPROMISED_TERMINALS_PER_TERMINAL_DAY)
    by_term = np.lexsort((rel_time, term))
    key = term[by_term] * span + rel_time[by_term]
    hit = _window_mask(
        key,
        span,
        c_terms,
        c_days * SECONDS_PER_DAY,
        COMPROMISED_TERMINAL_DAYS * SECONDS_PER_DAY,
    )
    scenario[by_term[hit]] = SCENARIO_COMPROMISED_TERMINAL
    del by_term, key, hit

    # 3. compromised cards
    k_days, k_custs = _daily_picks(rng, days, n_cust, n_cust * COMPROMISED_CARDS_PER_CUSTOMER_DAY)
    by_cust = np.lexsort((rel_time, cust))
    key = cust[by_cust] * span + rel_time[by_cust]
    in_window = _window_mask(
        key,
        span,
        k_custs,
        k_days * SECONDS_PER_DAY,
        COMPROMISED_CARD_DAYS * SECONDS_PER_DAY,
    )
    chosen = rng.random(n) < COMPROMISED_CARD_FRACTION
    victims = by_cust[in_window]
    victims = victims[chosen[victims]]
    scenario[victims] = SCENARIO_COMPROMISED_CARD
    cents[victims] *= COMPROMISED_CARD_MULTIPLIER
    del by_cust, key, in_window, chosen, victims

    # 4. card testing bursts (extra payments)
    b_days, b_custs = _daily_picks(rng, days, n_cust, n_cust * CARD_TESTING_PER_CUSTOMER_DAY)
    sizes = rng.integers(CARD_TESTING_BURST_SIZE[0], CARD_TESTING_BURST_SIZE[1] + 1, size=b_days.size)
    burst_start = b_days * SECONDS_PER_DAY + rng.integers(
        0, SECONDS_PER_DAY - CARD_TESTING_WINDOW_SECONDS, size=b_days.size
    )
    m = int(sizes.sum())
    ct_time = np.repeat(burst_start, sizes) + rng.integers(0, CARD_TESTING_WINDOW_SECONDS, size=m)
    ct_cust = np.repeat(b_custs, sizes)
    ct_term = rng.integers(0, n_term, size=m).astype(np.int64)
    ct_cents = rng.integers(CARD_TESTING_AMOUNT_CENTS[0], CARD_TESTING_AMOUNT_CENTS[1] + 1, size=m).astype(np.int64)

    rel_time = np.concatenate([rel_time, ct_time])
    cust = np.concatenate([cust, ct_cust])
    term = np.concatenate([term, ct_term])
    cents = np.concatenate([cents, ct_cents])
    scenario = np.concatenate([scenario, np.full(m, SCENARIO_CARD_TESTING, dtype=np.int8)])

    # --- order by time (stable => ties keep generation order) -------------
    order = np.argsort(rel_time, kind="stable")
    event_time = rel_time[order] + np.int64(config.start_epoch)
    cents = cents[order]
    scenario = scenario[order]
    total = event_time.shape[0]
    return Simulation(
        config=config,
        transaction_id=np.arange(total, dtype=np.int64),
        event_time=event_time,
        customer=cust[order],
        terminal=term[order],
        amount_cents=cents,
        amount=cents / 100.0,
        scenario=scenario,
        is_fraud=scenario > 0,
        customer_xy=customer_xy,
        terminal_xy=terminal_xy,
        compromised_terminal_events=np.stack([c_days, c_terms], axis=1),
        compromised_card_events=np.stack([k_days, k_custs], axis=1),
        card_testing_events=np.stack([b_days, b_custs, sizes.astype(np.int64)], axis=1),
        generation_seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
def _rfc3339(seconds: np.ndarray) -> list[str]:
    """int64 epoch seconds -> 'YYYY-MM-DDTHH:MM:SS' strings (no 'Z')."""
    return np.datetime_as_string(np.asarray(seconds, dtype=np.int64).astype("datetime64[s]"), unit="s").tolist()


def publication_order(sim: Simulation) -> tuple[np.ndarray, np.ndarray]:
    """Merged publication order: (is_feedback bool array, transaction index).

    Transactions are already sorted by time and feedback follows the same
    order shifted by the constant delay, so both streams are merged with one
    ``searchsorted`` (feedback goes after transactions of the same instant).
    """
    n = len(sim)
    fraud_idx = np.flatnonzero(sim.is_fraud)
    reported = sim.event_time[fraud_idx] + sim.config.feedback_delay_seconds
    # number of transactions published at or before each feedback
    before = np.searchsorted(sim.event_time, reported, side="right")
    fb_pos = before + np.arange(fraud_idx.size, dtype=np.int64)
    total = n + fraud_idx.size
    is_fb = np.zeros(total, dtype=bool)
    is_fb[fb_pos] = True
    index = np.empty(total, dtype=np.int64)
    index[~is_fb] = np.arange(n, dtype=np.int64)
    index[is_fb] = fraud_idx
    return is_fb, index


def write_replay(sim: Simulation, path: str | os.PathLike, progress: bool = False) -> SimulationSummary:
    """Write ``sim`` as a replay file at ``path`` and summarise it."""
    t0 = time.perf_counter()
    n = len(sim)
    w_tx, w_c, w_t = sim.id_widths
    delay = sim.config.feedback_delay_seconds
    # %-style templates (fast per-line formatting); widths are baked in.
    tx_fmt = (
        '{"kind": "transaction", "event": {"transaction_id": '
        f'"tx%0{w_tx}d", "event_time": "%sZ", "customer_id": "C%0{w_c}d", '
        f'"terminal_id": "T%0{w_t}d", "amount": %d.%02d}}}}\n'
    )
    fb_fmt = (
        '{"kind": "feedback", "event": {"transaction_id": '
        f'"tx%0{w_tx}d", "customer_id": "C%0{w_c}d", "terminal_id": "T%0{w_t}d", '
        '"event_time": "%sZ", "reported_at": "%sZ", "is_fraud": true}}\n'
    )
    is_fb, index = publication_order(sim)
    total = is_fb.shape[0]

    bar = None
    if progress:
        from tqdm import tqdm  # lazy: optional dependency

        bar = tqdm(total=total, unit="event", desc="writing replay")
    try:
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            for lo in range(0, total, _WRITE_CHUNK):
                hi = min(total, lo + _WRITE_CHUNK)
                fb_mask = is_fb[lo:hi]
                idx = index[lo:hi]
                lines = np.empty(hi - lo, dtype=object)

                t_idx = idx[~fb_mask]
                if t_idx.size:
                    c = sim.amount_cents[t_idx]
                    lines[~fb_mask] = [
                        tx_fmt % row
                        for row in zip(
                            t_idx.tolist(),
                            _rfc3339(sim.event_time[t_idx]),
                            sim.customer[t_idx].tolist(),
                            sim.terminal[t_idx].tolist(),
                            (c // 100).tolist(),
                            (c % 100).tolist(),
                            strict=True,
                        )
                    ]
                f_idx = idx[fb_mask]
                if f_idx.size:
                    et = sim.event_time[f_idx]
                    lines[fb_mask] = [
                        fb_fmt % row
                        for row in zip(
                            f_idx.tolist(),
                            sim.customer[f_idx].tolist(),
                            sim.terminal[f_idx].tolist(),
                            _rfc3339(et),
                            _rfc3339(et + delay),
                            strict=True,
                        )
                    ]
                fh.write("".join(lines.tolist()))
                if bar is not None:
                    bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()

    frauds = int(sim.is_fraud.sum())
    counts = np.bincount(sim.scenario.astype(np.int64), minlength=5)
    if n:
        first, last = _rfc3339(sim.event_time[[0, n - 1]])
        first, last = first + "Z", last + "Z"
    else:
        first = last = ""
    return SimulationSummary(
        transactions=n,
        feedback=frauds,
        frauds_by_scenario={name: int(counts[code]) for code, name in SCENARIO_NAMES.items()},
        fraud_rate=(frauds / n) if n else 0.0,
        first_event_time=first,
        last_event_time=last,
        seconds=sim.generation_seconds + (time.perf_counter() - t0),
    )


def simulate_to_file(config: SimulationConfig, path: str | os.PathLike, progress: bool = False) -> SimulationSummary:
    """Simulate ``config`` and write the replay file; ``seconds`` covers both."""
    return write_replay(simulate(config), path, progress=progress)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
