"""Fault injection against the real emulators and the real scoring pipeline (`beam_pipelines.score`).

Each test ends with an exact reconciliation: every transaction is exactly one insight, every bad
message exactly one dead letter, and every insight's features equal a fault-free computation
(the backfill over the same events).
"""

import base64
import json
import os
import re
import signal
import threading
import time

import pytest

from models import loader
from rtml import config, emulators, pubsub_tools, simulator
from rtml.features import FEATURE_NAMES
from rtml.processes import PipelineProcess
from tests.conftest import make_topics
from tests.feature_runs import bigtable_rows, new_table, run_backfill
from tests.pubsub_helpers import collect
from tests.test_serving import check_insight_fields, copy_version, publish_replay, score_args

pytestmark = [pytest.mark.emulator, pytest.mark.slow, pytest.mark.fault]


def _history(tmp_path, days=3, customers=150, seed=13):
    path = tmp_path / "stream.jsonl"
    simulator.simulate_to_file(simulator.SimulationConfig(days=days, customers=customers, terminals=2 * customers, seed=seed), path)
    return path


def _reference(services, path, tmp_path) -> dict[str, dict]:
    """Features of every transaction from the backfill (no Pub/Sub, no faults)."""
    rows = run_backfill(services, [path], tmp_path / "reference", table=None)
    return {tx: {name: row[name] for name in FEATURE_NAMES} for tx, row in rows.items()}


def _reconcile(insights: list[dict], reference: dict[str, dict]) -> None:
    ids = [insight["transaction_id"] for insight in insights]
    assert len(ids) == len(set(ids)), "a transaction was scored twice"
    assert set(ids) == set(reference), f"missing {len(set(reference) - set(ids))}, unexpected {len(set(ids) - set(reference))}"
    for insight in insights:
        _check_features(insight, reference)


def _check_features(insight: dict, reference: dict[str, dict]) -> None:
    for name, value in reference[insight["transaction_id"]].items():
        assert insight["features"][name] == pytest.approx(value, abs=1e-9), (insight["transaction_id"], name)


def _serve(services, tmp_path, trained, name, extra_args=()):
    topics = make_topics(services)
    table = new_table(services, name)
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    copy_version(trained.version, model_dir, "20260301-000000")
    job = PipelineProcess("beam_pipelines.score", [*score_args(services, topics, table, model_dir), *extra_args], tmp_path / "score.log")
    return topics, table, job


def test_a_week_with_a_malformed_flood_and_every_message_delivered_twice(services, trained, tmp_path):
    path = _history(tmp_path, days=7, customers=70)
    reference = _reference(services, path, tmp_path)
    topics, _, job = _serve(services, tmp_path, trained, "fault-flood")
    with job:
        first = publish_replay(services, topics, path, malformed_rate=0.10, seed=1)
        second = publish_replay(services, topics, path, malformed_rate=0.10, seed=1)  # the same messages again
        messages = collect(topics["fraud-insights"] + "-sub", services.project, len(reference), 600, process=job)
        bad = sum(first.malformed.values()) + sum(second.malformed.values())
        dead = collect(topics["dead-letter"] + "-sub", services.project, bad, 120, process=job)
    assert sum(first.malformed.values()) >= 0.08 * first.transactions
    assert len(first.malformed) == len(pubsub_tools.MALFORMED_KINDS)  # every kind of breakage
    insights = [json.loads(m.data) for m in messages]
    _reconcile(insights, reference)
    metadata = json.loads((tmp_path / "models" / "20260301-000000" / loader.METADATA_FILE).read_text())
    for message, insight in zip(messages, insights, strict=True):
        check_insight_fields(insight, dict(message.attributes), metadata)
    assert len(dead) == bad
    for message in dead:
        record = json.loads(message.data)
        assert record["error"] and record["source"] in ("transactions", "fraud-feedback")
        assert base64.b64decode(record["payload_base64"]) is not None and message.attributes["error_kind"]
    assert {m.attributes["error_kind"] for m in dead} >= {"not_json", "missing_field"}
    # Logs at INFO carry no payloads: no ids, no JSON of a message.
    log = (tmp_path / "score.log").read_text(errors="replace")
    assert "INFO" in log
    assert not re.search(r"tx\d{6,}|C\d{4,}|T\d{5,}|\"transaction_id\"|\"amount\"", log)


