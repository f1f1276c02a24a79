"""Tests for rtml.examples: TFRecord framing, tf.train.Example encoding, and files on disk."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtml import examples
from rtml.events import format_timestamp, parse_timestamp
from rtml.features import FEATURE_NAMES
from rtml.history import ExampleColumns

T0 = parse_timestamp("2024-01-01T00:00:00Z", "event_time")
RECORDS = [b"first", b"", b"\x00\xff" * 300, b"last record"]


def close_as_float32(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def sample_columns() -> ExampleColumns:
    times = [T0 + 1_500_000, T0 + 86_400_000_000, T0 + 90_000_123_456]
    return ExampleColumns(
        transaction_id=["tx1", "tx2", "tx-é3"],
        customer_id=["C1", "C2", "C1"],
        terminal_id=["T1", "T1", "T2"],
        event_time=[format_timestamp(t) for t in times],
        event_time_us=times,
        label=[0, 1, 0],
        features={name: [i + 0.1, (i + 1) / 3, 123_456.789 * (i % 4)] for i, name in enumerate(FEATURE_NAMES)},
    )


# --- framing ------------------------------------------------------------------------------------


def test_read_records_of_framed_records_round_trips_including_empty_ones():
    data = b"".join(examples.frame(record) for record in RECORDS)
    assert list(examples.read_records(data)) == RECORDS


def test_read_records_of_no_bytes_is_empty():
    assert list(examples.read_records(b"")) == []


def test_frame_is_length_crc_data_crc():
    framed = examples.frame(b"abc")
    assert len(framed) == 8 + 4 + 3 + 4
    assert framed[:8] == (3).to_bytes(8, "little")
    assert framed[12:15] == b"abc"


@settings(deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_read_records_round_trips_any_records(records):
    assert list(examples.read_records(b"".join(map(examples.frame, records)))) == records


@pytest.mark.parametrize("position", [0, 3, 8, 11], ids=["length", "length-high", "length-crc", "length-crc-end"])
def test_read_records_rejects_a_flipped_byte_in_the_length_part(position):
    data = bytearray(examples.frame(b"payload"))
    data[position] ^= 0x01
    with pytest.raises(ValueError, match="corrupt TFRecord length"):
        list(examples.read_records(bytes(data)))


@pytest.mark.parametrize("position", [12, 15, 18, 19, 22], ids=["data", "data-mid", "data-end", "crc", "crc-end"])
def test_read_records_rejects_a_flipped_byte_in_the_data_part(position):
    data = bytearray(examples.frame(b"payload"))
    data[position] ^= 0x80
    with pytest.raises(ValueError, match="corrupt TFRecord data"):
        list(examples.read_records(bytes(data)))


def test_read_records_rejects_corruption_in_a_later_record_after_yielding_the_earlier_ones():
    data = bytearray(examples.frame(b"good") + examples.frame(b"bad"))
    data[-5] ^= 0x01
    records = examples.read_records(bytes(data))
    assert next(records) == b"good"
    with pytest.raises(ValueError):
        next(records)


# --- files --------------------------------------------------------------------------------------


def test_write_file_returns_the_count_and_writes_the_framed_records(tmp_path):
    path = str(tmp_path / "one.tfrecord")
    assert examples.write_file(path, iter(RECORDS)) == len(RECORDS)
    with open(path, "rb") as handle:
        assert list(examples.read_records(handle.read())) == RECORDS


def test_write_file_of_no_records_is_an_empty_file(tmp_path):
    path = str(tmp_path / "empty.tfrecord")
    assert examples.write_file(path, []) == 0
    assert os.path.getsize(path) == 0


def test_files_written_by_write_file_are_read_by_tensorflow(tmp_path):
    import tensorflow as tf

    path = str(tmp_path / "tf.tfrecord")
    examples.write_file(path, RECORDS)
    assert [record.numpy() for record in tf.data.TFRecordDataset(path)] == RECORDS


def test_read_dir_reads_every_record_of_every_tfrecord_file(tmp_path):
    encoded = examples.encode_columns(sample_columns())
    examples.write_file(str(tmp_path / "examples-00000-of-00002.tfrecord"), encoded[:2])
    examples.write_file(str(tmp_path / "examples-00001-of-00002.tfrecord"), encoded[2:])
    examples.write_file(str(tmp_path / "empty.tfrecord"), [])
    examples.write_file(str(tmp_path / "other.txt"), encoded)  # not a *.tfrecord file
    ids = sorted(example["transaction_id"] for example in examples.read_dir(str(tmp_path)))
    assert ids == ["tx-é3", "tx1", "tx2"]


def test_read_dir_of_a_folder_without_tfrecord_files_is_empty(tmp_path):
    assert list(examples.read_dir(str(tmp_path))) == []


# --- tf.train.Example encoding ------------------------------------------------------------------


def test_encode_columns_gives_one_example_per_row_that_from_example_decodes():
    columns = sample_columns()
    encoded = examples.encode_columns(columns)
    assert len(encoded) == 3
    for i, record in enumerate(encoded):
        decoded = examples.from_example(record)
        assert set(decoded) == {*examples.ID_COLUMNS, *examples.INT_COLUMNS, *FEATURE_NAMES}
        for name in examples.ID_COLUMNS:
            assert decoded[name] == getattr(columns, name)[i]
        assert decoded["event_time_us"] == columns.event_time_us[i]
        assert decoded["label"] == columns.label[i]
        for name in FEATURE_NAMES:
            assert close_as_float32(decoded[name], columns.features[name][i]), (i, name)


def test_encoded_examples_parse_with_a_tensorflow_feature_spec():
    import tensorflow as tf

    columns = sample_columns()
    spec = {name: tf.io.FixedLenFeature([], tf.string) for name in examples.ID_COLUMNS}
    spec.update({name: tf.io.FixedLenFeature([], tf.int64) for name in examples.INT_COLUMNS})
    spec.update({name: tf.io.FixedLenFeature([], tf.float32) for name in examples.FLOAT_COLUMNS})
    for i, record in enumerate(examples.encode_columns(columns)):
        parsed = tf.io.parse_single_example(record, spec)
        assert parsed["transaction_id"].numpy().decode() == columns.transaction_id[i]
        assert parsed["event_time"].numpy().decode() == columns.event_time[i]
        assert int(parsed["event_time_us"].numpy()) == columns.event_time_us[i]
        assert int(parsed["label"].numpy()) == columns.label[i]
        for name in examples.FLOAT_COLUMNS:
            assert close_as_float32(float(parsed[name].numpy()), columns.features[name][i]), (i, name)


def test_encode_columns_of_no_rows_is_empty():
    empty = ExampleColumns([], [], [], [], [], [], {name: [] for name in FEATURE_NAMES})
    assert list(examples.encode_columns(empty)) == []


INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@settings(deadline=None, max_examples=200)
@given(st.lists(INT64, min_size=1, max_size=20))
def test_varints_are_protobufs_int64_encoding(values):
    from tensorflow.core.example import feature_pb2

    matrix, lengths = examples._varints(values)
    for value, row, length in zip(values, matrix.tolist(), lengths.tolist(), strict=True):
        packed = feature_pb2.Int64List(value=[value]).SerializeToString()  # field 1, length, the varint
        assert packed[2:] == examples._varint(value) == bytes(row[:length])


ID_TEXT = st.text(min_size=1, max_size=12) | st.text(alphabet="é€😀", min_size=40, max_size=128)


@st.composite
def example_columns(draw):
    n = draw(st.integers(min_value=1, max_value=12))
    texts = st.lists(ID_TEXT, min_size=n, max_size=n)
    times = draw(st.lists(st.one_of(st.integers(0, 2**53), INT64), min_size=n, max_size=n))
    floats = st.floats(width=32, allow_nan=False)
    return ExampleColumns(
        transaction_id=draw(texts),
        customer_id=draw(texts),
        terminal_id=draw(texts),
        event_time=draw(
            st.lists(st.sampled_from(["2024-01-01T00:00:00Z", "2024-01-01T00:00:00.123+02:00"]), min_size=n, max_size=n)
        ),
        event_time_us=times,
        label=draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n)),
        features={name: draw(st.lists(floats, min_size=n, max_size=n)) for name in FEATURE_NAMES},
    )


@settings(deadline=None, max_examples=150)
@given(example_columns())
def test_encode_columns_is_read_back_by_tensorflow_row_for_row_whatever_the_lengths(columns):
    """Rows of different id and varint lengths take different byte layouts; each must still come
    back from TensorFlow's own parser as its row, in order."""
    encoded = examples.encode_columns(columns)
    assert len(encoded) == len(columns)
    for record, row in zip(encoded, columns.rows(), strict=True):
        assert examples.from_example(record) == row


def test_encode_columns_keeps_row_order_across_interleaved_layouts():
    n = 8
    ids = [f"tx{i}" + "x" * (i % 2) for i in range(n)]  # two layouts, four rows each, interleaved
    columns = ExampleColumns(
        transaction_id=ids,
        customer_id=["C1"] * n,
        terminal_id=["T1"] * n,
        event_time=[format_timestamp(T0)] * n,
        event_time_us=[T0 + i for i in range(n)],
        label=[i % 2 for i in range(n)],
        features={name: [float(i)] * n for i, name in enumerate(FEATURE_NAMES)},
    )
    assert [examples.from_example(record) for record in examples.encode_columns(columns)] == columns.rows()
