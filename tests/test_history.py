"""Tests for rtml.history: replay lines to rows, sharded feature computation, and the example join."""

from __future__ import annotations

import gc
import io
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beam_pipelines.backfill import ExampleColumnsCoder, cyclic_gc_paused, lines_in_range, pack, unpack
from rtml import history
from rtml.events import Feedback, Transaction, format_timestamp, parse_timestamp, replay_record
from rtml.features import CUSTOMER_FEATURES, DAY_US, FEATURE_NAMES, HOUR_US, TERMINAL_FEATURES
from tests.feature_reference import reference_features

T0 = parse_timestamp("2024-01-01T00:00:00Z", "event_time")  # a Monday
EXACT = {name for name in FEATURE_NAMES if "_nb_tx_" in name or name.startswith("tx_during_")}


def tx(tid, t, customer, terminal, amount):
    return Transaction(tid, format_timestamp(t), t, customer, terminal, float(amount))


def fb(tid, t, reported_at, customer, terminal, is_fraud=True):
    return Feedback(
        tid, customer, terminal, format_timestamp(t), t, format_timestamp(reported_at), reported_at, is_fraud
    )


def line(record) -> bytes:
    return json.dumps(record).encode() + b"\n"


TX_EVENT = {
    "transaction_id": "tx1",
    "event_time": "2024-01-06T03:00:00.5+01:00",
    "customer_id": "C1",
    "terminal_id": "T1",
    "amount": 12,
}
FB_EVENT = {
    "transaction_id": "tx1",
    "customer_id": "C1",
    "terminal_id": "T1",
    "event_time": "2024-01-06T02:00:00.5Z",
    "reported_at": "2024-01-10T00:00:00Z",
    "is_fraud": False,
}


# --- parse_line ---------------------------------------------------------------------------------


def test_parse_line_of_a_transaction_is_a_row_of_that_transaction():
    row = history.parse_line(2, 170, line({"kind": "transaction", "event": TX_EVENT}))
    expected = Transaction(
        "tx1", "2024-01-06T03:00:00.5+01:00", parse_timestamp("2024-01-06T02:00:00.5Z", "t"), "C1", "T1", 12.0
    )
    assert row[:2] == (2, 170)
    assert history.transaction_of(row) == expected
    assert history.is_transaction(row)
    assert history.customer_id(row) == "C1"
    assert history.terminal_id(row) == "T1"


def test_parse_line_of_a_feedback_is_a_row_of_that_feedback():
    row = history.parse_line(0, 9, line({"kind": "feedback", "event": FB_EVENT}))
    assert row[:2] == (0, 9)
    assert history.feedback_of(row) == Feedback(
        "tx1",
        "C1",
        "T1",
        "2024-01-06T02:00:00.5Z",
        parse_timestamp("2024-01-06T02:00:00.5Z", "t"),
        "2024-01-10T00:00:00Z",
        parse_timestamp("2024-01-10T00:00:00Z", "t"),
        False,
    )
    assert not history.is_transaction(row)
    assert history.customer_id(row) == "C1"
    assert history.terminal_id(row) == "T1"


def test_row_helpers_read_the_ids_of_each_row_kind():
    t = history.parse_line(0, 0, line(replay_record(tx("a", T0, "C7", "T8", 1.0))))
    f = history.parse_line(0, 50, line(replay_record(fb("a", T0, T0 + DAY_US, "C9", "T10"))))
    assert (history.is_transaction(t), history.customer_id(t), history.terminal_id(t)) == (True, "C7", "T8")
    assert (history.is_transaction(f), history.customer_id(f), history.terminal_id(f)) == (False, "C9", "T10")


@pytest.mark.parametrize("blank", [b"", b"\n", b"   \r\n", b"\t"])
def test_parse_line_of_a_blank_line_is_none(blank):
    assert history.parse_line(0, 0, blank) is None


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"{not json\n", "not_json"),
        (b'{"kind": "transaction", "event": {}\n', "not_json"),
        (b'{"event": {}}\n', "not_replay_line"),
        (b'{"kind": "refund", "event": {}}\n', "not_replay_line"),
        (b'{"kind": "transaction"}\n', "not_replay_line"),
        (b'{"kind": "transaction", "event": [1, 2]}\n', "not_replay_line"),
        (b'{"kind": "feedback", "event": "x"}\n', "not_replay_line"),
        (b"[1, 2]\n", "not_object"),
        (b"null\n", "not_object"),
        (line({"kind": "transaction", "event": {**TX_EVENT, "amount": -1}}), "negative_amount"),
        (
            line({"kind": "transaction", "event": {**TX_EVENT, "event_time": "2024-01-06T03:00:00"}}),
            "timestamp_without_zone",
        ),
        (line({"kind": "transaction", "event": {**TX_EVENT, "customer_id": ""}}), "empty_id"),
        (line({"kind": "feedback", "event": {k: v for k, v in FB_EVENT.items() if k != "is_fraud"}}), "missing_field"),
        (
            line({"kind": "feedback", "event": {**FB_EVENT, "reported_at": "2024-01-01T00:00:00Z"}}),
            "reported_before_event",
        ),
    ],
)
def test_parse_line_rejects_a_bad_line_with_its_kind_and_seq(raw, kind):
    rejected = history.parse_line(3, 4096, raw)
    assert isinstance(rejected, history.Rejected)
    assert rejected.kind == kind
    assert rejected.seq == (3, 4096)
    assert rejected.error


