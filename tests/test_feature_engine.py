"""The feature engine on the real emulators: stream, backfill and a brute-force reference agree.

One simulated history of 60 days serves every test. Each streaming run is the real
`python -m beam_pipelines.featurize` process on its own topics and Bigtable table.
"""

import math

import pytest

from rtml import pubsub_tools, simulator
from rtml.features import FEATURE_NAMES
from tests.feature_reference import reference_features
from tests.feature_runs import (
    StreamingJob,
    bigtable_rows,
    by_id,
    new_table,
    replay_events,
    run_backfill,
    write_replay,
)

pytestmark = [pytest.mark.emulator, pytest.mark.slow]

DAYS = 60
SPLIT_DAY = 30


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    folder = tmp_path_factory.mktemp("history")
    path = folder / "history.jsonl"
    simulator.simulate_to_file(simulator.SimulationConfig(days=DAYS, customers=20, terminals=40, seed=11), path)
    lines = list(pubsub_tools.read_replay(path))
    split_at = next(i for i, line in enumerate(lines) if line.published_at >= f"2026-01-{SPLIT_DAY + 1:02d}")
    first = write_replay(folder / "first.jsonl", lines[:split_at])
    second = write_replay(folder / "second.jsonl", lines[split_at:])
    reference = reference_features(replay_events(path))
    return {"path": path, "lines": lines, "first": first, "second": second, "reference": reference, "folder": folder}


@pytest.fixture(scope="module")
def uninterrupted(services, history, tmp_path_factory):
    """One streaming run over the whole history (shared by the parity and restart tests)."""
    from tests.conftest import make_topics

    topics = make_topics(services)
    table = new_table(services, "parity")
    with StreamingJob(services, topics, table, tmp_path_factory.mktemp("logs") / "parity.log") as job:
        stats = job.publish(history["path"])
        records = job.features(stats.transactions)
        job.settle()
    return {"records": records, "table": table}


def assert_same_features(got: dict, want: dict, ids=None) -> None:
    ids = sorted(want) if ids is None else sorted(ids)
    assert ids, "nothing to compare"
    for tx_id in ids:
        for name in FEATURE_NAMES:
            g, w = got[tx_id][name], want[tx_id][name]
            if "nb_tx" in name or name.startswith("tx_during"):
                assert g == w, (tx_id, name, g, w)
            else:
                assert math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-9), (tx_id, name, g, w)


def test_stream_backfill_and_reference_agree_on_every_transaction(services, history, uninterrupted, tmp_path):
    reference = history["reference"]
    stream = by_id(uninterrupted["records"])
    assert len(uninterrupted["records"]) == len(reference) == len(stream)
    assert_same_features(stream, reference)
    batch = run_backfill(services, [history["path"]], tmp_path / "examples", table=None)
    assert len(batch) == len(reference)
    assert_same_features(batch, reference)
    # the history really exercises the terminal-risk path
    assert sum(1 for f in reference.values() if f["terminal_risk_30d"] > 0) > 10


def test_a_restarted_job_continues_exactly_from_bigtable(services, history, uninterrupted, unique_topics, tmp_path):
    # The first job keeps its entities in Beam state under a key per customer and per terminal, as
    # on Dataflow (--feature_state=beam); the second, like the uninterrupted run, in the process
    # under 16 bucket keys (the local default): each kind continues from the other's table.
    table = new_table(services, "restart")
    with StreamingJob(services, unique_topics, table, tmp_path / "before.log", extra=("--feature_state=beam",)) as job:
        first = job.publish(history["first"])
        before = job.features(first.transactions)
        job.settle()
    assert len(before) == first.transactions
    assert_same_features(by_id(before), by_id(uninterrupted["records"]), ids=by_id(before))
    # A new job has fresh state: everything it knows comes from Bigtable.
    with StreamingJob(services, unique_topics, table, tmp_path / "after.log") as job:
        second = job.publish(history["second"])
        after = job.features(second.transactions)
    assert len(after) == second.transactions
    assert_same_features(by_id(after), by_id(uninterrupted["records"]), ids=by_id(after))


