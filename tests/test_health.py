"""Model health: latency quantiles, PSI windows, the delayed-label join, and the Beam transform
on real features (a stream whose amounts shift drifts; one from the training distribution does not)."""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue
from hypothesis import given, settings
from hypothesis import strategies as st

from models import decisions, loader
from models.features import RAW_FEATURES
from rtml import config, drift, events, examples, health
from transforms.health import MonitorModel, ObserveFn

DAY_US = 86_400 * 1_000_000


# --- pure parts ---------------------------------------------------------------------------------


@given(st.lists(st.floats(min_value=0, max_value=600_000, allow_nan=False), min_size=1, max_size=300))
def test_latency_quantiles_are_within_the_histogram_resolution(latencies):
    histogram = Counter(health.latency_bucket(ms) for ms in latencies)
    for q in (0.5, 0.99):
        exact = sorted(latencies)[max(1, int(np.ceil(q * len(latencies)))) - 1]
        estimate = health.quantile(histogram, q)
        if exact < 1.0:
            assert estimate <= 1.02
        else:
            assert exact / health.LATENCY_BASE <= estimate <= exact * health.LATENCY_BASE


def test_an_empty_histogram_has_no_quantile():
    assert health.quantile(Counter(), 0.5) is None


def _reference(values: dict[str, np.ndarray], version: str = "v1") -> health.Reference:
    summaries = {name: drift.summarize(column) for name, column in values.items()}
    return health.Reference.from_metadata(
        {"version": version, "feature_statistics": {k: v for k, v in summaries.items() if k != "score"}, "score_statistics": summaries["score"]}
    )


def test_window_psi_bins_exactly_like_the_training_summary():
    rng = np.random.default_rng(3)
    train = {"amount": rng.lognormal(3, 1, 5000), "score": rng.beta(1, 30, 5000)}
    reference = _reference(train)
    live = {"amount": rng.lognormal(3.4, 1, 700), "score": rng.beta(1, 20, 700)}
    stats = health.WindowStats()
    for i in range(700):
        stats.add(health.Observation("v1", "approve", float(live["score"][i]), 5.0, {"amount": float(live["amount"][i])}), reference)
    psi = stats.psi(reference)
    for name in ("amount", "score"):
        summary = drift.summarize(train[name])
        expected = drift.psi(summary["bin_proportions"], drift.bin_proportions(live[name], summary["bin_edges"]))
        assert psi[name] == pytest.approx(expected, abs=1e-6)


def test_window_stats_merge_like_one_window():
    rng = np.random.default_rng(4)
    reference = _reference({"amount": rng.lognormal(3, 1, 2000), "score": rng.random(2000)})
    observations = [
        health.Observation("v1", random.Random(i).choice(decisions.DECISIONS), float(rng.random()), float(rng.integers(1, 5000)), {"amount": float(rng.lognormal(3, 1))})
        for i in range(300)
    ]
    whole, parts = health.WindowStats(), [health.WindowStats() for _ in range(3)]
    for i, observation in enumerate(observations):
        whole.add(observation, reference)
        parts[i % 3].add(observation, reference)
    merged = health.merge_all(parts)
    assert (merged.events, merged.decisions, merged.latency, merged.bins) == (whole.events, whole.decisions, whole.latency, whole.bins)