def test_shard_of_is_stable_and_in_range():
    shards = {history.shard_of(f"C{i}", 5) for i in range(200)}
    assert shards == set(range(5))
    assert history.shard_of("C1", 5) == history.shard_of("C1", 5)


# --- shards and join on a hand-built history ------------------------------------------------------

# Publication order. Customers C1..C3, terminals T1, T2. tx1 is reported fraud; tx2 is reported
# and later retracted; tx1 is redelivered (a duplicate); tx7 is reported fraud then the report is
# retracted and reported again (fraud wins). The later transactions see tx1/tx2 in their
# terminal windows (delay 7 days).
EVENTS = [
    tx("tx1", T0 + 10 * HOUR_US, "C1", "T1", 10.0),
    tx("tx2", T0 + 12 * HOUR_US, "C2", "T1", 20.0),
    tx("tx3", T0 + DAY_US + 3 * HOUR_US, "C1", "T2", 30.0),
    tx("tx4", T0 + 2 * DAY_US + 15 * HOUR_US, "C3", "T1", 40.0),
    fb("tx1", T0 + 10 * HOUR_US, T0 + 3 * DAY_US, "C1", "T1"),
    fb("tx2", T0 + 12 * HOUR_US, T0 + 3 * DAY_US + HOUR_US, "C2", "T1"),
    tx("tx1", T0 + 10 * HOUR_US, "C1", "T1", 10.0),
    fb("tx2", T0 + 12 * HOUR_US, T0 + 4 * DAY_US, "C2", "T1", is_fraud=False),
    tx("tx5", T0 + 6 * DAY_US + 5 * HOUR_US, "C1", "T2", 55.5),
    tx("tx6", T0 + 8 * DAY_US + 9 * HOUR_US, "C2", "T1", 60.0),
    tx("tx7", T0 + 8 * DAY_US + 11 * HOUR_US, "C3", "T2", 70.0),
    fb("tx7", T0 + 8 * DAY_US + 11 * HOUR_US, T0 + 9 * DAY_US, "C3", "T2", is_fraud=False),
    fb("tx7", T0 + 8 * DAY_US + 11 * HOUR_US, T0 + 10 * DAY_US, "C3", "T2"),
    tx("tx8", T0 + 9 * DAY_US + 23 * HOUR_US, "C1", "T1", 80.0),
    tx("tx9", T0 + 16 * DAY_US + 2 * HOUR_US, "C3", "T2", 90.0),
    tx("tx10", T0 + 17 * DAY_US, "C2", "T1", 100.0),
]


