"""Streaming scoring: Pub/Sub -> validation -> features -> RunInference -> insights on Pub/Sub.

Reads `transactions-sub` and `fraud-feedback-sub`, validates every message (rejects go to the
dead-letter topic), computes the reference features with the Bigtable-backed stateful DoFns,
scores each transaction with the newest valid model version in `--model_dir` through Beam's
RunInference, and publishes one insight per transaction to `fraud-insights` with attributes
`transaction_id`, `decision` and `model_version`; a transaction's feature state is written to
Bigtable once its insight is out, so replaying the input after a crash (`rtml seek`) neither
loses nor repeats an insight (`transforms.outcomes`). A version written into `--model_dir` later is
picked up within `--model_poll_secs` without a restart; a version that fails its hash check
is refused and the current one keeps serving. Inference failures become dead letters. Every
`--health_period_secs` a health record per model version goes to `--health_topic`
(`model-health`): drift against the training statistics, decision mix, latency, and the
precision of its decisions as fraud feedback arrives (`rtml.health`, `rtml top`).

    python -m beam_pipelines.score --model_dir out/models     # locally, against the emulators
"""

import sys
from typing import NamedTuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from beam_pipelines import options as opts
from beam_pipelines.featurize import input_outcomes, publish_outcomes, read_and_featurize
from rtml import config, drift, health
from transforms.health import MonitorModel
from transforms.outcomes import DEAD_LETTER
from transforms.scoring import INSIGHT, FraudModelHandler, ScoreTransactions, to_scoring_example

# The delayed-label join's keys on the local runners (`--label_join_buckets`): they scan every
# key of every stateful step after each bundle, and a key per customer made that scan a third
# longer (BENCHMARKS.md).
LOCAL_LABEL_BUCKETS = 16


class ScoreOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--model_poll_secs",
            type=float,
            default=20.0,
            help="How often to look for a new model version in --model_dir, in seconds (default: %(default)s).",
        )
        parser.add_argument(
            "--model_updates",
            choices=("handler", "side_input"),
            default="handler",
            help="How new versions are found: 'handler' (the model handler lists --model_dir every "
            "--model_poll_secs; any runner) or 'side_input' (RunInference's WatchFilePattern side input; "
            "needs splittable DoFns, e.g. Dataflow). Default: %(default)s.",
        )
        parser.add_argument(
            "--inference_max_batch_size",
            type=int,
            default=64,
            help="Largest inference batch (default: %(default)s).",
        )
        parser.add_argument(
            "--inference_max_batch_duration_secs",
            type=float,
            default=0.0,
            help="If > 0, hold elements up to this long to fill inference batches across bundles "
            "(RunInference's stateful batching; adds up to this much latency). Default: batch within a "
            "bundle only, in the terminal feature step.",
        )
        parser.add_argument(
            "--health_topic",
            default=None,
            help="Topic for model health records: drift, decision mix, latency and delayed-label precision "
            f"per model version (default: the project's {config.HEALTH_TOPIC}).",
        )
        opts.add_switch(parser, "--no_health", "Do not compute or publish model health records.")
        parser.add_argument(
            "--health_window_secs",
            type=float,
            default=600.0,
            help="Processing-time window each health record covers, in seconds (default: %(default)s).",
        )
        parser.add_argument(
            "--health_period_secs",
            type=float,
            default=60.0,
            help="A health record per model version this often, in seconds (default: %(default)s).",
        )
        parser.add_argument(
            "--psi_threshold",
            type=float,
            default=drift.PSI_ALERT,
            help="Population stability index from which a feature counts as drifted (default: %(default)s).",
        )
        parser.add_argument(
            "--label_join_buckets",
            type=int,
            default=None,
            help="How many keys the delayed-label join spreads customers over; 0: a key per customer. "
            f"Default: {LOCAL_LABEL_BUCKETS} on the local runners, which scan every key of a stateful step "
            "after every bundle, and 0 elsewhere.",
        )
        parser.add_argument(
            "--health_min_events",
            type=int,
            default=health.DEFAULT_MIN_EVENTS,
            help="Events a version needs in a window before its PSI is computed (default: %(default)s).",
        )


class ScorePipeline(NamedTuple):
    examples: beam.PCollection  # (transaction_id, ScoringExample): featured transactions keyed for inference
    insights: beam.PCollection  # insight dicts, as published
    dead_letters: tuple[beam.PCollection, ...]  # (error_kind, record), validation's and scoring's, unflattened
    health: beam.PCollection | None  # health record dicts (None with --no_health)


