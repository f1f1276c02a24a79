"""ValidateMessages as a Beam transform: typed events out, one dead letter per bad message, counters."""

import base64
import json

import apache_beam as beam
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.windowed_value import WindowedValue

from rtml import events
from transforms import outcomes
from transforms.validation import ReadEvents, ValidateMessages, dead_letter_message

GOOD = [
    {
        "transaction_id": f"tx{i}",
        "event_time": f"2026-01-01T00:00:0{i}Z",
        "customer_id": "C1",
        "terminal_id": "T1",
        "amount": float(i),
    }
    for i in range(3)
]
BAD = {
    b"not json": "not_json",
    b"\xff": "not_utf8",
    b"[]": "not_object",
    json.dumps({**GOOD[0], "amount": -1}).encode(): "negative_amount",
    json.dumps({**GOOD[0], "event_time": "2026-01-01T00:00:00"}).encode(): "timestamp_without_zone",
}


def counter(result, name: str) -> int:
    found = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    return sum(c.committed for c in found)


def test_validate_messages_yields_typed_events_and_one_dead_letter_per_bad_message():
    messages = [PubsubMessage(json.dumps(body).encode(), {"n": str(i)}) for i, body in enumerate(GOOD)]
    messages += [PubsubMessage(payload, {"bad": kind}) for payload, kind in BAD.items()]
    expected_events = [events.parse_transaction(json.dumps(body).encode()) for body in GOOD]

    pipeline = TestPipeline(runner="FnApiRunner")
    validated = pipeline | beam.Create(messages) | ValidateMessages("transactions")
    assert_that(validated.events, equal_to(expected_events), label="Events")

    def check_dead_letters(actual):
        assert sorted(kind for kind, _ in actual) == sorted(BAD.values())
        for kind, record in actual:
            payload = base64.b64decode(record["payload_base64"])
            assert BAD[payload] == kind
            assert record["source"] == "transactions"
            assert record["attributes"] == {"bad": kind}
            assert record["error"]

    assert_that(validated.dead_letters, check_dead_letters, label="DeadLetters")

    def check_outcomes(actual):
        # The same dead letters as the keyed outcomes publishing takes: one each, with no state cells.
        items = [item for _, item in actual]
        assert all(item.kind == outcomes.DEAD_LETTER and item.cells == () for item in items)
        assert sorted(item.attributes["error_kind"] for item in items) == sorted(BAD.values())
        for item in items:
            record = json.loads(item.data)
            assert BAD[base64.b64decode(record["payload_base64"])] == item.attributes["error_kind"]
            assert item.attributes["source"] == record["source"] == "transactions"

    assert_that(validated.outcomes, check_outcomes, label="Outcomes")
    result = pipeline.run()
    result.wait_until_finish()
    assert counter(result, "transactions_valid") == 3
    assert counter(result, "transactions_invalid") == 5
    assert counter(result, "error_not_json") == 1
    assert counter(result, "error_negative_amount") == 1


def test_a_parser_crash_becomes_a_dead_letter_not_a_pipeline_failure():
    def fragile(payload: bytes):
        if payload == b"boom":
            raise ZeroDivisionError("parser defect")
        return payload.decode()

    pipeline = TestPipeline(runner="FnApiRunner")
    validated = pipeline | beam.Create([b"ok", b"boom"]) | ValidateMessages("transactions", fragile)
    assert_that(validated.events, equal_to(["ok"]), label="Events")
    assert_that(
        validated.dead_letters | beam.Map(lambda kr: (kr[0], kr[1]["error"])),
        equal_to([("unexpected_error", "message: could not be parsed (ZeroDivisionError: parser defect)")]),
        label="DeadLetters",
    )
    pipeline.run().wait_until_finish()


def test_dead_letter_message_carries_the_record_and_kind_attributes():
    record = events.dead_letter("fraud-feedback", "is_fraud: expected a boolean, got string", b"{}", {}, 0)
    message = dead_letter_message(("wrong_type", record))
    assert json.loads(message.data) == record
    assert message.attributes == {"source": "fraud-feedback", "error_kind": "wrong_type"}


class KeyInBundlesFn(beam.DoFn):
    """A next step run inside validation: holds each bundle's events, then keys them by customer."""

    def start_bundle(self):
        self._held = []

    def process(self, event, timestamp, window):
        self._held.append(WindowedValue((event.customer_id, event.transaction_id), timestamp, [window]))
        yield "seen", event.transaction_id

    def finish_bundle(self):
        yield from self._held


def test_then_runs_inside_validation_on_valid_events_only_and_its_output_is_the_events():
    messages = [PubsubMessage(json.dumps(body).encode(), {}) for body in GOOD] + [PubsubMessage(b"not json", {})]
    pipeline = TestPipeline(runner="FnApiRunner")
    then = KeyInBundlesFn().with_output_types(tuple[str, str])
    validated = pipeline | beam.Create(messages) | ValidateMessages("transactions", then=then)
    # `then`'s output type is the events' (stateful steps take their key coder from it).
    assert validated.events.element_type == beam.typehints.Tuple[str, str]
    ids = [body["transaction_id"] for body in GOOD]
    assert_that(validated.events, equal_to([("seen", i) for i in ids] + [("C1", i) for i in ids]), label="Events")
    assert_that(validated.dead_letters | beam.Map(lambda kr: kr[0]), equal_to(["not_json"]), label="DeadLetters")
    pipeline.run().wait_until_finish()


def test_read_events_refuses_a_then_for_a_source_it_does_not_read():
    with pytest.raises(ValueError, match=r"unknown sources \['feedback'\]"):
        ReadEvents("projects/p/subscriptions/t", "projects/p/subscriptions/f", then={"feedback": KeyInBundlesFn()})
