"""Monitoring end to end on the real emulators: health records from `rtml serve` whose delayed-label
figures equal brute force over a replayed week, then `rtml retrain` changing the served version,
and a worse candidate refused."""

import json
import time
import zlib

import pytest

from models import loader
from rtml import cli, config, pubsub_tools
from rtml.processes import PipelineProcess
from tests.conftest import TRAINING_WINDOW, make_topics
from tests.feature_runs import new_table
from tests.pubsub_helpers import collect, decoded
from tests.test_health import brute_force_labels
from tests.test_serving import publish_replay, score_args

pytestmark = [pytest.mark.emulator, pytest.mark.slow]

WEEK = ("2026-02-05", "2026-02-12")  # a week of the `trained` history whose fraud reports (7 days later) are in it too
PERIOD_S = 3


def _week_of_some_customers(history, out, share: int = 8) -> tuple[list[dict], list[dict]]:
    """The last week's transactions of one customer in `share`, and every report of those
    transactions (reports come days later: some after the week), in publication order:
    (transactions, reports)."""
    transactions, reports = [], []
    with open(history) as source, open(out, "w") as target:
        for line in source:
            record = json.loads(line)
            event = record["event"]
            if not WEEK[0] <= event["event_time"] < WEEK[1] or zlib.crc32(event["customer_id"].encode()) % share:
                continue
            target.write(line)
            (transactions if record["kind"] == "transaction" else reports).append(event)
    return transactions, reports


def _other_customers_transactions(history, share: int = 8) -> list[str]:
    """Last-week transaction lines of the customers `_week_of_some_customers` left out (never published yet)."""
    out = []
    for line in open(history):
        record = json.loads(line)
        if record["kind"] == "transaction" and record["event"]["event_time"] >= WEEK[0] and zlib.crc32(record["event"]["customer_id"].encode()) % share:
            out.append(line)
    return out


def _versions_served(services, topics, job, stream, count: int) -> set[str]:
    publish_replay(services, topics, stream, limit=count)
    return {m["model_version"] for m in decoded(collect(topics["fraud-insights"] + "-sub", services.project, count, 120, process=job))}


def test_health_labels_then_retrain_changes_the_served_version_and_refuses_a_worse_one(services, trained, tmp_path):
    topics = make_topics(services)
    table = new_table(services, "monitoring")
    model_dir = tmp_path / "models"
    common = ["--examples", str(trained.examples), "--model-dir", str(model_dir), "--quiet"]
    weak = ["--model-type", "logistic", "--epochs", "1"]
    window = ["--train-start", TRAINING_WINDOW[0], "--train-end", TRAINING_WINDOW[1]]
    assert cli.main(["train", *common, *window, *weak, "--version", "20260101-000000"]) == 0

    stream = tmp_path / "week.jsonl"
    transactions, reports = _week_of_some_customers(trained.history, stream)
    assert len(transactions) > 500 and any(r["is_fraud"] for r in reports)
    health_topic = config.topic_path(services.project, topics[config.HEALTH_TOPIC])
    args = score_args(services, topics, table, model_dir) + [
        f"--health_topic={health_topic}",
        f"--health_period_secs={PERIOD_S}",
        f"--health_window_secs={10 * PERIOD_S}",
        "--health_min_events=50",
    ]
    health_sub = topics[config.HEALTH_TOPIC] + "-sub"
    with PipelineProcess("beam_pipelines.score", args, tmp_path / "score.log") as job:
        publish_replay(services, topics, stream)
        insights = decoded(collect(topics["fraud-insights"] + "-sub", services.project, len(transactions), 600, process=job))
        assert sorted(i["transaction_id"] for i in insights) == sorted(t["transaction_id"] for t in transactions)
        expected = brute_force_labels(insights, reports)
        assert set(expected) == {"20260101-000000"}
        assert expected["20260101-000000"]["reported_frauds"] >= 3, expected

        # Health records: the last one must carry exactly the brute-force label figures.
        records, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            job.check_running()
            pubsub_tools.pull(health_sub, services.project, count=1, idle_timeout=2 * PERIOD_S, on_message=records.append)
            if records and json.loads(records[-1].data)["labels"] == expected["20260101-000000"]:
                break
        health = decoded(records)
        assert health, "no health record"
        last = health[-1]
        assert last["labels"] == expected["20260101-000000"], (last["labels"], expected)
        assert all(r["labels"]["scored"] <= len(insights) for r in health)
        assert max(r["events"] for r in health) >= 50 and any(r["psi"] for r in health)
        # Publish-to-insight latency locally is tens of milliseconds at least, never the 0 ms bucket.
        busy = [r for r in health if r["events"]]
        assert all(5 < r["latency_ms"]["p50"] <= r["latency_ms"]["p99"] < 600_000 for r in busy), [r["latency_ms"] for r in busy]
        assert {r["model_version"] for r in health} == {"20260101-000000"}
        assert records[-1].attributes == {"model_version": "20260101-000000", "alarm": "drift" if last["drifted"] else "none"}

        retrain = ["retrain", "--input", str(trained.history), "--model-dir", str(model_dir), "--days", "21", "--quiet"]
        retrain += ["--project", services.project, "--bigtable-emulator", services.bigtable_host, "--pubsub-emulator", services.pubsub_host]
        assert cli.main([*retrain, "--version", "20260102-000000"]) == 0
        refused_dir = model_dir / ".refused"
        assert [v.rsplit("/", 1)[-1] for v in loader.versions(str(model_dir))] == ["20260101-000000", "20260102-000000"]
        published = loader.read_metadata(str(model_dir / "20260102-000000"))["publish_guard"]
        assert published["published"] and published["serving_version"] == "20260101-000000"
        assert published["candidate"] >= published["serving"]

        # The running job switches to the new version (it looks every 2 s).
        more = tmp_path / "more.jsonl"
        served = set()
        deadline = time.monotonic() + 90
        offset = 0
        lines = _other_customers_transactions(trained.history)
        while served != {"20260102-000000"} and time.monotonic() < deadline:
            more.write_text("".join(lines[offset : offset + 20]))
            offset += 20
            served = _versions_served(services, topics, job, more, 20)

        assert served == {"20260102-000000"}

        cli_exit = cli.main([*retrain, *weak, "--version", "20260103-000000"])
        assert cli_exit == cli.RETRAIN_REFUSED
        refused = loader.read_metadata(str(refused_dir / "20260103-000000"))["publish_guard"]
        assert not refused["published"] and refused["serving_version"] == "20260102-000000"
        assert refused["candidate"] < refused["serving"]
        assert [v.rsplit("/", 1)[-1] for v in loader.versions(str(model_dir))] == ["20260101-000000", "20260102-000000"]
        time.sleep(5)  # more than the poll interval: a refused version would have been picked up by now
        more.write_text("".join(lines[offset : offset + 20]))
        assert _versions_served(services, topics, job, more, 20) == {"20260102-000000"}