def history_rows(events, file_count=2):
    """Rows as the backfill parses them: the events cut over files, each line at its byte offset."""
    rows = []
    per_file = -(-len(events) // file_count)
    for index in range(file_count):
        offset = 0
        for event in events[index * per_file : (index + 1) * per_file]:
            raw = line(replay_record(event))
            rows.append(history.parse_line(index, offset, raw))
            offset += len(raw)
    return rows


def shuffled(rows, seed):
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def examples_of(rows, seed=0):
    """The backfill's two cores over one shard each, inputs in any order."""
    terminal = history.terminal_shard(shuffled(rows, seed + 1))
    customer, columns = history.customer_examples(shuffled(terminal.handed_on(), seed))
    return customer, terminal, columns


def test_history_rows_are_parsed_back_to_the_events():
    rows = history_rows(EVENTS)
    back = [history.transaction_of(r) if history.is_transaction(r) else history.feedback_of(r) for r in sorted(rows)]
    assert back == EVENTS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shard_features_equal_the_reference_over_the_same_events(seed):
    customer, terminal, columns = examples_of(history_rows(EVENTS), seed)
    expected = reference_features(EVENTS)
    assert sorted(columns.transaction_id) == sorted(expected)
    for row in columns.rows():
        want = expected[row["transaction_id"]]
        for name in FEATURE_NAMES:
            if name in EXACT:
                assert row[name] == want[name], (row["transaction_id"], name)
            else:
                assert row[name] == pytest.approx(want[name], abs=1e-9), (row["transaction_id"], name)
    for tid, values in customer.features.items():
        assert values == pytest.approx(tuple(expected[tid][n] for n in CUSTOMER_FEATURES), abs=1e-9)
    for tid, (_, values, _) in terminal.features.items():
        assert values == pytest.approx(tuple(expected[tid][n] for n in TERMINAL_FEATURES), abs=1e-9)


def test_the_hand_built_history_exercises_fraud_risk():
    _, _, columns = examples_of(history_rows(EVENTS))
    rows = {row["transaction_id"]: row for row in columns.rows()}
    # tx6 at T1 sees tx1 (fraud) and tx2 (retracted) 7 to 8 days earlier; tx4 is too recent to count.
    assert rows["tx6"]["terminal_nb_tx_7d"] == 2
    assert rows["tx6"]["terminal_risk_7d"] == 0.5
    assert rows["tx9"]["terminal_risk_30d"] == pytest.approx(1 / 3)


def test_customer_shard_counts_the_duplicate_once():
    customer, _, columns = examples_of(history_rows(EVENTS))
    assert customer.duplicates == 1
    assert columns.transaction_id.count("tx1") == 1
    assert len(columns) == 10
    assert [e.transaction_id for e in customer.states["C1"].entries()] == ["tx1", "tx3", "tx5", "tx8"]


def test_labels_are_one_only_where_the_latest_report_says_fraud():
    _, _, columns = examples_of(history_rows(EVENTS))
    labels = dict(zip(columns.transaction_id, columns.label, strict=True))
    assert {tid for tid, label in labels.items() if label} == {"tx1", "tx7"}
    assert labels["tx2"] == 0  # reported, then retracted


def test_label_follows_the_greatest_reported_at_not_the_publication_order():
    events = [
        tx("a", T0, "C1", "T1", 1.0),
        fb("a", T0, T0 + 5 * DAY_US, "C1", "T1", is_fraud=False),
        fb("a", T0, T0 + 2 * DAY_US, "C1", "T1", is_fraud=True),  # older report published late
    ]
    _, _, columns = examples_of(history_rows(events, file_count=1))
    assert columns.label == [0]


def test_terminal_states_hold_the_reports_in_force():
    _, terminal, _ = examples_of(history_rows(EVENTS))
    reports = terminal.states["T1"].reports()
    assert reports["tx1"].is_fraud
    assert not reports["tx2"].is_fraud
    assert terminal.states["T2"].reports()["tx7"].is_fraud


def test_example_columns_are_sorted_by_event_time():
    _, _, columns = examples_of(history_rows(EVENTS), seed=5)
    rows = columns.rows()
    times = [r["event_time_us"] for r in rows]
    assert times == sorted(times)
    assert times == sorted({e.transaction_id: e.event_time_us for e in EVENTS if isinstance(e, Transaction)}.values())
    assert [r["transaction_id"] for r in rows] == [
        "tx1",
        "tx2",
        "tx3",
        "tx4",
        "tx5",
        "tx6",
        "tx7",
        "tx8",
        "tx9",
        "tx10",
    ]
    first = rows[0]
    assert (first["customer_id"], first["terminal_id"], first["event_time"]) == ("C1", "T1", "2024-01-01T10:00:00Z")
    assert set(first) == {*history.ExampleColumns._fields, *FEATURE_NAMES} - {"features"}


def test_join_keeps_only_transactions_known_to_both_cores():
    _, terminal, _ = examples_of(history_rows(EVENTS))
    customer_only = {"tx1": history.customer_shard(r for r in history_rows(EVENTS[:1])).features["tx1"]}
    columns = history.join(customer_only, terminal.features)
    assert columns.transaction_id == ["tx1"]
    assert history.join({}, terminal.features).transaction_id == []


def test_customer_shards_split_by_shard_of_give_the_same_features():
    rows = history_rows(EVENTS)
    transactions = [row for row in rows if history.is_transaction(row)]
    whole = history.customer_shard(transactions)
    merged, duplicates = {}, 0
    for shard in range(3):
        part = history.customer_shard(r for r in transactions if history.shard_of(history.customer_id(r), 3) == shard)
        merged.update(part.features)
        duplicates += part.duplicates
    assert merged == whole.features
    assert duplicates == whole.duplicates == 1


# --- lines_in_range -----------------------------------------------------------------------------

json_lines = st.lists(
    st.one_of(
        st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=8)), max_size=3).map(json.dumps),
        st.just(""),
    ),
    max_size=12,
)


