"""The scoring transform on Beam's streaming DirectRunner with TestStream and a small exported model."""

import json
from collections import Counter

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import Timestamp

from models import decisions, loader
from models.features import RAW_FEATURES
from rtml import events, examples
from transforms.features import FeaturedTransaction
from transforms.health import HEALTH_KEY
from transforms.scoring import (
    BATCH_SIZES,
    DEAD_LETTER,
    FEATURES_ERROR_KIND,
    INFERENCE_ERROR_KIND,
    INSIGHT,
    FraudModelHandler,
    ScoreTransactions,
    to_scoring_example,
)

pytestmark = pytest.mark.slow


def _featured(columns: dict, rows) -> list[FeaturedTransaction]:
    out = []
    for i in rows:
        day = columns["day"][i]
        tx = events.Transaction(
            columns["transaction_id"][i], f"{day}T12:00:00Z", events.parse_timestamp(f"{day}T12:00:00Z", "event_time"),
            columns["customer_id"][i], "T-test", float(columns["amount"][i]),
        )
        cells = ((f"row-of-{tx.transaction_id}".encode(), "cell"),)  # stand-ins: carried through, not read
        out.append(FeaturedTransaction(tx, {name: float(columns[name][i]) for name in RAW_FEATURES}, cells))
    return out


def test_teststream_transactions_get_the_models_scores_decisions_and_reasons(trained):
    model = loader.load(trained.version)
    columns = examples.read_columns(str(trained.examples), pattern="examples-00003-*")
    scores = model.score(columns)
    # Up to 6 transactions of each decision, so every decision is exercised.
    all_decisions = np.array(decisions.decide(scores, model.thresholds["review"], model.thresholds["decline"]))
    rows = [int(i) for d in decisions.DECISIONS for i in np.flatnonzero(all_decisions == d)[:6]]
    featured = _featured(columns, rows)
    broken = FeaturedTransaction(featured[0].transaction._replace(transaction_id="broken"), {"amount": 1.0}, ((b"row-of-broken", "cell"),))
    values = np.array([[f.features[name] for name in RAW_FEATURES] for f in featured], dtype=np.float32)
    expected_scores, contributions = model.explain({name: values[:, j] for j, name in enumerate(RAW_FEATURES)})
    expected_decisions = decisions.decide(expected_scores, model.thresholds["review"], model.thresholds["decline"])
    expected_reasons = decisions.top_reasons(contributions, values, RAW_FEATURES)
    assert set(expected_decisions) == set(decisions.DECISIONS)
    expected = {
        f.transaction.transaction_id: (float(s), d, r, f)
        for f, s, d, r in zip(featured, expected_scores, expected_decisions, expected_reasons, strict=True)
    }

    version = model.version  # the matchers are pickled: they must not hold the model itself
    stream = (
        TestStream()
        .add_elements(featured[:9])
        .advance_processing_time(1)
        .add_elements([*featured[9:], broken])
        .advance_watermark_to_infinity()
    )
    options = PipelineOptions(runner="BundleBasedDirectRunner")
    options.view_as(StandardOptions).streaming = True

    def check_insights(insights):
        assert len(insights) == len(expected)
        assert {i["transaction_id"] for i in insights} == set(expected)
        for insight in insights:
            score, decision, reasons, source = expected[insight["transaction_id"]]
            assert insight["score"] == pytest.approx(score, abs=1e-6)
            assert insight["decision"] == decision
            assert [r["feature"] for r in insight["reasons"]] == [r["feature"] for r in reasons]
            for got, want in zip(insight["reasons"], reasons, strict=True):
                assert got["contribution"] == pytest.approx(want["contribution"], rel=1e-4, abs=1e-6)
                assert got["value"] == pytest.approx(want["value"])
            assert insight["model_version"] == version
            assert insight["features"] == source.features
            assert insight["amount"] == source.transaction.amount and insight["event_time"] == source.transaction.event_time
            assert insight["processed_at"].endswith("Z")

    def check_dead_letters(dead):
        assert len(dead) == 1
        kind, record = dead[0]
        assert kind == FEATURES_ERROR_KIND
        assert record["attributes"] == {"transaction_id": "broken"}
        assert record["error"].startswith("features: missing tx_during_weekend, tx_during_night")

    def check_outcomes(keyed):
        # one per transaction, insight or dead letter, with the message as published and its own state cells
        assert all(isinstance(shard, str) for shard, _ in keyed)
        outcomes = [o for _, o in keyed]
        assert sorted(o.attributes["transaction_id"] for o in outcomes if o.kind == INSIGHT) == sorted(expected)
        dead = [o for o in outcomes if o.kind == DEAD_LETTER]
        assert len(outcomes) == len(expected) + 1 and len(dead) == 1
        assert dead[0].attributes["error_kind"] == FEATURES_ERROR_KIND and dead[0].cells == ((b"row-of-broken", "cell"),)
        for o in outcomes:
            if o.kind == INSIGHT:
                tx_id = json.loads(o.data)["transaction_id"]
                assert o.attributes["transaction_id"] == tx_id and o.cells == ((f"row-of-{tx_id}".encode(), "cell"),)

    def check_observations(observed):
        # For model health: a scored event per insight, keyed by customer, and each bundle's
        # window stats counting every insight once (the dead letter is not an insight).
        scored_events = [(customer, event) for customer, event in observed if customer != HEALTH_KEY]
        assert sorted(event[1] for _, event in scored_events) == sorted(expected)
        for customer, (tag, tx_id, model_version, decision, event_us) in scored_events:
            source = expected[tx_id][3].transaction
            assert tag == "scored" and model_version == version and decision == expected[tx_id][1]
            assert customer == source.customer_id and event_us == source.event_time_us
        stats = [event[1] for key, event in observed if key == HEALTH_KEY and event[0] == "stats"]
        assert stats and sum(by_version[version].events for by_version in stats) == len(expected)
        assert sum(sum(s[version].decisions.values()) for s in stats) == len(expected)

    with TestPipeline(options=options) as pipeline:
        handler = FraudModelHandler(str(trained.model_dir), poll_secs=None, max_batch_size=8)
        scored = pipeline | stream | ScoreTransactions(handler, str(trained.model_dir), observe=True)
        assert_that(scored.insights, check_insights, label="CheckInsights")
        dead_letters = scored.dead_letters | "FlattenDeadLetters" >> beam.Flatten()
        assert_that(dead_letters, check_dead_letters, label="CheckDeadLetters")
        assert_that(scored.outcomes | "FlattenOutcomes" >> beam.Flatten(), check_outcomes, label="CheckOutcomes")
        assert_that(scored.observations, check_observations, label="CheckObservations")


