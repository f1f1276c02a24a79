"""Scoring: featured transactions -> RunInference with our exported versions -> insights.

`FraudModelHandler` is a Beam `ModelHandler` over `models.loader`: it opens a verified version
with `tf.saved_model.load`, scores a whole batch with one call of the `explain` signature
(scores and per-feature contributions together), and turns them into decisions and reasons
with the version's own thresholds. Beam's `RunInference` runs it and routes failed batches to
its error output, which `ScoreTransactions` turns into dead letters.

A new version that fails its hash check or does not load is refused: the handler keeps the
version it had, logs the refusal and counts it (`scoring/model_refusals`).

Model updates: RunInference's model-update side input (`WatchFilePattern`) is built on
splittable DoFns, which Beam's local bundle-based DirectRunner cannot run ("Transform node
...ProcessKeyedElements... was not replaced as expected"). So by default the handler watches
the model folder itself (`ModelSlot`), on every runner; `--model_updates=side_input` uses
Beam's watcher instead, on runners that support it (Dataflow).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import posixpath
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from models import decisions, loader
from models.features import RAW_FEATURES
from rtml import events
from transforms import dofn, health, outcomes
from transforms.validation import dead_letter_outcome

_LOG = logging.getLogger(__name__)
NAMESPACE = "scoring"
INFERENCE_ERROR_KIND = "inference_failed"
FEATURES_ERROR_KIND = "invalid_features"


def _counter(name: str):
    return Metrics.counter(NAMESPACE, name)


# Realized inference batch sizes in this process (size -> batches), next to the Beam
# distribution `scoring/inference_batch_size`: local runners do not report streaming metrics
# back to the launching process, so benchmarks read this, and the handler logs a summary.
BATCH_SIZES: Counter = Counter()
BATCH_LOG_INTERVAL_S = 30.0
_batch_log = {"at": time.monotonic(), "batches": 0, "examples": 0}
_batch_lock = threading.Lock()


def record_batch(size: int) -> None:
    """Count an inference batch, and log the sizes since the last summary every 30 s."""
    with _batch_lock:
        BATCH_SIZES[size] += 1
        _batch_log["batches"] += 1
        _batch_log["examples"] += size
        if time.monotonic() - _batch_log["at"] >= BATCH_LOG_INTERVAL_S:
            _LOG.info(
                "inference: %d batches, %d transactions, mean batch size %.2f in the last %.0f s",
                _batch_log["batches"],
                _batch_log["examples"],
                _batch_log["examples"] / _batch_log["batches"],
                time.monotonic() - _batch_log["at"],
            )
            _batch_log.update(at=time.monotonic(), batches=0, examples=0)


class ScoringExample(NamedTuple):
    """What RunInference carries per transaction: the transaction, its features, when it was
    published, and its state cells (written once its insight is out: `transforms.outcomes`)."""

    transaction: events.Transaction
    features: dict
    published_at_us: int
    cells: tuple = ()


class ModelSlot:
    """The version a worker serves, swapped in place when a newer valid version appears.

    One slot per model folder and process (`ModelSlot.shared`), handed to every `run_inference`
    call; `refresh` looks at the model folder at most every `poll_secs` and swaps in the newest
    version that passes `loader.load`. A version that fails is refused once (logged and
    counted) and never retried.
    """

    _SHARED: dict[tuple[str, float | None], ModelSlot] = {}
    _SHARED_LOCK = threading.Lock()

    @classmethod
    def shared(cls, model_dir: str, poll_secs: float | None) -> ModelSlot:
        """The process's slot for `model_dir`, serving its newest valid version once loaded.

        Held here for the life of the process: Beam's cache of shared objects keeps only the
        object acquired last alive, so the slot it held was collected between bundles and loaded
        again, the worker stalling for the load (4 loads in the 6 minutes of a demo run).
        """
        with cls._SHARED_LOCK:
            slot = cls._SHARED.get((model_dir, poll_secs))
            if slot is None:
                slot = cls._SHARED[(model_dir, poll_secs)] = cls(model_dir, poll_secs)
            if slot.current is None:
                slot.load_newest()
            return slot

    def __init__(self, model_dir: str, poll_secs: float | None):
        self.model_dir = model_dir
        self.poll_secs = poll_secs
        self.current = None
        self._refused: set[str] = set()
        self._checked_at = time.monotonic()
        self._lock = threading.Lock()

    def load_newest(self) -> None:
        """Serve the newest version that loads; refuse the newer ones that do not."""
        for candidate in reversed(loader.versions(self.model_dir)):
            if self.current is not None and candidate.rstrip("/") == self.current.path.rstrip("/"):
                return
            if self.offer(candidate):
                return
        if self.current is None:
            raise RuntimeError(f"no valid model version in {self.model_dir}; train one with `rtml train`")

    def offer(self, path: str) -> bool:
        """Try to serve the version at `path`; False (and the current version stays) if it is refused."""
        if path in self._refused:
            return False
        try:
            loaded = loader.load(path)
        except Exception as err:  # noqa: BLE001 - any failure to load refuses the version
            self._refused.add(path)
            _counter("model_refusals").inc()
            keeping = f"; version {self.current.version} keeps serving" if self.current is not None else ""
            reason = str(err) if isinstance(err, loader.ModelIntegrityError) else f"model version at {path} refused: {err}"
            _LOG.error("%s%s", reason, keeping)
            return False
        if self.current is not None:
            _LOG.info("model version %s replaces %s", loaded.version, self.current.version)
            _counter("model_updates").inc()
        else:
            _LOG.info("serving model version %s", loaded.version)
        self.current = loaded
        settle_heap()
        return True

    def refresh(self):
        """The version to score with, after a look at the model folder if one is due.

        The look is `load_newest`: a refused newest version does not hide a valid one between
        it and the serving version.
        """
        if self.poll_secs is not None and time.monotonic() - self._checked_at >= self.poll_secs:
            with self._lock:
                if time.monotonic() - self._checked_at >= self.poll_secs:
                    self.load_newest()
                    self._checked_at = time.monotonic()
        return self.current


def settle_heap() -> None:
    """Collect garbage, then leave what the process holds now (TensorFlow, Beam, the model) out of
    Python's later full collections (`gc.freeze`).

    Those collections walk every tracked object, and with a model loaded one took about 250 ms,
    stalling every transaction in flight: the worst 1% of 3,000 transactions at 100 events/s
    were those around one of them. Called after each model load, unfreezing first, so that a
    replaced version's objects can still be collected.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class FraudModelHandler(ModelHandler[ScoringExample, dict, ModelSlot]):
    """Loads verified model versions from `model_dir` and scores batches of `ScoringExample`s.

    `poll_secs` set: the handler watches the folder itself (`ModelSlot.refresh`), which works on
    every runner. `poll_secs` None: versions arrive through RunInference's model-update side
    input (`update_model_path`), which needs a runner with splittable DoFns, such as Dataflow.
    """

    def __init__(
        self,
        model_dir: str,
        poll_secs: float | None = 20.0,
        max_batch_size: int = 64,
        max_batch_duration_secs: float | None = None,
    ):
        super().__init__()
        self._model_dir = model_dir.rstrip("/")
        self._poll_secs = poll_secs
        self._path: str | None = None
        self._slot: ModelSlot | None = None
        # min = max: a batch is a whole bundle, up to max_batch_size. Beam's adaptive sizing starts
        # at min_batch_size in every new DoFn instance, and the local runner makes one per bundle,
        # so with min 1 a 10-message bundle went through the model in batches of 1, 2, 4 and 3.
        self._batching = {"min_batch_size": max_batch_size, "max_batch_size": max_batch_size}
        if max_batch_duration_secs:
            self._batching["max_batch_duration_secs"] = max_batch_duration_secs

    def update_model_path(self, model_path: str | None = None) -> None:
        """Called by RunInference with a new `.../<version>/metadata.json` from its model watcher."""
        if model_path:
            self._path = posixpath.dirname(model_path) if model_path.endswith(loader.METADATA_FILE) else model_path

    def load_model(self) -> ModelSlot:
        if self._slot is None:
            self._slot = ModelSlot.shared(self._model_dir, self._poll_secs)
        if self._path is not None and self._path.rstrip("/") != self._slot.current.path.rstrip("/"):
            self._slot.offer(self._path)
        return self._slot

    def run_inference(self, batch: Sequence[ScoringExample], model: ModelSlot, inference_args=None) -> Iterable[PredictionResult]:
        """One `explain` call for the batch; an example with unusable features gets an `error` instead."""
        import numpy as np

        served = model.refresh()
        Metrics.distribution(NAMESPACE, "inference_batch_size").update(len(batch))
        record_batch(len(batch))
        inferences = [{"error": feature_problem(example.features), "model_version": served.version} for example in batch]
        usable = [i for i, inference in enumerate(inferences) if inference["error"] is None]
        if usable:
            values = np.array([[batch[i].features[name] for name in RAW_FEATURES] for i in usable], dtype=np.float32)
            scores, contributions = served.explain_matrix(values)
            thresholds = served.thresholds
            chosen = decisions.decide(scores, thresholds["review"], thresholds["decline"])
            reasons = decisions.top_reasons(contributions, values, RAW_FEATURES)
            for i, score, decision, why in zip(usable, scores, chosen, reasons, strict=True):
                del inferences[i]["error"]
                inferences[i].update(score=float(score), decision=decision, reasons=why)
        for example, inference in zip(batch, inferences, strict=True):
            yield PredictionResult(example, inference, served.version)

    def batch_elements_kwargs(self) -> dict:
        return dict(self._batching)

    def get_metrics_namespace(self) -> str:
        return "RunInference_fraud"


