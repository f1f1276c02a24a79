"""Local defaults shared by the CLI, the emulator manager and the pipelines.

Every command talks to the local emulators unless told otherwise; these are the names and ports
the public contract fixes for that local setup.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_PROJECT = "rtml-local"
DEFAULT_BIGTABLE_INSTANCE = "rtml-local"
DEFAULT_PUBSUB_HOST = "localhost:8085"
DEFAULT_BIGTABLE_HOST = "localhost:8086"

TRANSACTIONS_TOPIC = "transactions"
FEEDBACK_TOPIC = "fraud-feedback"
INSIGHTS_TOPIC = "fraud-insights"
DEAD_LETTER_TOPIC = "dead-letter"
# Not in the contract: where the validation pipeline (`beam_pipelines.validate`) publishes the
# typed events it accepted. Used by the demo, the tests and the passthrough benchmark.
VALIDATED_TOPIC = "validated"
# Not in the contract: where the feature pipeline (`beam_pipelines.featurize`) publishes each
# transaction with its reference features.
FEATURES_TOPIC = "features"
# Not in the contract: where the scoring pipeline publishes its health records (`rtml.health`),
# which `rtml top` shows.
HEALTH_TOPIC = "model-health"

TOPICS = (TRANSACTIONS_TOPIC, FEEDBACK_TOPIC, INSIGHTS_TOPIC, DEAD_LETTER_TOPIC, VALIDATED_TOPIC, FEATURES_TOPIC, HEALTH_TOPIC)

# The input topics. Their subscriptions keep acknowledged messages (for 7 days), so a pipeline
# can be replayed from a point in time: `rtml seek`, after a crash of a local run.
INPUT_TOPICS = (TRANSACTIONS_TOPIC, FEEDBACK_TOPIC)

FEATURES_TABLE = "features"
# Column families of the feature table and their garbage-collection max age in days: the
# longest feature window (30 days) plus the feedback delay (7 days), with a day of margin.
FEATURE_FAMILIES: dict[str, float] = {"tx": 38.0, "fb": 38.0}


def subscription_for(topic: str) -> str:
    """The contract names every subscription `<topic>-sub`."""
    return f"{topic}-sub"


def topic_path(project: str, topic: str) -> str:
    return f"projects/{project}/topics/{topic}"


def subscription_path(project: str, subscription: str) -> str:
    return f"projects/{project}/subscriptions/{subscription}"


def resolve_subscription(project: str, subscription: str) -> str:
    """A subscription given by name (in `project`) or already as a full path."""
    return subscription if subscription.startswith("projects/") else subscription_path(project, subscription)


def state_dir() -> str:
    """Where `rtml up` records the processes it started (`RTML_HOME`, else ~/.rtml)."""
    return os.environ.get("RTML_HOME") or os.path.join(os.path.expanduser("~"), ".rtml")


@dataclass(frozen=True)
class LocalServices:
    """Where the local emulators listen, and the project and instance they serve."""

    pubsub_host: str = DEFAULT_PUBSUB_HOST
    bigtable_host: str = DEFAULT_BIGTABLE_HOST
    project: str = DEFAULT_PROJECT
    instance: str = DEFAULT_BIGTABLE_INSTANCE
    topics: tuple[str, ...] = field(default=TOPICS)

    def environ(self) -> dict[str, str]:
        """Environment variables that point Google's client libraries at these emulators."""
        return {
            "PUBSUB_EMULATOR_HOST": self.pubsub_host,
            "PUBSUB_PROJECT_ID": self.project,
            "BIGTABLE_EMULATOR_HOST": self.bigtable_host,
        }
