"""Pipeline options shared by the pipelines, and the local-runner and emulator defaults.

Run locally (no `--runner`, or `--runner=DirectRunner`) a pipeline talks to the local emulators
and uses the local runner that supports it: Beam's bundle-based DirectRunner for streaming and
the FnApiRunner for batch. (The plain DirectRunner would first try the Prism runner, which
downloads a binary.) On any other runner nothing is pointed at an emulator unless asked.
"""

import argparse
import logging
import os

from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions

from rtml import config

_LOG = logging.getLogger(__name__)
# How long results' feature state waits to be written together (`--state_max_buffering_secs`).
# The results themselves are out by then; a local crash makes a replay publish again those of
# this last stretch. 0.25 s against 0.1 s: 240.4 and 239.9 against 229.8 and 232.5 events/s
# (scoring, 3,000 transactions at once, runs alternated; BENCHMARKS.md).
STATE_MAX_BUFFERING_SECS = 0.25
LOCAL_RUNNERS = {"directrunner", "direct", "bundlebaseddirectrunner", "fnapirunner", "switchingdirectrunner"}


class LocalServiceOptions(PipelineOptions):
    """Where Pub/Sub and Bigtable are: the local emulators by default when run locally."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--pubsub_emulator_host",
            default=None,
            help="host:port of a Pub/Sub emulator. Default for local runners: $PUBSUB_EMULATOR_HOST, "
            f"else {config.DEFAULT_PUBSUB_HOST}. Pass 'none' to use real Pub/Sub.",
        )
        parser.add_argument(
            "--bigtable_emulator_host",
            default=None,
            help="host:port of a Bigtable emulator. Default for local runners: $BIGTABLE_EMULATOR_HOST, "
            f"else {config.DEFAULT_BIGTABLE_HOST}. Pass 'none' to use real Bigtable.",
        )


class StreamingIOOptions(PipelineOptions):
    """The Pub/Sub inputs and the dead-letter output of a streaming pipeline."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--transactions_subscription",
            default=None,
            help="Subscription with transactions, projects/P/subscriptions/S "
            f"(default: the project's {config.subscription_for(config.TRANSACTIONS_TOPIC)}).",
        )
        parser.add_argument(
            "--feedback_subscription",
            default=None,
            help="Subscription with fraud feedback, projects/P/subscriptions/S "
            f"(default: the project's {config.subscription_for(config.FEEDBACK_TOPIC)}).",
        )
        parser.add_argument(
            "--dead_letter_topic",
            default=None,
            help=f"Topic for rejected messages, projects/P/topics/T (default: the project's {config.DEAD_LETTER_TOPIC}).",
        )
        parser.add_argument(
            "--id_label",
            default=None,
            help="Pub/Sub attribute holding a unique message id, for deduplication on Dataflow "
            "(e.g. transaction_id). Off by default: local runners do not support it.",
        )
        parser.add_argument(
            "--timestamp_attribute",
            default=None,
            help="Pub/Sub attribute holding the element timestamp, on Dataflow only. Off by default.",
        )


