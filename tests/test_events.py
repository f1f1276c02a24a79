"""Validation rules of the contract: every rule has a failing example naming the field and rule."""

import base64
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtml import events

GOOD_TX = {
    "transaction_id": "tx1",
    "event_time": "2018-08-08T00:01:14Z",
    "customer_id": "C1",
    "terminal_id": "T1",
    "amount": 57.16,
}
GOOD_FB = {
    "transaction_id": "tx1",
    "customer_id": "C1",
    "terminal_id": "T1",
    "event_time": "2018-08-08T00:01:14Z",
    "reported_at": "2018-08-15T00:01:14Z",
    "is_fraud": True,
}


def tx_with(**changes) -> bytes:
    body = {**GOOD_TX, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def fb_with(**changes) -> bytes:
    body = {**GOOD_FB, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def test_valid_transaction_is_typed_with_utc_microseconds():
    tx = events.parse_transaction(tx_with())
    assert tx == events.Transaction("tx1", "2018-08-08T00:01:14Z", 1533686474_000000, "C1", "T1", 57.16)


def test_valid_feedback_is_typed():
    fb = events.parse_feedback(fb_with(is_fraud=False))
    assert fb.reported_at_us - fb.event_time_us == 7 * 86400 * 1_000_000
    assert fb.is_fraud is False


def test_unknown_extra_fields_are_ignored():
    assert events.parse_transaction(tx_with(channel="web", extra={"a": 1})).transaction_id == "tx1"


def test_integer_amount_and_zero_amount_are_accepted():
    assert events.parse_transaction(tx_with(amount=0)).amount == 0.0
    assert events.parse_transaction(tx_with(amount=12)).amount == 12.0


TRANSACTION_FAILURES = [
    # (payload, kind, words the error must contain)
    (b"x" * (64 * 1024 + 1), "payload_too_large", ["message", "65537 bytes", "65536"]),
    (b'{"transaction_id": "\xff"}', "not_utf8", ["message", "UTF-8"]),
    (b'{"transaction_id": ', "not_json", ["message", "JSON"]),
    (b"[1, 2]", "not_object", ["message", "array", "object"]),
    (b'"tx1"', "not_object", ["message", "string"]),
    (b"null", "not_object", ["message", "null"]),
    (tx_with(amount=...), "missing_field", ["amount", "missing"]),
    (tx_with(customer_id=..., terminal_id=...), "missing_field", ["customer_id", "terminal_id", "missing"]),
    (tx_with(transaction_id=17), "wrong_type", ["transaction_id", "string", "number"]),
    (tx_with(amount="12.50"), "wrong_type", ["amount", "number", "string"]),
    (tx_with(amount=True), "wrong_type", ["amount", "number", "boolean"]),
    (tx_with(amount=None), "wrong_type", ["amount", "null"]),
    (tx_with(event_time=1533686474), "wrong_type", ["event_time", "string"]),
    (tx_with(customer_id=""), "empty_id", ["customer_id", "1 to 128", "empty"]),
    (tx_with(terminal_id="T" * 129), "id_too_long", ["terminal_id", "1 to 128", "129"]),
    (tx_with(transaction_id="t" * 200), "id_too_long", ["transaction_id", "200"]),
    (tx_with(amount=-0.01), "negative_amount", ["amount", ">= 0"]),
    (
        b'{"transaction_id":"a","event_time":"2018-08-08T00:01:14Z","customer_id":"c","terminal_id":"t","amount":NaN}',
        "non_finite_amount",
        ["amount", "finite", "nan"],
    ),
    (
        b'{"transaction_id":"a","event_time":"2018-08-08T00:01:14Z","customer_id":"c","terminal_id":"t","amount":Infinity}',
        "non_finite_amount",
        ["amount", "finite", "inf"],
    ),
    (
        b'{"transaction_id":"a","event_time":"2018-08-08T00:01:14Z","customer_id":"c","terminal_id":"t","amount":1e999}',
        "non_finite_amount",
        ["amount", "finite"],
    ),
    (tx_with(amount=10**400), "non_finite_amount", ["amount", "finite"]),
    (tx_with(event_time="2018-08-08T00:01:14"), "timestamp_without_zone", ["event_time", "no time zone"]),
    (tx_with(event_time="2018-08-08 00:01:14.5"), "timestamp_without_zone", ["event_time", "no time zone"]),
    (tx_with(event_time="yesterday"), "timestamp_unparsable", ["event_time", "RFC 3339"]),
    (tx_with(event_time="2018-02-30T00:00:00Z"), "timestamp_unparsable", ["event_time", "not a valid date"]),
    (tx_with(event_time="2018-08-08T25:00:00Z"), "timestamp_unparsable", ["event_time"]),
    (tx_with(event_time="2018-08-08T00:00:00+25:00"), "timestamp_unparsable", ["event_time"]),
    (tx_with(event_time=""), "timestamp_unparsable", ["event_time"]),
]


@pytest.mark.parametrize("payload, kind, words", TRANSACTION_FAILURES)
def test_invalid_transaction_is_rejected_naming_field_and_rule(payload, kind, words):
    with pytest.raises(events.InvalidMessage) as caught:
        events.parse_transaction(payload)
    assert caught.value.kind == kind
    text = str(caught.value).lower()
    for word in words:
        assert word.lower() in text, f"{word!r} not in {text!r}"
    assert caught.value.kind in events.ERROR_KINDS


FEEDBACK_FAILURES = [
    (fb_with(reported_at="2018-08-08T00:01:13Z"), "reported_before_event", ["reported_at", "before event_time"]),
    (fb_with(reported_at="2018-08-08T01:01:13+02:00"), "reported_before_event", ["reported_at"]),
    (fb_with(is_fraud="true"), "wrong_type", ["is_fraud", "boolean", "string"]),
    (fb_with(is_fraud=1), "wrong_type", ["is_fraud", "boolean", "number"]),
    (fb_with(reported_at=...), "missing_field", ["reported_at", "missing"]),
    (fb_with(is_fraud=...), "missing_field", ["is_fraud", "missing"]),
    (fb_with(reported_at="2018-08-15"), "timestamp_unparsable", ["reported_at"]),
    (fb_with(transaction_id=""), "empty_id", ["transaction_id"]),
]


@pytest.mark.parametrize("payload, kind, words", FEEDBACK_FAILURES)
def test_invalid_feedback_is_rejected_naming_field_and_rule(payload, kind, words):
    with pytest.raises(events.InvalidMessage) as caught:
        events.parse_feedback(payload)
    assert caught.value.kind == kind
    for word in words:
        assert word.lower() in str(caught.value).lower()


ATTRIBUTE_FAILURES = [
    ({f"k{i}": "v" for i in range(33)}, ["at most 32", "got 33"]),
    ({"k" * 257: "v"}, ["longer than 256 bytes"]),
    ({"transaction_id": "x" * 1025}, ["transaction_id", "longer than 1024 bytes"]),
    ({"transaction_id": 7}, ["strings", "number"]),
]


@pytest.mark.parametrize("attributes, words", ATTRIBUTE_FAILURES)
def test_abusive_attributes_are_rejected_before_parsing(attributes, words):
    with pytest.raises(events.InvalidMessage) as caught:
        events.check_attributes(attributes)
    assert caught.value.kind == "bad_attributes"
    for word in words:
        assert word in str(caught.value)


def test_ordinary_attributes_pass_and_dead_letters_keep_them_within_limits():
    events.check_attributes({"transaction_id": "tx1", "event_id": "tx1", "published_at": "2026-01-01T00:00:00Z"})
    events.check_attributes({f"k{i}": "v" * 1024 for i in range(32)})
    kept = events.kept_attributes({f"k{i}": "v" * 5000 for i in range(100)})
    assert len(kept) == 32 and all(len(v) == 1024 for v in kept.values())


def test_every_error_kind_has_a_failing_example():
    covered = {kind for _, kind, _ in TRANSACTION_FAILURES + FEEDBACK_FAILURES} | {"bad_attributes"}
    assert covered == set(events.ERROR_KINDS)


def test_feedback_reported_at_equal_to_event_time_is_accepted():
    assert events.parse_feedback(fb_with(reported_at=GOOD_FB["event_time"])).is_fraud is True


@pytest.mark.parametrize(
    "text, micros",
    [
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T01:00:00+01:00", 0),
        ("1969-12-31T19:00:00-05:00", 0),
        ("2018-08-08T00:01:14.25Z", 1533686474_250000),
        ("2018-08-08t00:01:14.123456789z", 1533686474_123456),
        ("2018-08-08T00:01:14.000001Z", 1533686474_000001),
    ],
)
def test_timestamps_convert_to_utc_microseconds(text, micros):
    assert events.parse_timestamp(text, "event_time") == micros


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=4_102_444_800_000_000))
def test_format_then_parse_timestamp_round_trips(micros):
    text = events.format_timestamp(micros)
    assert text.endswith("Z")
    assert events.parse_timestamp(text, "t") == micros