def _freeze(pgid: int, seconds: float) -> None:
    os.killpg(pgid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.killpg(pgid, signal.SIGCONT)


def test_frozen_bigtable_then_frozen_pubsub_mid_stream_lose_nothing(services, emulator_state, trained, tmp_path):
    path = _history(tmp_path, seed=17)
    reference = _reference(services, path, tmp_path)
    pids = {row["emulator"]: row["pid"] for row in emulators.status(services, state=emulator_state)}
    topics, _, job = _serve(services, tmp_path, trained, "fault-freeze")
    with job:
        replay = threading.Thread(target=publish_replay, args=(services, topics, path), kwargs={"rate": 25.0})
        replay.start()
        subscription = topics["fraud-insights"] + "-sub"
        got = []
        while len(got) < 50:  # the pipeline is up and scoring
            job.check_running()
            pubsub_tools.pull(subscription, services.project, count=50 - len(got), idle_timeout=2.0, on_message=got.append)
        _freeze(pids["bigtable"], 20)
        time.sleep(5)
        _freeze(pids["pubsub"], 20)
        replay.join()
        got += collect(subscription, services.project, len(reference) - len(got), 600, process=job)
    _reconcile([json.loads(m.data) for m in got], reference)


def _held_transactions(services, table) -> list[str]:
    """The transaction ids in the customers' feature state (one `tx` cell each)."""
    return [q.decode() for key, cells in bigtable_rows(services, table).items() if b"#c#" in key for f, q in cells if f == "tx"]


def _unread_transaction_ids(services, subscription: str) -> set[str]:
    """The transactions a subscription still holds, left there for the next reader (leased, then released)."""
    from google.cloud import pubsub_v1

    path = config.subscription_path(services.project, subscription)
    subscriber = pubsub_v1.SubscriberClient()
    found, leases = set(), []
    try:
        while True:
            try:
                received = subscriber.pull(request={"subscription": path, "max_messages": 1000}, timeout=5).received_messages
            except Exception:  # noqa: BLE001 - the emulator answers an empty pull with a deadline error
                received = []
            if not received:
                break
            found |= {json.loads(m.message.data)["transaction_id"] for m in received}
            leases += [m.ack_id for m in received]
        for start in range(0, len(leases), 1000):
            subscriber.modify_ack_deadline(request={"subscription": path, "ack_ids": leases[start : start + 1000], "ack_deadline_seconds": 0})
    finally:
        subscriber.close()
    return found


def test_kill_9_mid_stream_then_a_restart_sought_back_loses_and_repeats_nothing(services, trained, tmp_path):
    """`kill -9` of the scoring process mid-stream loses what it had pulled but not finished (the
    local runner acknowledges before processing). Seeking the input subscriptions back to before
    the crash (`rtml seek`) and starting a new process recovers exactly that: each transaction one
    insight, features exact, each in the feature state once.

    Results go out as each bundle ends, so the process holds pulled messages whose results are
    not out only while it works through a backlog: the stream is offered four times as fast as
    the pipeline scores locally, and the kill comes 2 s into it.

    The one repeat the design allows (README, "Recovery after a crash"): a kill between an
    insight's publication and the Bigtable write of its batch's state (held 2 s here, so there
    are some) leaves the insight out and its transaction out of the state, so the replay scores it
    again. The test reads the state right after the kill and expects a second insight for exactly
    those transactions, none for any other."""
    path = _history(tmp_path, days=6, seed=19)
    reference = _reference(services, path, tmp_path)
    topics, table, job = _serve(services, tmp_path, trained, "fault-kill", ["--state_max_buffering_secs=2"])
    subscription = topics["fraud-insights"] + "-sub"
    # Offered faster than the pipeline scores locally, so it is busy with pulled messages when killed:
    # below capacity it sits idle between bundles, and a kill right after an output can lose nothing.
    replay = threading.Thread(target=publish_replay, args=(services, topics, path), kwargs={"rate": 800.0})
    got = []
    with job:
        stream_began_us = time.time_ns() // 1000
        replay.start()
        while len(got) < 150:  # the pipeline is up and scoring
            job.check_running()
            pubsub_tools.pull(subscription, services.project, count=150 - len(got), idle_timeout=2.0, on_message=got.append)
        time.sleep(2)  # deep in the backlog
        job.kill()
    replay.join()
    pubsub_tools.pull(subscription, services.project, idle_timeout=3.0, on_message=got.append)  # what left before the crash
    scored_before = {json.loads(m.data)["transaction_id"] for m in got}
    unread = _unread_transaction_ids(services, topics["transactions"] + "-sub")
    lost = set(reference) - scored_before - unread  # pulled by the dead process, never scored
    assert lost, "the crash lost nothing in flight, so recovery was not exercised"
    out_not_held = scored_before - set(_held_transactions(services, table))  # killed between publish and state write
    # Back to before the stream's first message: the whole stream was a backlog, so a message
    # published long before the crash may have been pulled just before it (seeking marks what was
    # published before the chosen moment as acknowledged).
    for topic in config.INPUT_TOPICS:
        pubsub_tools.seek(topics[topic] + "-sub", stream_began_us - 1_000_000, services.project)
    restarted = PipelineProcess("beam_pipelines.score", job.args, tmp_path / "restarted.log")
    with restarted:
        got += collect(subscription, services.project, len(reference) + len(out_not_held) - len(got), 600, process=restarted)
        time.sleep(4)  # the last batch's state reaches Bigtable
        held = _held_transactions(services, table)
    after = [json.loads(m.data) for m in got[len(scored_before) :]]
    after_ids = [insight["transaction_id"] for insight in after]
    assert len(after_ids) == len(set(after_ids)), "a transaction was scored twice after the restart"
    repeated = set(after_ids) & scored_before
    assert repeated == out_not_held, "only transactions whose insight was out but not their state are scored again"
    _reconcile([json.loads(m.data) for m in got[: len(scored_before)]] + [i for i in after if i["transaction_id"] not in repeated], reference)
    for insight in after:
        _check_features(insight, reference)  # the repeats too
    assert lost <= {insight["transaction_id"] for insight in after}
    assert sorted(held) == sorted(reference), "the feature state holds each transaction once"
