"""Local-run defaults: runner choice, emulator hosts, contract names, option validation."""

import os

import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_pipelines import options as opts


@pytest.fixture
def clean_env(monkeypatch):
    for key in ("PUBSUB_EMULATOR_HOST", "BIGTABLE_EMULATOR_HOST"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize(
    "argv, streaming, runner",
    [
        ([], True, "BundleBasedDirectRunner"),
        ([], False, "FnApiRunner"),
        (["--runner=DirectRunner"], True, "BundleBasedDirectRunner"),
        (["--runner=DirectRunner"], False, "FnApiRunner"),
        (["--runner=FnApiRunner"], False, "FnApiRunner"),
    ],
)
def test_local_runs_never_fall_through_to_prism(clean_env, argv, streaming, runner):
    options = PipelineOptions(argv)
    opts.prepare_local_run(options, streaming=streaming)
    assert options.view_as(StandardOptions).runner == runner
    assert options.view_as(StandardOptions).streaming is streaming


def test_local_runs_default_to_the_local_emulators_and_project(clean_env):
    options = PipelineOptions([])
    opts.prepare_local_run(options, streaming=False)
    assert os.environ["PUBSUB_EMULATOR_HOST"] == "localhost:8085"
    assert os.environ["BIGTABLE_EMULATOR_HOST"] == "localhost:8086"
    io = opts.resolve_streaming_io(options)
    assert io.transactions_subscription == "projects/rtml-local/subscriptions/transactions-sub"
    assert io.feedback_subscription == "projects/rtml-local/subscriptions/fraud-feedback-sub"
    assert io.dead_letter_topic == "projects/rtml-local/topics/dead-letter"


def test_emulator_flags_override_and_none_means_real_services(clean_env, monkeypatch):
    monkeypatch.setenv("BIGTABLE_EMULATOR_HOST", "elsewhere:1")
    options = PipelineOptions(["--pubsub_emulator_host=localhost:9999", "--bigtable_emulator_host=none"])
    opts.prepare_local_run(options, streaming=False)
    assert os.environ["PUBSUB_EMULATOR_HOST"] == "localhost:9999"
    assert "BIGTABLE_EMULATOR_HOST" not in os.environ


def test_dataflow_runs_need_a_project_and_touch_no_emulator(clean_env):
    options = PipelineOptions(["--runner=DataflowRunner"])
    opts.prepare_local_run(options, streaming=True)
    assert "PUBSUB_EMULATOR_HOST" not in os.environ
    with pytest.raises(ValueError, match="--project is required"):
        opts.project_of(options)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--transactions_subscription=transactions-sub", "projects/PROJECT/subscriptions/NAME"),
        ("--dead_letter_topic=projects/p/subscriptions/x", "projects/PROJECT/topics/NAME"),
        ("--id_label=transaction_id", "only on Dataflow"),
        ("--timestamp_attribute=published_at", "only on Dataflow"),
    ],
)
def test_bad_streaming_options_are_refused_before_the_graph_is_built(clean_env, flag, message):
    options = PipelineOptions([flag])
    opts.prepare_local_run(options, streaming=True)
    with pytest.raises(ValueError, match=message):
        opts.resolve_streaming_io(options)


def test_short_pull_client_caps_the_pull_deadline_and_delegates_the_rest():
    calls = []

    class Recorder:
        def pull(self, *args, **kwargs):
            calls.append(kwargs["timeout"])
            return "response"

        def acknowledge(self, **kwargs):
            return "acked"

    client = opts._ShortPullClient(Recorder())
    assert client.pull(subscription="s", max_messages=10, timeout=30) == "response"
    assert client.pull(subscription="s", max_messages=10, timeout=0.2) == "response"
    assert client.pull(subscription="s") == "response"
    assert calls == [opts.EMULATOR_PULL_DEADLINE_S, 0.2, opts.EMULATOR_PULL_DEADLINE_S]
    assert client.acknowledge(subscription="s", ack_ids=[]) == "acked"


@pytest.mark.parametrize("error", ["DeadlineExceeded", "ServiceUnavailable"])
def test_a_pull_that_times_out_or_finds_the_emulator_away_returns_no_messages(error):
    from google.api_core import exceptions

    class Unreachable:
        def pull(self, *args, **kwargs):
            raise getattr(exceptions, error)("emulator frozen")

    response = opts._ShortPullClient(Unreachable()).pull(subscription="s", max_messages=10, timeout=30)
    assert list(response.received_messages) == []


def test_shortened_pulls_are_installed_on_the_direct_runner_reader_once():
    from apache_beam.runners.direct.transform_evaluator import _PubSubReadEvaluator

    assert opts.shorten_emulator_pulls() is True
    installed = _PubSubReadEvaluator.__dict__["_get_subscriber_client"]
    assert opts.shorten_emulator_pulls() is True
    assert _PubSubReadEvaluator.__dict__["_get_subscriber_client"] is installed
    assert getattr(installed.__func__, "_rtml_short_pull", False)