class ExplodingHandler(FraudModelHandler):
    """Our handler, failing every batch that holds a transaction whose id starts with `explode`."""

    def run_inference(self, batch, model, inference_args=None):
        if any(example.transaction.transaction_id.startswith("explode") for example in batch):
            raise RuntimeError("model blew up")
        return super().run_inference(batch, model, inference_args)


def test_a_failing_inference_batch_becomes_dead_letters_and_the_stream_goes_on(trained):
    columns = examples.read_columns(str(trained.examples), pattern="examples-00004-*")
    featured = _featured(columns, range(6))
    exploding = [f._replace(transaction=f.transaction._replace(transaction_id=f"explode-{i}")) for i, f in enumerate(featured[:2])]
    good_ids = {f.transaction.transaction_id for f in featured}
    stream = TestStream().add_elements(exploding[:1]).add_elements(featured[:3]).add_elements([exploding[1], *featured[3:]])
    options = PipelineOptions(runner="BundleBasedDirectRunner")
    options.view_as(StandardOptions).streaming = True

    def check_insights(insights):
        assert sorted(i["transaction_id"] for i in insights) == sorted(good_ids)

    def check_dead_letters(dead):
        assert sorted(record["attributes"]["transaction_id"] for _, record in dead) == ["explode-0", "explode-1"]
        for kind, record in dead:
            assert kind == INFERENCE_ERROR_KIND
            assert record["error"] == "inference: the model failed on this transaction's batch: RuntimeError('model blew up')"

    with TestPipeline(options=options) as pipeline:
        handler = ExplodingHandler(str(trained.model_dir), poll_secs=None, max_batch_size=1)
        scored = pipeline | stream.advance_watermark_to_infinity() | ScoreTransactions(handler, str(trained.model_dir))
        assert_that(scored.insights, check_insights, label="CheckInsights")
        dead_letters = scored.dead_letters | "FlattenDeadLetters" >> beam.Flatten()
        assert_that(dead_letters, check_dead_letters, label="CheckDeadLetters")
        assert_that(scored.observations, equal_to([]), label="NotObserving")  # health off: nothing for it