@settings(deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_either_parsed_or_rejected_with_a_known_kind(payload):
    for parse in (events.parse_transaction, events.parse_feedback):
        try:
            parse(payload)
        except events.InvalidMessage as err:
            assert err.kind in events.ERROR_KINDS
            assert str(err)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(list(GOOD_TX) + ["x"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=130)),
    )
)
def test_arbitrary_objects_are_either_valid_or_rejected_with_a_known_kind(obj):
    try:
        tx = events.parse_transaction(json.dumps(obj).encode())
    except events.InvalidMessage as err:
        assert err.kind in events.ERROR_KINDS
    else:
        assert math.isfinite(tx.amount) and tx.amount >= 0
        assert 1 <= len(tx.transaction_id) <= 128


def test_dead_letter_record_has_the_contract_fields_and_keeps_the_payload():
    payload = b"\x00\xffnot json"
    record = events.dead_letter("transactions", "message: bad", payload, {"k": "v"}, 1_000_000)
    assert set(record) == {"source", "error", "payload_base64", "attributes", "received_at"}
    assert base64.b64decode(record["payload_base64"]) == payload
    assert record["attributes"] == {"k": "v"}
    assert record["received_at"] == "1970-01-01T00:00:01Z"
    json.dumps(record)


def test_replay_record_round_trips_through_the_parser():
    tx = events.parse_transaction(tx_with())
    record = events.replay_record(tx)
    assert record["kind"] == "transaction"
    assert events.parse_transaction(json.dumps(record["event"]).encode()) == tx
    fb = events.parse_feedback(fb_with())
    assert events.parse_feedback(json.dumps(events.replay_record(fb)["event"]).encode()) == fb
