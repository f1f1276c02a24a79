"""Training examples on disk: `tf.train.Example` records in TFRecord files.

Each example holds the ids (`transaction_id`, `customer_id`, `terminal_id`: bytes), the event
time (`event_time_us`: int64 microseconds, UTC; `event_time`: the RFC 3339 string), every
reference feature of `rtml.features.FEATURE_NAMES` as a float, and `label` (int64, 1 = fraud).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Iterator

import google_crc32c

from rtml.features import FEATURE_NAMES

ID_COLUMNS = ("transaction_id", "customer_id", "terminal_id", "event_time")
INT_COLUMNS = ("event_time_us", "label")
FLOAT_COLUMNS = FEATURE_NAMES
FILE_SUFFIX = ".tfrecord"
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_MAX_VARINT = 10  # bytes of the longest protobuf varint


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@functools.lru_cache(maxsize=4096)
def _record_head(length: int) -> bytes:
    """A TFRecord's first 12 bytes: the length and its masked CRC-32C (examples repeat a few lengths)."""
    packed = _LENGTH.pack(length)
    return packed + _CRC.pack(_masked_crc(packed))


def frame(record: bytes) -> bytes:
    """One TFRecord: length, its masked CRC-32C, the data, the data's masked CRC-32C."""
    return b"".join((_record_head(len(record)), record, _CRC.pack(_masked_crc(record))))


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


def _varint(value: int) -> bytes:
    """A protobuf varint (an int64 below zero as its 64-bit two's complement, as protobuf does)."""
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _entry(name: str, feature: bytes) -> bytes:
    """One entry of `Features.feature` (a map<string, Feature>), as a field of `Features`."""
    return _field(1, _field(1, name.encode()) + _field(2, feature))


_FEATURE_OF = {
    "bytes": lambda value: _field(1, _field(1, value)),  # Feature.bytes_list: BytesList{value: [value]}
    "int64": lambda value: _field(3, _field(1, value)),  # Feature.int64_list: Int64List{value: [packed varint]}
    "float": lambda value: _field(2, _field(1, value)),  # Feature.float_list: FloatList{value: [packed float]}
}


def _varints(values) -> tuple:
    """The protobuf varints of int64 values: an (n, 10) byte matrix, and the length of each."""
    import numpy as np

    v = np.asarray(values, dtype=np.int64).view(np.uint64)
    lengths = np.ones(len(v), dtype=np.int64)
    for k in range(1, _MAX_VARINT):
        lengths += v >= np.uint64(1) << np.uint64(7 * k)
    groups = ((v[:, None] >> (np.arange(_MAX_VARINT, dtype=np.uint64) * np.uint64(7))) & np.uint64(0x7F)).astype(
        np.uint8
    )
    more = np.arange(_MAX_VARINT)[None, :] < lengths[:, None] - 1
    return groups | more.astype(np.uint8) << 7, lengths


def encode_columns(columns) -> list[bytes]:
    """Serialized `tf.train.Example`s for a `rtml.history.ExampleColumns`, one per row, in row order.

    Examples whose variable-length parts (the ids' bytes, the integers' varints) have the same
    lengths share one byte layout: a template with the feature names in place, into which each
    column's bytes are copied for all those rows at once. A shard of a backfill has one or a
    few layouts, so the work per example is a few slices, not a protobuf message.
    """
    import numpy as np

    n = len(columns)
    if n == 0:
        return []
    ids = [[value.encode() for value in getattr(columns, name)] for name in ID_COLUMNS]
    ints = [_varints(getattr(columns, name)) for name in INT_COLUMNS]
    floats = [np.asarray(columns.features[name], dtype="<f4").view(np.uint8).reshape(n, 4) for name in FLOAT_COLUMNS]
    lengths = np.stack(
        [np.fromiter(map(len, column), dtype=np.int64, count=n) for column in ids] + [ints[0][1], ints[1][1]], axis=1
    )
    if (lengths == lengths[0]).all():
        layouts, groups = lengths[:1], [None]
    else:
        keys = [tuple(row) for row in lengths.tolist()]
        members: dict[tuple, list[int]] = {}
        for i, key in enumerate(keys):
            members.setdefault(key, []).append(i)
        layouts, groups = list(members), [np.asarray(rows) for rows in members.values()]
    out: list[bytes] = [b""] * n
    for layout, rows in zip(layouts, groups, strict=True):
        sizes = [int(size) for size in layout]
        id_sizes, int_sizes = sizes[: len(ID_COLUMNS)], sizes[len(ID_COLUMNS) :]
        parts = [("bytes", name, size, ids[j]) for j, (name, size) in enumerate(zip(ID_COLUMNS, id_sizes, strict=True))]
        parts += [
            ("int64", name, size, ints[j][0][:, :size])
            for j, (name, size) in enumerate(zip(INT_COLUMNS, int_sizes, strict=True))
        ]
        parts += [("float", name, 4, floats[j]) for j, name in enumerate(FLOAT_COLUMNS)]
        entries = [_entry(name, _FEATURE_OF[kind](b"\0" * size)) for kind, name, size, _ in parts]
        body_length = sum(map(len, entries))
        head = b"\x0a" + _varint(body_length)  # Example.features
        width = len(head) + body_length
        count = n if rows is None else len(rows)
        matrix = np.empty((count, width), dtype=np.uint8)
        matrix[:] = np.frombuffer(head + b"".join(entries), dtype=np.uint8)
        end = len(head)
        for (kind, _, size, values), entry in zip(parts, entries, strict=True):
            end += len(entry)  # each value is the last thing in its entry
            if kind == "bytes":
                joined = b"".join(values if rows is None else [values[i] for i in rows.tolist()])
                values = np.frombuffer(joined, dtype=np.uint8).reshape(count, size)
            elif rows is not None:
                values = values[rows]
            matrix[:, end - size : end] = values
        data = matrix.tobytes()
        records = [data[start : start + width] for start in range(0, len(data), width)]
        if rows is None:
            return records
        for i, record in zip(rows.tolist(), records, strict=True):
            out[i] = record
    return out


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


def read_columns(
    directory: str, start_us: int | None = None, end_us: int | None = None, pattern: str = "*" + FILE_SUFFIX
) -> dict:
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
