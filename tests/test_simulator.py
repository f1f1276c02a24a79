"""Tests for rtml.simulator: replay-file contract, determinism and fraud mix."""

from __future__ import annotations

import datetime
import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest

from rtml.simulator import (
    SCENARIO_NAMES,
    SimulationConfig,
    SimulationSummary,
    simulate,
    simulate_to_file,
    write_replay,
)

SMALL = SimulationConfig(days=12, customers=300, terminals=600, seed=7)
MIX = SimulationConfig(days=60, customers=1000, terminals=2000, seed=42)

TX_FIELDS = {"transaction_id", "event_time", "customer_id", "terminal_id", "amount"}
FB_FIELDS = {
    "transaction_id",
    "customer_id",
    "terminal_id",
    "event_time",
    "reported_at",
    "is_fraud",
}


def parse_time(value: str) -> datetime.datetime:
    assert value.endswith("Z"), value
    parsed = datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
    return parsed.replace(tzinfo=datetime.UTC)


def read_lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def publication_key(record: dict) -> tuple:
    event = record["event"]
    if record["kind"] == "transaction":
        return (parse_time(event["event_time"]), 0, event["transaction_id"])
    return (parse_time(event["reported_at"]), 1, event["transaction_id"])


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "small.jsonl"
    summary = simulate_to_file(SMALL, path)
    return path, summary, read_lines(path)


@pytest.fixture(scope="module")
def mix_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "mix.jsonl"
    sim = simulate(MIX)
    summary = write_replay(sim, path)
    return sim, summary, read_lines(path)


# ---------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------
def test_same_config_gives_byte_identical_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    simulate_to_file(SMALL, a)
    simulate_to_file(SMALL, b)
    data = a.read_bytes()
    assert len(data) > 0
    assert data == b.read_bytes()


