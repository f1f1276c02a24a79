"""The publish-then-persist step (`transforms.outcomes`) against the real emulators.

Its batches end by count (`batch_size`) or by a processing-time timer (`max_buffering_secs`);
the streaming tests mostly see the timer, so here the count is the only way a batch can end
before the input does.
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


def test_batches_end_at_batch_size_and_the_rest_leaves_at_the_end(services):
    """Seven results of one shard, batch size 3, a timer that would wait an hour: batches of 3, 3
    and the last 1 (flushed when the input ends); every message published once, every cell
    written, one write per batch. A result that publishes nothing (a fraud report's cells, on a
    shard of its own here) has its cells written all the same."""
    topics = make_topics(services)
    table = new_table(services, "outcomes-count")
    topic_path = config.topic_path(services.project, topics["fraud-insights"])
    items = [
        ("insights", outcomes.Outcome("insight", b"m%d" % i, {"transaction_id": f"t{i}"}, (_cell(i),)))
        for i in range(7)
    ] + [("reports", outcomes.Outcome(None, b"", {}, (_cell(7),)))]
    pipeline = beam.Pipeline(options=PipelineOptions(runner="FnApiRunner"))
    _ = (
        pipeline
        | beam.Create(items)
        | outcomes.PublishOutcomes(
            StoreConfig(services.project, services.instance, table),
            {"insight": topic_path},
            batch_size=3,
            max_buffering_secs=3600,
        )
    )
    result = pipeline.run()
    result.wait_until_finish()

    received = collect(topics["fraud-insights"] + "-sub", services.project, 7, 60)
    assert sorted((m.data, m.attributes["transaction_id"]) for m in received) == [(b"m%d" % i, f"t{i}") for i in range(7)]
    rows = bigtable_rows(services, table)
    for i in range(8):
        key, cell = _cell(i)
        assert rows[key][(cell.family, cell.qualifier)] == [(cell.timestamp_us / 1e6, cell.value)]
    metrics = _metrics(result)
    sizes = metrics["publish_batch_size"]
    assert (sizes.count, sizes.sum, sizes.min, sizes.max) == (3, 7, 1, 3)
    assert metrics["published"] == 7
    assert metrics["bigtable_write_rpcs"] == 4  # three insight batches, one of report cells


def test_a_result_without_a_topic_is_refused():
    fn = outcomes.PublishThenPersistFn(StoreConfig("p", "i", "t"), {"insight": "projects/p/topics/x"}, 3, 1.0)
    with pytest.raises(ValueError, match="no topic for results of kind 'health'"):
        fn.process(("k", outcomes.Outcome("health", b"", {}, ())))


@pytest.mark.parametrize("batch_size, buffering", [(0, 1.0), (3, 0.0)])
def test_batching_settings_are_checked(batch_size, buffering):
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        outcomes.PublishThenPersistFn(StoreConfig("p", "i", "t"), {}, batch_size, buffering)


def test_the_shared_publisher_sends_a_batch_without_waiting_for_more(services):
    """The step publishes a whole batch and then waits for it, so the client may hold a message
    for at most `CLIENT_BATCH_LATENCY_S` (its default, 10 ms, delayed every batch by that much)."""
    publisher = outcomes.shared_publisher()
    assert publisher.batch_settings.max_latency == outcomes.CLIENT_BATCH_LATENCY_S < 0.01
    assert outcomes.shared_publisher() is publisher
