"""Tests for rtml.entity_store: row keys, cell encoding and decoding, and batched Bigtable access."""

from __future__ import annotations

import datetime as dt
import re
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtml import emulators
from rtml import entity_store as es
from rtml.events import Feedback
from rtml.features import DAY_US, CustomerState, Entry, Report, TerminalState

T0 = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z in microseconds
KEY_FORMAT = re.compile(rb"[0-9a-f]{4}#[ct]#.+")


def fb(tid, event_time_us, reported_at_us, is_fraud=True):
    return Feedback(tid, "c1", "m1", "", event_time_us, "", reported_at_us, is_fraud)


# --- row keys ---------------------------------------------------------------------------------


def test_row_key_has_hash_prefix_kind_and_id():
    key = es.row_key(es.CUSTOMER, "C000123")
    assert KEY_FORMAT.fullmatch(key)
    assert key.endswith(b"#c#C000123")
    assert es.row_key(es.TERMINAL, "T9").endswith(b"#t#T9")


def test_row_key_is_deterministic():
    assert es.row_key(es.TERMINAL, "T000042") == es.row_key(es.TERMINAL, "T000042")


def test_row_key_differs_between_a_customer_and_a_terminal_with_the_same_id():
    assert es.row_key(es.CUSTOMER, "X1") != es.row_key(es.TERMINAL, "X1")


def test_row_key_prefix_spreads_consecutive_ids():
    prefixes = {es.row_key(es.CUSTOMER, f"C{i:06d}")[:4] for i in range(1000)}
    assert len(prefixes) > 200


@pytest.mark.parametrize("kind", ["x", "C", "", "customer"])
def test_row_key_rejects_an_unknown_kind(kind):
    with pytest.raises(ValueError, match="entity kind"):
        es.row_key(kind, "C1")


# --- cell timestamps ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("micros", "aligned"),
    [(0, 0), (999, 0), (1000, 1000), (1_234_567, 1_234_000), (T0 + 1, T0), (T0 + 999_999, T0 + 999_000)],
)
def test_millis_aligned_truncates_to_the_millisecond(micros, aligned):
    assert es.millis_aligned(micros) == aligned


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=2**62))
def test_millis_aligned_is_a_multiple_of_1000_at_most_999_below(micros):
    aligned = es.millis_aligned(micros)
    assert aligned % 1000 == 0
    assert 0 <= micros - aligned < 1000


def test_entry_cell_timestamp_is_the_event_time_in_milliseconds():
    cell = es.entry_cell(Entry(T0 + 123_456, "tx1", 12.5))
    assert cell.family == es.TX_FAMILY
    assert cell.qualifier == b"tx1"
    assert cell.timestamp_us == T0 + 123_000
    assert es.entry_cell(Entry(T0 + 123_456, "tx1", 12.5)) == cell  # no wall clock involved


def test_report_cell_timestamp_is_reported_at_in_milliseconds_not_the_event_time():
    cell = es.report_cell("tx1", Report(T0 + 5 * DAY_US + 7_891, True, T0 + 42))
    assert cell.family == es.FB_FAMILY
    assert cell.qualifier == b"tx1"
    assert cell.timestamp_us == T0 + 5 * DAY_US + 7_000
    assert es.report_cell("tx1", Report(T0 + 5 * DAY_US + 7_891, True, T0 + 42)) == cell


# --- decode_row ---------------------------------------------------------------------------------


def test_decode_row_round_trips_entry_and_report_cells():
    entry = Entry(T0 + 1_234_567, "tx1", 42.25)
    report = Report(T0 + DAY_US, True, T0 + 1_234_567)
    decoded = es.decode_row([es.entry_cell(entry), es.report_cell("tx1", report)])
    assert decoded.entries == [entry]
    assert decoded.reports == {"tx1": report}


def test_decode_row_of_no_cells_is_empty():
    decoded = es.decode_row([])
    assert decoded.entries == []
    assert decoded.reports == {}