def test_different_seed_gives_different_file(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    simulate_to_file(SMALL, a)
    simulate_to_file(SimulationConfig(days=12, customers=300, terminals=600, seed=8), b)
    assert a.read_bytes() != b.read_bytes()


def test_simulate_does_not_touch_global_numpy_random_state():
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    simulate(SMALL)
    assert np.array_equal(np.random.random(3), expected)


# ---------------------------------------------------------------------------
# Line contract
# ---------------------------------------------------------------------------
def test_every_line_has_contract_fields_with_right_types(small_file):
    _, _, records = small_file
    assert records, "the file must not be empty"
    kinds = Counter()
    for record in records:
        assert set(record) == {"kind", "event"}
        kinds[record["kind"]] += 1
        event = record["event"]
        if record["kind"] == "transaction":
            assert set(event) == TX_FIELDS
            amount = event["amount"]
            assert isinstance(amount, (int, float)) and not isinstance(amount, bool)
            assert math.isfinite(amount) and amount >= 0
            assert round(amount, 2) == amount
            parse_time(event["event_time"])
        else:
            assert record["kind"] == "feedback"
            assert set(event) == FB_FIELDS
            assert event["is_fraud"] is True
            assert parse_time(event["reported_at"]) >= parse_time(event["event_time"])
        for field in ("transaction_id", "customer_id", "terminal_id"):
            value = event[field]
            assert isinstance(value, str) and 0 < len(value) <= 128
        assert event["customer_id"].startswith("C")
        assert event["terminal_id"].startswith("T")
        assert event["transaction_id"].startswith("tx")
    assert kinds["transaction"] > 1000
    assert kinds["feedback"] > 0


def test_ids_are_zero_padded_to_fixed_widths_and_transaction_ids_unique(small_file):
    _, _, records = small_file
    tx = [r["event"] for r in records if r["kind"] == "transaction"]
    ids = [e["transaction_id"] for e in tx]
    assert len(ids) == len(set(ids))
    assert {len(i) for i in ids} == {len("tx00000000123")}
    assert {len(e["customer_id"]) for e in tx} == {len("C000123")}
    assert {len(e["terminal_id"]) for e in tx} == {len("T0004567")}
    customers = {int(e["customer_id"][1:]) for e in tx}
    terminals = {int(e["terminal_id"][1:]) for e in tx}
    assert min(customers) >= 0 and max(customers) < SMALL.customers
    assert min(terminals) >= 0 and max(terminals) < SMALL.terminals


def test_id_widths_grow_for_large_populations(tmp_path):
    config = SimulationConfig(days=1, customers=1_200_000, terminals=3, seed=1)
    sim = simulate(config)
    assert sim.customer_id_str(5) == "C0000005"
    assert sim.terminal_id_str(2) == "T0000002"
    assert sim.transaction_id_str(3) == "tx00000000003"


def test_event_times_lie_within_simulated_days(small_file):
    _, _, records = small_file
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    end = start + datetime.timedelta(days=SMALL.days)
    times = [parse_time(r["event"]["event_time"]) for r in records if r["kind"] == "transaction"]
    assert min(times) >= start and max(times) < end
    # time of day is centred on noon
    hours = np.array([t.hour + t.minute / 60 for t in times])
    assert 10.5 < hours.mean() < 13.5


def test_file_is_in_publication_order(small_file):
    _, _, records = small_file
    keys = [publication_key(r) for r in records]
    for previous, current in itertools.pairwise(keys):
        assert current > previous  # total order: strictly increasing
    # transaction ids are assigned in time order
    tx_ids = [r["event"]["transaction_id"] for r in records if r["kind"] == "transaction"]
    assert tx_ids == sorted(tx_ids)


def test_zero_delay_puts_feedback_right_after_its_transaction(tmp_path):
    config = SimulationConfig(days=10, customers=300, terminals=600, seed=3, feedback_delay_days=0)
    path = tmp_path / "zero.jsonl"
    summary = simulate_to_file(config, path)
    records = read_lines(path)
    assert summary.feedback > 0
    keys = [publication_key(r) for r in records]
    assert all(b > a for a, b in itertools.pairwise(keys))
    for i, record in enumerate(records):
        if record["kind"] == "feedback":
            event = record["event"]
            assert event["reported_at"] == event["event_time"]
            # only transactions of the same second, or other feedback, precede
            seen = {r["event"]["transaction_id"] for r in records[:i] if r["kind"] == "transaction"}
            assert event["transaction_id"] in seen
            break


# ---------------------------------------------------------------------------
# Feedback
# ---------------------------------------------------------------------------
def check_feedback(records, delay_days: float) -> tuple[int, int]:
    transactions = {}
    feedback = []
    for record in records:
        event = record["event"]
        if record["kind"] == "transaction":
            transactions[event["transaction_id"]] = event
        else:
            # a transaction is always published before its feedback
            assert event["transaction_id"] in transactions
            feedback.append(event)
    delay = datetime.timedelta(seconds=round(delay_days * 86400))
    for event in feedback:
        tx = transactions[event["transaction_id"]]
        assert event["customer_id"] == tx["customer_id"]
        assert event["terminal_id"] == tx["terminal_id"]
        assert event["event_time"] == tx["event_time"]
        assert parse_time(event["reported_at"]) - parse_time(event["event_time"]) == delay
    ids = [e["transaction_id"] for e in feedback]
    assert len(ids) == len(set(ids)), "one feedback per fraud"
    return len(transactions), len(feedback)


def test_feedback_references_transactions_with_matching_fields(small_file):
    _, summary, records = small_file
    _, n_fb = check_feedback(records, SMALL.feedback_delay_days)
    assert n_fb > 0
    assert n_fb == summary.feedback


def test_feedback_count_equals_fraud_transaction_count(mix_run):
    sim, _, records = mix_run
    n_tx, n_fb = check_feedback(records, MIX.feedback_delay_days)
    assert n_tx == len(sim)
    assert n_fb == int(sim.is_fraud.sum()) > 0
    fb_ids = {r["event"]["transaction_id"] for r in records if r["kind"] == "feedback"}
    fraud_ids = {sim.transaction_id_str(i) for i in np.flatnonzero(sim.is_fraud)}
    assert fb_ids == fraud_ids


def test_feedback_after_last_day_is_written_at_end_of_file(small_file):
    _, _, records = small_file
    end = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(days=SMALL.days)
    late = [
        i for i, r in enumerate(records) if r["kind"] == "feedback" and parse_time(r["event"]["reported_at"]) >= end
    ]
    assert late, "frauds in the last week must produce feedback past the end"
    assert late == list(range(len(records) - len(late), len(records)))


def test_fractional_feedback_delay_is_applied_to_the_second(tmp_path):
    config = SimulationConfig(days=8, customers=300, terminals=600, seed=5, feedback_delay_days=1.5)
    path = tmp_path / "frac.jsonl"
    summary = simulate_to_file(config, path)
    _, n_fb = check_feedback(read_lines(path), 1.5)
    assert n_fb == summary.feedback > 0


# ---------------------------------------------------------------------------
# Fraud mix
# ---------------------------------------------------------------------------
def test_fraud_rate_is_between_half_and_one_point_two_percent(mix_run):
    sim, summary, _ = mix_run
    rate = sim.is_fraud.mean()
    assert 0.005 <= rate <= 0.012
    assert summary.fraud_rate == pytest.approx(rate)


def test_every_fraud_scenario_occurs(mix_run):
    sim, summary, _ = mix_run
    counts = np.bincount(sim.scenario, minlength=5)
    for code, name in SCENARIO_NAMES.items():
        assert counts[code] >= 1, name
        assert summary.frauds_by_scenario[name] == counts[code]
    assert set(summary.frauds_by_scenario) == {
        "large_amount",
        "compromised_terminal",
        "compromised_card",
        "card_testing",
    }
    assert np.array_equal(sim.is_fraud, sim.scenario > 0)


def test_large_amount_frauds_exceed_220_and_every_amount_over_220_is_fraud(mix_run):
    sim, _, _ = mix_run
    large = sim.scenario == 1
    assert large.any()
    assert (sim.amount[large] > 220).all()
    assert sim.is_fraud[sim.amount > 220].all()


def window_mask(sim, column, events, days):
    """Payments whose ``column`` member has an event window covering them."""
    rel = sim.event_time - sim.config.start_epoch
    mask = np.zeros(len(sim), dtype=bool)
    for day, member in events[:, :2].tolist():
        mask |= (column == member) & (rel >= day * 86400) & (rel < (day + days) * 86400)
    return mask


def test_compromised_terminal_labels_cover_exactly_the_28_day_windows(mix_run):
    sim, _, _ = mix_run
    events = sim.compromised_terminal_events
    assert events.shape[0] > 0
    assert ((events[:, 0] >= 0) & (events[:, 0] < MIX.days)).all()
    in_window = window_mask(sim, sim.terminal, events, 28)
    regular = np.isin(sim.scenario, (0, 1, 2, 3))
    # inside a window every regular payment is fraud (scenario 3 takes precedence)
    assert np.isin(sim.scenario[in_window & regular], (2, 3)).all()
    # scenario 2 never occurs outside a window
    assert not (sim.scenario[~in_window] == 2).any()
    assert (sim.scenario[in_window & regular] == 2).sum() > 0


def test_compromised_card_labels_a_third_of_window_payments_with_5x_amounts(mix_run):
    sim, _, _ = mix_run
    events = sim.compromised_card_events
    assert events.shape[0] > 0
    in_window = window_mask(sim, sim.customer, events, 14) & (sim.scenario != 4)
    card = sim.scenario == 3
    assert card.any()
    assert not (card & ~in_window).any()
    share = card.sum() / in_window.sum()
    assert 0.25 < share < 0.42
    # amounts are multiplied by 5: whole multiples of 5 cents, and much larger
    assert (sim.amount_cents[card] % 5 == 0).all()
    assert np.median(sim.amount[card]) > 3 * np.median(sim.amount[sim.scenario == 0])


def test_card_testing_bursts_are_small_quick_and_sized_5_to_15(mix_run):
    sim, _, _ = mix_run
    events = sim.card_testing_events
    ct = sim.scenario == 4
    assert events.shape[0] > 0
    assert ct.sum() == events[:, 2].sum()
    assert ((events[:, 2] >= 5) & (events[:, 2] <= 15)).all()
    assert (sim.amount[ct] >= 0.5).all() and (sim.amount[ct] <= 3.0).all()
    rel_day = (sim.event_time - MIX.start_epoch) // 86400
    keys = Counter(map(tuple, events[:, :2].tolist()))
    for (day, customer), repeats in keys.items():
        if repeats > 1:  # two bursts for one customer on one day: skip
            continue
        burst = ct & (sim.customer == customer) & (rel_day == day)
        size = int(events[(events[:, 0] == day) & (events[:, 1] == customer), 2][0])
        assert burst.sum() == size
        times = sim.event_time[burst]
        assert times.max() - times.min() < 300


def test_customers_without_terminal_in_radius_use_the_nearest_one():
    sim = simulate(SimulationConfig(days=5, customers=20, terminals=1, seed=2))
    assert len(sim) > 0
    genuine = sim.scenario != 4
    assert (sim.terminal[genuine] == 0).all()


def test_genuine_payments_are_at_terminals_near_home(mix_run):
    sim, _, _ = mix_run
    genuine = np.flatnonzero(sim.scenario != 4)[:5000]
    d = np.linalg.norm(
        sim.customer_xy[sim.customer[genuine]] - sim.terminal_xy[sim.terminal[genuine]],
        axis=1,
    )
    assert (d <= 5.0 + 1e-4).mean() > 0.999


# ---------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("days", 0),
        ("days", -3),
        ("customers", 0),
        ("terminals", 0),
        ("feedback_delay_days", -1.0),
        ("feedback_delay_days", float("nan")),
        ("seed", -1),
    ],
)
def test_invalid_config_value_raises_value_error_naming_field(field, value):
    with pytest.raises(ValueError, match=field):
        SimulationConfig(**{field: value})