def test_health_record_fields_and_drift_list():
    rng = np.random.default_rng(5)
    reference = _reference({"amount": rng.lognormal(3, 1, 3000), "score": rng.beta(1, 30, 3000)})
    stats = health.WindowStats()
    for i in range(250):
        decision = "decline" if i < 5 else ("review" if i < 20 else "approve")
        stats.add(health.Observation("v1", decision, float(rng.beta(1, 30)), 100.0 + i, {"amount": float(rng.lognormal(5, 1))}), reference)
    tally = health.LabelTally()
    tally.count_scored(stats.decisions)
    for delta in [health.LabelDelta("v1", "decline", 1)] * 4 + [health.LabelDelta("v1", "approve", 1)] * 2:
        health.apply({"v1": tally}, delta)
    record = health.health_record("v1", stats, tally, reference, ("a", "b"), "c", psi_threshold=0.2, min_events=200)
    assert record["events"] == 250
    assert record["decisions"] == {"approve": 230, "review": 15, "decline": 5}
    assert record["alert_rate"] == pytest.approx(20 / 250)
    assert record["drifted"][0] == "amount" and record["psi"]["amount"] > 1.0
    assert "score" not in record["drifted"]
    assert record["labels"]["precision"] == {"review": 0.0, "decline": 0.8}
    assert record["labels"]["fraud_flagged_share"] == pytest.approx(4 / 6)
    assert health.alarm(record) == "drift"
    few = health.health_record("v1", stats, tally, reference, ("a", "b"), "c", min_events=251)
    assert few["psi"] == {} and few["drifted"] == [] and health.alarm(few) == "none"


def brute_force_labels(insights, reports) -> dict[str, dict]:
    """Per version: scored and flagged counts, and frauds by decision under the latest report."""
    latest = {}
    for report in reports:
        latest[report["transaction_id"]] = bool(report["is_fraud"])
    out: dict[str, dict] = {}
    for insight in insights:
        row = out.setdefault(insight["model_version"], {"scored": 0, "flagged": Counter(), "frauds": Counter()})
        row["scored"] += 1
        row["flagged"][insight["decision"]] += 1
        if latest.get(insight["transaction_id"]):
            row["frauds"][insight["decision"]] += 1
    result = {}
    for version, row in out.items():
        frauds = sum(row["frauds"].values())
        caught = row["frauds"]["review"] + row["frauds"]["decline"]
        result[version] = {
            "scored": row["scored"],
            "flagged": {d: row["flagged"][d] for d in ("review", "decline")},
            "reported_frauds": frauds,
            "frauds_flagged": {d: row["frauds"][d] for d in ("review", "decline")},
            "precision": {d: (round(row["frauds"][d] / row["flagged"][d], 6) if row["flagged"][d] else None) for d in ("review", "decline")},
            "fraud_flagged_share": round(caught / frauds, 6) if frauds else None,
        }
    return result


_event = st.tuples(
    st.sampled_from(["scored", "report"]),
    st.integers(0, 7),
    st.sampled_from(["v1", "v2"]),
    st.sampled_from(decisions.DECISIONS),
    st.booleans(),
)


class _Key:
    """One key of the label join as `LabelJoinFn` keeps it: the small state and the scored log."""

    def __init__(self):
        self.joined = health.JoinedLabels()
        self.log: list = []
        self.log_reads = 0

    def read_log(self):
        self.log_reads += 1
        return iter(self.log)


@settings(max_examples=300, deadline=None)
@given(st.lists(_event, max_size=40), st.sampled_from([0, 1, 3]))
def test_the_label_join_matches_brute_force_in_any_order(stream, buckets):
    keys: dict[str, _Key] = {}
    tallies: dict = {}
    insights, reports = [], []
    for kind, n, version, decision, is_fraud in stream:
        tx, customer = f"t{n}", f"c{n % 3}"
        key = keys.setdefault(health.label_key(customer, buckets), _Key())
        if kind == "scored":
            # A repeated insight (say, a redelivery after a crash) reaches the join too: the first counts.
            if not any(i["transaction_id"] == tx for i in insights):
                insights.append({"transaction_id": tx, "model_version": version, "decision": decision})
                tallies.setdefault(version, health.LabelTally()).count_scored({decision: 1})
            deltas, append = key.joined.on_scored((tx, version, decision, n))
            if append:
                key.log.append((tx, version, decision, n))
        else:
            reports.append({"transaction_id": tx, "is_fraud": is_fraud})
            reads = key.log_reads
            resolved = tx in key.joined.resolved
            deltas = key.joined.on_report(tx, is_fraud, n, key.read_log)
            assert key.log_reads == reads + (not resolved)  # the log is read only for an unresolved one
        for delta in deltas:
            health.apply(tallies, delta)
    expected = brute_force_labels(insights, reports)
    assert {version: tally.record() for version, tally in tallies.items() if tally.scored} == expected
    # A transaction reported before it was first scored never reaches the log.
    first: dict[tuple[str, int], int] = {}
    for i, (kind, n, *_) in enumerate(stream):
        first.setdefault((kind, n), i)
    reported_first = {f"t{n}" for (kind, n), i in first.items() if kind == "scored" and first.get(("report", n), i) < i}
    assert not reported_first & {entry[0] for key in keys.values() for entry in key.log}