def test_decode_row_newest_report_cell_wins_so_a_later_retraction_overrides():
    fraud = es.report_cell("tx1", Report(T0 + DAY_US, True, T0))
    retraction = es.report_cell("tx1", Report(T0 + 2 * DAY_US, False, T0))
    for cells in ([fraud, retraction], [retraction, fraud]):
        assert es.decode_row(cells).reports == {"tx1": Report(T0 + 2 * DAY_US, False, T0)}


def test_decode_row_newest_report_cell_wins_so_a_later_report_overrides_a_retraction():
    retraction = es.report_cell("tx1", Report(T0 + DAY_US, False, T0))
    fraud = es.report_cell("tx1", Report(T0 + 3 * DAY_US, True, T0))
    assert es.decode_row([fraud, retraction]).reports == {"tx1": Report(T0 + 3 * DAY_US, True, T0)}


def test_decode_row_returns_entries_sorted_by_time_then_id():
    entries = [Entry(T0 + 30, "b", 3.0), Entry(T0 + 10, "z", 1.0), Entry(T0 + 30, "a", 2.0), Entry(T0, "q", 0.5)]
    decoded = es.decode_row([es.entry_cell(e) for e in entries])
    assert decoded.entries == sorted(entries)
    assert [e.transaction_id for e in decoded.entries] == ["q", "z", "a", "b"]


# --- state round trip ---------------------------------------------------------------------------

tx_times = st.integers(min_value=0, max_value=60 * DAY_US).map(lambda us: T0 + us)
report_delays_ms = st.integers(min_value=1, max_value=20 * DAY_US // 1000)
amounts = st.floats(min_value=0, max_value=1e6, allow_nan=False)
tx_ids = st.sampled_from([f"tx{i}" for i in range(12)])

# One history step: ("tx", id, event time, amount) or ("fb", id, delay in ms, is_fraud).
steps_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("tx"), tx_ids, tx_times, amounts),
        st.tuples(st.just("fb"), tx_ids, report_delays_ms, st.booleans()),
    ),
    max_size=30,
)


def build_states(steps):
    """A customer and a terminal fed with the steps; reported_at in whole milliseconds (as stored)."""
    customer, terminal = CustomerState(), TerminalState()
    times = {}
    for kind, tid, value, extra in steps:
        if kind == "tx":
            times.setdefault(tid, value)
            customer.add(tid, value, extra)
            terminal.add(tid, value, extra)
        else:
            event_time = times.get(tid, T0 + 123)
            terminal.apply_feedback(fb(tid, event_time, es.millis_aligned(event_time) + 1000 * value, extra))
    return customer, terminal


def test_state_cells_of_a_terminal_hold_one_cell_per_entry_and_report():
    terminal = TerminalState([Entry(T0, "a", 1.0), Entry(T0 + 5, "b", 2.0)])
    terminal.apply_feedback(fb("a", T0, T0 + DAY_US))
    terminal.apply_feedback(fb("pending", T0 + 9, T0 + DAY_US, False))
    cells = es.state_cells(terminal)
    assert sorted((c.family, c.qualifier) for c in cells) == [
        (es.FB_FAMILY, b"a"),
        (es.FB_FAMILY, b"pending"),
        (es.TX_FAMILY, b"a"),
        (es.TX_FAMILY, b"b"),
    ]


def test_state_cells_of_a_customer_hold_only_transactions():
    customer = CustomerState([Entry(T0, "a", 1.0), Entry(T0 + 5, "b", 2.0)])
    assert {c.family for c in es.state_cells(customer)} == {es.TX_FAMILY}
    assert len(es.state_cells(customer)) == 2


def test_customer_and_terminal_state_of_a_missing_row_are_empty():
    assert es.customer_state(None).entries() == []
    terminal = es.terminal_state(None)
    assert terminal.entries() == []
    assert terminal.reports() == {}


