"""Model health: what the scoring pipeline publishes to the `model-health` topic, and how.

Every `--health_period_secs` (default 60) the scoring pipeline publishes one health record per
model version that scored in the last `--health_window_secs` (default 600) of processing time.
A record is a JSON object (message attributes: `model_version`, and `alarm`: `drift` when any
PSI is over the threshold, else `none`):

    {
      "window_start": "2026-11-21T10:00:00Z",     # processing time, UTC
      "window_end": "2026-11-21T10:10:00Z",
      "emitted_at": "2026-11-21T10:10:00.412Z",
      "model_version": "20261121-093000",
      "events": 1234,                             # insights this version emitted in the window
      "decisions": {"approve": 1200, "review": 25, "decline": 9},
      "alert_rate": 0.0276,                       # (review + decline) / events; null when no events
      "latency_ms": {"p50": 180.0, "p99": 950.0}, # publish to insight; nulls when no events
      "psi": {"amount": 0.012, ..., "score": 0.02},  # every raw feature and the score; {} below min_events
      "psi_threshold": 0.2,
      "min_events": 200,                          # PSI is computed from this many events in the window on
      "drifted": ["amount"],                      # PSI >= threshold, largest first
      "labels": {                                 # delayed labels, since the job started, for this version
        "scored": 51234,                          # transactions this version scored
        "flagged": {"review": 1030, "decline": 420},
        "reported_frauds": 380,                   # of the scored, currently reported as fraud
        "frauds_flagged": {"review": 120, "decline": 230},
        "precision": {"review": 0.1165, "decline": 0.5476},   # frauds_flagged / flagged; null when 0
        "fraud_flagged_share": 0.9211             # (review + decline frauds) / reported_frauds; null when 0
      }
    }

PSI compares the window's values, binned with the decile edges stored in the version's
`metadata.json` (`feature_statistics`, `score_statistics`), with the training shares
(`rtml.drift`). Latency quantiles come from a log-spaced histogram (about 2% resolution), so
windows merge by adding counts.

Labels follow fraud feedback as it arrives: the latest report for a transaction wins (`is_fraud`
false retracts), a report may come before or after the transaction's insight, and each scored
transaction counts once for the version that scored it.
"""

from __future__ import annotations

import bisect
import math
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from models import decisions
from rtml import drift

SCORE = "score"
FLAGGED = ("review", "decline")
DEFAULT_MIN_EVENTS = 200

# Latency histogram: bucket i holds [BASE**i, BASE**(i+1)) milliseconds; 0 ms goes to bucket 0.
LATENCY_BASE = 1.02


def latency_bucket(ms: float) -> int:
    return 0 if ms < 1.0 else int(math.log(ms) / math.log(LATENCY_BASE))


def bucket_value(bucket: int) -> float:
    """The geometric middle of a latency bucket, in milliseconds."""
    return LATENCY_BASE ** (bucket + 0.5)


def quantile(histogram: Mapping[int, int], q: float) -> float | None:
    """The q-quantile of a latency histogram (nearest rank), or None when it is empty."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return round(bucket_value(bucket), 1)
    raise AssertionError("unreachable: ranks never pass the total")


@dataclass(frozen=True)
class Reference:
    """A version's training distributions: decile edges and bin shares per feature and the score."""

    version: str
    edges: dict[str, tuple[float, ...]]
    proportions: dict[str, tuple[float, ...]]

    @classmethod
    def from_metadata(cls, metadata: Mapping) -> Reference:
        summaries = {**metadata["feature_statistics"], SCORE: metadata["score_statistics"]}
        return cls(
            version=metadata["version"],
            edges={name: tuple(s["bin_edges"]) for name, s in summaries.items()},
            proportions={name: tuple(s["bin_proportions"]) for name, s in summaries.items()},
        )

    def bins(self, values: Mapping[str, float]) -> dict[str, int]:
        """The bin of each value (same rule as `drift.bin_proportions`: edges[i-1] <= v < edges[i])."""
        return {name: bisect.bisect_right(self.edges[name], values[name]) for name in self.edges if name in values}


