"""Batch backfill: replay files -> reference features per transaction -> training examples + warm state.

Reads one or more replay files (local paths or gs://), numbers every line by publication order,
and runs the same feature core as the streaming DoFns over each entity in publication order, in
two shuffles: events grouped by terminal shard get their terminal features and labels, then
transactions grouped by customer shard get their customer features and become examples there
(no third shuffle to join the two halves). Writes

- training examples (`tf.train.Example` in TFRecord shards under `--examples_out`): one per
  transaction, every reference feature, the label, event time and ids;
- the final state of every entity into the Bigtable feature table, so a streaming job started
  afterwards begins warm (skip with `--no_state`);
- `rejected.jsonl` under `--examples_out`: one record per input line that broke the contract.

    python -m beam_pipelines.backfill --input history.jsonl --examples_out out/examples
"""

import contextlib
import gc
import io
import json
import logging
import pickle
import sys
import time
from typing import NamedTuple

import apache_beam as beam
import zstandard
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions
from apache_beam.runners.runner import PipelineResult

from beam_pipelines import options as opts
from rtml import entity_store, examples, history
from transforms import dofn
from transforms.features import StoreConfig

RANGE_BYTES = 16 * 1024 * 1024
STATE_ROWS_PER_WRITE = 200


class BackfillOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--input",
            action="append",
            default=None,
            help="Required. Replay file (JSON Lines, local or gs://); repeat for several, given in publication order.",
        )
        parser.add_argument(
            "--examples_out", default=None, help="Required. Folder for the TFRecord example shards (local or gs://)."
        )
        parser.add_argument(
            "--shards", type=int, default=16, help="Entity shards and example files (default: %(default)s)."
        )
        opts.add_switch(
            parser,
            "--no_state",
            "Do not load the final feature state into Bigtable (retraining uses it, so that a running "
            "scorer's state is left alone).",
        )
        parser.add_argument(
            "--progress_file",
            default=None,
            help="Local file to which each parsed byte range appends its size (drives `rtml backfill`'s progress bar).",
        )


def _metric(name: str):
    return Metrics.counter("backfill", name)


def pack(rows: list | tuple) -> bytes:
    """A shard's rows (tuples of primitives) as one opaque, compressed value for a shuffle.

    As Beam elements, rows are encoded and decoded in the workers and decoded and re-encoded
    again by the local runner for every grouped value; one pickle per part passes through the
    runner as bytes, and compressed (Zstandard's level 1: under a third of the bytes) the runner
    has that much less to move between stages while the workers wait. Zstandard compresses this
    data 3.5 times as fast as zlib's fastest level and decompresses it 4 times as fast. Pickle's
    memo is off, which halves its cost: a shared object is written again, and rows never refer
    to themselves.
    """
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.fast = True
    pickler.dump(rows)
    return zstandard.ZstdCompressor(level=1).compress(buffer.getvalue())


def unpacked(data: bytes):
    """What `pack` packed."""
    return pickle.loads(zstandard.ZstdDecompressor().decompress(data))


def unpack(parts) -> list:
    """The rows of every packed part of a grouped shard, in one list."""
    return [row for part in parts for row in unpacked(part)]


