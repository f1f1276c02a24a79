"""Model health in the scoring pipeline: drift, delayed labels and service figures per window.

    insights --Observer--> per bundle: counts and feature bins per version ------------------.
    (in AssembleInsightFn,  per insight: (label key, scored) -.                               |
     or ObserveFn)                                             |                               |
    feedback --(label key, report)-----------------------------+--> LabelJoinFn -------------+--> HealthFn --> records
                                                                    (fraud label               (one key; a processing-
                                                                     changes; keyed by          time timer every period)
                                                                     customer or by bucket
                                                                     of customers)

The window stats pass through `LabelJoinFn` unchanged, so that `HealthFn` has one input, and
the scoring pipeline observes its insights in the step that makes them: the local runner runs
a step once per bundle of each input, empty bundles included.

`HealthFn` keeps per-period buckets of `rtml.health.WindowStats` and, every `period_secs` of
processing time, publishes one record per model version seen in the last `window_secs` (the
schema is in `rtml.health`) to its topic itself: a record carries no feature state, so it does
not need `transforms.outcomes`' publish-then-persist order, and a publishing step fed by the
health step would run once per bundle for a record a minute. Delayed-label tallies are
cumulative since the job started: the count of scored transactions and decisions comes from the
observations, the fraud labels from `LabelJoinFn`, which joins each customer's insights with the
fraud feedback in either order, under the customer's label key (`rtml.health.label_key`).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from typing import Any

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from models import loader
from rtml import drift, events, health
from transforms import dofn, outcomes

_LOG = logging.getLogger(__name__)
NAMESPACE = "health"
HEALTH_KEY = "health"
HEALTH = "health"  # the outcome kind of health records
DAY_US = 86_400 * 1_000_000
# How long a customer's scored transactions wait for fraud feedback in the label join, by event
# time: the longest feature window plus the feedback delay, with margin.
LABEL_RETENTION_US = 60 * DAY_US


_REFERENCES: dict[str, References] = {}
_REFERENCES_LOCK = threading.Lock()


class References:
    """Training distributions per model version, read from `model_dir/VERSION/metadata.json` once."""

    def __init__(self, model_dir: str):
        self._model_dir = model_dir.rstrip("/")
        self._known: dict[str, health.Reference | None] = {}

    @classmethod
    def shared(cls, model_dir: str) -> References:
        """One per model folder and process: the local runner sets DoFns up again for every bundle."""
        with _REFERENCES_LOCK:
            return _REFERENCES.setdefault(model_dir, cls(model_dir))

    def get(self, version: str) -> health.Reference | None:
        if version not in self._known:
            try:
                self._known[version] = health.Reference.from_metadata(loader.read_metadata(f"{self._model_dir}/{version}"))
            except Exception as err:  # noqa: BLE001 - health goes on without drift for this version
                _LOG.warning("health: no training statistics for model version %s (%s); its PSI is not computed", version, err)
                self._known[version] = None
        return self._known[version]


class Observer:
    """Observes insights for model health, a bundle at a time: the window stats per model
    version of the bundle's insights, and each insight's scored event for the label join."""

    def __init__(self, model_dir: str, label_buckets: int = 0):
        self._model_dir = model_dir
        self._label_buckets = label_buckets
        self._references: References | None = None
        self._stats: dict[str, health.WindowStats] = {}

    def setup(self) -> None:
        self._references = References.shared(self._model_dir)

    def start_bundle(self) -> None:
        self._stats = {}

    def observe(self, insight: dict, latency_ms: float) -> tuple[str, tuple]:
        """Count the insight in its version's stats; returns its `(label key, ("scored", ...))`."""
        observation = health.Observation.from_insight(insight, latency_ms)
        version = observation.model_version
        self._stats.setdefault(version, health.WindowStats()).add(observation, self._references.get(version))
        return scored_event(insight, self._label_buckets)

    def finish_bundle(self) -> WindowedValue | None:
        """The bundle's `(HEALTH_KEY, ("stats", {version: WindowStats}))`, or None if it saw no insight."""
        if not self._stats:
            return None
        return WindowedValue((HEALTH_KEY, ("stats", self._stats)), Timestamp.of(time.time()), [GlobalWindow()])


class ObserveFn(dofn.DoFn):
    """(insight, latency in ms) -> what `MonitorModel` takes: `(label key, ("scored", ...))`
    per insight and one `(HEALTH_KEY, ("stats", {version: WindowStats}))` per bundle. The
    scoring pipeline does the same inside `AssembleInsightFn`, saving a step. `label_buckets`
    must be `MonitorModel`'s."""

    def __init__(self, model_dir: str, label_buckets: int = 0):
        self._observer = Observer(model_dir, label_buckets)

    def setup(self):
        self._observer.setup()

    def start_bundle(self):
        self._observer.start_bundle()

    def process(self, observed: tuple[dict, float]):
        yield self._observer.observe(*observed)

    def finish_bundle(self):
        stats = self._observer.finish_bundle()
        if stats is not None:
            yield stats