@dataclass
class Observation:
    """One insight, reduced to what health needs."""

    model_version: str
    decision: str
    score: float
    latency_ms: float
    features: dict[str, float]

    @classmethod
    def from_insight(cls, insight: Mapping, latency_ms: float) -> Observation:
        return cls(insight["model_version"], insight["decision"], float(insight["score"]), float(latency_ms), dict(insight["features"]))


@dataclass
class WindowStats:
    """Additive counts for one model version over a stretch of time."""

    events: int = 0
    decisions: Counter = field(default_factory=Counter)
    latency: Counter = field(default_factory=Counter)  # latency bucket -> count
    bins: dict[str, Counter] = field(default_factory=dict)  # feature (or score) -> bin -> count

    def add(self, observation: Observation, reference: Reference | None) -> None:
        self.events += 1
        self.decisions[observation.decision] += 1
        self.latency[latency_bucket(observation.latency_ms)] += 1
        if reference is not None:
            for name, index in reference.bins({**observation.features, SCORE: observation.score}).items():
                self.bins.setdefault(name, Counter())[index] += 1

    def merge(self, other: WindowStats) -> WindowStats:
        self.events += other.events
        self.decisions.update(other.decisions)
        self.latency.update(other.latency)
        for name, counts in other.bins.items():
            self.bins.setdefault(name, Counter()).update(counts)
        return self

    def psi(self, reference: Reference) -> dict[str, float]:
        """PSI of every binned feature against the reference's training shares."""
        result = {}
        for name, expected in reference.proportions.items():
            counts = self.bins.get(name, Counter())
            total = sum(counts.values())
            if total:
                actual = [counts.get(i, 0) / total for i in range(len(expected))]
                result[name] = round(drift.psi(expected, actual), 6)
        return result


def merge_all(parts: Iterable[WindowStats]) -> WindowStats:
    total = WindowStats()
    for part in parts:
        total.merge(part)
    return total


@dataclass
class LabelTally:
    """Delayed-label counts for one model version (cumulative; deltas may be negative on retraction)."""

    scored: int = 0
    flagged: Counter = field(default_factory=Counter)  # decision -> scored with it
    frauds: Counter = field(default_factory=Counter)  # decision -> currently reported as fraud

    def count_scored(self, decisions_made: Mapping[str, int]) -> None:
        """Add scored transactions, by decision."""
        self.scored += sum(decisions_made.values())
        self.flagged.update(decisions_made)

    def record(self) -> dict:
        reported = sum(self.frauds.values())
        caught = sum(self.frauds[d] for d in FLAGGED)
        return {
            "scored": self.scored,
            "flagged": {d: self.flagged[d] for d in FLAGGED},
            "reported_frauds": reported,
            "frauds_flagged": {d: self.frauds[d] for d in FLAGGED},
            "precision": {d: _ratio(self.frauds[d], self.flagged[d]) for d in FLAGGED},
            "fraud_flagged_share": _ratio(caught, reported),
        }


def _ratio(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 6) if denominator > 0 else None


@dataclass(frozen=True)
class LabelDelta:
    """A scored transaction's fraud label turning on (+1) or off (-1)."""

    model_version: str
    decision: str
    fraud: int


def apply(tallies: dict[str, LabelTally], delta: LabelDelta) -> None:
    tallies.setdefault(delta.model_version, LabelTally()).frauds[delta.decision] += delta.fraud


# A scored transaction in the label join's log: (transaction_id, model_version, decision, event_time_us).
ScoredEntry = tuple[str, str, str, int]


def label_key(customer_id: str, buckets: int) -> str:
    """The label join's key for a customer: the customer itself (`buckets` 0), else one of
    `buckets` buckets of customers. A customer's insights and reports always meet under it."""
    if buckets < 0:
        raise ValueError(f"label join buckets must be >= 0, got {buckets}")
    if not buckets:
        return customer_id
    return str(zlib.crc32(customer_id.encode("utf-8")) % buckets)