def test_label_keys_keep_a_customer_together_and_bucket_as_asked():
    customers = [f"C{i:05d}" for i in range(1000)]
    assert all(health.label_key(c, 0) == c for c in customers)
    for buckets in (1, 16):
        keys = {health.label_key(c, buckets) for c in customers}
        assert keys == {str(b) for b in range(buckets)}
        assert health.label_key("C00007", buckets) == health.label_key("C00007", buckets)
    with pytest.raises(ValueError, match=">= 0"):
        health.label_key("C1", -1)


def test_the_label_join_forgets_old_entries():
    joined = health.JoinedLabels()
    joined.on_report("older", True, 0, lambda: iter(()))
    joined.on_report("reported", False, 59 * DAY_US, lambda: iter(()))
    _, append = joined.on_scored(("reported", "v1", "review", 59 * DAY_US))
    assert not append and "reported" in joined.resolved
    log = [("old", "v1", "review", 0), ("new", "v1", "review", 61 * DAY_US)]
    kept, pruned = joined.prune(60 * DAY_US, log)
    assert pruned == 2 and kept == [("new", "v1", "review", 61 * DAY_US)]
    assert set(joined.reports) == {"reported"} and set(joined.resolved) == {"reported"}
    kept, pruned = joined.prune(DAY_US, kept)
    assert pruned == 2 and not joined.reports and not joined.resolved and kept == [("new", "v1", "review", 61 * DAY_US)]
    assert health.JoinedLabels().prune(DAY_US, []) == ([], 0)


_DELTAS: list = []  # what `LabelJoinFn` emitted, collected by reference (in-process DirectRunner)


def _collect_delta(element) -> None:
    _DELTAS.append(element)


def test_the_join_step_prunes_its_log_as_it_fills_and_a_late_report_then_finds_nothing():
    from transforms.health import LabelJoinFn

    now = time.time()
    before = [
        ("k", ("scored", "old", "v1", "review", 0)),
        ("k", ("scored", "new", "v1", "decline", 61 * DAY_US)),
        ("k", ("scored", "first", "v1", "review", 61 * DAY_US)),  # the third entry: the log is pruned
    ]
    after = [("k", ("report", "old", True, 0)), ("k", ("report", "new", True, 61 * DAY_US))]
    stream = (
        TestStream()
        .add_elements([TimestampedValue(e, now) for e in before])
        .add_elements([TimestampedValue(e, now) for e in after])
        .advance_watermark_to_infinity()
    )
    _DELTAS.clear()
    options = PipelineOptions(runner="BundleBasedDirectRunner")
    options.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=options) as pipeline:
        joined = (
            pipeline
            | stream
            | beam.ParDo(LabelJoinFn(prune_after=3))
            .with_input_types(tuple[str, tuple])
            .with_output_types(tuple[str, tuple])
        )
        _ = joined | beam.Map(_collect_delta)
    # "old" was 61 days older than the newest entry when the log reached 3: its report finds nothing.
    assert _DELTAS == [("health", ("labels", [health.LabelDelta("v1", "decline", 1)]))]
    with pytest.raises(ValueError, match="at least 1"):
        LabelJoinFn(prune_after=0)


# --- the Beam transform on real features ---------------------------------------------------------

SHIFT_FROM = "2026-02-23"  # the last three simulated days of the `trained` history
SHIFT = 3.0


