"""Publish each transaction's result, then write its feature state to Bigtable.

A transaction's result is the one message the pipeline owes for it: an insight (scoring), a
feature record (featurize), or a dead letter. `PublishOutcomes` publishes the results of each
bundle as the bundle ends, on a publishing thread, so the step goes on with the next bundle
while Pub/Sub acknowledges. The results' state cells (`FeaturedTransaction.cells`: the
transaction in its customer's and its terminal's rows, and the cells of fraud reports, which
publish nothing) wait in Beam state, with the results, for `max_buffering_secs` (or
`batch_size` results); then the step waits until Pub/Sub has acknowledged every result of the
batch and only then writes the batch's cells in one Bigtable request. Latency is one bundle and
one publish; Bigtable sees one write per batch.

Why this order: the local runner acknowledges input messages before processing them, so after a
crash the way back is to seek the input subscriptions to before the crash and replay (`rtml
seek`). Since a transaction reaches the durable state only after its result was published, a
replayed transaction found in the state is a duplicate (dropped and counted), and one not found
is computed and published again. The window left is between a result's publication and the
write of its batch's cells, at most `max_buffering_secs` plus a write: a crash in it makes those
transactions come out twice. A result whose acknowledgement this process did not see (its batch
was published by a worker that died, on a runner that keeps state, such as Dataflow) is
published again before its cells are written: at least once, never lost.

Insights, feature records and dead letters go this way, as `(shard, Outcome)` pairs made by
`keyed`, straight from the steps that produce them: one stateful step does the batching and the
publishing. Fewer steps matter on the local runner, which runs every step once for every bundle
of each of its inputs, empty bundles included. Health records, which carry no state and come a
few a minute, are published by the health step itself with `publish_all`.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
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


def shared_publisher():
    """One Pub/Sub publisher per process (the local runner sets a DoFn up again for every bundle).
    `publish_all` sends through its request API (`.api`), one request per topic and batch."""
    from google.cloud import pubsub_v1

    key = (os.getpid(), os.environ.get("PUBSUB_EMULATOR_HOST"))
    with _PUBLISHERS_LOCK:
        if key not in _PUBLISHERS:
            _PUBLISHERS[key] = pubsub_v1.PublisherClient()
        return _PUBLISHERS[key]


class _Publishing:
    """A process's publishing threads, and the publications handed to them whose results not every
    flush has confirmed yet, by publication id. Shared by every instance of the step in the process
    (the local runner makes one for every bundle, and a later bundle's instance confirms), and by
    every key: a bundle holds results of several keys, each confirmed by its own key's flush."""

    THREADS = 4
    # A publication no flush asked about for this long held results of a key that moved to another
    # worker since (that worker publishes them again): forgotten once done.
    FORGET_AFTER_S = 3600.0

    def __init__(self):
        self._lock = threading.Lock()
        self._pool = None
        self._pid = None
        # publication id -> [handed over (monotonic), future, results not confirmed yet]
        self._sent: dict[str, list] = {}
        self._ids = itertools.count()

    def new_id(self) -> str:
        return f"{_SHARD_PREFIX}-{os.getpid()}-{next(self._ids)}"

    def send(self, publication: str, results: int, publish, *args) -> None:
        """Run `publish(*args)`, which publishes `results` results, on a publishing thread."""
        with self._lock:
            if self._pool is None or self._pid != os.getpid():  # none yet, or inherited by a fork
                self._pool = concurrent.futures.ThreadPoolExecutor(self.THREADS, thread_name_prefix="rtml-publish")
                self._pid = os.getpid()
                self._sent = {}
            now = time.monotonic()
            self._sent[publication] = [now, self._pool.submit(publish, *args), results]
            stale = [
                key for key, (at, future, _) in self._sent.items() if now - at > self.FORGET_AFTER_S and future.done()
            ]
            for key in stale:
                del self._sent[key]

    def confirm(self, publication: str, results: int) -> bool:
        """Wait for a publication handed over in this process, for `results` of its results: True
        once Pub/Sub acknowledged it; False if it failed or this process does not know it (the
        caller publishes those results again)."""
        with self._lock:
            sent = self._sent.get(publication)
            if sent is not None:
                sent[2] -= results
                if sent[2] <= 0:
                    del self._sent[publication]
        if sent is None:
            return False
        try:
            sent[1].result()
        except Exception as err:  # noqa: BLE001 - publish_all gave up; the caller publishes again and raises if that fails
            _LOG.warning("a batch of results could not be published (%s); publishing it again", err)
            return False
        return True


PUBLISHING = _Publishing()


class PublishThenPersistFn(dofn.DoFn):
    """Per shard: publish each bundle's results as the bundle ends (on a publishing thread), and
    keep them with their state cells until `batch_size` results or `max_buffering_secs` after the
    first; then wait for every acknowledgement of the batch and write its cells in one request.

    The buffer lives in Beam state (it survives a worker failure like any other element), and
    the wait is a processing-time timer, as in Beam's `GroupIntoBatches`. Each result is buffered
    under the id of its bundle's publication; a flush publishes again, synchronously, the results
    of any publication it cannot confirm (module doc).
    """

    BUFFER = BagStateSpec("buffer", PickleCoder())  # (publication id, Outcome)
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
        self._republished = Metrics.counter(NAMESPACE, "published_again")

    def teardown(self):
        self._store.close()

    def start_bundle(self):
        self._unsent: list[Outcome] = []  # this bundle's results not handed to a publishing thread yet
        # The id of the publication they will go out in, buffered with each of them.
        self._publication = PUBLISHING.new_id()

    def process(
        self,
        element: tuple[str, Outcome],
        buffer=beam.DoFn.StateParam(BUFFER),
        count=beam.DoFn.StateParam(COUNT),
        flush=beam.DoFn.TimerParam(FLUSH),
    ):
        _, item = element
        if item.kind is not None:
            if item.kind not in self._topics:
                raise ValueError(f"no topic for results of kind {item.kind!r}; known: {sorted(self._topics)}")
            self._unsent.append(item)
        buffer.add((self._publication, item))
        size = (count.read() or 0) + 1
        count.write(size)
        if size == 1:
            flush.set(Timestamp.of(time.time() + self._max_buffering_secs))
        if size >= self._batch_size:
            flush.clear()
            self._flush(buffer, count)

    def finish_bundle(self):
        self._send()

    @on_timer(FLUSH)
    def on_flush(self, buffer=beam.DoFn.StateParam(BUFFER), count=beam.DoFn.StateParam(COUNT)):
        self._flush(buffer, count)

    def _send(self) -> None:
        """Hand this bundle's results so far to a publishing thread, as one publication."""
        if self._unsent:
            batch, self._unsent = self._unsent, []
            self._published.inc(len(batch))
            self._batch_sizes.update(len(batch))
            PUBLISHING.send(
                self._publication, len(batch), publish_all, self._publisher, self._topics, batch, self._retries
            )
            self._publication = PUBLISHING.new_id()

    def _flush(self, buffer, count) -> None:
        self._send()
        batch = list(buffer.read())
        if not batch:
            return
        by_publication: dict[str, list[Outcome]] = {}
        for publication, item in batch:
            if item.kind is not None:
                by_publication.setdefault(publication, []).append(item)
        unconfirmed = []
        for publication, published in by_publication.items():
            if not PUBLISHING.confirm(publication, len(published)):
                unconfirmed += published
        if unconfirmed:  # cells only after their results are out
            self._republished.inc(len(unconfirmed))
            publish_all(self._publisher, self._topics, unconfirmed, self._retries)
        rows: dict[bytes, list] = {}
        for _, item in batch:
            for key, cell in item.cells:
                rows.setdefault(key, []).append(cell)
        if rows:
            before = self._store.write_rpcs
            self._store.write(rows)
            self._write_rpcs.inc(self._store.write_rpcs - before)
        buffer.clear()
        count.clear()


# Pub/Sub's limits on one publish request: 1,000 messages and 10 MB (this leaves room for framing).
MAX_MESSAGES_PER_REQUEST = 1000
MAX_BYTES_PER_REQUEST = 9_000_000


def _requests(messages: list) -> Iterator[list]:
    """`messages` in order, cut into requests within Pub/Sub's limits."""
    chunk, size = [], 0
    for message in messages:
        message_size = len(message.data) + sum(len(k) + len(v) for k, v in message.attributes.items())
        if chunk and (len(chunk) == MAX_MESSAGES_PER_REQUEST or size + message_size > MAX_BYTES_PER_REQUEST):
            yield chunk
            chunk, size = [], 0
        chunk.append(message)
        size += message_size
    if chunk:
        yield chunk


def publish_all(publisher, topics: dict[str, str], batch: list[Outcome], retries=None) -> None:
    """Publish every outcome to `topics[item.kind]`, in one request per topic (more past Pub/Sub's
    limits), and return once Pub/Sub has acknowledged them all. A failed request is retried with
    backoff for up to 10 minutes, then this raises. `retries`: a counter of retried messages."""
    from google.pubsub_v1 import types

    by_topic: dict[str, list] = {}
    for item in batch:
        by_topic.setdefault(topics[item.kind], []).append(
            types.PubsubMessage(data=item.data, attributes=item.attributes)
        )
    deadline = time.monotonic() + PUBLISH_RETRY_FOR_S
    delay = 0.2
    for topic, messages in by_topic.items():
        for request in _requests(messages):
            while True:
                try:
                    publisher.api.publish(topic=topic, messages=request)
                    break
                except Exception as err:  # noqa: BLE001 - any publish failure is retried, then raised
                    if time.monotonic() + delay > deadline:
                        raise RuntimeError(f"{len(request)} results could not be published to {topic}: {err}") from err
                    _LOG.warning(
                        "publishing %d results to %s failed (%s); retrying in %.1f s", len(request), topic, err, delay
                    )
                    if retries is not None:
                        retries.inc(len(request))
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)


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
