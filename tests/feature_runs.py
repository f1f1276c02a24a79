"""Helpers that run the real feature paths for tests: the streaming job and the backfill."""

import json
import time
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines import backfill
from beam_pipelines import options as opts
from rtml import config, emulators, events, pubsub_tools
from rtml.processes import PipelineProcess
from tests.pubsub_helpers import collect


def replay_events(path) -> list:
    """The typed events of a replay file, in file order."""
    out = []
    for line in pubsub_tools.read_replay(path):
        data = json.dumps(line.event).encode()
        out.append(events.parse_transaction(data) if line.kind == "transaction" else events.parse_feedback(data))
    return out


def write_replay(path, lines) -> Path:
    """Write replay lines (`ReplayLine` or `(kind, event)` pairs) to `path`."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as handle:
        for line in lines:
            kind, event = (line.kind, line.event) if hasattr(line, "kind") else line
            handle.write(json.dumps({"kind": kind, "event": event}) + "\n")
    return path


def new_table(services, name: str) -> str:
    emulators.ensure_feature_table(services, name)
    return name


def featurize_args(services, topics: dict, table: str) -> list[str]:
    """Options for `beam_pipelines.featurize` on the given topics and feature table."""
    project = services.project
    return [
        f"--project={project}",
        f"--bigtable_table={table}",
        f"--transactions_subscription={config.subscription_path(project, topics['transactions'] + '-sub')}",
        f"--feedback_subscription={config.subscription_path(project, topics['fraud-feedback'] + '-sub')}",
        f"--dead_letter_topic={config.topic_path(project, topics['dead-letter'])}",
        f"--output_topic={config.topic_path(project, topics['features'])}",
    ]


class StreamingJob:
    """`python -m beam_pipelines.featurize` on its own topics and feature table."""

    def __init__(self, services, topics: dict, table: str, log_path, extra: tuple = ()):
        self.services = services
        self.topics = topics
        argv = [*featurize_args(services, topics, table), *extra]
        self.process = PipelineProcess("beam_pipelines.featurize", argv, log_path)

    def __enter__(self):
        self.process.start()
        return self

    def __exit__(self, *exc):
        self.process.stop()

    def publish(self, path) -> pubsub_tools.ReplayStats:
        return pubsub_tools.replay(
            path,
            project=self.services.project,
            transactions_topic=self.topics["transactions"],
            feedback_topic=self.topics["fraud-feedback"],
            progress=False,
        )

    def features(self, expected: int, timeout_s: float = 600.0) -> list[dict]:
        """Feature records read back (all of them, so a test can also count extras)."""
        messages = collect(
            self.topics["features"] + "-sub", self.services.project, expected, timeout_s, process=self.process
        )
        return [json.loads(m.data) for m in messages]

    def settle(self, seconds: float = 4.0) -> None:
        """Give batched Bigtable writes time to flush (they are buffered up to one second)."""
        time.sleep(seconds)


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["transaction_id"]: r["features"] for r in records}


def run_backfill(services, inputs: list, out_dir, table: str | None) -> dict[str, dict]:
    """Run the backfill pipeline in-process; returns its exact (float64) features by transaction id."""
    argv = [f"--input={p}" for p in inputs] + [f"--examples_out={out_dir}", "--shards=4"]
    argv += [f"--project={services.project}", "--direct_num_workers=1", "--direct_running_mode=in_memory"]
    argv += [f"--bigtable_table={table}"] if table else ["--no_state"]
    options = PipelineOptions(argv)
    opts.prepare_local_run(options, streaming=False)
    dump = Path(out_dir) / "features.jsonl"

    def write_rows(element):
        _, columns = element
        with open(dump, "a", encoding="utf-8") as handle:
            for row in columns.rows():
                handle.write(json.dumps(row) + "\n")

    with beam.Pipeline(options=options) as pipeline:
        built = backfill.build(pipeline, options)
        _ = built.examples | "DumpForTest" >> beam.Map(write_rows)
    rows = [json.loads(line) for line in open(dump, encoding="utf-8")]
    return {row["transaction_id"]: row for row in rows}


def bigtable_rows(services, table: str) -> dict:
    """Every cell of a table: {row_key: {(family, qualifier): [(timestamp_us, value), ...]}}."""
    from google.cloud import bigtable

    client = bigtable.Client(project=services.project, admin=True)
    snapshot = {}
    for row in client.instance(services.instance).table(table).read_rows():
        cells = {}
        for family, columns in row.cells.items():
            for qualifier, versions in columns.items():
                cells[(family, qualifier)] = sorted((c.timestamp.timestamp(), c.value) for c in versions)
        snapshot[row.row_key] = cells
    client.close()
    return snapshot