class OutputTopicOptions(PipelineOptions):
    """The topic a streaming pipeline publishes its results to (one flag shared by all of them:
    Beam parses every imported options class, so two classes may not both define it)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--output_topic",
            default=None,
            help="Topic for the pipeline's results, projects/P/topics/T (default: the project's topic for "
            f"the pipeline: {config.VALIDATED_TOPIC} for validate, {config.FEATURES_TOPIC} for featurize, "
            f"{config.INSIGHTS_TOPIC} for score).",
        )
        parser.add_argument(
            "--state_max_buffering_secs",
            type=float,
            default=STATE_MAX_BUFFERING_SECS,
            help="featurize and score: results are published as each bundle ends; their feature state waits "
            "this long, in seconds, to go to Bigtable in one request with others', once Pub/Sub has "
            "acknowledged them. Longer means fewer requests, and more results published again by a replay "
            "after a local crash (default: %(default)s).",
        )
        parser.add_argument("--publish_max_buffering_secs", type=float, default=None, help=argparse.SUPPRESS)


def resolve_output_topic(options: PipelineOptions, default_topic: str) -> str:
    """`--output_topic`, or the project's `default_topic`; checked for shape (and the buffering time)."""
    output = options.view_as(OutputTopicOptions)
    if output.publish_max_buffering_secs is not None:
        raise ValueError(
            "--publish_max_buffering_secs is gone: results are published as each bundle ends, and "
            "--state_max_buffering_secs sets how long their feature state waits to be written"
        )
    if output.state_max_buffering_secs <= 0:
        raise ValueError("--state_max_buffering_secs must be > 0")
    if output.output_topic is None:
        output.output_topic = config.topic_path(project_of(options), default_topic)
    _check_path("output_topic", output.output_topic, "topics")
    return output.output_topic


class BigtableOptions(PipelineOptions):
    """The Bigtable table holding per-entity feature state."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--bigtable_instance",
            default=config.DEFAULT_BIGTABLE_INSTANCE,
            help="Bigtable instance with the feature table (default: %(default)s).",
        )
        parser.add_argument(
            "--bigtable_table",
            default=config.FEATURES_TABLE,
            help="Feature-state table; create it with `rtml up` or templates/setup_gcp.sh (default: %(default)s).",
        )


# Keys of the feature steps on the local streaming runner (`--feature_state=process`).
LOCAL_FEATURE_BUCKETS = 16


class FeatureStateOptions(PipelineOptions):
    """Where the streaming feature steps keep each customer's and terminal's state between events."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--feature_state",
            choices=("beam", "process"),
            default=None,
            help="featurize and score: 'beam' keeps each customer's and terminal's state in Beam state under a "
            "key of its own (any runner); 'process' keeps it in the memory of the local runner's one process, "
            f"the steps' keys being {LOCAL_FEATURE_BUCKETS} buckets of them: that runner scans every key of a "
            "stateful step after every bundle. Bigtable holds it durably either way. Default: process on the "
            "local streaming runner, beam elsewhere.",
        )


def feature_buckets(options: PipelineOptions) -> int:
    """The feature steps' buckets of entities (0: a key per entity, Beam state); see `--feature_state`."""
    chosen = options.view_as(FeatureStateOptions).feature_state
    standard = options.view_as(StandardOptions)
    one_process = is_local(options) and standard.streaming and (standard.runner or "").lower() != "fnapirunner"
    if chosen == "process" and not one_process:
        raise ValueError(
            "--feature_state=process needs the local streaming runner, where one process handles every key; "
            "use --feature_state=beam"
        )
    if chosen == "beam" or (chosen is None and not one_process):
        return 0
    return LOCAL_FEATURE_BUCKETS


def store_config(options: PipelineOptions):
    """The feature store settings of these options (a `transforms.features.StoreConfig`)."""
    from transforms.features import StoreConfig

    bigtable = options.view_as(BigtableOptions)
    return StoreConfig(project_of(options), bigtable.bigtable_instance, bigtable.bigtable_table)


def run_streaming(build, argv: list[str] | None = None):
    """Build a streaming pipeline with `build(pipeline, options)` and start it without waiting."""
    import apache_beam as beam

    options = PipelineOptions(argv)
    prepare_local_run(options, streaming=True)
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    return pipeline.run()