@contextlib.contextmanager
def cyclic_gc_paused():
    """Python's cyclic garbage collector off while a shard is computed, then on again if it was.

    A shard builds hundreds of thousands of lists and tuples that live until it ends, and every
    collection of the oldest generation walks all of them: the terminal core took 6.0 us per
    row with the collector on and 3.8 us with it off. The shard's data holds no reference cycles,
    so reference counting frees it all the same. What the block leaves alive is walked once when
    the collector is back on, so the steps do their work in a method that returns only its small
    output (the shard's states and rows are freed on return).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class ExampleColumnsCoder(beam.coders.Coder):
    """`history.ExampleColumns` as pickled columns, with a size estimate that does not encode them.

    Beam samples elements to estimate each PCollection's size; without a coder of its own, a
    shard's columns (a named tuple) fall back to a full pickle for each sample.
    """

    def encode(self, value: history.ExampleColumns) -> bytes:
        return pack(tuple(value))

    def decode(self, encoded: bytes) -> history.ExampleColumns:
        return history.ExampleColumns(*unpacked(encoded))

    def is_deterministic(self) -> bool:
        return False

    def estimate_size(self, value: history.ExampleColumns) -> int:
        if not len(value):
            return 0
        ids = sum(len(getattr(value, name)[0]) for name in examples.ID_COLUMNS)
        return len(value) * (ids + 8 * (len(examples.INT_COLUMNS) + len(value.features)))


beam.coders.registry.register_coder(history.ExampleColumns, ExampleColumnsCoder)


class SplitFilesFn(dofn.DoFn):
    """Cut each input file into byte ranges `(file_index, path, start, end)` to parse in parallel."""

    def __init__(self, range_bytes: int = RANGE_BYTES):
        self._range_bytes = range_bytes

    def process(self, indexed_path):
        index, path = indexed_path
        matches = FileSystems.match([path])[0].metadata_list
        if not matches:
            raise FileNotFoundError(f"--input {path}: no such file")
        size = matches[0].size_in_bytes
        for start in range(0, max(size, 1), self._range_bytes):
            yield index, path, start, min(size, start + self._range_bytes)


def lines_in_range(handle, start: int, end: int):
    """`(offset, line)` of every line that starts in [start, end) of an open binary file.

    A line belongs to the range its first byte falls in, so adjacent ranges never share or
    lose a line.
    """
    position = start
    if start > 0:
        handle.seek(start - 1)
        position = start - 1 + len(handle.readline())  # finish the line that straddles `start`
    else:
        handle.seek(0)
    while position < end:
        line = handle.readline()
        if not line:
            return
        yield position, line
        position += len(line)


class ParseRangeFn(dofn.DoFn):
    """Parse and validate the lines of one byte range; emit event rows grouped by terminal shard."""

    REJECTED = "rejected"

    def __init__(self, shards: int, progress_file: str | None = None):
        self._shards = shards
        self._progress_file = progress_file

    def process(self, byte_range):
        index, path, start, end = byte_range
        with cyclic_gc_paused():
            packed, rejected, counts = self._parse(index, path, start, end)
        for row in rejected:
            _metric(f"rejected_{row.kind}").inc()
            yield beam.pvalue.TaggedOutput(self.REJECTED, row)
        for name, count in counts.items():
            _metric(name).inc(count)
        if self._progress_file:
            with open(self._progress_file, "a", encoding="utf-8") as progress:
                progress.write(f"{end - start}\n")
        yield from packed

    def _parse(self, index: int, path: str, start: int, end: int):
        """The range's rows packed per terminal shard, its rejected lines, and its counts."""
        by_terminal: dict[int, list] = {}
        rejected: list[history.Rejected] = []
        transactions = feedback = lines = 0
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            for offset, raw in lines_in_range(handle, start, end):
                lines += 1
                row = history.parse_line(index, offset, raw)
                if row is None:
                    continue
                if isinstance(row, history.Rejected):
                    rejected.append(row)
                    continue
                by_terminal.setdefault(history.shard_of(history.terminal_id(row), self._shards), []).append(row)
                if history.is_transaction(row):
                    transactions += 1
                else:
                    feedback += 1
        packed = [(shard, pack(rows)) for shard, rows in by_terminal.items()]
        return packed, rejected, {"lines": lines, "transactions": transactions, "feedback": feedback}


class _StateSaver:
    """Writes final entity states to the feature table (nothing without a store config)."""

    def __init__(self, store: StoreConfig | None):
        self._store_config = store

    def setup(self):
        self._store = entity_store.EntityStore(*self._store_config) if self._store_config else None

    def teardown(self):
        if self._store is not None:
            self._store.close()

    def _save(self, kind: str, states: dict) -> None:
        if self._store is None:
            return
        rows = {}
        for entity_id, state in states.items():
            cells = entity_store.state_cells(state)
            if cells:
                rows[entity_store.row_key(kind, entity_id)] = cells
            if len(rows) >= STATE_ROWS_PER_WRITE:
                self._write(rows)
                rows = {}
        if rows:
            self._write(rows)

    def _write(self, rows: dict) -> None:
        before = self._store.write_rpcs
        self._store.write(rows)
        _metric("bigtable_write_rpcs").inc(self._store.write_rpcs - before)
        _metric("state_rows_written").inc(len(rows))


class TerminalShardFn(_StateSaver, beam.DoFn):
    """Run the terminal core over one terminal shard; store its final states; emit every
    transaction as `(row, terminal values or None for a repeat, label)`, grouped by customer shard."""

    def __init__(self, shards: int, store: StoreConfig | None):
        _StateSaver.__init__(self, store)
        self._shards = shards

    def process(self, element):
        _, parts = element
        with cyclic_gc_paused():
            packed = self._hand_on(parts)
        yield from packed

    def _hand_on(self, parts) -> list[tuple[int, bytes]]:
        result = history.terminal_shard(unpack(parts))
        self._save(entity_store.TERMINAL, result.states)
        by_customer: dict[int, list] = {}
        for item in result.handed_on():
            by_customer.setdefault(history.shard_of(history.customer_id(item[0]), self._shards), []).append(item)
        return [(shard, pack(items)) for shard, items in by_customer.items()]


class CustomerShardFn(_StateSaver, beam.DoFn):
    """Run the customer core over one customer shard; store its final states; emit the shard's
    examples as columns."""

    def process(self, element):
        shard, parts = element
        with cyclic_gc_paused():
            duplicates, columns = self._examples(parts)
        _metric("duplicates").inc(duplicates)
        _metric("examples").inc(len(columns))
        _metric("fraud_examples").inc(sum(columns.label))
        yield shard, columns

    def _examples(self, parts) -> tuple[int, history.ExampleColumns]:
        result, columns = history.customer_examples(unpack(parts))
        self._save(entity_store.CUSTOMER, result.states)
        return result.duplicates, columns


