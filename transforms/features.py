"""Streaming feature engine: keyed stateful DoFns in the global window, backed by Bigtable.

Transactions pass the customer DoFn (keyed by customer) and then the terminal DoFn (keyed by
terminal, which also receives fraud feedback), and leave with every reference feature. Beam
state is the hot cache of each entity; Bigtable is the durable store: the first time a worker
sees a key it loads the entity's row, and every change is written back, in batches so there
are far fewer write RPCs than events. The changes travel as state cells to
`transforms.outcomes.PublishOutcomes`, which writes each batch's cells in one request after
publishing the batch's results:

- a transaction's own cells (one in its customer's row, one in its terminal's) go with it as
  `FeaturedTransaction.cells`. So a transaction is in the durable state only once its result is
  out: after a crash and a replay of the input, a transaction found in the state was handled (a
  duplicate), and one not found is computed again;
- a fraud report's cell depends on the report alone, so it leaves the step that loads the
  reports' terminal rows, as an outcome that publishes nothing (`ComputedFeatures.feedback_state`).
  It may reach Bigtable before the terminal step has applied the report: a terminal restored from
  its row applies the report the same way. Made there, the local runner's bundle of report cells
  exists only when reports came in (a step's every output gets a bundle each time it runs, empty
  or not, and each bundle runs the steps that read it once).

Where the hot cache lives (`buckets`): by default in Beam state under a key per customer and
per terminal, as any runner needs. The local streaming runner is one process that runs each
stateful step one bundle at a time, and after every bundle it scans every key every stateful
step has ever had for due timers: with a key per customer and per terminal that scan came to a
quarter of a wave's time. Given `buckets`, the steps are keyed by that many buckets of entities
instead and keep each entity's state in a dict of the process (per step), which on that runner
is what Beam state is too: memory of the one process, rebuilt from Bigtable after a restart.
Their state specs stay declared, so the runner still runs each step one bundle at a time.
"""

import functools
import logging
import threading
import uuid
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.utils.timestamp import Timestamp

from rtml import entity_store as store
from rtml import events
from rtml.features import Entry, Report
from transforms import dofn, outcomes

FEEDBACK_STATE_TAG = "feedback_state"
_LOG = logging.getLogger(__name__)


class StoreConfig(NamedTuple):
    """Where the feature table lives."""

    project: str
    instance: str
    table: str


class FeaturedTransaction(NamedTuple):
    """A transaction with all reference features, and the state cells it adds: `(row_key, Cell)`
    for its customer and its terminal, to be written once its result is out (see module doc)."""

    transaction: events.Transaction
    features: dict
    cells: tuple = ()


def _counter(name: str):
    return Metrics.counter("features", name)


def _checked_buckets(buckets: int) -> int:
    if buckets < 0:
        raise ValueError(f"feature buckets must be >= 0, got {buckets}")
    return buckets


def entity_key(entity_id: str, buckets: int = 0) -> str:
    """A feature step's key for an entity: the entity itself (`buckets` 0), else one of `buckets`
    buckets of entities (see the module doc)."""
    if not _checked_buckets(buckets):
        return entity_id
    return str(zlib.crc32(entity_id.encode("utf-8")) % buckets)


# Entity states of the steps that keep them in this process (`buckets`), by the step's token.
_IN_PROCESS: dict[str, dict[str, Any]] = {}


class _InProcess:
    """One entity's state in the process's dict, read and written as a key's Beam state would be."""

    __slots__ = ("_entities", "_id")

    def __init__(self, entities: dict, entity_id: str):
        self._entities = entities
        self._id = entity_id

    def read(self):
        return self._entities.get(self._id)

    def write(self, value) -> None:
        self._entities[self._id] = value