def feature_problem(features: dict) -> str | None:
    """What makes a feature dict unusable for the model (missing or non-numeric values), or None."""
    missing = [name for name in RAW_FEATURES if name not in features]
    if missing:
        return f"features: missing {', '.join(missing)}"
    for name in RAW_FEATURES:
        value = features[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"features: {name} must be a finite number, got {value!r}"
    return None


def to_scoring_example(featured, timestamp=beam.DoFn.TimestampParam) -> tuple[str, ScoringExample]:
    """Key a featured transaction by transaction_id; its element timestamp is the publish time.

    As a `beam.Map` function, or as `ComputeFeatures`'s `emit` (called with the timestamp)."""
    tx = featured.transaction
    return tx.transaction_id, ScoringExample(tx, featured.features, timestamp.micros, featured.cells)


def insight_record(example: ScoringExample, inference: dict, processed_at_us: int) -> dict:
    """The contract's insight object."""
    return {
        **events.contract_fields(example.transaction),
        "score": inference["score"],
        "decision": inference["decision"],
        "model_version": inference["model_version"],
        "features": dict(example.features),
        "reasons": inference["reasons"],
        "processed_at": events.format_timestamp(processed_at_us),
    }


class AssembleInsightFn(dofn.DoFn):
    """(transaction_id, PredictionResult) -> insight dict; counts decisions and publish-to-emit latency.

    Also an `OUTCOMES` output: each insight or dead letter as the keyed `Outcome` to publish;
    and, given the model folder, an `OBSERVATIONS` output for model health: the insights as
    `transforms.health.Observer` sees them, a scored event per insight and the window stats of
    each bundle (observed here rather than in a step of its own: the local runner runs every
    step once per bundle).
    """

    def __init__(self, observe_model_dir: str | None = None, label_buckets: int = 0):
        self._observer = health.Observer(observe_model_dir, label_buckets) if observe_model_dir else None

    def setup(self):
        if self._observer is not None:
            self._observer.setup()
        self._insights = _counter("insights")
        self._by_decision = {decision: _counter(f"decision_{decision}") for decision in decisions.DECISIONS}
        self._latency = Metrics.distribution(NAMESPACE, "latency_ms")
        self._invalid = _counter("invalid_features")

    def start_bundle(self):
        if self._observer is not None:
            self._observer.start_bundle()

    def process(self, keyed):
        _, result = keyed
        now_us = time.time_ns() // 1000
        if "error" in result.inference:
            self._invalid.inc()
            dead = (FEATURES_ERROR_KIND, transaction_dead_letter(result.example, result.inference["error"], now_us))
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, dead)
            yield beam.pvalue.TaggedOutput(OUTCOMES, dead_letter_outcome(dead, result.example.cells))
            return
        record = insight_record(result.example, result.inference, now_us)
        latency_ms = max(0, (now_us - result.example.published_at_us) // 1000)
        self._insights.inc()
        self._by_decision[record["decision"]].inc()
        self._latency.update(latency_ms)
        yield record
        yield beam.pvalue.TaggedOutput(OUTCOMES, outcomes.outcome(INSIGHT, insight_message(record), result.example.cells))
        if self._observer is not None:
            yield beam.pvalue.TaggedOutput(OBSERVATIONS, self._observer.observe(record, latency_ms))

    def finish_bundle(self):
        if self._observer is not None:
            stats = self._observer.finish_bundle()
            if stats is not None:
                yield beam.pvalue.TaggedOutput(OBSERVATIONS, stats)


def insight_message(record: dict) -> PubsubMessage:
    data = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    attributes = {key: record[key] for key in ("transaction_id", "decision", "model_version")}
    return PubsubMessage(data, attributes)


DEAD_LETTERS = "dead_letters"
OBSERVATIONS = "observations"
OUTCOMES = "outcomes"
INSIGHT = "insight"  # outcome kinds, each published to its own topic
DEAD_LETTER = outcomes.DEAD_LETTER


def transaction_dead_letter(example: ScoringExample, error: str, received_us: int) -> dict:
    """A dead letter for a transaction that passed validation but could not be scored."""
    tx = example.transaction
    payload = json.dumps(events.contract_fields(tx), separators=(",", ":")).encode("utf-8")
    return events.dead_letter("transactions", error, payload, {"transaction_id": tx.transaction_id}, received_us)


def failed_batch_dead_letters(failure) -> Iterable:
    """RunInference's error output (a failed batch and its exception) -> one dead letter per
    transaction, and (`OUTCOMES` output) the same as an `Outcome` to publish."""
    batch, error = failure
    # Beam's error output carries (exception type, repr of the exception, traceback).
    text = error[1] if isinstance(error, tuple) and len(error) >= 2 else repr(error)
    received_us = time.time_ns() // 1000
    _counter("inference_failures").inc(len(batch))
    for keyed in batch:
        example = keyed[1] if isinstance(keyed, tuple) else keyed
        message = f"inference: the model failed on this transaction's batch: {text}"
        dead = (INFERENCE_ERROR_KIND, transaction_dead_letter(example, message, received_us))
        yield dead
        yield beam.pvalue.TaggedOutput(OUTCOMES, dead_letter_outcome(dead, example.cells))


class Scored(NamedTuple):
    """What `ScoreTransactions` makes. Dead letters and outcomes come one PCollection per producing
    step, unflattened (`PublishOutcomes` and `WriteDeadLetters` take several): the local runner
    runs a Flatten once per bundle even in a pipeline that does not read it."""

    insights: beam.PCollection  # insight dicts
    dead_letters: tuple[beam.PCollection, ...]  # (error_kind, dead-letter record)
    observations: beam.PCollection  # for MonitorModel (transforms.health.Observer); empty unless observing
    outcomes: tuple[beam.PCollection, ...]  # keyed transforms.outcomes.Outcome per transaction: its insight or dead letter


class ScoreTransactions(beam.PTransform):
    """Featured transactions -> insights, with live model updates and failures as dead letters."""

    def __init__(
        self,
        handler: FraudModelHandler,
        model_dir: str,
        side_input_poll_secs: float | None = None,
        observe: bool = False,
        keyed: bool = False,
        batched: bool = False,
        label_buckets: int = 0,
    ):
        """`side_input_poll_secs`: watch `model_dir` with RunInference's `WatchFilePattern` side
        input at this interval (Dataflow); None when the handler watches the folder itself.
        `observe`: emit `Scored.observations` for model health (`transforms.health.MonitorModel`,
        whose `label_buckets` goes here too).
        `keyed`: the input is `to_scoring_example`'s pairs already (as `ComputeFeatures` emits them
        given `emit=to_scoring_example`), not `FeaturedTransaction`s. `batched`: it comes in
        lists of those pairs, each a batch (as `ComputeFeatures(batch_size=...)` makes them), and
        RunInference skips its own batching step (`with_no_batching`)."""
        super().__init__()
        self._handler = handler
        self._model_dir = model_dir.rstrip("/")
        self._side_input_poll = side_input_poll_secs
        self._observe = observe
        self._label_buckets = label_buckets
        self._keyed = keyed
        self._batched = batched
        if batched and not keyed:
            raise ValueError("batched input must be keyed: lists of to_scoring_example's pairs")

    def expand(self, featured):
        keyed = featured if self._keyed else featured | "KeyByTransaction" >> beam.Map(to_scoring_example)
        handler = KeyedModelHandler(self._handler)
        run_inference = RunInference(
            handler.with_no_batching() if self._batched else handler,
            **(
                {"watch_model_pattern": f"{self._model_dir}/*/{loader.METADATA_FILE}", "interval": self._side_input_poll}
                if self._side_input_poll
                else {}
            ),
        ).with_exception_handling()
        predictions, errors = keyed | "RunInference" >> run_inference
        assemble = AssembleInsightFn(self._model_dir if self._observe else None, self._label_buckets)
        assembled = predictions | "AssembleInsights" >> beam.ParDo(assemble).with_outputs(
            DEAD_LETTERS, OBSERVATIONS, OUTCOMES, main="insights"
        )
        failed = errors.failed_inferences | "FailedInferences" >> dofn.FlatMap(failed_batch_dead_letters).with_outputs(
            OUTCOMES, main="dead_letters"
        )
        return Scored(
            assembled.insights,
            (assembled[DEAD_LETTERS], failed.dead_letters),
            assembled[OBSERVATIONS],
            (assembled[OUTCOMES], failed[OUTCOMES]),
        )
