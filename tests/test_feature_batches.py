"""The terminal step's batches for inference (`transforms.features.Batches`): pure logic, no services."""

import pytest
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from transforms.features import Batches


def test_batches_hold_at_most_the_size_and_the_rest_leaves_on_flush():
    batches = Batches(3)
    completed = [batches.add(f"item{i}", Timestamp(micros=100 + i)) for i in range(7)]
    full = [batch for batch in completed if batch is not None]
    rest = batches.flush()
    assert [batch.value for batch in full] == [["item0", "item1", "item2"], ["item3", "item4", "item5"]]
    assert completed.index(full[0]) == 2 and completed.index(full[1]) == 5  # out as soon as full
    assert rest.value == ["item6"]
    assert batches.flush() is None  # nothing left: no empty batch


def test_a_batch_carries_its_latest_timestamp_in_the_global_window():
    batches = Batches(2)
    assert batches.add("late", Timestamp(micros=900)) is None
    batch = batches.add("early", Timestamp(micros=100))
    assert batch.timestamp == Timestamp(micros=900)
    assert list(batch.windows) == [GlobalWindow()]
    assert batches.add("next", Timestamp(micros=50)) is None
    assert batches.flush().timestamp == Timestamp(micros=50)  # a new batch starts from its own items


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1, got 0"):
        Batches(0)