class _EntityFn(dofn.DoFn):
    """Shared plumbing: the Bigtable store, created once per worker, RPC counters, and where the
    entities' states are (Beam state, or with `buckets` this process's dict; see the module doc)."""

    def __init__(self, config: StoreConfig, kind: str, buckets: int = 0):
        self._config = config
        self._kind = kind
        self._buckets = _checked_buckets(buckets)  # refused now, not in a worker
        self._token = uuid.uuid4().hex  # names this step's entities in the process

    def setup(self):
        self._store = store.EntityStore(*self._config, shared=True)
        self._read_rpcs = _counter("bigtable_read_rpcs")
        self._loaded = _counter(f"{self._kind}_rows_loaded")
        self._in_process = None
        if self._buckets:
            # Kept across bundles: the local runner calls setup and teardown around every bundle.
            with _KNOWN_LOCK:
                self._in_process = _IN_PROCESS.setdefault(self._token, {})

    def _entity_state(self, state, entity_id: str):
        """The entity's state: the key's Beam state, or its entry in this process's dict."""
        return state if self._in_process is None else _InProcess(self._in_process, entity_id)

    def teardown(self):
        self._store.close()

    def _load(self, entity_id: str, attached):
        """The stored row of an entity: the one `LoadEntitiesFn` attached, else one read."""
        if attached is not None:
            return attached
        key = store.row_key(self._kind, entity_id)
        self._read_rpcs.inc()
        cells = self._store.load([key]).get(key)
        if cells is not None:
            self._loaded.inc()
        return cells


# Keys each `LoadEntitiesFn` step has loaded in this process (by the step's token), oldest first.
_KNOWN_KEYS: dict[str, dict[bytes, None]] = {}
_KNOWN_LOCK = threading.Lock()