@settings(deadline=None)
@given(json_lines, st.booleans(), st.data())
def test_lines_in_range_over_consecutive_ranges_yields_every_line_once_at_its_offset(lines, trailing, data):
    content = "\n".join(lines).encode() + (b"\n" if trailing and lines else b"")
    size = len(content)
    a = data.draw(st.integers(0, size), label="a")
    b = data.draw(st.integers(a, size), label="b")
    expected, offset = [], 0
    while offset < size:
        end = content.find(b"\n", offset)
        end = size if end < 0 else end + 1
        expected.append((offset, content[offset:end]))
        offset = end
    handle = io.BytesIO(content)
    got = [item for start, end in ((0, a), (a, b), (b, size)) for item in lines_in_range(handle, start, end)]
    assert got == expected


def test_lines_in_range_gives_a_line_to_the_range_its_first_byte_is_in():
    content = b'{"a": 1}\n{"b": 2}\n{"c": 3}'
    handle = io.BytesIO(content)
    assert list(lines_in_range(handle, 0, 9)) == [(0, b'{"a": 1}\n')]
    assert list(lines_in_range(handle, 9, 10)) == [(9, b'{"b": 2}\n')]
    assert list(lines_in_range(handle, 10, 18)) == []
    assert list(lines_in_range(handle, 18, 19)) == [(18, b'{"c": 3}')]


def test_a_deeply_nested_line_is_rejected_not_a_crash():
    rejected = history.parse_line(0, 0, b"[" * 5000)
    assert isinstance(rejected, history.Rejected)
    assert rejected.kind == "not_json"


def test_a_line_gets_the_verdict_its_message_would_get():
    assert history.parse_line(0, 0, b'\xff{"kind": "transaction"}').kind == "not_utf8"
    huge = b'{"kind": "transaction", "event": {"pad": "' + b"x" * 70_000 + b'"}}'
    assert history.parse_line(0, 0, huge).kind == "payload_too_large"


def test_the_first_copy_of_a_transaction_id_reused_by_another_customer_wins():
    first = Transaction("X", "2024-01-01T00:00:00Z", 1704067200000000, "c1", "m1", 10.0)
    second = Transaction("X", "2024-01-01T01:00:00Z", 1704070800000000, "c2", "m1", 99.0)
    result = history.customer_shard([(0, 100, *second), (0, 0, *first)])
    assert result.features["X"] == (1, 10.0, 1, 10.0, 1, 10.0)
    assert result.duplicates == 1


def test_the_terminal_core_hands_on_the_repeat_it_did_not_keep():
    _, terminal, _ = examples_of(history_rows(EVENTS))
    assert [history.transaction_of(row).transaction_id for row in terminal.repeats] == ["tx1"]
    assert "tx1" in terminal.features


def test_an_id_reused_by_another_customer_at_the_same_terminal_still_counts_at_that_customer():
    """As in the stream: C2's state takes X (its customer step sees it first), the terminal drops
    it as a repeat, so X has one example (C1's) and C2's next transaction counts X."""
    events = [
        tx("X", T0, "C1", "T1", 10.0),
        tx("X", T0 + HOUR_US, "C2", "T1", 99.0),
        tx("Y", T0 + 2 * HOUR_US, "C2", "T1", 5.0),
    ]
    customer, _, columns = examples_of(history_rows(events, file_count=1))
    rows = {row["transaction_id"]: row for row in columns.rows()}
    assert sorted(rows) == ["X", "Y"]
    assert (rows["X"]["customer_id"], rows["X"]["amount"]) == ("C1", 10.0)
    assert rows["Y"]["customer_nb_tx_1d"] == 2
    assert customer.duplicates == 1
    assert [e.transaction_id for e in customer.states["C2"].entries()] == ["X", "Y"]


@pytest.mark.parametrize("shards", [2, 3, 5])
def test_terminal_then_customer_shards_give_the_examples_of_one_shard(shards):
    """The backfill's split: terminal shards, then their transactions regrouped by customer shard."""
    rows = history_rows(EVENTS)
    whole = examples_of(rows)[2].rows()
    by_customer: dict[int, list] = {}
    for shard in range(shards):
        terminal = history.terminal_shard(r for r in rows if history.shard_of(history.terminal_id(r), shards) == shard)
        for item in terminal.handed_on():
            by_customer.setdefault(history.shard_of(history.customer_id(item[0]), shards), []).append(item)
    split = [row for items in by_customer.values() for row in history.customer_examples(items)[1].rows()]
    assert sorted(split, key=lambda r: r["transaction_id"]) == sorted(whole, key=lambda r: r["transaction_id"])


