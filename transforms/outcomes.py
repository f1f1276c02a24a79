"""Publish each transaction's result, then write its feature state to Bigtable.

A transaction's result is the one message the pipeline owes for it: an insight (scoring), a
feature record (featurize), or a dead letter. `PublishOutcomes` batches results (by count, or
`max_buffering_secs` after the first one), publishes a batch, waits until Pub/Sub has
acknowledged every message of it, and only then writes the batch's state cells
(`FeaturedTransaction.cells`: the transaction in its customer's and its terminal's rows, and
the cells of fraud reports, which publish nothing) in one Bigtable request.

Why: the local runner acknowledges input messages before processing them, so after a crash the
way back is to seek the input subscriptions to before the crash and replay (`rtml seek`). Since
a transaction reaches the durable state only after its result was published, a replayed
transaction found in the state is a duplicate (dropped and counted), and one not found is
computed and published again. The one window left is between Pub/Sub's acknowledgement of a
batch and the Bigtable write that follows, a few milliseconds per batch, in which a crash makes
that batch's transactions come out twice.

Insights, feature records and dead letters go this way, as `(shard, Outcome)` pairs made by
`keyed`, straight from the steps that produce them: one stateful step does the batching and the
publishing. Fewer steps matter on the local runner, which runs every step once for every bundle
of each of its inputs, empty bundles included. Health records, which carry no state and come a
few a minute, are published by the health step itself with `publish_all`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from rtml import entity_store as store
from transforms import dofn

_LOG = logging.getLogger(__name__)
NAMESPACE = "outcomes"
DEAD_LETTER = "dead_letter"  # the outcome kind of dead letters, in every pipeline
PUBLISH_RETRY_FOR_S = 600.0


class Outcome(NamedTuple):
    """One message to publish (`kind` names its topic; None: nothing to publish) and the state
    cells to write after it."""

    kind: str | None
    data: bytes
    attributes: dict
    cells: tuple  # (row_key, Cell) pairs


# Outcomes are keyed by process and worker thread, as Beam's GroupIntoBatches.WithShardedKey
# does: batches fill up locally, and a large job is not funnelled through one key.
_SHARD_PREFIX = uuid.uuid4().hex[:12]


def keyed(item: Outcome) -> tuple[str, Outcome]:
    """`(shard, item)`: what `PublishOutcomes` takes."""
    return f"{_SHARD_PREFIX}-{threading.get_ident()}", item


def of_message(kind: str, message, cells: tuple = ()) -> Outcome:
    """An outcome from a PubsubMessage."""
    return Outcome(kind, message.data, dict(message.attributes or {}), tuple(cells))


def outcome(kind: str, message, cells: tuple) -> tuple[str, Outcome]:
    """A keyed outcome from a PubsubMessage."""
    return keyed(of_message(kind, message, cells))


def state_only(cells) -> tuple[str, Outcome]:
    """A keyed outcome that publishes nothing and writes `cells` (a fraud report's) with its batch."""
    return keyed(Outcome(None, b"", {}, tuple(cells)))


_PUBLISHERS: dict[tuple, Any] = {}
_PUBLISHERS_LOCK = threading.Lock()
# How long the Pub/Sub client holds a message for more to send with it. The batches are made
# here, published in one go and then waited for, so the client's default of 10 ms only delayed
# every batch: 10 messages published and acknowledged took 14.2 ms (median) against the
# emulator with it, 3.4 ms with 1 ms.
CLIENT_BATCH_LATENCY_S = 0.001


def shared_publisher():
    """One Pub/Sub publisher per process (the local runner sets a DoFn up again for every bundle)."""
    from google.cloud import pubsub_v1

    key = (os.getpid(), os.environ.get("PUBSUB_EMULATOR_HOST"))
    with _PUBLISHERS_LOCK:
        if key not in _PUBLISHERS:
            settings = pubsub_v1.types.BatchSettings(max_latency=CLIENT_BATCH_LATENCY_S)
            _PUBLISHERS[key] = pubsub_v1.PublisherClient(batch_settings=settings)
        return _PUBLISHERS[key]


class PublishThenPersistFn(dofn.DoFn):
    """Per shard: buffer outcomes until `batch_size` or `max_buffering_secs` after the first,
    then publish the batch, wait for every acknowledgement, and write its cells in one request.

    The buffer lives in Beam state (it survives a worker failure like any other element), and
    the wait is a processing-time timer, as in Beam's `GroupIntoBatches`; doing the batching in
    this step rather than in a separate one saves a step per bundle on the local runner.
    """

    BUFFER = BagStateSpec("buffer", PickleCoder())
    COUNT = ReadModifyWriteStateSpec("count", VarIntCoder())
    FLUSH = TimerSpec("flush", TimeDomain.REAL_TIME)

    def __init__(self, config, topics: dict[str, str], batch_size: int, max_buffering_secs: float):
        if batch_size < 1 or max_buffering_secs <= 0:
            raise ValueError("batch_size must be at least 1 and max_buffering_secs > 0")
        self._config = config
        self._topics = dict(topics)
        self._batch_size = batch_size
        self._max_buffering_secs = max_buffering_secs

    def setup(self):
        self._publisher = shared_publisher()
        self._store = store.EntityStore(*self._config, shared=True)
        self._published = Metrics.counter(NAMESPACE, "published")
        self._batch_sizes = Metrics.distribution(NAMESPACE, "publish_batch_size")
        self._write_rpcs = Metrics.counter(NAMESPACE, "bigtable_write_rpcs")
        self._retries = Metrics.counter(NAMESPACE, "publish_retries")

    def teardown(self):
        self._store.close()

    def process(
        self,
        element: tuple[str, Outcome],
        buffer=beam.DoFn.StateParam(BUFFER),
        count=beam.DoFn.StateParam(COUNT),
        flush=beam.DoFn.TimerParam(FLUSH),
    ):
        _, item = element
        if item.kind is not None and item.kind not in self._topics:
            raise ValueError(f"no topic for results of kind {item.kind!r}; known: {sorted(self._topics)}")
        buffer.add(item)
        size = (count.read() or 0) + 1
        count.write(size)
        if size == 1:
            flush.set(Timestamp.of(time.time() + self._max_buffering_secs))
        if size >= self._batch_size:
            flush.clear()
            self._flush(buffer, count)

    @on_timer(FLUSH)
    def on_flush(self, buffer=beam.DoFn.StateParam(BUFFER), count=beam.DoFn.StateParam(COUNT)):
        self._flush(buffer, count)

    def _flush(self, buffer, count) -> None:
        batch = list(buffer.read())
        if not batch:
            return
        self._publish([item for item in batch if item.kind is not None])
        rows: dict[bytes, list] = {}
        for item in batch:
            for key, cell in item.cells:
                rows.setdefault(key, []).append(cell)
        before = self._store.write_rpcs
        self._store.write(rows)
        self._write_rpcs.inc(self._store.write_rpcs - before)
        buffer.clear()
        count.clear()

    def _publish(self, batch: list[Outcome]) -> None:
        if batch:
            self._published.inc(len(batch))
            self._batch_sizes.update(len(batch))
            publish_all(self._publisher, self._topics, batch, self._retries)


def publish_all(publisher, topics: dict[str, str], batch: list[Outcome], retries=None) -> None:
    """Publish every outcome (`topics[item.kind]`) and wait for each acknowledgement; retry the
    failed ones with backoff for up to 10 minutes, then raise. `retries`: a counter of retried messages."""
    pending = list(batch)
    deadline = time.monotonic() + PUBLISH_RETRY_FOR_S
    delay = 0.2
    while pending:
        futures = [(item, publisher.publish(topics[item.kind], item.data, **item.attributes)) for item in pending]
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
        if retries is not None:
            retries.inc(len(failed))
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
        pending = failed


class PublishOutcomes(beam.PTransform):
    """Keyed `Outcome`s (`keyed`), one PCollection or several -> Pub/Sub (topic by kind), each
    batch's state cells then written to Bigtable."""

    def __init__(self, config, topics: dict[str, str], batch_size: int = 500, max_buffering_secs: float = 0.25):
        super().__init__()
        self._fn = PublishThenPersistFn(config, topics, batch_size, max_buffering_secs)

    def expand(self, outcomes):
        if not isinstance(outcomes, (tuple, list)):
            outcomes = (outcomes,)
        # Typed str keys: the state needs a deterministic key coder (Dataflow matches state by encoded key).
        keyed_outcomes = tuple[str, Any]
        return (
            tuple(outcomes)
            | "FlattenOutcomes" >> beam.Flatten().with_output_types(keyed_outcomes)
            | "PublishThenPersist" >> beam.ParDo(self._fn).with_input_types(keyed_outcomes)
        )