class LoadEntitiesFn(dofn.DoFn):
    """Attach the stored rows of entities this worker has not loaded yet: one read per bundle.

    Elements leave as `(event, customer_row, terminal_row)`, passed through `key` when given
    (keying them here saves the stateful step behind a step of its own); a row is an
    `EntityCells` (empty when Bigtable has none) for a key first seen in this bundle, else None.
    The stateful DoFns use an attached row only while their state for that key is empty, and read
    the row themselves if none is attached, so this step saves requests without being needed for
    correctness.

    `cells(event)`, when given, are state cells the event adds whatever the entity holds: they
    leave on output `FEEDBACK_STATE_TAG` as an outcome that publishes nothing.
    """

    def __init__(
        self,
        config: StoreConfig,
        remembered_keys: int = 1_000_000,
        key: Callable[[tuple], Any] | None = None,
        cells: Callable[[Any], list] | None = None,
    ):
        self._config = config
        self._remembered_keys = remembered_keys
        self._key = key
        self._cells = cells
        self._token = uuid.uuid4().hex  # names this step's remembered keys in the process

    def setup(self):
        self._store = store.EntityStore(*self._config, shared=True)
        # Kept across bundles: the local runner calls setup and teardown around every bundle.
        with _KNOWN_LOCK:
            self._known: dict[bytes, None] = _KNOWN_KEYS.setdefault(self._token, {})
        self._read_rpcs = _counter("bigtable_read_rpcs")
        self._batched = _counter("rows_loaded_in_batches")

    def teardown(self):
        self._store.close()

    def start_bundle(self):
        self._pending = []

    def process(self, event, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        self._pending.append((event, _entity_keys(event), timestamp, window))

    def finish_bundle(self):
        from apache_beam.utils.windowed_value import WindowedValue

        wanted = {}
        for _, keys, _, _ in self._pending:
            for key in keys:
                if key is not None and key not in self._known:
                    wanted[key] = None
        rows = {}
        if wanted:
            self._read_rpcs.inc()
            rows = self._store.load(wanted)
            self._batched.inc(len(wanted))
            with _KNOWN_LOCK:
                for key in wanted:
                    self._known[key] = None
                while len(self._known) > self._remembered_keys:
                    self._known.pop(next(iter(self._known)))
        for event, keys, timestamp, window in self._pending:
            attached = tuple((rows.get(key) or store.EntityCells()) if key in wanted else None for key in keys)
            loaded = (event, *attached)
            yield WindowedValue(loaded if self._key is None else self._key(loaded), timestamp, [window])
            if self._cells is not None:
                state = outcomes.state_only(self._cells(event))
                yield beam.pvalue.TaggedOutput(FEEDBACK_STATE_TAG, WindowedValue(state, timestamp, [window]))
        self._pending = []


def by_customer(loaded: tuple, buckets: int = 0) -> tuple[str, tuple]:
    """A loaded transaction keyed for the customer step."""
    return entity_key(loaded[0].customer_id, buckets), loaded


def feedback_by_terminal(loaded: tuple, buckets: int = 0) -> tuple[str, tuple]:
    """A loaded fraud report keyed for the terminal step."""
    return entity_key(loaded[0].terminal_id, buckets), ("fb", loaded)


def report_cells(feedback: events.Feedback) -> list:
    """The state cell a fraud report adds to its terminal's row."""
    report = Report(feedback.reported_at_us, feedback.is_fraud, feedback.event_time_us)
    return [(store.row_key(store.TERMINAL, feedback.terminal_id), store.report_cell(feedback.transaction_id, report))]


def _entity_keys(event) -> tuple:
    terminal_key = store.row_key(store.TERMINAL, event.terminal_id)
    if isinstance(event, events.Transaction):
        return store.row_key(store.CUSTOMER, event.customer_id), terminal_key
    return None, terminal_key


class CustomerFeaturesFn(_EntityFn):
    """Customer windows for each transaction; a duplicate transaction_id is counted, not passed on."""

    ENTITY = ReadModifyWriteStateSpec("customer", PickleCoder())

    def __init__(self, config: StoreConfig, buckets: int = 0):
        super().__init__(config, store.CUSTOMER, buckets)

    def setup(self):
        super().setup()
        self._duplicates = _counter("duplicate_transactions")
        self._late = _counter("late_transactions")

    def process(self, element, beam_state=beam.DoFn.StateParam(ENTITY)):
        _, (tx, customer_row, terminal_row) = element
        customer_id = tx.customer_id
        entity = self._entity_state(beam_state, customer_id)
        cached = entity.read()
        state = store.customer_state(self._load(customer_id, customer_row)) if cached is None else cached
        if state.watermark_us is not None and tx.event_time_us < state.watermark_us:
            self._late.inc()
            _LOG.debug(  # ids are customer data: never at INFO
                "late transaction %s for customer %s: %.3f s behind the customer's latest",
                tx.transaction_id,
                customer_id,
                (state.watermark_us - tx.event_time_us) / 1e6,
            )
        features = state.update(tx)
        if features is None:
            self._duplicates.inc()
            if cached is None:
                entity.write(state)
            return
        entity.write(state)
        cell = (store.row_key(store.CUSTOMER, customer_id), _entry_cell(tx))
        yield entity_key(tx.terminal_id, self._buckets), ("tx", (tx, features, terminal_row, cell))


class Batches:
    """Items gathered into lists of at most `size`, as WindowedValues in the global window (where
    the feature steps keep their state) stamped with their latest item's timestamp."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"batch size must be at least 1, got {size}")
        self._size = size
        self._items: list = []
        self._latest: Timestamp | None = None

    def add(self, item, timestamp: Timestamp):
        """Take an item; returns the batch it completes, else None."""
        self._items.append(item)
        self._latest = timestamp if self._latest is None else max(self._latest, timestamp)
        return self.flush() if len(self._items) >= self._size else None

    def flush(self):
        """The batch gathered so far (None if empty), and start a new one."""
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        if not self._items:
            return None
        batch = WindowedValue(self._items, self._latest, [GlobalWindow()])
        self._items, self._latest = [], None
        return batch


class TerminalFeaturesFn(_EntityFn):
    """Terminal windows and fraud risk; applies fraud feedback to the terminal's transactions.

    Every transaction that arrives here leaves with features: the customer step has dropped the
    duplicates. If the terminal holds the id already (the same id at another customer, or a state
    write of the customer's lost in a crash), it is not added again and its terminal features are
    the windows as they stand at its event time.
    """

    ENTITY = ReadModifyWriteStateSpec("terminal", PickleCoder())

    def __init__(
        self,
        config: StoreConfig,
        emit: Callable[[FeaturedTransaction, Timestamp], Any] | None = None,
        batch_size: int | None = None,
        buckets: int = 0,
    ):
        super().__init__(config, store.TERMINAL, buckets)
        self._emit = emit
        self._batch_size = batch_size

    def setup(self):
        super().setup()
        self._feedback = _counter("feedback_applied")
        self._held = _counter("transactions_already_at_terminal")

    def start_bundle(self):
        self._batches = Batches(self._batch_size) if self._batch_size else None

    def finish_bundle(self):
        batch = self._batches.flush() if self._batches is not None else None
        if batch is not None:
            yield batch

    def process(self, element, beam_state=beam.DoFn.StateParam(ENTITY), timestamp=beam.DoFn.TimestampParam):
        _, (kind, payload) = element
        if kind == "fb":
            payload, _, row = payload
            terminal_id = payload.terminal_id
        else:
            tx, customer_features, row, customer_cell = payload
            terminal_id = tx.terminal_id
        entity = self._entity_state(beam_state, terminal_id)
        cached = entity.read()
        state = store.terminal_state(self._load(terminal_id, row)) if cached is None else cached
        if kind == "fb":  # its state cell left with the report, from the loading step
            changed = state.apply_feedback(payload)
            entity.write(state)
            if changed:
                self._feedback.inc()
            return
        terminal_features = state.update(tx)
        if terminal_features is None:
            self._held.inc()
            if cached is None:
                entity.write(state)
            terminal_features = state.features_at(tx.event_time_us)
            cells = (customer_cell,)
        else:
            entity.write(state)
            cells = (customer_cell, (store.row_key(store.TERMINAL, terminal_id), _entry_cell(tx)))
        featured = FeaturedTransaction(tx, _all_features(tx, customer_features, terminal_features), cells)
        made = featured if self._emit is None else self._emit(featured, timestamp)
        if self._batches is None:
            yield made
            return
        batch = self._batches.add(made, timestamp)
        if batch is not None:
            yield batch


def _entry_cell(tx) -> store.Cell:
    return store.entry_cell(Entry(tx.event_time_us, tx.transaction_id, tx.amount))


def _all_features(tx, customer_features: dict, terminal_features: dict) -> dict:
    from rtml.features import FEATURE_NAMES, transaction_features

    merged = {**transaction_features(tx), **customer_features, **terminal_features}
    return {name: merged[name] for name in FEATURE_NAMES}


class ComputedFeatures(NamedTuple):
    transactions: beam.PCollection  # FeaturedTransaction, carrying its own state cells (or what `emit` makes of it)
    feedback_state: beam.PCollection  # keyed outcomes with the cells of fraud reports, for `PublishOutcomes`


def load_transactions(config: StoreConfig, buckets: int = 0) -> LoadEntitiesFn:
    """The DoFn that loads transactions' rows and keys them for the customer step (`buckets`: see
    the module doc)."""
    key = functools.partial(by_customer, buckets=buckets)
    return LoadEntitiesFn(config, key=key).with_output_types(tuple[str, Any])


class ComputeFeatures(beam.PTransform):
    """Transactions and feedback -> featured transactions (with their state cells), plus feedback's state cells.

    `emit(featured, timestamp)`, if given, is what the terminal step outputs for each featured
    transaction instead (the element's timestamp is its publish time on a stream): the first
    transform of what comes next, done here rather than in a step of its own, since the local
    runner runs every step once per bundle. For the same reason `loaded=True` takes transactions
    already through `load_transactions(config)`, run in the step before (the streaming pipelines
    run it inside validation: `ReadEvents(then=...)`); otherwise this transform loads them in a
    step of its own. And given `batch_size`, the terminal step outputs lists of up to that many
    of what it makes, the rest of each bundle's at the bundle's end, in place of a batching
    step after it (scoring hands them to RunInference as its batches). Given `buckets`, the
    feature steps keep their entities in the process (local streaming runner only; see the
    module doc), and transactions loaded beforehand must have been keyed with the same count.
    """

    def __init__(
        self,
        config: StoreConfig,
        emit: Callable[[FeaturedTransaction, Timestamp], Any] | None = None,
        loaded: bool = False,
        batch_size: int | None = None,
        buckets: int = 0,
    ):
        super().__init__()
        self._config = config
        self._emit = emit
        self._loaded = loaded
        self._batch_size = batch_size
        self._buckets = _checked_buckets(buckets)

    def expand(self, inputs):
        transactions, feedback = inputs
        buckets = self._buckets
        if not self._loaded:
            transactions = transactions | "LoadTransactionEntities" >> beam.ParDo(
                load_transactions(self._config, buckets)
            )
        customers = transactions | "CustomerFeatures" >> beam.ParDo(
            CustomerFeaturesFn(self._config, buckets)
        ).with_input_types(
            tuple[str, Any]  # str keys: a deterministic key coder for the state
        ).with_output_types(tuple[str, Any])
        by_terminal = functools.partial(feedback_by_terminal, buckets=buckets)
        reports = feedback | "LoadFeedbackEntities" >> beam.ParDo(
            LoadEntitiesFn(self._config, key=by_terminal, cells=report_cells)
        ).with_output_types(tuple[str, Any]).with_outputs(FEEDBACK_STATE_TAG, main="loaded")
        featured = (
            (customers, reports.loaded)
            | "MergeTerminalInputs" >> beam.Flatten()
            | "TerminalFeatures"
            >> beam.ParDo(TerminalFeaturesFn(self._config, self._emit, self._batch_size, buckets))
            .with_input_types(tuple[str, Any])  # str keys: a deterministic key coder for the state
            .with_output_types(FeaturedTransaction if self._emit is None and not self._batch_size else Any)
            # One output, but `with_outputs` keeps the step's name (its state's, for --update).
            .with_outputs(main="featured")
        )
        return ComputedFeatures(featured.featured, reports[FEEDBACK_STATE_TAG])


class WriteBatchFn(dofn.DoFn):
    """Write one batch of `(row_key, [Cell])` with one Bigtable request (retried with backoff)."""

    def __init__(self, config: StoreConfig):
        self._config = config

    def setup(self):
        self._store = store.EntityStore(*self._config, shared=True)
        self._rpcs = _counter("bigtable_write_rpcs")
        self._cells = _counter("bigtable_cells_written")

    def teardown(self):
        self._store.close()

    def process(self, element):
        _, batch = element
        rows: dict[bytes, list] = {}
        for key, cells in batch:
            rows.setdefault(key, []).extend(cells)
        before = self._store.write_rpcs
        self._store.write(rows)
        self._rpcs.inc(self._store.write_rpcs - before)
        self._cells.inc(sum(len(cells) for cells in rows.values()))


class WriteEntityCells(beam.PTransform):
    """Batch mutations (by count or by time) and write each batch in one Bigtable request.

    The buffer lives in Beam state, so a batch survives a worker failure like any other element.
    """

    def __init__(self, config: StoreConfig, batch_size: int = 500, max_buffering_secs: float = 1.0, shards: int = 2):
        super().__init__()
        self._config = config
        self._batch_size = batch_size
        self._max_buffering_secs = max_buffering_secs
        self._shards = shards

    def expand(self, mutations):
        shards = self._shards
        return (
            mutations
            | "KeyByShard" >> beam.Map(lambda kv: (zlib.crc32(kv[0]) % shards, kv)).with_output_types(tuple[int, Any])
            | "Batch" >> beam.GroupIntoBatches(self._batch_size, max_buffering_duration_secs=self._max_buffering_secs)
            | "Write" >> beam.ParDo(WriteBatchFn(self._config))
        )
