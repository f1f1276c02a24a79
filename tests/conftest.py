"""Shared fixtures. `services` starts the real Pub/Sub and Bigtable emulators once per session;
`trained` simulates, backfills and trains one small model version once per session."""

import os
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest

from rtml import config, emulators


@pytest.fixture(scope="session")
def emulator_state(tmp_path_factory) -> Path:
    """Where the session's emulators record their process groups (the fault tests signal them)."""
    return tmp_path_factory.mktemp("emulators")


@pytest.fixture(scope="session")
def services(emulator_state) -> config.LocalServices:
    """The local emulators on free ports (so a developer's own `rtml up` is left alone).

    Started and stopped with the same code as `rtml up` / `rtml down`; the test process's
    environment points Google's clients at them for the whole session.
    """
    state = emulator_state
    local = config.LocalServices(
        pubsub_host=f"localhost:{emulators.free_port()}",
        bigtable_host=f"localhost:{emulators.free_port()}",
    )
    emulators.start(local, state=state, log=lambda _text: None)
    saved = {key: os.environ.get(key) for key in local.environ()}
    os.environ.update(local.environ())
    try:
        yield local
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        emulators.stop(state=state, log=lambda _text: None)


def make_topics(services) -> dict[str, str]:
    """Fresh topics and `<topic>-sub` subscriptions, so tests never share messages."""
    from google.cloud import pubsub_v1

    suffix = uuid.uuid4().hex[:8]
    names = {topic: f"{topic}-{suffix}" for topic in config.TOPICS}
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    for base, name in names.items():
        topic_path = config.topic_path(services.project, name)
        publisher.create_topic(request={"name": topic_path})
        sub_path = config.subscription_path(services.project, config.subscription_for(name))
        subscriber.create_subscription(request=emulators.subscription_request(sub_path, topic_path, base))
    subscriber.close()
    return names


@pytest.fixture
def unique_topics(services):
    """Fresh topics for one test."""
    return make_topics(services)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


TRAINING_WINDOW = ("2026-02-16", "2026-02-22")


class Trained(NamedTuple):
    history: Path  # the simulated replay file (56 days, 600 customers)
    examples: Path  # its backfill examples
    model_dir: Path
    version: str  # path of the exported version


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    """A model version exported by `rtml train` from simulated history, as a user would make it."""
    from beam_pipelines import backfill
    from models import loader
    from rtml import cli, simulator

    work = tmp_path_factory.mktemp("trained")
    history = work / "history.jsonl"
    simulator.simulate_to_file(simulator.SimulationConfig(days=56, customers=600, terminals=1200, seed=11), history)
    examples = work / "examples"
    backfill.run(["--input", str(history), "--examples_out", str(examples), "--no_state"]).wait_until_finish()
    model_dir = work / "models"
    argv = ["train", "--examples", str(examples), "--train-start", TRAINING_WINDOW[0], "--train-end", TRAINING_WINDOW[1]]
    assert cli.main([*argv, "--model-dir", str(model_dir), "--quiet"]) == 0
    (version,) = loader.versions(str(model_dir))
    return Trained(history, examples, model_dir, version)
