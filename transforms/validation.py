"""Turn raw Pub/Sub messages into typed events, routing every rejected message to dead letters."""

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage, ReadFromPubSub, WriteToPubSub
from apache_beam.metrics import Metrics

from rtml import events
from transforms import dofn, outcomes

DEAD_LETTER_TAG = "dead_letter"
OUTCOMES_TAG = "outcomes"

beam.coders.registry.register_coder(events.Transaction, beam.coders.RowCoder)
beam.coders.registry.register_coder(events.Feedback, beam.coders.RowCoder)


def message_parts(message: Any) -> tuple[bytes, Mapping[str, str]]:
    """Payload and attributes of a Pub/Sub message read with or without attributes."""
    if isinstance(message, PubsubMessage):
        return message.data or b"", message.attributes or {}
    if isinstance(message, (bytes, bytearray)):
        return bytes(message), {}
    raise TypeError(f"expected a PubsubMessage or bytes, got {type(message).__name__}")


class ValidateMessageFn(dofn.DoFn):
    """Parse one source's messages; a message that fails becomes one dead-letter record.

    `parse` raises `events.InvalidMessage` for a contract violation. Any other exception is a
    defect in parsing, yet it must not stop the pipeline either: it is dead-lettered as
    `unexpected_error` with the exception's text, and counted separately.

    A dead letter leaves twice: as `(error_kind, record)` on `DEAD_LETTER_TAG`, and as the
    keyed outcome `transforms.outcomes.PublishOutcomes` publishes on `OUTCOMES_TAG` (made here
    rather than in a step of its own: the local runner runs every step once per bundle).
    """

    def __init__(self, source: str, parse: Callable[[bytes], Any]):
        self._source = source
        self._parse = parse

    def setup(self) -> None:
        self._valid = Metrics.counter("validation", f"{self._source}_valid")
        self._invalid = Metrics.counter("validation", f"{self._source}_invalid")
        self._by_kind = {
            kind: Metrics.counter("validation", f"error_{kind}") for kind in (*events.ERROR_KINDS, "unexpected_error")
        }

    def process(self, message: Any):
        yield from self._validate(message, _just)

    def _validate(self, message: Any, on_valid: Callable[[Any], Any]):
        payload, attributes = message_parts(message)
        try:
            events.check_attributes(attributes)
            event = self._parse(payload)
        except events.InvalidMessage as err:
            kind, error = err.kind, str(err)
        except Exception as err:  # noqa: BLE001 - routed to dead letters, see docstring
            kind, error = "unexpected_error", f"message: could not be parsed ({type(err).__name__}: {err})"
        else:
            self._valid.inc()
            yield from on_valid(event) or ()
            return
        self._invalid.inc()
        self._by_kind[kind].inc()
        dead = (kind, events.dead_letter(self._source, error, payload, attributes, time.time_ns() // 1000))
        yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, dead)
        yield beam.pvalue.TaggedOutput(OUTCOMES_TAG, dead_letter_outcome(dead))


def _just(event) -> tuple:
    return (event,)


class ValidateThenFn(ValidateMessageFn):
    """`ValidateMessageFn`, then `then`: the DoFn of the step that would come next, run inside
    this one. Each valid event goes to its `process(event, timestamp, window)`, and what it
    yields there and from `finish_bundle` (as WindowedValues) is the main output, of its output
    type; its setup, start_bundle and teardown run with this DoFn's. The local runner takes a
    bundle's path one level at a time, scanning every key of every stateful step between levels,
    so a level fewer is time saved on every bundle. (A class of its own, so that validation
    without `then` does not ask Beam for each element's timestamp and window, which costs.)
    """

    def __init__(self, source: str, parse: Callable[[bytes], Any], then: beam.DoFn):
        super().__init__(source, parse)
        self._then = then
        output_types = then.get_type_hints().output_types
        if output_types:  # the main output is `then`'s (its key type gives stateful steps their key coder)
            self.with_output_types(*output_types[0], **output_types[1])

    def default_label(self) -> str:
        return "ValidateMessageFn"  # the step's name stays what it was (Dataflow --update matches by it)

    def setup(self) -> None:
        self._then.setup()
        super().setup()

    def teardown(self) -> None:
        self._then.teardown()

    def start_bundle(self) -> None:
        self._then.start_bundle()

    def finish_bundle(self):
        yield from self._then.finish_bundle() or ()

    def process(self, message: Any, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        yield from self._validate(message, lambda event: self._then.process(event, timestamp, window))


class Validated(NamedTuple):
    """Outputs of `ValidateMessages`: typed events, `(error_kind, record)` dead letters, and the
    same dead letters as keyed outcomes to publish."""

    events: beam.PCollection
    dead_letters: beam.PCollection
    outcomes: beam.PCollection


class ValidateMessages(beam.PTransform):
    """Validate the messages of one source (`transactions` or `fraud-feedback`); valid events go
    on to `then`, if given (see `ValidateThenFn`), and `events` is what it outputs."""

    PARSERS: dict[str, Callable[[bytes], Any]] = {
        "transactions": events.parse_transaction,
        "fraud-feedback": events.parse_feedback,
    }

    def __init__(self, source: str, parse: Callable[[bytes], Any] | None = None, then: beam.DoFn | None = None):
        super().__init__()
        if parse is None and source not in self.PARSERS:
            raise ValueError(f"no parser for source {source!r}; known: {sorted(self.PARSERS)}")
        self._source = source
        self._parse = parse or self.PARSERS[source]
        self._then = then

    def expand(self, messages: beam.PCollection) -> Validated:
        validate = (
            ValidateMessageFn(self._source, self._parse)
            if self._then is None
            else ValidateThenFn(self._source, self._parse, self._then)
        )
        outputs = messages | "Parse" >> beam.ParDo(validate).with_outputs(DEAD_LETTER_TAG, OUTCOMES_TAG, main="events")
        return Validated(outputs.events, outputs[DEAD_LETTER_TAG], outputs[OUTCOMES_TAG])


def dead_letter_message(kind_and_record: tuple[str, dict]) -> PubsubMessage:
    """A dead-letter record as a Pub/Sub message, its source and error kind as attributes."""
    kind, record = kind_and_record
    data = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return PubsubMessage(data, {"source": record["source"], "error_kind": kind})


def dead_letter_outcome(kind_and_record: tuple[str, dict], cells: tuple = ()) -> tuple[str, outcomes.Outcome]:
    """A dead letter as the keyed outcome `transforms.outcomes.PublishOutcomes` publishes, with
    the state cells of its transaction (none for a message that failed validation)."""
    return outcomes.outcome(outcomes.DEAD_LETTER, dead_letter_message(kind_and_record), cells)


class WriteDeadLetters(beam.PTransform):
    """Publish `(error_kind, record)` dead letters from any number of steps (one PCollection, or
    a tuple of them) to one topic."""

    def __init__(self, topic: str):
        super().__init__()
        self._topic = topic

    def expand(self, dead_letters):
        if isinstance(dead_letters, (tuple, list)):
            dead_letters = tuple(dead_letters) | "FlattenDeadLetters" >> beam.Flatten()
        return (
            dead_letters
            | "ToMessage" >> dofn.Map(dead_letter_message).with_output_types(PubsubMessage)
            | "Publish" >> WriteToPubSub(self._topic, with_attributes=True)
        )


class InputEvents(NamedTuple):
    """Outputs of `ReadEvents`. The dead letters come one PCollection per source, as
    `(error_kind, record)` and as keyed outcomes: `WriteDeadLetters` and `PublishOutcomes` take
    several, and they are not flattened here, since the local runner would run a Flatten once per
    bundle even in a pipeline that does not read it."""

    transactions: beam.PCollection
    feedback: beam.PCollection
    dead_letters: tuple[beam.PCollection, ...]
    dead_letter_outcomes: tuple[beam.PCollection, ...]


class ReadEvents(beam.PTransform):
    """Read both input subscriptions and validate them: typed events plus all dead letters.

    `id_label` and `timestamp_attribute` are passed to Pub/Sub only when set (Dataflow). `then`
    maps a source to a DoFn that its valid events pass inside the validation step (see
    `ValidateThenFn`); that source's `events` are then what the DoFn outputs.
    """

    def __init__(
        self,
        transactions_subscription: str,
        feedback_subscription: str,
        id_label: str | None = None,
        timestamp_attribute: str | None = None,
        then: Mapping[str, beam.DoFn] | None = None,
    ):
        super().__init__()
        self._subscriptions = {"transactions": transactions_subscription, "fraud-feedback": feedback_subscription}
        self._read_args = {"id_label": id_label, "timestamp_attribute": timestamp_attribute}
        self._then = dict(then or {})
        unknown = set(self._then) - set(self._subscriptions)
        if unknown:
            raise ValueError(f"`then` for unknown sources {sorted(unknown)}; known: {sorted(self._subscriptions)}")

    def expand(self, pbegin: beam.pvalue.PBegin) -> InputEvents:
        validated = {}
        for source, label in (("transactions", "Transactions"), ("fraud-feedback", "Feedback")):
            messages = pbegin | f"Read{label}" >> ReadFromPubSub(
                subscription=self._subscriptions[source], with_attributes=True, **self._read_args
            )
            validated[source] = messages | f"Validate{label}" >> ValidateMessages(source, then=self._then.get(source))
        sources = ("transactions", "fraud-feedback")
        return InputEvents(
            validated["transactions"].events,
            validated["fraud-feedback"].events,
            tuple(validated[source].dead_letters for source in sources),
            tuple(validated[source].outcomes for source in sources),
        )