class WriteExamplesFn(dofn.DoFn):
    """Write one shard of examples as `examples-SSSSS-of-NNNNN.tfrecord` (rewritten whole on retry)."""

    def __init__(self, directory: str, shards: int):
        self._directory = directory
        self._shards = shards

    def process(self, element):
        shard, columns = element
        name = f"examples-{shard:05d}-of-{self._shards:05d}{examples.FILE_SUFFIX}"
        path = FileSystems.join(self._directory, name)
        with cyclic_gc_paused():
            written = examples.write_file(path, examples.encode_columns(columns) if len(columns) else [])
        yield path, written


class Backfill(NamedTuple):
    examples: beam.PCollection  # (shard, history.ExampleColumns)
    rejected: beam.PCollection  # history.Rejected
    files: beam.PCollection  # (path, count)


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> Backfill:
    args = options.view_as(BackfillOptions)
    # Checked here rather than with argparse's `required`: Beam parses every imported options
    # class for any pipeline in the process, so a required flag would break the others.
    if not args.input:
        raise ValueError("--input is required: one or more replay files (local paths or gs://)")
    if not args.examples_out:
        raise ValueError("--examples_out is required: the folder for the TFRecord examples")
    if args.shards < 1:
        raise ValueError("--shards must be at least 1")
    store = None if args.no_state else opts.store_config(options)
    shards = args.shards
    parsed = (
        pipeline
        | "ListInputs" >> beam.Create(list(enumerate(args.input)))
        | "SplitFiles" >> beam.ParDo(SplitFilesFn())
        | "Distribute" >> beam.Reshuffle()
        | "Parse"
        >> beam.ParDo(ParseRangeFn(shards, args.progress_file)).with_outputs(ParseRangeFn.REJECTED, main="events")
    )
    joined = (
        parsed.events
        | "GroupByTerminalShard" >> beam.GroupByKey()
        | "TerminalFeatures" >> beam.ParDo(TerminalShardFn(shards, store))
        | "GroupByCustomerShard" >> beam.GroupByKey()
        | "CustomerFeaturesAndExamples"
        >> beam.ParDo(CustomerShardFn(store)).with_output_types(tuple[int, history.ExampleColumns])
    )
    files = joined | "WriteExamples" >> beam.ParDo(WriteExamplesFn(args.examples_out, shards))
    rejected = parsed[ParseRangeFn.REJECTED]
    _ = (
        rejected
        | "RejectedToJson"
        >> beam.Map(
            lambda r: json.dumps({"input": r.seq[0], "byte_offset": r.seq[1], "kind": r.kind, "error": r.error})
        )
        | "WriteRejected"
        >> beam.io.WriteToText(
            FileSystems.join(args.examples_out, "rejected"),
            file_name_suffix=".jsonl",
            num_shards=1,
            shard_name_template="",
        )
    )
    return Backfill(joined, rejected, files)


class _NoStagingWarning(logging.Filter):
    """Drops the warning every local worker process logs at start-up about a staging folder that a
    local run never has (the job's code is on the worker's path already); it reads like a fault."""

    TEXT = "No semi_persistent_directory found"

    def filter(self, record: logging.LogRecord) -> bool:
        return self.TEXT not in record.getMessage()


WORKER_LOG = "apache_beam.runners.portability.local_job_service"  # where local workers' logs surface


def quiet_local_workers() -> None:
    """Install the filter on the local workers' log (once per process)."""
    worker_log = logging.getLogger(WORKER_LOG)
    if not any(isinstance(f, _NoStagingWarning) for f in worker_log.filters):
        worker_log.addFilter(_NoStagingWarning())


def run(argv: list[str] | None = None) -> PipelineResult:
    """Build and run the backfill (a batch job; on Dataflow this returns once it is submitted)."""
    options = PipelineOptions(argv)
    opts.prepare_local_run(options, streaming=False)
    if opts.is_local(options):
        direct = options.view_as(DirectOptions)
        if direct.direct_num_workers in (None, 0, 1):
            direct.direct_num_workers = 2
            direct.direct_running_mode = "multi_processing"
        quiet_local_workers()
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    return pipeline.run()


def summary(result: PipelineResult) -> dict[str, int]:
    """The backfill's counters by name."""
    from apache_beam.metrics.metric import MetricsFilter

    counters = result.metrics().query(MetricsFilter().with_namespace("backfill"))["counters"]
    totals: dict[str, int] = {}
    for counter in counters:
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + counter.committed
    return totals


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    result = run(argv)
    result.wait_until_finish()
    totals = summary(result)
    totals["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(totals, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1:])