def test_config_defaults_match_contract():
    config = SimulationConfig()
    assert (config.days, config.customers, config.terminals) == (90, 5000, 10000)
    assert config.start == datetime.date(2026, 1, 1)
    assert (config.seed, config.feedback_delay_days) == (42, 7.0)
    with pytest.raises(dataclasses_frozen_error()):
        config.days = 3  # type: ignore[misc]


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_custom_start_date_shifts_event_times(tmp_path):
    config = SimulationConfig(days=2, customers=50, terminals=100, seed=1, start=datetime.date(2025, 12, 31))
    summary = simulate_to_file(config, tmp_path / "start.jsonl")
    assert summary.first_event_time.startswith("2025-12-31T")
    assert summary.last_event_time.startswith("2026-01-01T")


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------
def test_summary_matches_file_contents(small_file):
    _, summary, records = small_file
    assert isinstance(summary, SimulationSummary)
    tx = [r["event"] for r in records if r["kind"] == "transaction"]
    fb = [r["event"] for r in records if r["kind"] == "feedback"]
    assert summary.transactions == len(tx)
    assert summary.feedback == len(fb)
    assert sum(summary.frauds_by_scenario.values()) == len(fb)
    assert summary.fraud_rate == pytest.approx(len(fb) / len(tx))
    times = sorted(e["event_time"] for e in tx)
    assert summary.first_event_time == times[0]
    assert summary.last_event_time == times[-1]
    assert summary.seconds > 0