@pytest.fixture(scope="module")
def shifted_examples(trained, tmp_path_factory):
    """Backfill examples of the `trained` history with every amount from SHIFT_FROM on multiplied by SHIFT."""
    from beam_pipelines import backfill

    work = tmp_path_factory.mktemp("shifted")
    history = work / "history.jsonl"
    with open(trained.history) as source, open(history, "w") as target:
        for line in source:
            record = json.loads(line)
            if record["kind"] == "transaction" and record["event"]["event_time"] >= SHIFT_FROM:
                record["event"]["amount"] = round(record["event"]["amount"] * SHIFT, 2)
            target.write(json.dumps(record) + "\n")
    out = work / "examples"
    backfill.run(["--input", str(history), "--examples_out", str(out), "--no_state"]).wait_until_finish()
    return out


def _insights(examples_dir, model) -> list[dict]:
    """Insights as the scorer would make them for the examples from SHIFT_FROM on (real features and scores)."""
    start = events.parse_timestamp(SHIFT_FROM + "T00:00:00Z", "start")
    columns = examples.read_columns(str(examples_dir), start_us=start)
    values = {name: columns[name] for name in RAW_FEATURES}
    scores = model.score(values)
    chosen = decisions.decide(scores, model.thresholds["review"], model.thresholds["decline"])
    out = []
    for i, tx in enumerate(columns["transaction_id"]):
        out.append(
            {
                "transaction_id": tx,
                "customer_id": columns["customer_id"][i],
                "event_time": events.format_timestamp(int(columns["event_time_us"][i])),
                "model_version": model.version,
                "decision": chosen[i],
                "score": float(scores[i]),
                "features": {name: float(values[name][i]) for name in RAW_FEATURES},
            }
        )
    return out


def _latency(i: int) -> float:
    """A made-up publish-to-insight latency for the i-th insight: 100 ms to 1,099 ms, evenly."""
    return 100.0 + (i * 37) % 1000


_COLLECTED: list[dict] = []  # the in-process streaming DirectRunner calls `_collect` by reference


def _collect(record: dict) -> None:
    _COLLECTED.append(record)


def _run_health(
    insights: list[dict],
    feedback: list[events.Feedback],
    model_dir: str,
    period: float = 60.0,
    topic: str | None = None,
    label_buckets: int = 0,
) -> dict:
    """Insights and feedback through `MonitorModel` on the streaming DirectRunner; the last record.

    The health buckets follow the wall clock, the timers the test clock, which starts at 0: it
    jumps past two period boundaries after the wall-clock time of the elements, and the second
    tick's window holds them all even if processing crossed the first boundary.
    """
    now = time.time()
    observations = [(insight, _latency(i)) for i, insight in enumerate(insights)]
    stream = (
        TestStream(output_tags={"observations", "feedback"})
        .add_elements([TimestampedValue(o, now) for o in observations], tag="observations")
        .add_elements([TimestampedValue(f, now) for f in feedback], tag="feedback")
        .advance_processing_time(int(now + 2 * period + 1))
        .advance_watermark_to_infinity()
    )
    _COLLECTED.clear()
    options = PipelineOptions(runner="BundleBasedDirectRunner")
    options.view_as(StandardOptions).streaming = True
    with beam.Pipeline(options=options) as pipeline:
        inputs = pipeline | stream
        observed = inputs["observations"] | beam.ParDo(ObserveFn(model_dir, label_buckets))
        out = (observed, inputs["feedback"]) | MonitorModel(
            model_dir, window_secs=600, period_secs=period, topic=topic, label_buckets=label_buckets
        )
        _ = out | beam.Map(_collect)
    versions = {record["model_version"] for record in _COLLECTED}
    assert len(versions) == 1 and 1 <= len(_COLLECTED) <= 3, _COLLECTED
    return _COLLECTED[-1]


@pytest.fixture(scope="module")
def served(trained):
    return loader.load(trained.version)


