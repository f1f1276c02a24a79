"""Streaming feature pipeline: Pub/Sub inputs -> validation -> stateful features -> Pub/Sub.

Reads `transactions-sub` and `fraud-feedback-sub`, validates them (rejects go to the dead-letter
topic), computes every reference feature with the Bigtable-backed stateful DoFns, and publishes
one record per transaction to `--output_topic`:
`{transaction_id, customer_id, terminal_id, event_time, amount, features: {...}}`; a
transaction's feature state is written to Bigtable once its record is out
(`transforms.outcomes`), so replaying the input after a crash loses none, and repeats only
those published in the last `--state_max_buffering_secs` before it.
The scoring pipeline runs the same steps before inference; this one serves feature logging and
the feature engine's own tests.

    python -m beam_pipelines.featurize            # locally, against the emulators
"""

import json
import sys
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from beam_pipelines import options as opts
from rtml import config, events
from transforms import dofn
from transforms.features import ComputedFeatures, ComputeFeatures, FeaturedTransaction, load_transactions
from transforms.outcomes import DEAD_LETTER, PublishOutcomes, outcome
from transforms.validation import InputEvents, ReadEvents


class FeaturizePipeline(NamedTuple):
    featured: beam.PCollection
    dead_letters: tuple[beam.PCollection, ...]  # per source


def feature_record(item: FeaturedTransaction) -> dict:
    return {**events.contract_fields(item.transaction), "features": item.features}


def feature_message(item) -> PubsubMessage:
    """A featured transaction as a Pub/Sub message (`item` is a `FeaturedTransaction`)."""
    data = json.dumps(feature_record(item), separators=(",", ":")).encode("utf-8")
    return PubsubMessage(data, {"transaction_id": item.transaction.transaction_id})


def read_and_featurize(pipeline: beam.Pipeline, options: PipelineOptions, emit=None, batch_size: int | None = None):
    """The front half shared with scoring: Pub/Sub -> validation -> features.

    Returns `(io options, InputEvents, ComputedFeatures)`; step labels are the same in both
    pipelines (ReadEvents, ComputeFeatures). `emit`, `batch_size`: see `ComputeFeatures`.
    """
    io = opts.resolve_streaming_io(options)
    store = opts.store_config(options)
    buckets = opts.feature_buckets(options)  # where the feature steps keep their entities
    # Validation loads the valid transactions' rows itself, a step fewer (see ComputeFeatures).
    inputs = pipeline | "ReadEvents" >> ReadEvents(
        io.transactions_subscription,
        io.feedback_subscription,
        io.id_label,
        io.timestamp_attribute,
        then={"transactions": load_transactions(store, buckets)},
    )
    computed = (inputs.transactions, inputs.feedback) | "ComputeFeatures" >> ComputeFeatures(
        store, emit, loaded=True, batch_size=batch_size, buckets=buckets
    )
    return io, inputs, computed


def input_outcomes(inputs: InputEvents, computed: ComputedFeatures) -> list[beam.PCollection]:
    """What the front half owes besides the transactions' results, as keyed outcomes for
    `publish_outcomes`: validation's dead letters, and fraud reports' state cells."""
    return [*inputs.dead_letter_outcomes, computed.feedback_state]


FEATURES = "features"  # the outcome kind of this pipeline


def publish_outcomes(options: PipelineOptions, topics: dict[str, str]) -> PublishOutcomes:
    """Publish each transaction's result, then write its state (see `transforms.outcomes`); the
    state waits up to `--state_max_buffering_secs` to be written with others'."""
    buffering = options.view_as(opts.OutputTopicOptions).state_max_buffering_secs
    return PublishOutcomes(opts.store_config(options), topics, max_buffering_secs=buffering)


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> FeaturizePipeline:
    output_topic = opts.resolve_output_topic(options, config.FEATURES_TOPIC)
    io, inputs, computed = read_and_featurize(pipeline, options)
    records = computed.transactions | "ToMessage" >> dofn.Map(
        lambda item: outcome(FEATURES, feature_message(item), item.cells)
    )
    _ = (records, *input_outcomes(inputs, computed)) | "PublishFeatures" >> publish_outcomes(
        options, {FEATURES: output_topic, DEAD_LETTER: io.dead_letter_topic}
    )
    return FeaturizePipeline(computed.transactions, inputs.dead_letters)


def run(argv: list[str] | None = None) -> PipelineResult:
    """Build and start the pipeline; returns without waiting (streaming runs until cancelled)."""
    return opts.run_streaming(build, argv)


if __name__ == "__main__":
    opts.streaming_main(build, sys.argv[1:])