def check(options: PipelineOptions) -> str:
    """The model folder, once the options are valid (checked here, not by argparse: see backfill.build)."""
    model_dir = options.view_as(opts.ModelDirOptions).model_dir
    if not model_dir:
        raise ValueError("--model_dir is required: the folder `rtml train` exports model versions to")
    args = options.view_as(ScoreOptions)
    if args.model_poll_secs <= 0:
        raise ValueError("--model_poll_secs must be > 0")
    if args.inference_max_batch_size < 1:
        raise ValueError("--inference_max_batch_size must be at least 1")
    if args.inference_max_batch_duration_secs < 0:
        raise ValueError("--inference_max_batch_duration_secs must be >= 0")
    if args.health_period_secs <= 0 or args.health_window_secs < args.health_period_secs:
        raise ValueError("--health_period_secs must be > 0 and --health_window_secs at least as long")
    if args.psi_threshold <= 0:
        raise ValueError("--psi_threshold must be > 0")
    if args.health_min_events < 1:
        raise ValueError("--health_min_events must be at least 1")
    if args.label_join_buckets is not None and args.label_join_buckets < 0:
        raise ValueError("--label_join_buckets must be >= 0 (0: a key per customer)")
    if args.health_topic is not None:
        opts.check_topic_path("health_topic", args.health_topic)
    if args.model_updates == "side_input" and opts.is_local(options):
        raise ValueError(
            "--model_updates=side_input needs splittable DoFns, which the local DirectRunner cannot run; "
            "use the default --model_updates=handler locally"
        )
    return model_dir


def label_join_buckets(options: PipelineOptions) -> int:
    """`--label_join_buckets`, or its default for the runner."""
    chosen = options.view_as(ScoreOptions).label_join_buckets
    if chosen is not None:
        return chosen
    return LOCAL_LABEL_BUCKETS if opts.is_local(options) else 0


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> ScorePipeline:
    model_dir = check(options)
    args = options.view_as(ScoreOptions)
    output_topic = opts.resolve_output_topic(options, config.INSIGHTS_TOPIC)
    # The terminal step keys each transaction for inference itself and, unless batches are to
    # fill across bundles, hands RunInference its batches, saving two steps (see ComputeFeatures).
    batch_in_features = not args.inference_max_batch_duration_secs
    io, inputs, computed = read_and_featurize(
        pipeline,
        options,
        emit=to_scoring_example,
        batch_size=args.inference_max_batch_size if batch_in_features else None,
    )
    by_side_input = args.model_updates == "side_input"
    label_buckets = label_join_buckets(options)
    handler = FraudModelHandler(
        model_dir,
        poll_secs=None if by_side_input else args.model_poll_secs,
        max_batch_size=args.inference_max_batch_size,
        max_batch_duration_secs=args.inference_max_batch_duration_secs or None,
    )
    scored = computed.transactions | "ScoreTransactions" >> ScoreTransactions(
        handler,
        model_dir,
        side_input_poll_secs=args.model_poll_secs if by_side_input else None,
        observe=not args.no_health,
        keyed=True,
        batched=batch_in_features,
        label_buckets=label_buckets,
    )
    # Insights, the dead letters of validation and of scoring, and fraud reports' state cells go
    # out through one publishing step (transforms.outcomes); health records, which carry no
    # state, are published by the health step itself.
    results = [*scored.outcomes, *input_outcomes(inputs, computed)]
    topics = {INSIGHT: output_topic, DEAD_LETTER: io.dead_letter_topic}
    health_records = None
    if not args.no_health:
        health_topic = args.health_topic or config.topic_path(opts.project_of(options), config.HEALTH_TOPIC)
        health_records = (scored.observations, inputs.feedback) | "MonitorModel" >> MonitorModel(
            model_dir,
            args.health_window_secs,
            args.health_period_secs,
            args.psi_threshold,
            args.health_min_events,
            topic=health_topic,
            label_buckets=label_buckets,
        )
    _ = tuple(results) | "PublishResults" >> publish_outcomes(options, topics)
    return ScorePipeline(computed.transactions, scored.insights, (*inputs.dead_letters, *scored.dead_letters), health_records)


def run(argv: list[str] | None = None) -> PipelineResult:
    """Build and start the pipeline; returns without waiting (streaming runs until cancelled)."""
    return opts.run_streaming(build, argv)


if __name__ == "__main__":
    opts.streaming_main(build, sys.argv[1:])
