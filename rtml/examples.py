"""Training examples on disk: `tf.train.Example` records in TFRecord files.

Each example holds the ids (`transaction_id`, `customer_id`, `terminal_id`: bytes), the event
time (`event_time_us`: int64 microseconds, UTC; `event_time`: the RFC 3339 string), every
reference feature of `rtml.features.FEATURE_NAMES` as a float, and `label` (int64, 1 = fraud).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from rtml.features import FEATURE_NAMES

ID_COLUMNS = ("transaction_id", "customer_id", "terminal_id", "event_time")
INT_COLUMNS = ("event_time_us", "label")
FLOAT_COLUMNS = FEATURE_NAMES
FILE_SUFFIX = ".tfrecord"
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
    """One TFRecord: length, its masked CRC-32C, the data, the data's masked CRC-32C."""
    length = _LENGTH.pack(len(record))
    return b"".join((length, _CRC.pack(_masked_crc(length)), record, _CRC.pack(_masked_crc(record))))


def read_records(data: bytes) -> Iterator[bytes]:
    """The records of a TFRecord file's bytes, checking both CRCs."""
    offset = 0
    while offset < len(data):
        (length,) = _LENGTH.unpack_from(data, offset)
        header = data[offset : offset + 8]
        (length_crc,) = _CRC.unpack_from(data, offset + 8)
        if length_crc != _masked_crc(header):
            raise ValueError(f"corrupt TFRecord length at byte {offset}")
        start = offset + 12
        record = data[start : start + length]
        (data_crc,) = _CRC.unpack_from(data, start + length)
        if data_crc != _masked_crc(record):
            raise ValueError(f"corrupt TFRecord data at byte {start}")
        yield record
        offset = start + length + 4


def encode_columns(columns) -> list[bytes]:
    """Serialized `tf.train.Example`s for a `rtml.history.ExampleColumns`, encoded in one batch."""
    import numpy as np
    import pyarrow as pa
    from tfx_bsl.coders import example_coder

    offsets = pa.array(np.arange(len(columns) + 1, dtype=np.int32))

    def single(values):
        return pa.ListArray.from_arrays(offsets, values)

    arrays = [single(pa.array(getattr(columns, name), pa.string()).cast(pa.binary())) for name in ID_COLUMNS]
    arrays += [single(pa.array(np.asarray(getattr(columns, name), dtype=np.int64))) for name in INT_COLUMNS]
    arrays += [single(pa.array(np.asarray(columns.features[name], dtype=np.float32))) for name in FLOAT_COLUMNS]
    batch = pa.RecordBatch.from_arrays(arrays, [*ID_COLUMNS, *INT_COLUMNS, *FLOAT_COLUMNS])
    return example_coder.RecordBatchToExamplesEncoder().encode(batch)


def from_example(record: bytes) -> dict:
    """A serialized example as a plain dict (ids as str, ints, floats)."""
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example.FromString(record)
    feature = example.features.feature
    out: dict = {name: feature[name].bytes_list.value[0].decode("utf-8") for name in ID_COLUMNS}
    out.update({name: feature[name].int64_list.value[0] for name in INT_COLUMNS})
    out.update({name: feature[name].float_list.value[0] for name in FLOAT_COLUMNS})
    return out


def write_file(path: str, records: Iterable[bytes]) -> int:
    """Write records to `path` (local or gs://) as one TFRecord file; returns the count."""
    from apache_beam.io.filesystems import FileSystems

    framed = [frame(record) for record in records]
    with FileSystems.create(path) as handle:
        handle.write(b"".join(framed))
    return len(framed)


def read_dir(directory: str) -> Iterator[dict]:
    """Every example under `directory` (all `*.tfrecord` files), decoded."""
    from apache_beam.io.filesystems import FileSystems

    pattern = FileSystems.join(directory, "*" + FILE_SUFFIX)
    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as handle:
            for record in read_records(handle.read()):
                yield from_example(record)


def read_columns(directory: str, start_us: int | None = None, end_us: int | None = None, pattern: str = "*" + FILE_SUFFIX) -> dict:
    """The examples under `directory` with `start_us <= event_time_us < end_us`, as columns.

    Every reference feature and `label` as a float32 numpy array, `event_time_us` as int64; `transaction_id`,
    `customer_id` and `day` (the UTC date, YYYY-MM-DD) as lists of str.
    """
    import numpy as np
    from apache_beam.io.filesystems import FileSystems

    ids = ("transaction_id", "customer_id", "day")
    columns: dict[str, list] = {name: [] for name in (*FLOAT_COLUMNS, "label", "event_time_us", *ids)}
    for match in FileSystems.match([FileSystems.join(directory, pattern)])[0].metadata_list:
        with FileSystems.open(match.path) as handle:
            for record in read_records(handle.read()):
                example = from_example(record)
                t = example["event_time_us"]
                if (start_us is not None and t < start_us) or (end_us is not None and t >= end_us):
                    continue
                for name in FLOAT_COLUMNS:
                    columns[name].append(example[name])
                columns["label"].append(example["label"])
                columns["event_time_us"].append(t)
                columns["transaction_id"].append(example["transaction_id"])
                columns["customer_id"].append(example["customer_id"])
                columns["day"].append(example["event_time"][:10])
    out: dict = {name: np.asarray(columns[name], dtype=np.float32) for name in (*FLOAT_COLUMNS, "label")}
    out["event_time_us"] = np.asarray(columns["event_time_us"], dtype=np.int64)
    out.update({name: columns[name] for name in ids})
    return out