def streaming_main(build, argv: list[str] | None = None) -> None:
    """Command-line entry of a streaming pipeline: locally it runs until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_streaming(build, argv)
    if is_local(PipelineOptions(argv)):
        try:
            result.wait_until_finish()
        except KeyboardInterrupt:
            _LOG.info("interrupted: stopping the pipeline")
            result.cancel()


def is_local(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner
    return runner is None or (isinstance(runner, str) and runner.lower() in LOCAL_RUNNERS)


def project_of(options: PipelineOptions) -> str:
    """The Google Cloud project, `rtml-local` when running locally without one."""
    gcp = options.view_as(GoogleCloudOptions)
    if gcp.project is None and is_local(options):
        gcp.project = config.DEFAULT_PROJECT
    if not gcp.project:
        raise ValueError("--project is required when running outside the local runners")
    return gcp.project


def prepare_local_run(options: PipelineOptions, streaming: bool) -> None:
    """Pick the local runner and point client libraries at the emulators (local runs only).

    Called before the graph is built. Sets `streaming` as given, replaces `DirectRunner` (or no
    runner) with the local runner that supports the mode, and exports the emulator hosts into
    this process's environment, where Google's client libraries read them.
    """
    standard = options.view_as(StandardOptions)
    standard.streaming = streaming
    if not is_local(options):
        hosts = options.view_as(LocalServiceOptions)
        _export("PUBSUB_EMULATOR_HOST", hosts.pubsub_emulator_host)
        _export("BIGTABLE_EMULATOR_HOST", hosts.bigtable_emulator_host)
        return
    if standard.runner is None or standard.runner.lower() in {"directrunner", "direct", "switchingdirectrunner"}:
        standard.runner = "BundleBasedDirectRunner" if streaming else "FnApiRunner"
        _LOG.info("running locally on %s", standard.runner)
    project_of(options)
    hosts = options.view_as(LocalServiceOptions)
    _export(
        "PUBSUB_EMULATOR_HOST",
        _local_host(hosts.pubsub_emulator_host, "PUBSUB_EMULATOR_HOST", config.DEFAULT_PUBSUB_HOST),
    )
    _export(
        "BIGTABLE_EMULATOR_HOST",
        _local_host(hosts.bigtable_emulator_host, "BIGTABLE_EMULATOR_HOST", config.DEFAULT_BIGTABLE_HOST),
    )
    if streaming and standard.runner == "BundleBasedDirectRunner" and os.environ.get("PUBSUB_EMULATOR_HOST"):
        shorten_emulator_pulls()


# The Pub/Sub emulator holds a pull on an empty subscription until about 0.95 s before the RPC's
# deadline, and the bundle-based DirectRunner pulls with a 30 s deadline on its only worker
# thread. An idle subscription (fraud feedback is rare) would then stall every other step for
# 29 s per poll. Locally against the emulator we cap that deadline at 0.5 s, so an empty pull
# returns at once: measured on the emulator, an empty pull took 2 to 5 ms with a 0.5 s or 0.9 s
# deadline, 55 ms with 1.0 s and 256 ms with 1.2 s; a pull with messages 2 to 4 ms. The runner
# polls both subscriptions between waves of work, so those 55 ms per wave were a third of the
# scoring pipeline's time and half the validation pipeline's. Beam's behaviour is otherwise
# unchanged: at most 10 messages per bundle, acknowledged before processing.
EMULATOR_PULL_DEADLINE_S = 0.5


class _ShortPullClient:
    """Delegates to a SubscriberClient, capping the deadline of `pull`.

    A pull that runs out of that short deadline, or finds the emulator unavailable (stopped,
    frozen, restarting), answers "no messages" instead of raising: the local reader would
    otherwise end the pipeline, and it simply pulls again on its next poll.
    """

    def __init__(self, client):
        self._client = client

    def pull(self, *args, timeout=None, **kwargs):
        from google.api_core import exceptions
        from google.pubsub_v1.types import PullResponse

        capped = EMULATOR_PULL_DEADLINE_S if timeout is None else min(timeout, EMULATOR_PULL_DEADLINE_S)
        try:
            return self._client.pull(*args, timeout=capped, **kwargs)
        except (exceptions.DeadlineExceeded, exceptions.ServiceUnavailable) as err:
            _LOG.warning("Pub/Sub pull failed (%s); pulling again on the next poll", type(err).__name__)
            return PullResponse()

    def __getattr__(self, name):
        return getattr(self._client, name)


def shorten_emulator_pulls() -> bool:
    """Cap the local runner's Pub/Sub pull deadline (see above); False if Beam's layout differs."""
    try:
        from apache_beam.runners.direct.transform_evaluator import _PubSubReadEvaluator
    except ImportError:
        _LOG.warning("cannot shorten emulator pulls: Beam's DirectRunner Pub/Sub reader was not found")
        return False
    current = _PubSubReadEvaluator.__dict__.get("_get_subscriber_client")
    if not isinstance(current, classmethod):
        _LOG.warning("cannot shorten emulator pulls: unexpected DirectRunner Pub/Sub reader")
        return False
    if getattr(current.__func__, "_rtml_short_pull", False):
        return True
    original = current.__func__

    def short_pull_client(cls, transform):
        return _ShortPullClient(original(cls, transform))

    short_pull_client._rtml_short_pull = True
    _PubSubReadEvaluator._get_subscriber_client = classmethod(short_pull_client)
    _LOG.info("local run on the Pub/Sub emulator: pull deadline capped at %.2f s", EMULATOR_PULL_DEADLINE_S)
    return True


def resolve_streaming_io(options: PipelineOptions) -> StreamingIOOptions:
    """Fill the Pub/Sub paths left unset with the project's contract names."""
    io = options.view_as(StreamingIOOptions)
    project = project_of(options)
    if io.transactions_subscription is None:
        io.transactions_subscription = config.subscription_path(
            project, config.subscription_for(config.TRANSACTIONS_TOPIC)
        )
    if io.feedback_subscription is None:
        io.feedback_subscription = config.subscription_path(project, config.subscription_for(config.FEEDBACK_TOPIC))
    if io.dead_letter_topic is None:
        io.dead_letter_topic = config.topic_path(project, config.DEAD_LETTER_TOPIC)
    for name in ("transactions_subscription", "feedback_subscription"):
        _check_path(name, getattr(io, name), "subscriptions")
    _check_path("dead_letter_topic", io.dead_letter_topic, "topics")
    if is_local(options) and (io.id_label or io.timestamp_attribute):
        raise ValueError("--id_label and --timestamp_attribute work only on Dataflow; leave them unset for local runs")
    return io