def test_batched_input_is_scored_one_given_list_at_a_time_and_a_failing_list_dead_letters_its_members(trained):
    # As the terminal feature step hands them on: lists of keyed examples, each one inference batch.
    columns = examples.read_columns(str(trained.examples), pattern="examples-00004-*")
    featured = _featured(columns, range(5))
    exploding = featured[4]._replace(transaction=featured[4].transaction._replace(transaction_id="explode-0"))
    lists = [featured[:3], [featured[3], exploding]]
    batches = [[to_scoring_example(f, Timestamp(micros=1_000 + i)) for i, f in enumerate(batch)] for batch in lists]
    options = PipelineOptions(runner="BundleBasedDirectRunner")
    options.view_as(StandardOptions).streaming = True

    def check_insights(insights):
        scored = sorted(f.transaction.transaction_id for f in featured[:3])
        assert sorted(i["transaction_id"] for i in insights) == scored

    def check_dead_letters(dead):
        ids = sorted(record["attributes"]["transaction_id"] for _, record in dead)
        assert ids == sorted(["explode-0", featured[3].transaction.transaction_id])  # the whole second list
        assert {kind for kind, _ in dead} == {INFERENCE_ERROR_KIND}

    before = Counter(BATCH_SIZES)
    with TestPipeline(options=options) as pipeline:
        handler = ExplodingHandler(str(trained.model_dir), poll_secs=None, max_batch_size=1)  # unused: no batching step
        stream = TestStream().add_elements(batches[:1]).add_elements(batches[1:]).advance_watermark_to_infinity()
        scored = pipeline | stream | ScoreTransactions(handler, str(trained.model_dir), keyed=True, batched=True)
        assert_that(scored.insights, check_insights, label="CheckInsights")
        dead_letters = scored.dead_letters | "FlattenDeadLetters" >> beam.Flatten()
        assert_that(dead_letters, check_dead_letters, label="CheckDeadLetters")
    # The first list went through the model whole (the second failed before it got there).
    assert BATCH_SIZES - before == Counter({3: 1})


def test_batched_input_must_be_keyed(trained):
    handler = FraudModelHandler(str(trained.model_dir), poll_secs=None)
    with pytest.raises(ValueError, match="batched input must be keyed"):
        ScoreTransactions(handler, str(trained.model_dir), batched=True)


def test_a_refused_newest_version_does_not_hide_a_valid_one_published_before_it(trained, tmp_path):
    from tests.test_serving import copy_version
    from transforms.scoring import ModelSlot

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    copy_version(trained.version, model_dir, "20260301-000001")
    slot = ModelSlot(str(model_dir), poll_secs=0.0)
    slot.load_newest()
    assert slot.current.version == "20260301-000001"
    # Between two looks, a valid version and then a broken one appear.
    copy_version(trained.version, model_dir, "20260301-000002")
    broken = copy_version(trained.version, model_dir, "20260301-000003")
    (broken / "report" / "loss.png").unlink()
    assert slot.refresh().version == "20260301-000002"
    assert slot.refresh().version == "20260301-000002"  # the refused one is not tried again


def test_handlers_of_one_model_folder_share_one_slot_loaded_once_per_process(trained, tmp_path, monkeypatch):
    # The local runner makes a handler per bundle; a load per handler would stall the stream.
    from tests.test_serving import copy_version

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    copy_version(trained.version, model_dir, "20260301-000001")
    loads = []
    real_load = loader.load
    monkeypatch.setattr(loader, "load", lambda path: loads.append(path) or real_load(path))
    first = FraudModelHandler(str(model_dir), poll_secs=None).load_model()
    second = FraudModelHandler(str(model_dir), poll_secs=None).load_model()
    assert first is second and first.current.version == "20260301-000001"
    assert len(loads) == 1
    other = tmp_path / "other"
    other.mkdir()
    copy_version(trained.version, other, "20260301-000002")
    assert FraudModelHandler(str(other), poll_secs=None).load_model().current.version == "20260301-000002"


def test_a_loaded_version_leaves_the_heap_frozen_and_the_next_load_frees_what_became_garbage(trained, tmp_path):
    """After a load, the objects the process holds are out of the full collections' way; a
    cycle of objects frozen then and dropped since is freed at the next load, so replaced
    versions do not stay in memory."""
    import gc
    import weakref

    from tests.test_serving import copy_version
    from transforms.scoring import ModelSlot

    class Node:
        pass

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    copy_version(trained.version, model_dir, "20260301-000001")
    cycle = Node()
    cycle.itself = cycle
    alive = weakref.ref(cycle)
    try:
        slot = ModelSlot(str(model_dir), poll_secs=None)
        slot.load_newest()
        assert gc.get_freeze_count() > 0
        del cycle
        gc.collect()
        assert alive() is not None  # frozen: full collections skip it
        copy_version(trained.version, model_dir, "20260301-000002")
        slot.load_newest()
        assert slot.current.version == "20260301-000002"
        assert alive() is None
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_the_label_join_is_bucketed_locally_and_keyed_by_customer_elsewhere_unless_told():
    from beam_pipelines import score

    def buckets(*argv):
        return score.label_join_buckets(PipelineOptions(["--model_dir=m", *argv]))

    assert buckets() == score.LOCAL_LABEL_BUCKETS == buckets("--runner=DirectRunner")
    assert buckets("--runner=DataflowRunner") == 0
    assert buckets("--label_join_buckets=0") == 0 and buckets("--runner=DataflowRunner", "--label_join_buckets=7") == 7
    with pytest.raises(ValueError, match="--label_join_buckets must be >= 0"):
        score.check(PipelineOptions(["--model_dir=m", "--label_join_buckets=-1"]))
