"""Tests for rtml.features: the contract's reference features, per event, from bounded state."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtml.events import Feedback, Transaction, format_timestamp, parse_timestamp
from rtml.features import (
    CUSTOMER_FEATURES,
    DAY_US,
    DELAY_DAYS,
    FEATURE_NAMES,
    HOUR_US,
    RETENTION_US,
    TERMINAL_FEATURES,
    WINDOW_DAYS,
    CustomerState,
    Entry,
    Report,
    TerminalState,
    features_for,
    transaction_features,
)
from tests.feature_reference import reference_features, reference_stream

T0 = parse_timestamp("2024-01-01T00:00:00Z", "event_time")  # a Monday
US = 1
COUNT_NAMES = {name for name in FEATURE_NAMES if "_nb_tx_" in name or name.startswith("tx_during_")}


def tx(tid, t, customer="c1", terminal="m1", amount=10.0):
    return Transaction(tid, format_timestamp(t), t, customer, terminal, float(amount))


def fb(tid, event_time, reported_at, is_fraud=True, customer="c1", terminal="m1"):
    return Feedback(
        tid,
        customer,
        terminal,
        format_timestamp(event_time),
        event_time,
        format_timestamp(reported_at),
        reported_at,
        is_fraud,
    )


class Engine:
    """Routes a stream to per-entity states the way a pipeline does."""

    def __init__(self, retention_us=RETENTION_US):
        self.retention_us = retention_us
        self.customers: dict[str, CustomerState] = {}
        self.terminals: dict[str, TerminalState] = {}

    def customer(self, key):
        if key not in self.customers:
            self.customers[key] = CustomerState(retention_us=self.retention_us)
        return self.customers[key]

    def terminal(self, key):
        if key not in self.terminals:
            self.terminals[key] = TerminalState(retention_us=self.retention_us)
        return self.terminals[key]

    def process(self, event):
        if isinstance(event, Feedback):
            self.terminal(event.terminal_id).apply_feedback(event)
            return None
        return features_for(event, self.customer(event.customer_id), self.terminal(event.terminal_id))

    def run(self, events):
        """Features (or None) of every transaction, in order."""
        out = []
        for event in events:
            result = self.process(event)
            if isinstance(event, Transaction):
                out.append(result)
        return out

    def rebuilt(self):
        """A copy of every state restored from what it would persist."""
        other = Engine(self.retention_us)
        for key, state in self.customers.items():
            other.customers[key] = CustomerState(state.entries(), retention_us=self.retention_us)
        for key, state in self.terminals.items():
            other.terminals[key] = TerminalState(state.entries(), state.reports(), retention_us=self.retention_us)
        return other


def assert_features_equal(got, want):
    assert (got is None) == (want is None), (got, want)
    if got is None:
        return
    assert list(got) == list(FEATURE_NAMES)
    for name in FEATURE_NAMES:
        if name in COUNT_NAMES:
            assert type(got[name]) is int, name
            assert got[name] == want[name], (name, got[name], want[name])
        else:
            assert type(got[name]) is float, name
            assert math.isclose(got[name], want[name], rel_tol=1e-9, abs_tol=1e-9), (name, got[name], want[name])


def assert_stream_matches(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        try:
            assert_features_equal(g, w)
        except AssertionError as err:
            raise AssertionError(f"transaction #{i}: {err}") from None


# --- names and per-transaction flags ---------------------------------------------------------


def test_feature_names_are_the_contracts_fifteen_in_order():
    assert FEATURE_NAMES == (
        "amount",
        "tx_during_weekend",
        "tx_during_night",
        "customer_nb_tx_1d",
        "customer_avg_amount_1d",
        "customer_nb_tx_7d",
        "customer_avg_amount_7d",
        "customer_nb_tx_30d",
        "customer_avg_amount_30d",
        "terminal_nb_tx_1d",
        "terminal_risk_1d",
        "terminal_nb_tx_7d",
        "terminal_risk_7d",
        "terminal_nb_tx_30d",
        "terminal_risk_30d",
    )
    assert FEATURE_NAMES[3:9] == CUSTOMER_FEATURES
    assert FEATURE_NAMES[9:] == TERMINAL_FEATURES
    assert WINDOW_DAYS == (1, 7, 30) and DELAY_DAYS == 7
    assert RETENTION_US == 37 * DAY_US


@pytest.mark.parametrize(
    ("stamp", "night"),
    [
        ("2024-01-03T00:00:00Z", 1),
        ("2024-01-03T06:59:59.999999Z", 1),
        ("2024-01-03T07:00:00Z", 0),
        ("2024-01-03T23:59:59.999999Z", 0),
        ("2024-01-03T06:30:00+02:00", 1),  # 04:30 UTC
        ("2024-01-03T08:30:00+02:00", 1),  # 06:30 UTC
        ("2024-01-03T06:30:00-01:00", 0),  # 07:30 UTC
    ],
)
def test_night_is_utc_hours_0_to_6_inclusive(stamp, night):
    t = parse_timestamp(stamp, "event_time")
    assert transaction_features(tx("a", t))["tx_during_night"] == night


@pytest.mark.parametrize(
    ("stamp", "weekend"),
    [
        ("2024-01-05T23:59:59.999999Z", 0),  # Friday
        ("2024-01-06T00:00:00Z", 1),  # Saturday
        ("2024-01-07T23:59:59.999999Z", 1),  # Sunday
        ("2024-01-08T00:00:00Z", 0),  # Monday
        ("2024-01-08T00:30:00+01:00", 1),  # Sunday 23:30 UTC
        ("1969-12-28T12:00:00Z", 1),  # a Sunday before the epoch
        ("1969-12-29T12:00:00Z", 0),  # a Monday before the epoch
    ],
)
def test_weekend_is_saturday_or_sunday_utc(stamp, weekend):
    t = parse_timestamp(stamp, "event_time")
    assert transaction_features(tx("a", t))["tx_during_weekend"] == weekend


def test_transaction_features_copy_the_amount_as_float():
    assert transaction_features(tx("a", T0, amount=12)) == {
        "amount": 12.0,
        "tx_during_weekend": 0,
        "tx_during_night": 1,
    }


# --- customer windows --------------------------------------------------------------------------


def test_customer_window_excludes_exactly_n_days_before_and_includes_t():
    t = T0 + 40 * DAY_US
    state = CustomerState()
    for tid, when, amount in [
        ("30d-edge", t - 30 * DAY_US, 1000.0),  # excluded everywhere
        ("30d-in", t - 30 * DAY_US + US, 300.0),
        ("7d-edge", t - 7 * DAY_US, 70.0),  # in 30d only
        ("7d-in", t - 7 * DAY_US + US, 7.0),
        ("1d-edge", t - DAY_US, 50.0),  # in 7d and 30d
        ("1d-in", t - DAY_US + US, 4.0),
        ("same-time", t, 6.0),
    ]:
        state.update(tx(tid, when, amount=amount))
    got = state.update(tx("T", t, amount=2.0))
    assert got == {
        "customer_nb_tx_1d": 3,
        "customer_avg_amount_1d": (4.0 + 6.0 + 2.0) / 3,
        "customer_nb_tx_7d": 5,
        "customer_avg_amount_7d": (7.0 + 50.0 + 4.0 + 6.0 + 2.0) / 5,
        "customer_nb_tx_30d": 7,
        "customer_avg_amount_30d": (300.0 + 70.0 + 7.0 + 50.0 + 4.0 + 6.0 + 2.0) / 7,
    }
    assert list(got) == list(CUSTOMER_FEATURES)


def test_first_customer_transaction_counts_only_itself():
    got = CustomerState().update(tx("T", T0, amount=42.5))
    assert got == dict.fromkeys(CUSTOMER_FEATURES[0::2], 1) | dict.fromkeys(CUSTOMER_FEATURES[1::2], 42.5)
    assert type(got["customer_nb_tx_1d"]) is int and type(got["customer_avg_amount_1d"]) is float


def test_customer_features_ignore_other_customers():
    engine = Engine()
    engine.process(tx("x", T0, customer="other", amount=100.0))
    got = engine.process(tx("T", T0 + HOUR_US, customer="c1", amount=5.0))
    assert got["customer_nb_tx_30d"] == 1 and got["customer_avg_amount_30d"] == 5.0


# --- terminal windows --------------------------------------------------------------------------


def test_terminal_window_is_delayed_by_seven_days_with_exclusive_lower_edge():
    t = T0 + 60 * DAY_US
    d = 7 * DAY_US
    state = TerminalState()
    for tid, when in [
        ("too-recent", t - d + US),  # after t - D: excluded
        ("at-delay", t - d),  # t - D: in every window
        ("1d-in", t - d - DAY_US + US),
        ("1d-edge", t - d - DAY_US),  # in 7d and 30d
        ("7d-in", t - d - 7 * DAY_US + US),
        ("7d-edge", t - d - 7 * DAY_US),  # in 30d only
        ("30d-in", t - d - 30 * DAY_US + US),
        ("30d-edge", t - d - 30 * DAY_US),  # excluded everywhere
    ]:
        assert state.update(tx(tid, when)) is not None
    got = state.update(tx("T", t))
    assert got == {
        "terminal_nb_tx_1d": 2,
        "terminal_risk_1d": 0.0,
        "terminal_nb_tx_7d": 4,
        "terminal_risk_7d": 0.0,
        "terminal_nb_tx_30d": 6,
        "terminal_risk_30d": 0.0,
    }
    assert list(got) == list(TERMINAL_FEATURES)
    for tid in ("too-recent", "at-delay", "1d-edge", "7d-edge", "30d-edge"):
        state.apply_feedback(fb(tid, 0, t))  # mark the boundary entries
    assert state.features_at(t) == {
        "terminal_nb_tx_1d": 2,
        "terminal_risk_1d": 1 / 2,
        "terminal_nb_tx_7d": 4,
        "terminal_risk_7d": 2 / 4,
        "terminal_nb_tx_30d": 6,
        "terminal_risk_30d": 3 / 6,
    }


def test_terminal_features_are_zero_without_delayed_transactions():
    state = TerminalState()
    state.update(tx("recent", T0))
    got = state.update(tx("T", T0 + 6 * DAY_US))
    assert got == dict.fromkeys(TERMINAL_FEATURES[0::2], 0) | dict.fromkeys(TERMINAL_FEATURES[1::2], 0.0)
    assert type(got["terminal_nb_tx_1d"]) is int and type(got["terminal_risk_1d"]) is float


def test_terminal_risk_is_share_of_window_transactions_marked_fraud():
    t = T0 + 60 * DAY_US
    state = TerminalState()
    old = [
        tx("a", t - 7 * DAY_US - HOUR_US),
        tx("b", t - 9 * DAY_US),
        tx("c", t - 20 * DAY_US),
        tx("d", t - 25 * DAY_US),
    ]
    for item in old:
        state.update(item)
    assert state.apply_feedback(fb("a", old[0].event_time_us, t - DAY_US)) is True
    assert state.apply_feedback(fb("c", old[2].event_time_us, t - DAY_US)) is True
    got = state.update(tx("T", t))
    assert got["terminal_nb_tx_1d"] == 1 and got["terminal_risk_1d"] == 1.0
    assert got["terminal_nb_tx_7d"] == 2 and got["terminal_risk_7d"] == 0.5
    assert got["terminal_nb_tx_30d"] == 4 and got["terminal_risk_30d"] == 0.5


def test_terminal_features_come_from_transactions_processed_before_only():
    t = T0 + 60 * DAY_US
    engine = Engine()
    first = engine.process(tx("T", t))
    engine.process(tx("late", t - 10 * DAY_US))
    engine.process(fb("late", t - 10 * DAY_US, t))
    assert first["terminal_nb_tx_30d"] == 0
    again = engine.terminals["m1"].features_at(t)
    assert again["terminal_nb_tx_30d"] == 1 and again["terminal_risk_30d"] == 1.0


# --- duplicates and out-of-order ---------------------------------------------------------------


def test_duplicate_transaction_is_not_counted_twice_and_returns_none():
    engine = Engine()
    first = engine.process(tx("a", T0, amount=10.0))
    assert engine.process(tx("a", T0, amount=10.0)) is None
    assert engine.process(tx("a", T0 + HOUR_US, amount=99.0)) is None  # a different copy: still a duplicate
    assert first["customer_nb_tx_1d"] == 1
    assert len(engine.customers["c1"]) == 1 and len(engine.terminals["m1"]) == 1
    assert engine.customers["c1"].watermark_us == T0
    later = engine.process(tx("b", T0 + 2 * HOUR_US, amount=20.0))
    assert later["customer_nb_tx_1d"] == 2 and later["customer_avg_amount_1d"] == 15.0
    assert engine.customers["c1"].entries() == [Entry(T0, "a", 10.0), Entry(T0 + 2 * HOUR_US, "b", 20.0)]


def test_state_updates_return_none_for_a_held_id():
    customer, terminal = CustomerState(), TerminalState()
    assert customer.update(tx("a", T0)) is not None and customer.update(tx("a", T0)) is None
    assert terminal.update(tx("a", T0)) is not None and terminal.update(tx("a", T0)) is None


def test_same_id_at_another_customer_counts_once_at_the_shared_terminal():
    engine = Engine()
    engine.process(tx("a", T0, customer="c1"))
    engine.process(tx("seen", T0 - 7 * DAY_US, customer="c9"))
    got = engine.process(tx("a", T0 + HOUR_US, customer="c2"))
    assert got is not None and got["customer_nb_tx_1d"] == 1
    assert got["terminal_nb_tx_1d"] == 1  # terminal features still computed, without adding "a" again
    assert [e.transaction_id for e in engine.terminals["m1"].entries()] == ["seen", "a"]
    later = engine.process(tx("b", T0 + 7 * DAY_US + HOUR_US, customer="c3"))
    assert later["terminal_nb_tx_1d"] == 1


def test_out_of_order_transaction_counts_for_later_ones_and_sees_earlier_processed():
    t = T0 + 60 * DAY_US
    engine = Engine()
    engine.process(tx("new", t, amount=10.0))
    late = engine.process(tx("late", t - 2 * HOUR_US, amount=30.0))
    # its own features come from everything processed so far: "new" is after it, not in its windows
    assert late["customer_nb_tx_1d"] == 1 and late["customer_avg_amount_1d"] == 30.0
    after = engine.process(tx("after", t + HOUR_US, amount=20.0))
    assert after["customer_nb_tx_1d"] == 3 and after["customer_avg_amount_1d"] == 20.0
    # and at the terminal
    engine.process(tx("old", t - 9 * DAY_US))
    probe = engine.process(tx("probe", t + 2 * HOUR_US))
    assert probe["terminal_nb_tx_7d"] == 1
    assert [e.transaction_id for e in engine.customers["c1"].entries()] == ["old", "late", "new", "after", "probe"]


def test_customer_window_counts_equal_times_regardless_of_processing_order():
    state = CustomerState()
    state.update(tx("b", T0 + HOUR_US, amount=1.0))
    state.update(tx("c", T0 + 2 * HOUR_US, amount=1.0))
    got = state.update(tx("a", T0 + HOUR_US, amount=4.0))  # late, ties with "b"
    assert got["customer_nb_tx_1d"] == 2 and got["customer_avg_amount_1d"] == 2.5
    assert [e.transaction_id for e in state.entries()] == ["a", "b", "c"]


# --- feedback ----------------------------------------------------------------------------------


def test_feedback_before_its_transaction_applies_when_it_arrives():
    t = T0 + 60 * DAY_US
    state = TerminalState()
    when = t - 7 * DAY_US - HOUR_US
    assert state.apply_feedback(fb("a", when, when)) is True
    assert state.reports() == {"a": Report(when, True, when)}
    state.update(tx("a", when))
    got = state.update(tx("T", t))
    assert got["terminal_nb_tx_1d"] == 1 and got["terminal_risk_1d"] == 1.0


def test_retraction_unmarks_the_transaction():
    t = T0 + 60 * DAY_US
    state = TerminalState()
    state.update(tx("a", t - 7 * DAY_US - HOUR_US))
    state.apply_feedback(fb("a", t - 7 * DAY_US - HOUR_US, t - 3 * DAY_US, True))
    assert state.features_at(t)["terminal_risk_1d"] == 1.0
    assert state.apply_feedback(fb("a", t - 7 * DAY_US - HOUR_US, t - 2 * DAY_US, False)) is True
    assert state.features_at(t)["terminal_risk_1d"] == 0.0
    assert state.reports()["a"].is_fraud is False


@pytest.mark.parametrize("order", ["older-first", "newer-first"])
def test_latest_reported_at_wins_regardless_of_processing_order(order):
    t = T0 + 60 * DAY_US
    older = fb("a", t - 7 * DAY_US - HOUR_US, t - 5 * DAY_US, True)
    newer = fb("a", t - 7 * DAY_US - HOUR_US, t - 4 * DAY_US, False)
    reports = [older, newer] if order == "older-first" else [newer, older]
    for transaction_first in (True, False):
        state = TerminalState()
        if transaction_first:
            state.update(tx("a", t - 7 * DAY_US - HOUR_US))
        changed = [state.apply_feedback(report) for report in reports]
        assert changed == ([True, True] if order == "older-first" else [True, False])
        if not transaction_first:
            state.update(tx("a", t - 7 * DAY_US - HOUR_US))
        assert state.features_at(t)["terminal_risk_1d"] == 0.0
        assert state.reports() == {"a": Report(t - 4 * DAY_US, False, t - 7 * DAY_US - HOUR_US)}
    # mirrored: the newer report says fraud
    state = TerminalState([Entry(t - 7 * DAY_US - HOUR_US, "a", 1.0)])
    state.apply_feedback(fb("a", t - 7 * DAY_US - HOUR_US, t - 4 * DAY_US, True))
    assert state.apply_feedback(fb("a", t - 7 * DAY_US - HOUR_US, t - 5 * DAY_US, False)) is False
    assert state.features_at(t)["terminal_risk_1d"] == 1.0


def test_equal_reported_at_lets_the_later_processed_report_win():
    t = T0 + 60 * DAY_US
    state = TerminalState([Entry(t - 7 * DAY_US - HOUR_US, "a", 1.0)])
    state.apply_feedback(fb("a", t - 7 * DAY_US - HOUR_US, t - 4 * DAY_US, True))
    assert state.apply_feedback(fb("a", t - 7 * DAY_US - HOUR_US, t - 4 * DAY_US, False)) is True
    assert state.features_at(t)["terminal_risk_1d"] == 0.0
    assert state.apply_feedback(fb("a", t - 7 * DAY_US - HOUR_US, t - 4 * DAY_US, False)) is False  # same report again


def test_feedback_processed_after_a_transaction_does_not_change_its_features():
    t = T0 + 60 * DAY_US
    engine = Engine()
    engine.process(tx("a", t - 7 * DAY_US - HOUR_US))
    before = engine.process(tx("T1", t))
    engine.process(fb("a", t - 7 * DAY_US - HOUR_US, t))
    after = engine.process(tx("T2", t))
    assert before["terminal_risk_1d"] == 0.0 and after["terminal_risk_1d"] == 1.0


# --- restore -----------------------------------------------------------------------------------


def _mixed_stream(days=80, seed_step=7919):
    """A deterministic stream with out-of-order transactions, duplicates and feedback."""
    events = []
    for i in range(days * 6):
        t = T0 + i * 4 * HOUR_US + (i * seed_step) % HOUR_US
        if i % 11 == 5:
            t -= 3 * DAY_US  # late
        item = tx(f"t{i}", t, customer=f"c{i % 3}", terminal=f"m{i % 4}", amount=float((i * 37) % 200))
        events.append(item)
        if i % 13 == 0:
            events.append(item)  # re-delivery
        if i % 5 == 0:
            target = events[max(0, len(events) - 1 - (i % 17))]
            if isinstance(target, Transaction):
                events.append(
                    fb(
                        target.transaction_id,
                        target.event_time_us,
                        t + (i % 3) * HOUR_US,
                        is_fraud=i % 15 != 0,
                        customer=target.customer_id,
                        terminal=target.terminal_id,
                    )
                )
        if i % 9 == 0:
            events.append(fb(f"t{i + 3}", t + 2 * HOUR_US, t + HOUR_US, terminal=f"m{(i + 3) % 4}"))  # pending
    return events


def test_restoring_states_midway_gives_the_same_features_as_never_restoring():
    events = _mixed_stream()
    straight = Engine().run(events)
    for cut in (1, 57, len(events) // 2, len(events) - 3):
        engine = Engine()
        head = engine.run(events[:cut])
        engine = engine.rebuilt()
        tail = engine.run(events[cut:])
        assert head + tail == straight  # exactly, floats included


def test_restored_state_round_trips_entries_reports_and_watermark():
    engine = Engine()
    engine.run(_mixed_stream(days=50))
    for state in engine.terminals.values():
        copy = TerminalState(state.entries(), state.reports())
        assert copy.entries() == state.entries()
        assert copy.reports() == state.reports()
        assert copy.watermark_us == state.watermark_us and len(copy) == len(state)
    for state in engine.customers.values():
        copy = CustomerState(state.entries())
        assert copy.entries() == state.entries() and copy.watermark_us == state.watermark_us


def test_restore_deduplicates_sorts_and_keeps_the_newest_report_cell():
    t = T0 + 60 * DAY_US
    entries = [Entry(t - 8 * DAY_US, "b", 2.0), Entry(t - 9 * DAY_US, "a", 1.0), Entry(t - 8 * DAY_US, "b", 5.0)]
    cells = [
        ("a", Report(t - 2 * DAY_US, False, t - 9 * DAY_US)),
        ("a", Report(t - 3 * DAY_US, True, t - 9 * DAY_US)),  # older cell
        ("b", Report(t - DAY_US, True, t - 8 * DAY_US)),
    ]
    state = TerminalState(entries, cells)
    assert state.entries() == [Entry(t - 9 * DAY_US, "a", 1.0), Entry(t - 8 * DAY_US, "b", 2.0)]
    assert state.reports()["a"].is_fraud is False
    got = state.features_at(t)
    assert got["terminal_nb_tx_7d"] == 2 and got["terminal_risk_7d"] == 0.5
    assert TerminalState(entries, {"a": cells[0][1], "b": cells[2][1]}).features_at(t) == got
    customer = CustomerState(reversed(entries))
    assert [e.transaction_id for e in customer.entries()] == ["a", "b"] and customer.watermark_us == t - 8 * DAY_US


def test_restore_drops_entries_and_pending_reports_beyond_the_horizon():
    t = T0 + 100 * DAY_US
    entries = [Entry(t, "new", 1.0), Entry(t - RETENTION_US, "edge", 1.0), Entry(t - RETENTION_US + 1, "kept", 1.0)]
    reports = {
        "edge": Report(t, True, t - RETENTION_US),
        "gone": Report(t, True, t - RETENTION_US),
        "wait": Report(t, True, t - RETENTION_US + 1),
    }
    state = TerminalState(entries, reports)
    assert [e.transaction_id for e in state.entries()] == ["kept", "new"]
    assert set(state.reports()) == {"wait"}
    assert [e.transaction_id for e in CustomerState(entries).entries()] == ["kept", "new"]


# --- retention and pruning ---------------------------------------------------------------------


def test_state_size_stays_bounded_over_200_days_of_hourly_transactions():
    engine = Engine()
    bound = 37 * 24
    for i in range(200 * 24):
        t = T0 + i * HOUR_US
        engine.process(tx(f"t{i}", t))
        if i % 3 == 0:
            engine.process(fb(f"t{i}", t, t + HOUR_US))
        if i % 7 == 0:
            engine.process(fb(f"future{i}", t + HOUR_US, t))  # stays pending forever
        customer, terminal = engine.customers["c1"], engine.terminals["m1"]
        assert len(customer) <= bound and len(terminal) <= bound
    assert len(customer) == bound and len(terminal) == bound
    # the physical lists carry at most a small batch of pruned slots
    assert len(customer._times) <= bound + 32 and len(terminal._times) <= bound + 32
    assert len(customer._known) == bound and len(terminal._known) == bound
    assert len(terminal._reports) <= bound // 3 + 1 and len(terminal._fraud) == len(terminal._reports)
    assert len(terminal._pending) <= 2 * (bound // 7 + 1) + 64
    assert customer.entries()[0].event_time_us == T0 + (200 * 24 - bound) * HOUR_US


def test_pruning_never_changes_features_in_event_time_order():
    events = []
    for i in range(70 * 8):
        t = T0 + i * 3 * HOUR_US
        events.append(tx(f"t{i}", t, customer=f"c{i % 2}", terminal=f"m{i % 3}", amount=float(i % 50)))
        if i % 4 == 1:
            events.append(
                fb(
                    f"t{i - 1}",
                    t - 3 * HOUR_US,
                    t,
                    is_fraud=i % 12 != 1,
                    customer=f"c{(i - 1) % 2}",
                    terminal=f"m{(i - 1) % 3}",
                )
            )
    engine = Engine()
    assert_stream_matches(engine.run(events), reference_stream(events))
    assert all(len(state) <= 37 * 8 for state in engine.customers.values())
    assert any(t["terminal_nb_tx_30d"] > 0 and t["terminal_risk_30d"] > 0 for t in reference_features(events).values())


def test_transaction_older_than_the_horizon_is_answered_but_not_stored():
    t = T0 + 100 * DAY_US
    engine = Engine()
    engine.process(tx("new", t))
    engine.process(tx("recent", t - 20 * DAY_US))
    old = t - RETENTION_US
    got = engine.process(tx("ancient", old, amount=7.0))
    assert got["customer_nb_tx_1d"] == 1 and got["customer_avg_amount_30d"] == 7.0
    assert got["terminal_nb_tx_30d"] == 0 and got["terminal_risk_30d"] == 0.0
    assert [e.transaction_id for e in engine.customers["c1"].entries()] == ["recent", "new"]
    assert [e.transaction_id for e in engine.terminals["m1"].entries()] == ["recent", "new"]
    # not remembered, so a copy is answered again
    assert engine.process(tx("ancient", old, amount=7.0)) is not None
    # a transaction just inside the horizon is stored
    assert engine.process(tx("edge", old + 1)) is not None and len(engine.customers["c1"]) == 3


def test_customer_features_stay_exact_for_transactions_up_to_seven_days_late():
    events = []
    for i in range(60 * 4):
        t = T0 + i * 6 * HOUR_US
        if i % 10 == 9:
            t -= 7 * DAY_US - HOUR_US
        events.append(tx(f"t{i}", t, amount=float(i % 17)))
    got = Engine().run(events)
    want = reference_stream(events)
    for g, w in zip(got, want, strict=True):
        for name in CUSTOMER_FEATURES:
            assert math.isclose(g[name], w[name], rel_tol=1e-9, abs_tol=1e-9), name


def test_feedback_for_a_transaction_beyond_the_horizon_is_dropped():
    t = T0 + 100 * DAY_US
    state = TerminalState([Entry(t, "new", 1.0)])
    assert state.apply_feedback(fb("gone", t - RETENTION_US, t)) is False
    assert state.apply_feedback(fb("pending", t - RETENTION_US + 1, t)) is True
    assert set(state.reports()) == {"pending"}
    state.update(tx("newer", t + 1))  # moves the horizon past the pending report
    assert state.reports() == {}


def test_pending_report_is_judged_by_its_own_event_time():
    # feedback whose event_time disagrees with its transaction's: the report's own time decides
    t = T0 + 100 * DAY_US
    state = TerminalState([Entry(t, "new", 1.0)])
    stale = t - RETENTION_US + HOUR_US
    assert state.apply_feedback(fb("x", stale, t, True)) is True
    assert state.apply_feedback(fb("y", stale, t, True)) is True
    state.update(tx("later", t + 2 * HOUR_US))  # the horizon passes both reports (not swept yet)
    assert state.reports() == {}
    assert state.apply_feedback(fb("x", t, t - HOUR_US, True)) is True  # older reported_at, but the other is gone
    assert state.reports() == {"x": Report(t - HOUR_US, True, t)}
    state.update(tx("y", t + HOUR_US))  # its pending report fell behind the horizon: not applied
    state.update(tx("x", t + HOUR_US))
    assert state.reports() == {"x": Report(t - HOUR_US, True, t)}
    assert state.features_at(t + 8 * DAY_US)["terminal_risk_1d"] == 1 / 3


def test_stale_pending_reports_are_swept_from_memory():
    t = T0 + 100 * DAY_US
    state = TerminalState([Entry(t, "new", 1.0)])
    for i in range(60):
        state.apply_feedback(fb(f"old{i}", t - 30 * DAY_US, t))
    state.update(tx("later", t + 7 * DAY_US))  # horizon = t - 30 days: all 60 are now stale
    for i in range(10):
        state.apply_feedback(fb(f"fresh{i}", t, t))
    assert len(state._pending) < 64 and set(state.reports()) == {f"fresh{i}" for i in range(10)}


def test_restore_lets_the_later_of_two_equal_report_cells_win():
    t = T0 + 60 * DAY_US
    cells = [("a", Report(t, True, t - 8 * DAY_US)), ("a", Report(t, False, t - 8 * DAY_US))]
    assert TerminalState([Entry(t - 8 * DAY_US, "a", 1.0)], cells).reports()["a"].is_fraud is False


def test_retention_must_be_positive():
    with pytest.raises(ValueError):
        CustomerState(retention_us=0)
    with pytest.raises(ValueError):
        TerminalState(retention_us=-1)


# --- properties against the naive reference ----------------------------------------------------

# Times cluster on days that lie exactly 1, 7, 8, 14, 30, 37... days apart, at whole hours around the
# night edge, give or take a microsecond, so that window, horizon and calendar edges are hit often.
EDGE_OFFSETS_DAYS = (0, 0, 1, 7, 8, 14, 30, 37, 38, 44)
HOURS = st.sampled_from([0, 0, 6, 7, 12])
JITTER_US = st.sampled_from([0, 0, 0, 0, 1, -1, 12_345])
AMOUNTS = st.one_of(st.sampled_from([0.0, 1.0, 2.5, 10.0, 99.99]), st.floats(0, 5000, allow_nan=False))


@st.composite
def streams(draw, max_day=35, in_order=False, max_tx=30):
    """Transactions of a few customers/terminals with re-deliveries and feedback, in processing order."""
    customers = ["c0", "c1", "c2"][: draw(st.integers(1, 3))]
    terminals = ["m0", "m1", "m2"][: draw(st.integers(1, 3))]
    anchors = draw(st.lists(st.integers(0, max_day), min_size=1, max_size=3))
    txs = []
    for i in range(draw(st.integers(1, max_tx))):
        if draw(st.integers(0, 2)):
            day = min(max_day, draw(st.sampled_from(anchors)) + draw(st.sampled_from(EDGE_OFFSETS_DAYS)))
        else:
            day = draw(st.integers(0, max_day))
        t = T0 + day * DAY_US + draw(HOURS) * HOUR_US + draw(JITTER_US)
        txs.append(tx(f"t{i}", t, draw(st.sampled_from(customers)), draw(st.sampled_from(terminals)), draw(AMOUNTS)))
    if in_order:
        txs.sort(key=lambda item: item.event_time_us)
    events = list(txs)
    for _ in range(draw(st.integers(0, 5))):  # re-deliveries, some of them altered
        source = draw(st.sampled_from(txs))
        copy = draw(
            st.sampled_from(
                [
                    source,
                    source,
                    source._replace(amount=source.amount + 1.0),
                    source._replace(customer_id="c-other"),  # new for that customer, not for the terminal
                    source._replace(terminal_id="m-other"),  # a duplicate for the customer
                ]
            )
        )
        at = events.index(source) + 1
        if not in_order:
            at = draw(st.integers(at, len(events)))
        events.insert(at, copy)
    for _ in range(draw(st.integers(0, 12))):  # reports and retractions, anywhere in the stream
        if draw(st.integers(0, 9)) == 0:
            event_time = T0 + draw(st.integers(0, max_day)) * DAY_US
            target = tx("unknown", event_time, customers[0], terminals[0])
        else:
            target = draw(st.sampled_from(txs))
        reported_at = target.event_time_us + draw(st.sampled_from([0, 1, 2, 3, 14, 20, 40])) * 12 * HOUR_US
        report = fb(
            target.transaction_id,
            target.event_time_us,
            reported_at,
            draw(st.sampled_from([True, True, False])),
            target.customer_id,
            target.terminal_id,
        )
        events.insert(draw(st.integers(0, len(events))), report)
    return events


PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(streams(max_day=35))
def test_features_match_the_naive_reference_on_random_streams_within_retention(events):
    assert_stream_matches(Engine().run(events), reference_stream(events))


@PROPERTY
@given(streams(max_day=150, in_order=True))
def test_features_match_the_naive_reference_in_event_time_order_over_long_spans(events):
    assert_stream_matches(Engine().run(events), reference_stream(events))


@PROPERTY
@given(streams(max_day=120), st.sampled_from([RETENTION_US, 2 * DAY_US, 9 * DAY_US, 40 * DAY_US]))
def test_late_events_follow_the_documented_retention_rule(events, retention_us):
    assert_stream_matches(Engine(retention_us).run(events), reference_stream(events, retention_us))


@PROPERTY
@given(streams(max_day=90), st.data())
def test_restoring_at_any_point_changes_nothing(events, data):
    straight = Engine().run(events)
    cut = data.draw(st.integers(0, len(events)))
    engine = Engine()
    head = engine.run(events[:cut])
    tail = engine.rebuilt().run(events[cut:])
    assert head + tail == straight
    for state in list(engine.customers.values()) + list(engine.terminals.values()):
        times = [(e.event_time_us, e.transaction_id) for e in state.entries()]
        assert times == sorted(times) and len(times) == len(state) == len({e[1] for e in times})


def test_reference_features_keep_the_first_copy_of_each_id():
    events = [tx("a", T0, amount=1.0), tx("a", T0, amount=2.0), tx("b", T0 + 1, amount=3.0)]
    result = reference_features(events)
    assert set(result) == {"a", "b"}
    assert result["a"]["customer_avg_amount_1d"] == 1.0 and result["b"]["customer_avg_amount_1d"] == 2.0
    assert reference_stream(events)[1] is None


def test_entity_keys_are_the_entity_or_a_stable_bucket_of_it():
    from transforms.features import ComputeFeatures, StoreConfig, by_customer, entity_key

    assert entity_key("C42") == entity_key("C42", 0) == "C42"
    ids = [f"C{i}" for i in range(1000)]
    keys = [entity_key(i, 16) for i in ids]
    assert set(keys) == {str(b) for b in range(16)}  # every bucket used, named by its number
    assert keys == [entity_key(i, 16) for i in ids]  # the same entity always meets under the same key
    tx = Transaction("T1", "2026-01-01T00:00:00Z", 1_767_225_600_000_000, "C7", "M3", 10.0)
    assert by_customer((tx, None, None)) == ("C7", (tx, None, None))
    assert by_customer((tx, None, None), buckets=16) == (entity_key("C7", 16), (tx, None, None))
    with pytest.raises(ValueError, match="feature buckets must be >= 0"):
        ComputeFeatures(StoreConfig("p", "i", "t"), buckets=-1)
