"""Publish replay files to the input topics, and read messages back from subscriptions."""

from __future__ import annotations

import gzip
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rtml import config, events

# Malformed variants `replay --malformed-rate` mixes in; each breaks one contract rule.
MALFORMED_KINDS = (
    "not_json",
    "not_utf8",
    "not_object",
    "missing_field",
    "wrong_type",
    "empty_id",
    "negative_amount",
    "timestamp_without_zone",
    "payload_too_large",
)


ORDERING_KEY = "replay"


class ReplayFileError(ValueError):
    """A line of a replay file that is not `{"kind": ..., "event": {...}}`."""


@dataclass
class ReplayLine:
    kind: str  # "transaction" or "feedback"
    event: dict[str, Any]
    line_number: int

    @property
    def published_at(self) -> str:
        return self.event["event_time"] if self.kind == "transaction" else self.event["reported_at"]


@dataclass
class ReplayStats:
    transactions: int = 0
    feedback: int = 0
    malformed: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def published(self) -> int:
        return self.transactions + self.feedback + sum(self.malformed.values())


def open_text(path: str | Path) -> IO[str]:
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_replay(path: str | Path) -> Iterator[ReplayLine]:
    """The lines of a replay file, checked for shape (not for contract rules: the pipeline does that)."""
    with open_text(path) as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError as err:
                raise ReplayFileError(f"{path}:{number}: not JSON ({err})") from None
            if not isinstance(record, dict) or record.get("kind") not in ("transaction", "feedback"):
                raise ReplayFileError(
                    f'{path}:{number}: expected {{"kind": "transaction"|"feedback", "event": {{...}}}}'
                )
            if not isinstance(record.get("event"), dict):
                raise ReplayFileError(f"{path}:{number}: 'event' must be a JSON object")
            yield ReplayLine(record["kind"], record["event"], number)


def count_lines(path: str | Path) -> int:
    with open_text(path) as handle:
        return sum(1 for line in handle if line.strip())


def message_attributes(line: ReplayLine) -> dict[str, str]:
    """Attributes published with each event.

    `event_id` is unique per event (for Dataflow's `--id_label`), `published_at` is the event's
    publication time in the contract (for `--timestamp_attribute`).
    """
    tx_id = str(line.event.get("transaction_id", ""))
    published_at = str(line.published_at)
    event_id = tx_id if line.kind == "transaction" else f"{tx_id}/feedback/{published_at}"
    return {"transaction_id": tx_id, "event_id": event_id, "published_at": published_at}


def malformed_payload(kind: str, line: ReplayLine) -> tuple[str, bytes]:
    """A payload derived from a good event that breaks exactly one rule: `(error_kind, payload)`.

    Feedback has no amount, so `negative_amount` becomes `reported_before_event` for it.
    """
    broken = dict(line.event)
    if kind == "negative_amount" and line.kind == "feedback":
        kind = "reported_before_event"
    if kind == "not_json":
        return kind, json.dumps(broken)[:-3].encode()
    if kind == "not_utf8":
        return kind, b"\xff\xfe" + json.dumps(broken).encode()
    if kind == "not_object":
        return kind, json.dumps([broken]).encode()
    if kind == "missing_field":
        broken.pop("transaction_id", None)
    elif kind == "wrong_type":
        broken["customer_id"] = 12345
    elif kind == "empty_id":
        broken["terminal_id"] = ""
    elif kind == "negative_amount":
        broken["amount"] = -(abs(float(broken.get("amount", 1.0))) or 1.0)
    elif kind == "reported_before_event":
        broken["reported_at"] = "1970-01-01T00:00:00Z"
    elif kind == "timestamp_without_zone":
        broken["event_time"] = str(broken.get("event_time", "2026-01-01T00:00:00Z")).rstrip("Zz")
    elif kind == "payload_too_large":
        broken["padding"] = "x" * (events.MAX_PAYLOAD_BYTES + 1)
    else:
        raise ValueError(f"unknown malformed kind {kind!r}; known: {', '.join(MALFORMED_KINDS)}")
    return kind, json.dumps(broken).encode()