@settings(deadline=None, max_examples=60)
@given(steps_strategy, tx_times, amounts)
def test_states_rebuilt_from_their_cells_equal_the_originals(steps, next_time, next_amount):
    customer, terminal = build_states(steps)
    customer_again = es.customer_state(es.decode_row(es.state_cells(customer)))
    terminal_again = es.terminal_state(es.decode_row(es.state_cells(terminal)))
    assert customer_again.entries() == customer.entries()
    assert terminal_again.entries() == terminal.entries()
    assert terminal_again.reports() == terminal.reports()
    assert customer_again.add("next", next_time, next_amount) == customer.add("next", next_time, next_amount)
    assert terminal_again.add("next", next_time, next_amount) == terminal.add("next", next_time, next_amount)


def test_terminal_rebuilt_from_cells_keeps_fraud_risk_of_a_reported_transaction():
    terminal = TerminalState()
    terminal.add("a", T0, 10.0)
    terminal.add("b", T0 + 1000, 20.0)
    terminal.apply_feedback(fb("a", T0, T0 + DAY_US))
    again = es.terminal_state(es.decode_row(es.state_cells(terminal)))
    later = T0 + 8 * DAY_US
    assert again.features_at(later) == terminal.features_at(later)
    assert again.features_at(later)["terminal_risk_7d"] == 0.5


# --- Bigtable emulator --------------------------------------------------------------------------


@pytest.fixture
def table_name(services):
    name = f"features-{uuid.uuid4().hex[:8]}"
    emulators.ensure_feature_table(services, name)
    return name


@pytest.fixture
def store(services, table_name):
    store = es.EntityStore(services.project, services.instance, table_name)
    yield store
    store.close()


def raw_cells(services, table_name, key):
    """Every cell version of a row, as (family, qualifier, value, timestamp), read directly."""
    from google.cloud import bigtable

    client = bigtable.Client(project=services.project, admin=False)
    row = client.instance(services.instance).table(table_name).read_row(key)
    client.close()
    if row is None:
        return None
    return sorted(
        (family, qualifier, cell.value, cell.timestamp)
        for family, columns in row.cells.items()
        for qualifier, cells in columns.items()
        for cell in cells
    )


def sample_rows():
    customer_key = es.row_key(es.CUSTOMER, "C1")
    terminal_key = es.row_key(es.TERMINAL, "T1")
    customer_entries = [Entry(T0 + 1_500, "tx1", 10.5), Entry(T0 + DAY_US + 3, "tx2", 0.0)]
    terminal_entries = [Entry(T0 + 1_500, "tx1", 10.5)]
    terminal_reports = {"tx1": Report(T0 + 2 * DAY_US, True, T0 + 1_500)}
    rows = {
        customer_key: [es.entry_cell(e) for e in customer_entries],
        terminal_key: [es.entry_cell(e) for e in terminal_entries]
        + [es.report_cell(tid, r) for tid, r in terminal_reports.items()],
    }
    expected = {
        customer_key: es.EntityCells(customer_entries, {}),
        terminal_key: es.EntityCells(terminal_entries, terminal_reports),
    }
    return rows, expected


@pytest.mark.emulator
def test_store_load_returns_the_rows_written_in_one_call(store):
    rows, expected = sample_rows()
    assert store.write(rows) == 2
    assert store.load(list(rows)) == expected


@pytest.mark.emulator
def test_store_load_leaves_out_rows_that_do_not_exist(store):
    rows, expected = sample_rows()
    store.write(rows)
    missing = es.row_key(es.CUSTOMER, "nobody")
    loaded = store.load([*rows, missing])
    assert missing not in loaded
    assert loaded == expected
    assert store.load([missing]) == {}
    assert store.load([]) == {}