def test_backfill_then_stream_equals_backfill_over_everything(services, history, unique_topics, tmp_path):
    table = new_table(services, "warm")
    run_backfill(services, [history["first"]], tmp_path / "first", table=table)
    with StreamingJob(services, unique_topics, table, tmp_path / "warm.log") as job:
        second = job.publish(history["second"])
        streamed = by_id(job.features(second.transactions))
    everything = run_backfill(services, [history["path"]], tmp_path / "all", table=None)
    assert len(streamed) == second.transactions
    assert_same_features(streamed, everything, ids=streamed)


def test_every_transaction_published_twice_gives_the_features_of_once(services, history, unique_topics, tmp_path):
    lines = [line for line in history["lines"] if line.published_at < "2026-01-16"]
    doubled = []
    for line in lines:
        doubled.append(line)
        if line.kind == "transaction":
            doubled.append(line)
    path = write_replay(tmp_path / "doubled.jsonl", doubled)
    once = reference_features(replay_events(write_replay(tmp_path / "once.jsonl", lines)))
    with StreamingJob(services, unique_topics, new_table(services, "doubled"), tmp_path / "dup.log") as job:
        stats = job.publish(path)
        records = job.features(stats.transactions // 2, timeout_s=300)
    assert stats.transactions == 2 * len(once)
    assert len(records) == len(once), "a duplicate was featured twice"
    assert_same_features(by_id(records), once)


def test_running_the_same_events_twice_leaves_bigtable_rows_identical(services, history, unique_topics, tmp_path):
    lines = [line for line in history["lines"] if line.published_at < "2026-01-11"]
    path = write_replay(tmp_path / "ten_days.jsonl", lines)
    table = new_table(services, "idempotent")
    snapshots = []
    for run in range(2):
        with StreamingJob(services, unique_topics, table, tmp_path / f"run{run}.log") as job:
            stats = job.publish(path)
            if run == 0:
                assert len(job.features(stats.transactions)) == stats.transactions
            job.settle(6)
        snapshots.append(bigtable_rows(services, table))
    batch_table = new_table(services, "idempotent_batch")
    for _ in range(2):
        run_backfill(services, [path], tmp_path / "batch", table=batch_table)
        snapshots.append(bigtable_rows(services, batch_table))
    assert snapshots[0] and snapshots[0] == snapshots[1]
    assert snapshots[2] == snapshots[3]
    # stream and backfill wrote the same cells with the same timestamps
    assert snapshots[0] == snapshots[2]


def test_a_late_transaction_is_counted_at_its_event_time_for_what_follows(services, history, unique_topics, tmp_path):
    lines = [line for line in history["lines"] if line.published_at < "2026-01-11"]
    # Deliver one transaction of a busy customer two positions of that customer later.
    customer = max(
        {line.event["customer_id"] for line in lines if line.kind == "transaction"},
        key=lambda c: sum(1 for line in lines if line.kind == "transaction" and line.event["customer_id"] == c),
    )
    own = [i for i, line in enumerate(lines) if line.kind == "transaction" and line.event["customer_id"] == customer]
    late_index, deliver_after = own[len(own) // 2], own[len(own) // 2 + 2]
    late = lines[late_index]
    reordered = [line for i, line in enumerate(lines) if i != late_index]
    reordered.insert(reordered.index(lines[deliver_after]) + 1, late)
    path = write_replay(tmp_path / "late.jsonl", reordered)
    expected = reference_features(replay_events(path))
    with StreamingJob(services, unique_topics, new_table(services, "late"), tmp_path / "late.log") as job:
        stats = job.publish(path)
        streamed = by_id(job.features(stats.transactions))
    assert_same_features(streamed, expected)
    in_order = history["reference"]
    # Delivered before the late one arrived: it is not counted yet.
    skipped = lines[own[len(own) // 2 + 1]].event["transaction_id"]
    assert streamed[skipped]["customer_nb_tx_30d"] == in_order[skipped]["customer_nb_tx_30d"] - 1
    # Delivered after it: counted at its event time, as if it had come in order.
    follower = lines[own[len(own) // 2 + 3]].event["transaction_id"]
    assert streamed[follower]["customer_nb_tx_30d"] == in_order[follower]["customer_nb_tx_30d"]