def true_or_false(text: str) -> bool:
    """A boolean option's value: true/false (also 1/0, yes/no), as a Flex Template passes it."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_switch(parser, flag: str, help: str) -> None:
    """A boolean option that is off by default: `--flag` alone, or `--flag=true|false` as Flex Templates pass it."""
    parser.add_argument(flag, type=true_or_false, nargs="?", const=True, default=False, help=help)


def check_topic_path(name: str, value: str) -> None:
    """Raise if `--name` is not a `projects/PROJECT/topics/NAME` path."""
    _check_path(name, value, "topics")


def _check_path(name: str, value: str, kind: str) -> None:
    parts = value.split("/")
    if len(parts) != 4 or parts[0] != "projects" or parts[2] != kind or not parts[1] or not parts[3]:
        raise ValueError(f"--{name} must look like projects/PROJECT/{kind}/NAME, got {value!r}")


def _local_host(flag: str | None, env_name: str, default: str) -> str | None:
    if flag is not None:
        return flag
    return os.environ.get(env_name) or default


def _export(env_name: str, host: str | None) -> None:
    if host is None:
        return
    if host.lower() == "none":
        os.environ.pop(env_name, None)
    else:
        os.environ[env_name] = host


class ModelDirOptions(PipelineOptions):
    """Where exported model versions live (one flag shared by training and scoring)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--model_dir",
            default=None,
            help="Folder of exported model versions, local or gs://; each version is a sub-folder "
            "<version>/ with saved_model/, report/ and metadata.json. Required.",
        )
