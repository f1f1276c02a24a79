"""`rtml up | down | status` on the real emulators, and the messages for a machine that lacks them."""

import os
import subprocess
import time

import pytest

from rtml import config, emulators

pytestmark = pytest.mark.emulator


@pytest.fixture(scope="module")
def own_emulators(tmp_path_factory):
    """A second pair of emulators with their own state folder, for lifecycle tests."""
    state = tmp_path_factory.mktemp("lifecycle")
    local = config.LocalServices(
        pubsub_host=f"localhost:{emulators.free_port()}", bigtable_host=f"localhost:{emulators.free_port()}"
    )
    records = emulators.start(local, state=state, log=lambda _t: None)
    yield local, state, records
    emulators.stop(state=state, log=lambda _t: None)


def test_up_creates_every_topic_subscription_and_the_feature_table(own_emulators):
    from google.cloud import bigtable, pubsub_v1

    local, _, _ = own_emulators
    with emulators.emulator_environment(local):
        publisher = pubsub_v1.PublisherClient()
        topics = {t.name for t in publisher.list_topics(request={"project": f"projects/{local.project}"})}
        subscriber = pubsub_v1.SubscriberClient()
        subs = {
            s.name: s.topic for s in subscriber.list_subscriptions(request={"project": f"projects/{local.project}"})
        }
        subscriber.close()
        client = bigtable.Client(project=local.project, admin=True)
        table = client.instance(local.instance).table(config.FEATURES_TABLE)
        families = table.list_column_families()
    for topic in ("transactions", "fraud-feedback", "fraud-insights", "dead-letter"):
        assert config.topic_path(local.project, topic) in topics
        sub = config.subscription_path(local.project, f"{topic}-sub")
        assert subs[sub] == config.topic_path(local.project, topic)
    assert set(families) == set(config.FEATURE_FAMILIES)
    for name, days in config.FEATURE_FAMILIES.items():
        assert families[name].gc_rule.max_age.total_seconds() == days * 86400


def test_up_again_reuses_the_running_emulators_and_is_idempotent(own_emulators):
    local, state, records = own_emulators
    messages = []
    again = emulators.start(local, state=state, log=messages.append)
    assert {n: r["pid"] for n, r in again.items()} == {n: r["pid"] for n, r in records.items()}
    assert any("already running" in m for m in messages)


def test_status_reports_running_and_answering(own_emulators):
    local, state, records = own_emulators
    rows = {row["emulator"]: row for row in emulators.status(local, state=state)}
    assert rows["pubsub"]["running"] and rows["pubsub"]["answering"]
    assert rows["bigtable"]["pid"] == records["bigtable"]["pid"]


def test_up_refuses_a_port_held_by_another_process(tmp_path, own_emulators):
    local, _, _ = own_emulators
    # The emulators of `own_emulators` hold these ports, but this state folder did not start them.
    with pytest.raises(emulators.EmulatorError, match="already in use"):
        emulators.start(local, state=tmp_path, log=lambda _t: None)


def test_down_stops_exactly_the_recorded_processes_and_never_by_name(tmp_path):
    local = config.LocalServices(
        pubsub_host=f"localhost:{emulators.free_port()}", bigtable_host=f"localhost:{emulators.free_port()}"
    )
    # A decoy whose name looks like an emulator: `down` must leave it alone.
    decoy = subprocess.Popen(["bash", "-c", "exec -a cbtemulator sleep 300"])
    try:
        records = emulators.start(local, state=tmp_path, log=lambda _t: None)
        stopped = emulators.stop(state=tmp_path, log=lambda _t: None)
        assert sorted(stopped) == ["bigtable", "pubsub"]
        for record in records.values():
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{record['pid']}") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not os.path.exists(f"/proc/{record['pid']}") or emulators._is_zombie(record["pid"])
        assert decoy.poll() is None
        assert not (tmp_path / emulators.STATE_FILE).exists()
        assert emulators.stop(state=tmp_path, log=lambda _t: None) == []
    finally:
        decoy.kill()
        decoy.wait()


def test_down_does_not_signal_a_recycled_pid(tmp_path):
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        emulators._save(tmp_path, {"pubsub": {"pid": stranger.pid, "start_ticks": 1, "host": "localhost:1"}})
        assert emulators.stop(state=tmp_path, log=lambda _t: None) == []
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_missing_components_are_named_with_how_to_install(tmp_path):
    (tmp_path / "platform").mkdir()
    with pytest.raises(emulators.EmulatorError) as caught:
        emulators.emulators(config.LocalServices(), root=tmp_path)
    text = str(caught.value)
    assert "Pub/Sub emulator" in text and "gcloud components install pubsub-emulator" in text
    assert "Bigtable emulator" in text and "gcloud components install bigtable" in text


def test_missing_java_is_named_with_how_to_install(monkeypatch):
    root = emulators.sdk_root()
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(emulators.shutil, "which", lambda name: None)
    with pytest.raises(emulators.EmulatorError, match="Java 11 or newer.*openjdk"):
        emulators.emulators(config.LocalServices(), root=root)
