"""LoadEntitiesFn: one Bigtable read per bundle for the entities a worker has not seen yet."""

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from rtml import emulators, entity_store, events
from rtml.features import Entry
from transforms.features import LoadEntitiesFn, StoreConfig

pytestmark = pytest.mark.emulator


def tx(tx_id: str, customer: str, terminal: str) -> events.Transaction:
    return events.Transaction(tx_id, "2026-01-02T00:00:00Z", 1767312000_000000, customer, terminal, 5.0)


def test_a_bundle_of_unseen_entities_is_loaded_with_one_read_and_attached(services):
    emulators.ensure_feature_table(services, "loader")
    store = entity_store.EntityStore(services.project, services.instance, "loader")
    stored = Entry(1767225600_000000, "old", 42.0)
    store.write({entity_store.row_key(entity_store.CUSTOMER, "C1"): [entity_store.entry_cell(stored)]})
    store.close()

    config = StoreConfig(services.project, services.instance, "loader")
    elements = [tx("a", "C1", "T1"), tx("b", "C1", "T1"), tx("c", "C2", "T2")]
    reads_before = entity_store.PROCESS_RPCS["read"]

    def check(loaded):
        by_id = {event.transaction_id: (customer, terminal) for event, customer, terminal in loaded}
        assert set(by_id) == {"a", "b", "c"}
        for tx_id in ("a", "b"):  # both elements of the bundle carry the row of C1
            assert by_id[tx_id][0].entries == [stored]
        assert by_id["c"][0].entries == []  # loaded, and empty: C2 has no row
        assert by_id["a"][1].entries == [] and by_id["c"][1].entries == []

    pipeline = TestPipeline(runner="FnApiRunner")
    loaded = pipeline | beam.Create(elements) | beam.ParDo(LoadEntitiesFn(config))
    assert_that(loaded, check)
    pipeline.run().wait_until_finish()
    assert entity_store.PROCESS_RPCS["read"] - reads_before == 1


def test_rows_are_attached_only_the_first_time_a_worker_sees_a_key(services):
    emulators.ensure_feature_table(services, "loader_once")
    fn = LoadEntitiesFn(StoreConfig(services.project, services.instance, "loader_once"))
    fn.setup()
    try:
        fn.start_bundle()
        fn.process(tx("a", "C1", "T1"), 0, None)
        first = [w.value for w in fn.finish_bundle()]
        fn.start_bundle()
        fn.process(tx("b", "C1", "T1"), 0, None)
        fn.process(tx("c", "C9", "T1"), 0, None)
        second = {w.value[0].transaction_id: w.value[1:] for w in fn.finish_bundle()}
    finally:
        fn.teardown()
    assert first[0][1] is not None and first[0][2] is not None
    assert second["b"] == (None, None)  # C1 and T1 were loaded for "a"
    assert second["c"][0] is not None and second["c"][1] is None