@pytest.mark.emulator
def test_store_load_gives_the_newest_report_of_a_column(store):
    key = es.row_key(es.TERMINAL, "T1")
    store.write({key: [es.report_cell("tx1", Report(T0 + DAY_US, True, T0))]})
    store.write({key: [es.report_cell("tx1", Report(T0 + 2 * DAY_US, False, T0))]})
    store.write({key: [es.report_cell("tx1", Report(T0 + DAY_US // 2, True, T0))]})  # older report, late
    assert store.load([key])[key].reports == {"tx1": Report(T0 + 2 * DAY_US, False, T0)}


def _utc(micros: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=micros)


@pytest.mark.emulator
def test_store_write_of_the_same_cells_twice_leaves_the_row_identical(services, table_name, store):
    rows, _ = sample_rows()
    store.write(rows)
    first = {key: raw_cells(services, table_name, key) for key in rows}
    store.write(rows)
    second = {key: raw_cells(services, table_name, key) for key in rows}
    assert second == first
    terminal_key = es.row_key(es.TERMINAL, "T1")
    assert [(f, q, ts) for f, q, _, ts in first[terminal_key]] == [
        (es.FB_FAMILY, b"tx1", _utc(T0 + 2 * DAY_US)),
        (es.TX_FAMILY, b"tx1", _utc(T0 + 1_000)),
    ]


@pytest.mark.emulator
def test_store_rebuilds_a_terminal_state_written_by_state_cells(store):
    terminal = TerminalState()
    terminal.add("a", T0, 10.0)
    terminal.add("b", T0 + 1_000, 20.0)
    terminal.apply_feedback(fb("a", T0, T0 + DAY_US))
    key = es.row_key(es.TERMINAL, "T1")
    store.write({key: es.state_cells(terminal)})
    again = es.terminal_state(store.load([key])[key])
    assert again.entries() == terminal.entries()
    assert again.reports() == terminal.reports()


@pytest.mark.emulator
def test_store_counts_one_rpc_per_call(store):
    rows, _ = sample_rows()
    assert (store.read_rpcs, store.write_rpcs) == (0, 0)
    store.write(rows)
    assert (store.read_rpcs, store.write_rpcs) == (0, 1)
    store.load(list(rows))
    store.load([es.row_key(es.CUSTOMER, "nobody")])
    assert (store.read_rpcs, store.write_rpcs) == (2, 1)
    store.write({es.row_key(es.CUSTOMER, "C1"): []})  # nothing to write: no request
    store.load([])
    assert (store.read_rpcs, store.write_rpcs) == (2, 1)


def _cells(n: int, tag: str = "t") -> list[es.Cell]:
    return [es.entry_cell(Entry(T0 + 1_000 * i, f"{tag}{i}", float(i))) for i in range(n)]


@given(st.lists(st.integers(0, 9), max_size=8), st.integers(1, 7))
def test_request_chunks_keep_every_cell_in_order_and_stay_under_the_limit(sizes, limit):
    rows = {f"r{i}".encode(): _cells(n, f"r{i}-") for i, n in enumerate(sizes)}
    chunks = list(es.request_chunks(rows, limit))
    assert all(0 < sum(map(len, chunk.values())) <= limit for chunk in chunks)
    assert all(len(chunk) > 0 and all(chunk.values()) for chunk in chunks)
    rebuilt: dict[bytes, list] = {}
    for chunk in chunks:
        for key, cells in chunk.items():
            rebuilt.setdefault(key, []).extend(cells)
    assert rebuilt == {key: cells for key, cells in rows.items() if cells}
    # Every chunk but the last is full: no more requests than needed.
    assert len(chunks) == -(-sum(sizes) // limit)


@pytest.mark.emulator
def test_store_splits_a_write_over_the_mutation_limit_into_requests_that_add_up(store, monkeypatch):
    monkeypatch.setattr(es, "MAX_MUTATIONS_PER_REQUEST", 3)
    big, small = es.row_key(es.CUSTOMER, "big"), es.row_key(es.CUSTOMER, "small")
    store.write({big: _cells(5), small: _cells(2)})
    assert store.write_rpcs == 3  # 3 + (2 + 1) + 1 cells
    loaded = store.load([big, small])
    assert [e.transaction_id for e in loaded[big].entries] == [f"t{i}" for i in range(5)]
    assert [e.transaction_id for e in loaded[small].entries] == ["t0", "t1"]
