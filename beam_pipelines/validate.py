"""Streaming validation pipeline: Pub/Sub inputs -> typed events and dead letters.

Reads `transactions-sub` and `fraud-feedback-sub`, validates every message against the contract,
publishes each accepted event (as a replay-file line) to `--output_topic` and each rejected one
to the dead-letter topic. It is the front half of the scoring pipeline on its own: the demo and
tests use it, and it is the passthrough baseline of the benchmarks.

    python -m beam_pipelines.validate            # locally, against the emulators
"""

import json
import sys
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage, WriteToPubSub
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from beam_pipelines import options as opts
from rtml import config, events
from transforms import dofn
from transforms.validation import ReadEvents, WriteDeadLetters


class ValidatePipeline(NamedTuple):
    transactions: beam.PCollection
    feedback: beam.PCollection
    dead_letters: tuple[beam.PCollection, ...]  # per source


def event_message(event: events.Transaction | events.Feedback) -> PubsubMessage:
    """An accepted event as a Pub/Sub message in the replay-file line format."""
    data = json.dumps(events.replay_record(event), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return PubsubMessage(data, {"transaction_id": event.transaction_id})


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> ValidatePipeline:
    io = opts.resolve_streaming_io(options)
    output_topic = opts.resolve_output_topic(options, config.VALIDATED_TOPIC)
    inputs = pipeline | "ReadEvents" >> ReadEvents(
        io.transactions_subscription, io.feedback_subscription, io.id_label, io.timestamp_attribute
    )
    _ = (
        (inputs.transactions, inputs.feedback)
        | "FlattenEvents" >> beam.Flatten()
        | "ToMessage" >> dofn.Map(event_message).with_output_types(PubsubMessage)
        | "PublishEvents" >> WriteToPubSub(output_topic, with_attributes=True)
    )
    _ = inputs.dead_letters | "WriteDeadLetters" >> WriteDeadLetters(io.dead_letter_topic)
    return ValidatePipeline(inputs.transactions, inputs.feedback, inputs.dead_letters)


def run(argv: list[str] | None = None) -> PipelineResult:
    """Build and start the pipeline; returns without waiting (streaming runs until cancelled)."""
    return opts.run_streaming(build, argv)


if __name__ == "__main__":
    opts.streaming_main(build, sys.argv[1:])
