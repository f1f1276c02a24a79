"""`beam_pipelines.score` on the real emulators: a replayed week end to end, and live model updates."""

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from models import loader
from rtml import config, events, pubsub_tools, simulator
from rtml.processes import PipelineProcess
from tests.conftest import make_topics
from tests.feature_runs import new_table
from tests.pubsub_helpers import collect

pytestmark = [pytest.mark.emulator, pytest.mark.slow]


def score_args(services, topics: dict, table: str, model_dir, poll_secs: float = 2.0) -> list[str]:
    project = services.project
    return [
        f"--project={project}",
        f"--bigtable_table={table}",
        f"--model_dir={model_dir}",
        f"--model_poll_secs={poll_secs}",
        f"--transactions_subscription={config.subscription_path(project, topics['transactions'] + '-sub')}",
        f"--feedback_subscription={config.subscription_path(project, topics['fraud-feedback'] + '-sub')}",
        f"--dead_letter_topic={config.topic_path(project, topics['dead-letter'])}",
        f"--output_topic={config.topic_path(project, topics['fraud-insights'])}",
    ]


def copy_version(source: str, model_dir: Path, name: str) -> Path:
    """Publish a copy of an exported version under a new name (metadata is not part of the hashes)."""
    staging = model_dir / f".{name}.partial"
    shutil.copytree(source, staging)
    metadata = json.loads((staging / loader.METADATA_FILE).read_text())
    metadata["version"] = name
    (staging / loader.METADATA_FILE).write_text(json.dumps(metadata))
    staging.rename(model_dir / name)
    return model_dir / name


def publish_replay(services, topics, path, **kwargs):
    """Publish a replay file to a test's own input topics."""
    return pubsub_tools.replay(
        path,
        project=services.project,
        transactions_topic=topics["transactions"],
        feedback_topic=topics["fraud-feedback"],
        progress=False,
        **kwargs,
    )


def check_insight_fields(insight: dict, attributes: dict, metadata: dict) -> None:
    """One insight against the contract and the serving version's metadata."""
    thresholds = metadata["thresholds"]
    assert insight["model_version"] == metadata["version"]
    assert 0.0 <= insight["score"] <= 1.0
    expected = "decline" if insight["score"] >= thresholds["decline"] else (
        "review" if insight["score"] >= thresholds["review"] else "approve")
    assert insight["decision"] == expected
    assert set(insight["features"]) == set(metadata["feature_names"])
    assert len(insight["reasons"]) <= 3 and all(r["contribution"] > 0 for r in insight["reasons"])
    assert [r["contribution"] for r in insight["reasons"]] == sorted((r["contribution"] for r in insight["reasons"]), reverse=True)
    assert insight["processed_at"].endswith("Z")
    assert attributes == {
        "transaction_id": insight["transaction_id"],
        "decision": insight["decision"],
        "model_version": insight["model_version"],
    }


@pytest.mark.fault
def test_a_new_version_is_picked_up_live_and_a_tampered_one_is_refused(services, trained, tmp_path):
    topics = make_topics(services)
    table = new_table(services, "score-swap")
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    copy_version(trained.version, model_dir, "20260301-000001")
    stream = tmp_path / "stream.jsonl"
    simulator.simulate_to_file(simulator.SimulationConfig(days=4, customers=250, terminals=500, seed=8), stream)
    transactions = {line.event["transaction_id"] for line in pubsub_tools.read_replay(stream) if line.kind == "transaction"}
    log = tmp_path / "score.log"
    published = {}
    with PipelineProcess("beam_pipelines.score", score_args(services, topics, table, model_dir), log) as job:
        replay = threading.Thread(target=publish_replay, args=(services, topics, stream), kwargs={"rate": 30.0})  # about 66 s of traffic
        replay.start()
        subscription = topics["fraud-insights"] + "-sub"
        first = []  # wait until the first version is serving
        deadline = time.monotonic() + 300
        while len(first) < 30 and time.monotonic() < deadline:
            job.check_running()
            pubsub_tools.pull(subscription, services.project, count=30 - len(first), idle_timeout=2.0, on_message=first.append)
        copy_version(trained.version, model_dir, "20260301-000002")
        published["v2"] = time.time()
        time.sleep(10)
        broken = copy_version(trained.version, model_dir, "20260301-000003")
        variables = next((broken / "saved_model" / "variables").glob("variables.data-*"))
        data = bytearray(variables.read_bytes())
        data[0] ^= 0xFF
        # Tampered after publication: the hashes no longer match.
        variables.write_bytes(bytes(data))
        replay.join()
        rest = collect(subscription, services.project, len(transactions) - len(first), 600, process=job)
    insights = [json.loads(m.data) for m in first + rest]
    ids = [insight["transaction_id"] for insight in insights]
    assert len(ids) == len(set(ids)) == len(transactions)
    by_time = sorted(insights, key=lambda i: i["processed_at"])
    versions = [insight["model_version"] for insight in by_time]
    assert set(versions) == {"20260301-000001", "20260301-000002"}
    switch = versions.index("20260301-000002")
    assert set(versions[switch:]) == {"20260301-000002"}, "once switched, the old version never scores again"
    first_v2 = events.parse_timestamp(by_time[switch]["processed_at"], "processed_at") / 1e6
    assert first_v2 - published["v2"] < 60, "the contract: a new version serves within 60 s"
    refusals = [line for line in log.read_text().splitlines() if "refused" in line]
    assert any("20260301-000003" in line and "sha256 mismatch" in line for line in refusals), refusals