def scored_event(insight: dict, label_buckets: int = 0) -> tuple[str, tuple]:
    return health.label_key(insight["customer_id"], label_buckets), (
        "scored",
        insight["transaction_id"],
        insight["model_version"],
        insight["decision"],
        events.parse_timestamp(insight["event_time"], "event_time"),
    )


def report_event(feedback: events.Feedback, label_buckets: int = 0) -> tuple[str, tuple]:
    return health.label_key(feedback.customer_id, label_buckets), (
        "report",
        feedback.transaction_id,
        feedback.is_fraud,
        feedback.event_time_us,
    )


class LabelJoinFn(dofn.DoFn):
    """Per key of the join (a customer, or a bucket of customers: `health.label_key`): joins
    insights with fraud reports; emits fraud-label changes of scored transactions. Window stats
    (key `HEALTH_KEY`) pass through unchanged, on their way to `HealthFn`.

    A scored transaction is appended to the key's `SCORED` bag, which reads nothing, unless a
    report of it came first; the bag is read when a report needs it, and pruned to
    `LABEL_RETENTION_US` of event time when appends bring it to `prune_at` entries, which is
    then set to twice what was kept (at least `prune_after`): each entry is read a bounded
    number of times on average, and no timer is needed, however many keys there are.
    """

    JOINED = ReadModifyWriteStateSpec("joined", PickleCoder())
    SCORED = BagStateSpec("scored", PickleCoder())
    LOG_SIZE = ReadModifyWriteStateSpec("log_size", PickleCoder())  # (entries in SCORED, prune at)

    def __init__(self, prune_after: int = 10_000):
        if prune_after < 1:
            raise ValueError(f"prune_after must be at least 1, got {prune_after}")
        self._prune_after = prune_after

    def setup(self):
        self._changes = Metrics.counter(NAMESPACE, "label_changes")
        self._pruned = Metrics.counter(NAMESPACE, "label_entries_pruned")

    def process(
        self,
        element: tuple[str, tuple],
        joined=beam.DoFn.StateParam(JOINED),
        scored=beam.DoFn.StateParam(SCORED),
        log_size=beam.DoFn.StateParam(LOG_SIZE),
    ):
        _, event = element
        if event[0] == "stats":
            yield element
            return
        state = joined.read() or health.JoinedLabels()
        if event[0] == "scored":
            deltas, append = state.on_scored(event[1:])
            if append:
                scored.add(event[1:])
                self._count_and_prune(state, joined, scored, log_size)
            else:
                joined.write(state)
        else:
            _, tx, is_fraud, event_us = event
            deltas = state.on_report(tx, is_fraud, event_us, scored.read)
            joined.write(state)
        if deltas:
            self._changes.inc(len(deltas))
            yield HEALTH_KEY, ("labels", deltas)

    def _count_and_prune(self, state: health.JoinedLabels, joined, scored, log_size) -> None:
        size, prune_at = log_size.read() or (0, self._prune_after)
        size += 1
        if size >= prune_at:
            log = list(scored.read())
            kept, pruned = state.prune(LABEL_RETENTION_US, log)
            if len(kept) != len(log):
                scored.clear()
                for entry in kept:
                    scored.add(entry)
            if pruned:
                self._pruned.inc(pruned)
                joined.write(state)
            size, prune_at = len(kept), max(self._prune_after, 2 * len(kept))
        log_size.write((size, prune_at))


