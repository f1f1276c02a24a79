"""Publish each transaction's result, then write its feature state to Bigtable.

A transaction's result is the one message the pipeline owes for it: an insight (scoring), a
feature record (featurize), or a dead letter when it passed validation but could not be scored.
`PublishOutcomes` batches results (by count, or `max_buffering_secs` after the first one),
publishes a batch, waits until Pub/Sub has acknowledged every message of it, and only then
writes the batch's state cells (`FeaturedTransaction.cells`: the transaction in its customer's
and its terminal's rows) in one Bigtable request.

Why: the local runner acknowledges input messages before processing them, so after a crash the
way back is to seek the input subscriptions to before the crash and replay (`rtml seek`). Since
a transaction reaches the durable state only after its result was published, a replayed
transaction found in the state is a duplicate (dropped and counted), and one not found is
computed and published again. The one window left is between Pub/Sub's acknowledgement of a
batch and the Bigtable write that follows, a few milliseconds per batch, in which a crash makes
that batch's transactions come out twice.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from rtml import entity_store as store

_LOG = logging.getLogger(__name__)
NAMESPACE = "outcomes"
PUBLISH_RETRY_FOR_S = 600.0


class Outcome(NamedTuple):
    """One message to publish (`kind` names its topic) and the state cells to write after it."""

    kind: str
    data: bytes
    attributes: dict
    cells: tuple  # (row_key, Cell) pairs


def outcome(kind: str, message, cells: tuple) -> Outcome:
    """An outcome from a PubsubMessage."""
    return Outcome(kind, message.data, dict(message.attributes or {}), tuple(cells))


_PUBLISHERS: dict[tuple, Any] = {}
_PUBLISHERS_LOCK = threading.Lock()


def _shared_publisher():
    """One Pub/Sub publisher per process (the local runner sets a DoFn up again for every bundle)."""
    from google.cloud import pubsub_v1

    key = (os.getpid(), os.environ.get("PUBSUB_EMULATOR_HOST"))
    with _PUBLISHERS_LOCK:
        if key not in _PUBLISHERS:
            _PUBLISHERS[key] = pubsub_v1.PublisherClient()
        return _PUBLISHERS[key]


class PublishThenPersistFn(beam.DoFn):
    """Publish one batch of outcomes, wait for every acknowledgement, then write their cells."""

    def __init__(self, config, topics: dict[str, str]):
        self._config = config
        self._topics = dict(topics)

    def setup(self):
        self._publisher = _shared_publisher()
        self._store = store.EntityStore(*self._config, shared=True)
        self._published = Metrics.counter(NAMESPACE, "published")
        self._batch_sizes = Metrics.distribution(NAMESPACE, "publish_batch_size")
        self._write_rpcs = Metrics.counter(NAMESPACE, "bigtable_write_rpcs")
        self._retries = Metrics.counter(NAMESPACE, "publish_retries")

    def teardown(self):
        self._store.close()

    def process(self, element):
        _, batch = element
        self._publish(batch)
        self._published.inc(len(batch))
        self._batch_sizes.update(len(batch))
        rows: dict[bytes, list] = {}
        for item in batch:
            for key, cell in item.cells:
                rows.setdefault(key, []).append(cell)
        before = self._store.write_rpcs
        self._store.write(rows)
        self._write_rpcs.inc(self._store.write_rpcs - before)

    def _publish(self, batch: list[Outcome]) -> None:
        """Publish every outcome; retry the failed ones with backoff for up to 10 minutes, then raise."""
        pending = list(batch)
        deadline = time.monotonic() + PUBLISH_RETRY_FOR_S
        delay = 0.2
        while True:
            futures = [
                (item, self._publisher.publish(self._topics[item.kind], item.data, **item.attributes)) for item in pending
            ]
            failed, error = [], None
            for item, future in futures:
                try:
                    future.result()
                except Exception as err:  # noqa: BLE001 - any publish failure is retried, then raised
                    failed.append(item)
                    error = err
            if not failed:
                return
            if time.monotonic() + delay > deadline:
                raise RuntimeError(f"{len(failed)} results could not be published: {error}") from error
            _LOG.warning("publishing %d of %d results failed (%s); retrying in %.1f s", len(failed), len(batch), error, delay)
            self._retries.inc(len(failed))
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            pending = failed


class PublishOutcomes(beam.PTransform):
    """`Outcome`s -> Pub/Sub (topic by kind), each batch's state cells then written to Bigtable."""

    def __init__(self, config, topics: dict[str, str], batch_size: int = 500, max_buffering_secs: float = 0.25):
        super().__init__()
        self._config = config
        self._topics = dict(topics)
        self._batch_size = batch_size
        self._max_buffering_secs = max_buffering_secs

    def expand(self, outcomes):
        # One key, sharded by Beam per worker thread (and by Dataflow as it sees fit), so batches
        # fill up without funnelling a large job through one worker.
        batches = beam.GroupIntoBatches.WithShardedKey(self._batch_size, max_buffering_duration_secs=self._max_buffering_secs)
        return (
            outcomes
            | "KeyForBatching" >> beam.Map(lambda item: (0, item)).with_output_types(tuple[int, Any])
            | "Batch" >> batches
            | "PublishThenPersist" >> beam.ParDo(PublishThenPersistFn(self._config, self._topics))
        )
