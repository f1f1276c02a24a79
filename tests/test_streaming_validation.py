"""The streaming validation pipeline on the DirectRunner against the real Pub/Sub emulator."""

import base64
import json

import pytest

from rtml import config
from rtml.processes import PipelineProcess
from tests.pubsub_helpers import collect, decoded

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


def test_every_good_event_and_every_dead_letter_comes_back(services, unique_topics, tmp_path):
    from google.cloud import pubsub_v1

    project = services.project
    transactions = [
        {
            "transaction_id": f"tx{i}",
            "event_time": f"2026-01-01T00:{i:02d}:00Z",
            "customer_id": f"C{i % 3}",
            "terminal_id": f"T{i % 5}",
            "amount": round(1.5 * i, 2),
        }
        for i in range(40)
    ]
    feedback = [
        {
            "transaction_id": "tx3",
            "customer_id": "C0",
            "terminal_id": "T3",
            "event_time": "2026-01-01T00:03:00Z",
            "reported_at": "2026-01-08T00:03:00Z",
            "is_fraud": True,
        },
        {
            "transaction_id": "tx3",
            "customer_id": "C0",
            "terminal_id": "T3",
            "event_time": "2026-01-01T00:03:00Z",
            "reported_at": "2026-01-09T00:00:00Z",
            "is_fraud": False,
        },
    ]
    bad_transactions = {
        b"{oops": "not_json",
        b"\xc3\x28": "not_utf8",
        b"42": "not_object",
        json.dumps({**transactions[0], "amount": "1"}).encode(): "wrong_type",
        json.dumps({**transactions[0], "customer_id": ""}).encode(): "empty_id",
        json.dumps({**transactions[0], "amount": -3}).encode(): "negative_amount",
        json.dumps({k: v for k, v in transactions[0].items() if k != "terminal_id"}).encode(): "missing_field",
        b"x" * (70 * 1024): "payload_too_large",
    }
    bad_feedback = {
        json.dumps({**feedback[0], "reported_at": "2025-12-31T00:00:00Z"}).encode(): "reported_before_event",
        json.dumps({**feedback[0], "event_time": "2026-01-01 00:03:00"}).encode(): "timestamp_without_zone",
    }

    names = unique_topics
    args = [
        f"--project={project}",
        f"--transactions_subscription={config.subscription_path(project, names['transactions'] + '-sub')}",
        f"--feedback_subscription={config.subscription_path(project, names['fraud-feedback'] + '-sub')}",
        f"--dead_letter_topic={config.topic_path(project, names['dead-letter'])}",
        f"--output_topic={config.topic_path(project, names['validated'])}",
    ]
    publisher = pubsub_v1.PublisherClient()
    tx_topic = config.topic_path(project, names["transactions"])
    fb_topic = config.topic_path(project, names["fraud-feedback"])
    with PipelineProcess("beam_pipelines.validate", args, tmp_path / "validate.log") as pipeline:
        futures = [publisher.publish(tx_topic, json.dumps(t).encode(), origin="test") for t in transactions]
        futures += [publisher.publish(tx_topic, payload, case=kind) for payload, kind in bad_transactions.items()]
        futures += [publisher.publish(fb_topic, json.dumps(f).encode()) for f in feedback]
        futures += [publisher.publish(fb_topic, payload, case=kind) for payload, kind in bad_feedback.items()]
        for future in futures:
            future.result(timeout=30)
        good = collect(names["validated"] + "-sub", project, len(transactions) + len(feedback), process=pipeline)
        dead = collect(
            names["dead-letter"] + "-sub", project, len(bad_transactions) + len(bad_feedback), process=pipeline
        )

    good_records = decoded(good)
    assert sorted(r["event"]["transaction_id"] for r in good_records if r["kind"] == "transaction") == sorted(
        t["transaction_id"] for t in transactions
    )
    assert [
        r["event"] for r in good_records if r["kind"] == "transaction" and r["event"]["transaction_id"] == "tx7"
    ] == [transactions[7]]
    assert sorted(json.dumps(r["event"], sort_keys=True) for r in good_records if r["kind"] == "feedback") == sorted(
        json.dumps(f, sort_keys=True) for f in feedback
    )
    assert len(good_records) == len(transactions) + len(feedback)

    assert len(dead) == len(bad_transactions) + len(bad_feedback)
    expected = {
        **{p: ("transactions", k) for p, k in bad_transactions.items()},
        **{p: ("fraud-feedback", k) for p, k in bad_feedback.items()},
    }
    seen = set()
    for message in dead:
        record = json.loads(message.data)
        assert set(record) == {"source", "error", "payload_base64", "attributes", "received_at"}
        payload = base64.b64decode(record["payload_base64"])
        source, kind = expected[payload]
        assert record["source"] == source
        assert message.attributes["error_kind"] == kind
        assert record["attributes"]["case"] == kind
        assert record["error"].split(":")[0]  # names the field (or "message")
        seen.add(payload)
    assert seen == set(expected)