class Pacer:
    """Sleeps so that publishing follows `--rate` events/s or `--speedup` x event time."""

    def __init__(self, rate: float | None = None, speedup: float | None = None):
        if rate is not None and speedup is not None:
            raise ValueError("give --rate or --speedup, not both")
        if rate is not None and rate <= 0:
            raise ValueError("--rate must be > 0 events per second")
        if speedup is not None and speedup <= 0:
            raise ValueError("--speedup must be > 0")
        self._rate, self._speedup = rate, speedup
        self._start = time.monotonic()
        self._first_us: int | None = None
        self._count = 0

    def wait(self, published_at_us: int) -> None:
        if self._rate is not None:
            due = self._start + self._count / self._rate
        elif self._speedup is not None:
            if self._first_us is None:
                self._first_us = published_at_us
            due = self._start + (published_at_us - self._first_us) / 1e6 / self._speedup
        else:
            return
        self._count += 1
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def replay(
    path: str | Path,
    project: str = config.DEFAULT_PROJECT,
    transactions_topic: str = config.TRANSACTIONS_TOPIC,
    feedback_topic: str = config.FEEDBACK_TOPIC,
    rate: float | None = None,
    speedup: float | None = None,
    malformed_rate: float = 0.0,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
    on_publish: Callable[[ReplayLine, int], None] | None = None,
) -> ReplayStats:
    """Publish a replay file to the input topics in file order.

    `on_publish(line, wall_time_us)` is called as each good event is handed to the publisher
    (for latency measurements).

    With `malformed_rate` > 0, after each good event a malformed copy is also published with that
    probability (seeded), cycling through `MALFORMED_KINDS`, to exercise the dead-letter path.
    """
    from google.cloud import pubsub_v1

    if not 0.0 <= malformed_rate <= 1.0:
        raise ValueError("--malformed-rate must be between 0 and 1")
    pacer = Pacer(rate, speedup)
    rng = random.Random(seed)
    # One ordering key per topic: the client then sends that topic's batches one after another,
    # so they arrive in file order (concurrent batches can overtake each other).
    publisher = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=500, max_latency=0.005),
        publisher_options=pubsub_v1.types.PublisherOptions(
            enable_message_ordering=True,
            flow_control=pubsub_v1.types.PublishFlowControl(
                message_limit=20_000,
                limit_exceeded_behavior=pubsub_v1.types.LimitExceededBehavior.BLOCK,
            ),
        ),
    )
    topics = {
        "transaction": config.topic_path(project, transactions_topic),
        "feedback": config.topic_path(project, feedback_topic),
    }
    total = count_lines(path) if progress else None
    if limit is not None and total is not None:
        total = min(total, limit)
    stats = ReplayStats()
    futures = []
    started = time.monotonic()
    bar = _progress(total, "replay", progress)
    try:
        for index, line in enumerate(read_replay(path)):
            if limit is not None and index >= limit:
                break
            published_at = line.published_at
            pacer.wait(events.parse_timestamp(published_at, "published_at") if speedup else 0)
            topic = topics[line.kind]
            data = json.dumps(line.event, separators=(",", ":")).encode("utf-8")
            futures.append(publisher.publish(topic, data, ordering_key=ORDERING_KEY, **message_attributes(line)))
            if on_publish is not None:
                on_publish(line, time.time_ns() // 1000)
            if line.kind == "transaction":
                stats.transactions += 1
            else:
                stats.feedback += 1
            if malformed_rate and rng.random() < malformed_rate:
                kind = MALFORMED_KINDS[sum(stats.malformed.values()) % len(MALFORMED_KINDS)]
                kind, payload = malformed_payload(kind, line)
                futures.append(publisher.publish(topic, payload, ordering_key=ORDERING_KEY, malformed=kind))
                stats.malformed[kind] += 1
            if len(futures) >= 5_000:
                _settle(futures)
            bar.update(1)
        _settle(futures)
    finally:
        bar.close()
        publisher.stop()
    stats.seconds = time.monotonic() - started
    return stats


def _settle(futures: list) -> None:
    for future in futures:
        future.result(timeout=120)
    futures.clear()


@dataclass
class PulledMessage:
    data: bytes
    attributes: dict[str, str]
    publish_time_us: int


def pull(
    subscription: str,
    project: str = config.DEFAULT_PROJECT,
    count: int | None = None,
    idle_timeout: float | None = None,
    on_message: Callable[[PulledMessage], None] | None = None,
    batch: int = 1000,
) -> int:
    """Pull and acknowledge messages until `count` arrived or none came for `idle_timeout` seconds.

    With neither limit it runs until interrupted. Each message is handed to `on_message` before
    it is acknowledged. Returns how many messages were handled.
    """
    from google.api_core import exceptions
    from google.cloud import pubsub_v1

    path = config.resolve_subscription(project, subscription)
    subscriber = pubsub_v1.SubscriberClient()
    handled = 0
    last = time.monotonic()
    try:
        while count is None or handled < count:
            want = batch if count is None else min(batch, count - handled)
            try:
                response = subscriber.pull(request={"subscription": path, "max_messages": want}, timeout=5)
                received = response.received_messages
            except exceptions.DeadlineExceeded:
                received = []
            if received:
                for item in received:
                    message = item.message
                    if on_message is not None:
                        on_message(
                            PulledMessage(message.data, dict(message.attributes), _timestamp_us(message.publish_time))
                        )
                handled += len(received)
                subscriber.acknowledge(request={"subscription": path, "ack_ids": [m.ack_id for m in received]})
                last = time.monotonic()
            elif idle_timeout is not None and time.monotonic() - last >= idle_timeout:
                break
            else:
                time.sleep(0.05)
    finally:
        subscriber.close()
    return handled


def seek(subscription: str, to_us: int, project: str = config.DEFAULT_PROJECT) -> None:
    """Redeliver every message a subscription received from `to_us` (µs since the epoch) on.

    The subscription must keep acknowledged messages (`rtml up` and `templates/setup_gcp.sh`
    create the input subscriptions that way); messages older than its retention are gone.
    """
    from google.cloud import pubsub_v1
    from google.protobuf import timestamp_pb2

    path = config.resolve_subscription(project, subscription)
    moment = timestamp_pb2.Timestamp(seconds=to_us // 1_000_000, nanos=(to_us % 1_000_000) * 1000)
    subscriber = pubsub_v1.SubscriberClient()
    try:
        found = subscriber.get_subscription(request={"subscription": path})
        if not found.retain_acked_messages:
            raise ValueError(
                f"{path} does not keep acknowledged messages, so seeking cannot replay them; "
                "update it with `gcloud pubsub subscriptions update SUB --retain-acked-messages`"
            )
        subscriber.seek(request={"subscription": path, "time": moment})
    finally:
        subscriber.close()


def drain(subscription: str, project: str = config.DEFAULT_PROJECT, idle_timeout: float = 1.0) -> int:
    """Acknowledge whatever a subscription holds (left over from earlier runs)."""
    return pull(subscription, project, idle_timeout=idle_timeout)


def _timestamp_us(value: Any) -> int:
    if value is None:
        return 0
    if hasattr(value, "timestamp"):
        return int(round(value.timestamp() * 1_000_000))
    return int(value.seconds) * 1_000_000 + int(value.nanos) // 1000


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ev", file=sys.stderr, dynamic_ncols=True)