class HealthFn(dofn.DoFn):
    """One key: per-period buckets of window stats and cumulative label tallies; a record per
    version each period, published to `topic` (if given) before it is output."""

    STATE = ReadModifyWriteStateSpec("health", PickleCoder())
    TICK = TimerSpec("tick", TimeDomain.REAL_TIME)

    def __init__(
        self,
        model_dir: str,
        window_secs: float,
        period_secs: float,
        psi_threshold: float = drift.PSI_ALERT,
        min_events: int = health.DEFAULT_MIN_EVENTS,
        topic: str | None = None,
    ):
        if period_secs <= 0 or window_secs < period_secs:
            raise ValueError("health windows need period_secs > 0 and window_secs >= period_secs")
        self._topic = topic
        self._model_dir = model_dir
        self._window = window_secs
        self._period = period_secs
        self._psi_threshold = psi_threshold
        self._min_events = min_events

    def setup(self):
        self._references = References.shared(self._model_dir)
        self._records = Metrics.counter(NAMESPACE, "records")
        self._alarms = Metrics.counter(NAMESPACE, "drift_alarms")
        self._retries = Metrics.counter(NAMESPACE, "publish_retries")
        self._publisher = outcomes.shared_publisher() if self._topic else None

    def _bucket(self, seconds: float) -> int:
        return int(seconds // self._period)

    def process(
        self,
        element: tuple[str, tuple[str, Any]],
        state=beam.DoFn.StateParam(STATE),
        tick=beam.DoFn.TimerParam(TICK),
    ):
        _, (kind, payload) = element
        current = state.read() or {"buckets": {}, "tallies": {}, "armed": False, "last_version": None}
        if kind == "stats":
            bucket = current["buckets"].setdefault(self._bucket(time.time()), {})
            for version, stats in payload.items():
                bucket.setdefault(version, health.WindowStats()).merge(stats)
                current["tallies"].setdefault(version, health.LabelTally()).count_scored(stats.decisions)
                current["last_version"] = version
        else:
            for delta in payload:
                health.apply(current["tallies"], delta)
        if not current["armed"]:
            tick.set(Timestamp.of((self._bucket(time.time()) + 1) * self._period))
            current["armed"] = True
        state.write(current)

    @on_timer(TICK)
    def on_tick(self, state=beam.DoFn.StateParam(STATE), tick=beam.DoFn.TimerParam(TICK), fire=beam.DoFn.TimestampParam):
        current = state.read()
        end_s = float(fire.micros) / 1e6
        end_bucket = self._bucket(end_s + self._period / 2)  # the tick's own boundary, rounding away float error
        first_bucket = end_bucket - max(1, round(self._window / self._period))
        current["buckets"] = {b: stats for b, stats in current["buckets"].items() if b >= first_bucket}
        in_window = [stats for b, stats in current["buckets"].items() if b < end_bucket]
        versions = sorted({version for stats in in_window for version in stats})
        if not versions and current["last_version"] is not None:
            versions = [current["last_version"]]  # a heartbeat with zero events: the stream stopped
        window = (
            events.format_timestamp(int((end_bucket * self._period - self._window) * 1e6)),
            events.format_timestamp(int(end_bucket * self._period * 1e6)),
        )
        emitted_at = events.format_timestamp(time.time_ns() // 1000)
        records = []
        for version in versions:
            stats = health.merge_all(bucket[version] for bucket in in_window if version in bucket)
            record = health.health_record(
                version,
                stats,
                current["tallies"].get(version),
                self._references.get(version),
                window,
                emitted_at,
                self._psi_threshold,
                self._min_events,
            )
            if record["drifted"]:
                self._alarms.inc()
                _LOG.warning("model %s drift: %s", version, ", ".join(f"{n} PSI {record['psi'][n]:.3f}" for n in record["drifted"]))
            records.append(record)
        if self._publisher is not None and records:
            batch = [outcomes.of_message(HEALTH, health_message(record)) for record in records]
            outcomes.publish_all(self._publisher, {HEALTH: self._topic}, batch, self._retries)
        self._records.inc(len(records))
        yield from records
        tick.set(Timestamp.of((end_bucket + 1) * self._period))
        state.write(current)


def health_message(record: dict) -> PubsubMessage:
    data = json.dumps(record, separators=(",", ":")).encode("utf-8")
    return PubsubMessage(data, {"model_version": record["model_version"], "alarm": health.alarm(record)})


class MonitorModel(beam.PTransform):
    """(observed insights, validated feedback) -> health records, one per version every period,
    published to `topic` if given.

    `observed` is what `Observer` makes of the insights (`ObserveFn`'s output; the scoring
    pipeline's `AssembleInsightFn` makes it too): a scored event per insight and the window
    stats per bundle. `label_buckets` (the observer's too) is how many keys the label join
    spreads customers over, 0 for a key per customer (`health.label_key`): the local runner
    scans every key of a stateful step for timers after every bundle, so locally fewer keys
    cost less, while on Dataflow keys spread the work.
    """

    def __init__(
        self,
        model_dir: str,
        window_secs: float = 600.0,
        period_secs: float = 60.0,
        psi_threshold: float = drift.PSI_ALERT,
        min_events: int = health.DEFAULT_MIN_EVENTS,
        topic: str | None = None,
        label_buckets: int = 0,
    ):
        super().__init__()
        health.label_key("", label_buckets)  # refuses a negative count now, not in a worker
        self._health = HealthFn(model_dir, window_secs, period_secs, psi_threshold, min_events, topic)
        self._label_buckets = label_buckets

    def expand(self, inputs):
        observed, feedback = inputs
        # Typed (str key, value) pairs all the way: the stateful steps need a deterministic key coder.
        keyed = tuple[str, Any]
        by_key = functools.partial(report_event, label_buckets=self._label_buckets)
        reports = feedback | "ReportsByCustomer" >> dofn.Map(by_key).with_output_types(keyed)
        return (
            (observed, reports)
            | "FlattenLabelEvents" >> beam.Flatten().with_output_types(keyed)
            | "JoinLabels" >> beam.ParDo(LabelJoinFn()).with_input_types(keyed).with_output_types(keyed)
            | "Health" >> beam.ParDo(self._health).with_input_types(keyed)
        )
