"""The publish-then-persist step (`transforms.outcomes`) against the real emulators, and its
bookkeeping of publications.

Results are published as each bundle ends; their state batches end by count (`batch_size`) or
by a processing-time timer (`max_buffering_secs`). The streaming tests mostly see the timer, so
here the count is the only way a batch can end before the input does.
"""

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from rtml import config, entity_store
from tests.conftest import make_topics
from tests.feature_runs import bigtable_rows, new_table
from tests.pubsub_helpers import collect
from transforms import outcomes
from transforms.features import StoreConfig

pytestmark = pytest.mark.emulator


def _cell(i: int) -> tuple[bytes, entity_store.Cell]:
    key = entity_store.row_key(entity_store.CUSTOMER, f"c{i}")
    return key, entity_store.Cell(entity_store.TX_FAMILY, f"t{i}".encode(), b"v%d" % i, 1_700_000_000_000_000 + 1000 * i)


def _metrics(result) -> dict:
    found = result.metrics().query(MetricsFilter().with_namespace(outcomes.NAMESPACE))
    values = {c.key.metric.name: c.committed for c in found["counters"]}
    values.update({d.key.metric.name: d.committed for d in found["distributions"]})
    return values


def _publish_pipeline(services, name: str, fn_class=outcomes.PublishThenPersistFn, batch_size: int = 3):
    """Seven insights of one shard and a fraud report's cells on another, through `fn_class`
    (a timer that would wait an hour) on the FnApiRunner."""
    topics = make_topics(services)
    table = new_table(services, name)
    topic_path = config.topic_path(services.project, topics["fraud-insights"])
    items = [
        ("insights", outcomes.Outcome("insight", b"m%d" % i, {"transaction_id": f"t{i}"}, (_cell(i),)))
        for i in range(7)
    ] + [("reports", outcomes.Outcome(None, b"", {}, (_cell(7),)))]
    fn = fn_class(StoreConfig(services.project, services.instance, table), {"insight": topic_path}, batch_size, 3600)
    pipeline = beam.Pipeline(options=PipelineOptions(runner="FnApiRunner"))
    _ = pipeline | beam.Create(items) | beam.ParDo(fn).with_input_types(tuple[str, outcomes.Outcome])
    result = pipeline.run()
    result.wait_until_finish()
    return topics, table, result


def _assert_every_cell_written(services, table):
    rows = bigtable_rows(services, table)
    for i in range(8):
        key, cell = _cell(i)
        assert rows[key][(cell.family, cell.qualifier)] == [(cell.timestamp_us / 1e6, cell.value)]


def test_batches_end_at_batch_size_and_the_rest_leaves_at_the_end(services):
    """Seven results of one shard, batch size 3, a timer that would wait an hour: publications and
    state writes of 3, 3 and the last 1 (flushed when the input ends); every message published
    once, every cell written, one write per batch. A result that publishes nothing (a fraud
    report's cells, on a shard of its own here) has its cells written all the same."""
    topics, table, result = _publish_pipeline(services, "outcomes-count")

    received = collect(topics["fraud-insights"] + "-sub", services.project, 7, 60)
    assert sorted((m.data, m.attributes["transaction_id"]) for m in received) == [(b"m%d" % i, f"t{i}") for i in range(7)]
    _assert_every_cell_written(services, table)
    metrics = _metrics(result)
    sizes = metrics["publish_batch_size"]
    assert (sizes.count, sizes.sum, sizes.min, sizes.max) == (3, 7, 1, 3)
    assert metrics["published"] == 7
    assert "published_again" not in metrics  # every publication confirmed by the process that sent it
    assert metrics["bigtable_write_rpcs"] == 4  # three insight batches, one of report cells


class _TakenOverFn(outcomes.PublishThenPersistFn):
    """As if a new worker took each key over as soon as a bundle's results were handed over: the
    process that flushes knows nothing of the publications (Dataflow moves keys between workers)."""

    def finish_bundle(self):
        super().finish_bundle()
        outcomes.PUBLISHING = outcomes._Publishing()


def test_results_a_flush_cannot_confirm_are_published_again_before_their_state(services, monkeypatch):
    """At least once: every result of a publication the flushing process never saw is published
    again, synchronously, before its batch's cells are written."""
    monkeypatch.setattr(outcomes, "PUBLISHING", outcomes._Publishing())
    topics, table, result = _publish_pipeline(services, "outcomes-takeover", _TakenOverFn, batch_size=100)

    received = collect(topics["fraud-insights"] + "-sub", services.project, 14, 60)
    assert sorted(m.data for m in received) == sorted([b"m%d" % i for i in range(7)] * 2)
    _assert_every_cell_written(services, table)
    metrics = _metrics(result)
    assert metrics["published"] == 7 and metrics["published_again"] == 7
    assert metrics["bigtable_write_rpcs"] == 2  # one batch per shard


def test_a_result_without_a_topic_is_refused():
    fn = outcomes.PublishThenPersistFn(StoreConfig("p", "i", "t"), {"insight": "projects/p/topics/x"}, 3, 1.0)
    with pytest.raises(ValueError, match="no topic for results of kind 'health'"):
        fn.process(("k", outcomes.Outcome("health", b"", {}, ())))


@pytest.mark.parametrize("batch_size, buffering", [(0, 1.0), (3, 0.0)])
def test_batching_settings_are_checked(batch_size, buffering):
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        outcomes.PublishThenPersistFn(StoreConfig("p", "i", "t"), {}, batch_size, buffering)


def test_requests_keep_within_pubsubs_limits_and_the_order():
    from google.pubsub_v1 import types

    small = [types.PubsubMessage(data=b"%d" % i, attributes={"transaction_id": f"t{i}"}) for i in range(2500)]
    requests = list(outcomes._requests(small))
    assert [len(r) for r in requests] == [1000, 1000, 500]
    assert [m for r in requests for m in r] == small
    large = [types.PubsubMessage(data=b"x" * 4_000_000) for _ in range(5)]
    assert [len(r) for r in outcomes._requests(large)] == [2, 2, 1]


def test_a_publication_is_confirmed_for_each_result_then_forgotten():
    """Each flush confirms its own key's results of a publication; once all are, it is forgotten."""
    publishing = outcomes._Publishing()
    publication = publishing.new_id()
    publishing.send(publication, 3, lambda: None)
    assert publishing.confirm(publication, 2)
    assert publishing.confirm(publication, 1)
    assert not publishing.confirm(publication, 1), "a fourth result was never in this publication"
    assert not publishing.confirm(publishing.new_id(), 1), "unknown here: published again by the caller"


def test_a_failed_publication_is_not_confirmed():
    def fail():
        raise RuntimeError("3 results could not be published")

    publishing = outcomes._Publishing()
    publication = publishing.new_id()
    publishing.send(publication, 1, fail)
    assert not publishing.confirm(publication, 1)


def test_a_publication_no_flush_asks_about_is_forgotten_once_done(monkeypatch):
    publishing = outcomes._Publishing()
    monkeypatch.setattr(publishing, "FORGET_AFTER_S", 0.0)
    first, second = publishing.new_id(), publishing.new_id()
    publishing.send(first, 1, lambda: None)
    publishing._sent[first][1].result()  # done
    publishing.send(second, 1, lambda: None)
    assert not publishing.confirm(first, 1)