@pytest.mark.slow
def test_a_shifted_stream_drifts_and_a_training_like_one_does_not(trained, shifted_examples, served):
    model_dir = str(trained.model_dir)
    steady = _insights(trained.examples, served)
    shifted = _insights(shifted_examples, served)
    assert len(steady) == len(shifted) > 1000

    record = _run_health(steady, [], model_dir)
    assert record["events"] == len(steady) and record["model_version"] == served.version
    latencies = sorted(_latency(i) for i in range(len(steady)))
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        exact = latencies[int(np.ceil(q * len(latencies))) - 1]
        assert exact / health.LATENCY_BASE <= record["latency_ms"][name] <= exact * health.LATENCY_BASE
    assert record["drifted"] == [], record["psi"]
    assert set(record["psi"]) == {*RAW_FEATURES, "score"}

    record = _run_health(shifted, [], model_dir)
    print("PSI under a x3 amount shift:", json.dumps(record["psi"], indent=1))
    assert {"amount", "customer_avg_amount_1d", "customer_avg_amount_7d"} <= set(record["drifted"])
    counts = [name for name in RAW_FEATURES if "nb_tx" in name or name.startswith("tx_during")]
    assert not set(counts) & set(record["drifted"]), record["psi"]
    assert record["drifted"] == sorted(record["drifted"], key=lambda n: -record["psi"][n])


@pytest.mark.emulator
def test_the_health_step_publishes_each_record_it_outputs_once_with_its_attributes(services, trained, served):
    from tests.conftest import make_topics
    from tests.pubsub_helpers import collect

    topics = make_topics(services)
    topic = config.topic_path(services.project, topics[config.HEALTH_TOPIC])
    _run_health(_insights(trained.examples, served)[:300], [], str(trained.model_dir), topic=topic)
    assert _COLLECTED
    published = collect(topics[config.HEALTH_TOPIC] + "-sub", services.project, len(_COLLECTED), timeout_s=30)
    key = lambda record: json.dumps(record, sort_keys=True)  # noqa: E731
    assert sorted(key(json.loads(m.data)) for m in published) == sorted(key(r) for r in _COLLECTED)
    assert sorted((m.attributes["model_version"], m.attributes["alarm"]) for m in published) == sorted(
        (r["model_version"], health.alarm(r)) for r in _COLLECTED
    )


@pytest.mark.slow
@pytest.mark.parametrize("label_buckets", [0, 4])
def test_delayed_labels_in_the_stream_equal_brute_force(trained, served, label_buckets):
    steady = _insights(trained.examples, served)[:800]
    by_id = {i["transaction_id"]: i for i in steady}
    # Real reports for these transactions from the history, plus retractions and reports of unscored ones.
    reports = []
    for line in open(trained.history):
        record = json.loads(line)
        if record["kind"] == "feedback" and record["event"]["transaction_id"] in by_id:
            reports.append(record["event"])
    # Plus reports of unreported ones (some flagged), retractions of unreported ones, and a report
    # of a transaction never scored. One report per transaction: the order of several reports of
    # one transaction is the pure join's test above.
    rng = random.Random(7)
    unreported = [i for i in steady if i["transaction_id"] not in {r["transaction_id"] for r in reports}]
    flagged = [i for i in unreported if i["decision"] != "approve"][:10]
    rest = [i for i in unreported if i["decision"] == "approve"]
    picked = rng.sample(rest, 40)
    reports += [{**_report_of(i), "is_fraud": True} for i in flagged + picked[:30]]
    reports += [{**_report_of(i), "is_fraud": False} for i in picked[30:]]
    reports.append({**_report_of(steady[0]), "transaction_id": "never-scored", "is_fraud": True})
    feedback = [events.feedback_from_object(r) for r in reports]
    record = _run_health(steady, feedback, str(trained.model_dir), label_buckets=label_buckets)
    expected = brute_force_labels(steady, reports)[served.version]
    assert record["labels"] == expected
    assert expected["reported_frauds"] > 0 and expected["frauds_flagged"]["review"] + expected["frauds_flagged"]["decline"] > 0


def _report_of(insight: dict) -> dict:
    return {
        "transaction_id": insight["transaction_id"],
        "customer_id": insight["customer_id"],
        "terminal_id": "T",
        "event_time": insight["event_time"],
        "reported_at": insight["event_time"],
    }