def test_simulation_arrays_match_file(small_file):
    _, _, records = small_file
    sim = simulate(SMALL)
    tx = [r["event"] for r in records if r["kind"] == "transaction"]
    assert len(tx) == len(sim)
    for i in (0, len(sim) // 2, len(sim) - 1):
        event = tx[i]
        assert event["transaction_id"] == sim.transaction_id_str(sim.transaction_id[i])
        assert event["customer_id"] == sim.customer_id_str(sim.customer[i])
        assert event["terminal_id"] == sim.terminal_id_str(sim.terminal[i])
        assert event["amount"] == pytest.approx(float(sim.amount[i]))
        assert parse_time(event["event_time"]).timestamp() == int(sim.event_time[i])
    assert sim.event_time.dtype == np.int64
    assert (np.diff(sim.event_time) >= 0).all()


def test_progress_bar_writes_same_file(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    sim = simulate(SimulationConfig(days=3, customers=100, terminals=200, seed=4))
    write_replay(sim, a, progress=True)
    write_replay(sim, b)
    assert a.read_bytes() == b.read_bytes()
    assert "event" in capsys.readouterr().err


def test_start_must_be_a_date():
    with pytest.raises(TypeError, match="start"):
        SimulationConfig(start="2026-01-01")  # type: ignore[arg-type]