def test_every_pipeline_module_can_be_imported_in_one_process_and_its_options_parsed(clean_env):
    import beam_pipelines.backfill  # noqa: F401
    import beam_pipelines.featurize  # noqa: F401
    import beam_pipelines.validate  # noqa: F401
    from rtml import config

    options = PipelineOptions([])
    opts.prepare_local_run(options, streaming=True)
    assert options.get_all_options()["output_topic"] is None
    assert opts.resolve_output_topic(options, config.FEATURES_TOPIC) == "projects/rtml-local/topics/features"
    explicit = PipelineOptions(["--output_topic=projects/p/topics/mine"])
    assert opts.resolve_output_topic(explicit, config.VALIDATED_TOPIC) == "projects/p/topics/mine"
    with pytest.raises(ValueError, match="projects/PROJECT/topics/NAME"):
        opts.resolve_output_topic(PipelineOptions(["--output_topic=mine"]), config.VALIDATED_TOPIC)


@pytest.mark.parametrize("module", ["featurize", "score"])
def test_stateful_steps_get_deterministic_key_coders(clean_env, caplog, tmp_path, module):
    """Keyed state needs a deterministic key coder (Dataflow matches state by encoded key)."""
    import importlib
    import logging

    import apache_beam as beam

    pipeline_module = importlib.import_module(f"beam_pipelines.{module}")
    options = PipelineOptions(["--project=rtml-local", f"--model_dir={tmp_path}"])
    opts.prepare_local_run(options, streaming=True)
    pipeline = beam.Pipeline(options=options)
    with caplog.at_level(logging.WARNING):
        pipeline_module.build(pipeline, options)
        pipeline.to_runner_api()
    assert "may not be deterministic" not in caplog.text


@pytest.mark.parametrize(
    "module, flags, expected",
    [("featurize", [], 0.25), ("score", [], 0.25), ("score", ["--state_max_buffering_secs=2"], 2.0)],
)
def test_state_waits_for_others_as_long_as_the_flag_says(clean_env, tmp_path, module, flags, expected):
    import importlib

    import apache_beam as beam
    from apache_beam.pipeline import PipelineVisitor

    from transforms.outcomes import PublishThenPersistFn

    options = PipelineOptions(["--project=rtml-local", f"--model_dir={tmp_path}", *flags])
    opts.prepare_local_run(options, streaming=True)
    pipeline = beam.Pipeline(options=options)
    importlib.import_module(f"beam_pipelines.{module}").build(pipeline, options)

    class FindPublisher(PipelineVisitor):
        def __init__(self):
            self.found = []

        def visit_transform(self, node):
            fn = getattr(node.transform, "fn", None)
            if isinstance(fn, PublishThenPersistFn):
                self.found.append(fn)

    visitor = FindPublisher()
    pipeline.visit(visitor)
    assert [fn._max_buffering_secs for fn in visitor.found] == [expected]


@pytest.mark.parametrize(
    "flag, error",
    [
        ("--state_max_buffering_secs=0", "--state_max_buffering_secs must be > 0"),
        ("--publish_max_buffering_secs=0.1", "--publish_max_buffering_secs is gone: results are published as each bundle ends"),
    ],
)
def test_buffering_flags_are_checked(flag, error):
    from rtml import config

    with pytest.raises(ValueError, match=error):
        opts.resolve_output_topic(PipelineOptions(["--project=p", flag]), config.INSIGHTS_TOPIC)


def test_feature_state_is_kept_in_the_process_only_on_the_local_streaming_runner():
    def buckets(*argv):
        return opts.feature_buckets(PipelineOptions(list(argv)))

    local = ("--streaming", "--runner=BundleBasedDirectRunner")
    assert buckets(*local) == opts.LOCAL_FEATURE_BUCKETS == 16
    assert buckets(*local, "--feature_state=process") == 16
    assert buckets(*local, "--feature_state=beam") == 0
    assert buckets("--streaming", "--runner=DataflowRunner") == 0
    assert buckets("--runner=FnApiRunner") == 0  # batch: several processes may share the keys
    dataflow, batch, fn_api = ("--streaming", "--runner=DataflowRunner"), ("--runner=FnApiRunner",), ("--streaming", "--runner=FnApiRunner")
    for elsewhere in (dataflow, batch, fn_api):
        with pytest.raises(ValueError, match="--feature_state=process needs the local streaming runner"):
            buckets(*elsewhere, "--feature_state=process")


def test_the_local_backfill_drops_only_the_workers_staging_warning(caplog):
    import logging

    from beam_pipelines import backfill

    backfill.quiet_local_workers()
    backfill.quiet_local_workers()
    worker_log = logging.getLogger(backfill.WORKER_LOG)
    assert sum(isinstance(f, backfill._NoStagingWarning) for f in worker_log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=backfill.WORKER_LOG):
        worker_log.warning('Worker: severity: WARN message: "No semi_persistent_directory found:  User registered objects"')
        worker_log.warning("Worker: severity: WARN message: something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["Worker: severity: WARN message: something else went wrong"]