# --- what crosses the backfill's shuffles -------------------------------------------------------


def test_rows_and_hand_off_items_come_back_from_packed_parts_in_order():
    rows = history_rows(EVENTS)
    items = history.terminal_shard(rows).handed_on()
    for values in (rows, items):
        assert unpack([pack(values[:3]), pack([]), pack(values[3:])]) == values


primitive = st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=6), st.none())


@settings(deadline=None)
@given(st.lists(st.tuples(primitive, st.tuples(primitive, primitive) | st.none(), primitive), max_size=20), st.data())
def test_pack_then_unpack_gives_the_rows_back_whatever_the_cut(rows, data):
    shared = rows[:1] * 2  # the same tuple twice: the pickler keeps no memo, so it is written twice
    cut = data.draw(st.integers(0, len(rows)))
    assert unpack([pack(shared + rows[:cut]), pack(rows[cut:])]) == shared + rows


def test_the_backfills_example_columns_have_a_coder_whose_size_estimate_is_near_the_encoded_size(tmp_path):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_pipelines import backfill

    options = PipelineOptions([f"--input={tmp_path / 'none.jsonl'}", f"--examples_out={tmp_path}", "--no_state"])
    built = backfill.build(beam.Pipeline(options=options), options)
    assert isinstance(beam.coders.registry.get_coder(built.examples.element_type).coders()[1], ExampleColumnsCoder)
    columns = examples_of(history_rows(EVENTS))[2]
    own = ExampleColumnsCoder()
    assert own.decode(own.encode(columns)) == columns
    encoded = len(own.encode(columns))
    assert encoded / 3 <= own.estimate_size(columns) <= encoded * 3
    assert own.estimate_size(history.join({}, {})) == 0


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_off_while_a_shard_is_computed_and_back_as_it_was_after(enabled):
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        with cyclic_gc_paused():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError, match="inside"), cyclic_gc_paused():
            raise ValueError("inside")
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


def test_the_backfill_writes_every_rejected_line_once_with_its_kind_and_counts_every_line(tmp_path):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_pipelines import backfill
    from beam_pipelines import options as opts

    events = [tx(f"tx{i}", T0 + i * HOUR_US, f"C{i % 3}", f"T{i % 2}", 10 + i) for i in range(8)]
    events.append(fb("tx2", T0 + 2 * HOUR_US, T0 + 3 * DAY_US, "C2", "T0"))
    bad = [
        (b"{not json\n", "not_json"),
        (b'{"kind": "refund", "event": {}}\n', "not_replay_line"),
        (line({"kind": "transaction", "event": {**TX_EVENT, "amount": -1}}), "negative_amount"),
    ]
    data, expected, position = b"", [], 0
    for i, event in enumerate(events):
        if i % 3 == 1 and bad:
            raw, kind = bad.pop(0)
            expected.append({"input": 1, "byte_offset": position, "kind": kind})
            data, position = data + raw, position + len(raw)
        raw = line(replay_record(event)) + (b"\n" if i == 4 else b"")  # and a blank line, which is skipped
        data, position = data + raw, position + len(raw)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_bytes(b"")
    second.write_bytes(data)
    out = tmp_path / "out"
    argv = [f"--input={first}", f"--input={second}", f"--examples_out={out}", "--no_state", "--shards=2"]
    options = PipelineOptions(argv + ["--direct_num_workers=1", "--direct_running_mode=in_memory"])
    opts.prepare_local_run(options, streaming=False)
    pipeline = beam.Pipeline(options=options)
    backfill.build(pipeline, options)
    result = pipeline.run()
    result.wait_until_finish()

    records = [json.loads(raw) for raw in (out / "rejected.jsonl").read_text().splitlines()]
    assert (
        sorted(
            ({key: r[key] for key in ("input", "byte_offset", "kind")} for r in records), key=lambda r: r["byte_offset"]
        )
        == expected
    )
    assert all(r["error"] for r in records)
    totals = backfill.summary(result)
    assert totals["lines"] == len(events) + len(expected) + 1
    assert (totals["transactions"], totals["feedback"], totals["examples"]) == (8, 1, 8)
    assert {name: n for name, n in totals.items() if name.startswith("rejected_")} == {
        "rejected_not_json": 1,
        "rejected_not_replay_line": 1,
        "rejected_negative_amount": 1,
    }