@dataclass
class JoinedLabels:
    """The label join for one key (a customer, or a bucket of customers; see `label_key`).

    Who scored a transaction goes to an append-only log (the caller's, a Beam bag: appending
    reads nothing), searched only when a report of a transaction not resolved yet arrives.
    This object holds what is small: `reports` maps transaction_id -> (is_fraud, event_time_us),
    the latest report of each reported transaction (scored yet or not); `resolved` maps
    transaction_id -> (model_version, decision, event_time_us) for reported transactions whose
    scoring is known. `prune` forgets what is older than a retention, by event time.
    """

    reports: dict[str, tuple[bool, int]] = field(default_factory=dict)
    resolved: dict[str, tuple[str, str, int]] = field(default_factory=dict)

    def on_scored(self, entry: ScoredEntry) -> tuple[list[LabelDelta], bool]:
        """A scored transaction: `(label changes, whether to append it to the log)`. If a report
        came first it is resolved here instead (this object changed); a repeat changes nothing."""
        transaction_id, model_version, decision, event_time_us = entry
        if transaction_id in self.resolved:
            return [], False  # one insight per transaction; a repeat changes nothing
        if transaction_id not in self.reports:
            return [], True
        self.resolved[transaction_id] = (model_version, decision, event_time_us)
        return ([LabelDelta(model_version, decision, 1)] if self.reports[transaction_id][0] else []), False

    def on_report(
        self, transaction_id: str, is_fraud: bool, event_time_us: int, log: Callable[[], Iterable[ScoredEntry]]
    ) -> list[LabelDelta]:
        """The latest report wins; a label change if it flips a scored transaction's label.
        `log()` gives the scored log; it is read only for a transaction not resolved yet."""
        before = self.reports.get(transaction_id, (False, 0))[0]
        self.reports[transaction_id] = (is_fraud, event_time_us)
        if transaction_id not in self.resolved:
            for tx, model_version, decision, scored_us in log():
                if tx == transaction_id:
                    self.resolved[tx] = (model_version, decision, scored_us)
                    break
        if before == is_fraud or transaction_id not in self.resolved:
            return []
        version, decision, _ = self.resolved[transaction_id]
        return [LabelDelta(version, decision, 1 if is_fraud else -1)]

    def prune(self, retention_us: int, log: list[ScoredEntry]) -> tuple[list[ScoredEntry], int]:
        """Forget entries whose event time is more than `retention_us` before the newest seen
        (here or in `log`); returns the log's entries to keep and how many entries went."""
        times = [t for *_, t in log] + [t for _, t in self.reports.values()] + [t for *_, t in self.resolved.values()]
        if not times:
            return log, 0
        horizon = max(times) - retention_us
        kept = [entry for entry in log if entry[3] >= horizon]
        old_reports = [tx for tx, (_, t) in self.reports.items() if t < horizon]
        old_resolved = [tx for tx, (*_, t) in self.resolved.items() if t < horizon]
        for tx in old_reports:
            del self.reports[tx]
        for tx in old_resolved:
            del self.resolved[tx]
        return kept, len(log) - len(kept) + len(old_reports) + len(old_resolved)


def health_record(
    version: str,
    stats: WindowStats,
    tally: LabelTally | None,
    reference: Reference | None,
    window: tuple[str, str],
    emitted_at: str,
    psi_threshold: float = drift.PSI_ALERT,
    min_events: int = DEFAULT_MIN_EVENTS,
) -> dict:
    """One health record (the schema in this module's docstring)."""
    psi = stats.psi(reference) if reference is not None and stats.events >= min_events else {}
    drifted = sorted((name for name, value in psi.items() if value >= psi_threshold), key=lambda n: (-psi[n], n))
    flagged = sum(stats.decisions[d] for d in FLAGGED)
    return {
        "window_start": window[0],
        "window_end": window[1],
        "emitted_at": emitted_at,
        "model_version": version,
        "events": stats.events,
        "decisions": {d: stats.decisions[d] for d in decisions.DECISIONS},
        "alert_rate": _ratio(flagged, stats.events),
        "latency_ms": {"p50": quantile(stats.latency, 0.50), "p99": quantile(stats.latency, 0.99)},
        "psi": psi,
        "psi_threshold": psi_threshold,
        "min_events": min_events,
        "drifted": drifted,
        "labels": (tally or LabelTally()).record(),
    }


def alarm(record: Mapping) -> str:
    return "drift" if record.get("drifted") else "none"
