"""Kernel costs in one process, and the full transform chain against the null chain in batch.

- kernels: microseconds per event to validate a transaction payload, to update the customer and
  terminal feature cores, and to run the model alone (the `explain` signature: scores and
  contributions) at batch sizes 1, 64 and 256;
- chains: 100,000 simulated transactions through the full chain (validate -> Bigtable-backed
  features -> RunInference -> insight) and through the null chain (validate -> format), both in
  a batch pipeline on the FnApiRunner (one process), events per second and their ratio.
"""

from __future__ import annotations

import json
import statistics
import time

import apache_beam as beam

CHAIN_EVENTS = 100_000


def _median_time(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def transaction_payloads(history, limit: int) -> list[bytes]:
    out = []
    with open(history, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["kind"] == "transaction":
                out.append(json.dumps(record["event"]).encode("utf-8"))
                if len(out) == limit:
                    break
    return out


def bench_kernels(history, model_dir, repeat: int) -> dict:
    import numpy as np

    from models import loader
    from models.features import RAW_FEATURES
    from rtml import events
    from rtml.features import CustomerState, TerminalState

    payloads = transaction_payloads(history, 20_000)
    parsed = [events.parse_transaction(p) for p in payloads]
    validate = _median_time(repeat, lambda: [events.parse_transaction(p) for p in payloads]) / len(payloads)

    def features():
        customers, terminals = {}, {}
        for tx in parsed:
            customers.setdefault(tx.customer_id, CustomerState()).update(tx)
            terminals.setdefault(tx.terminal_id, TerminalState()).update(tx)

    feature_us = _median_time(repeat, features) / len(parsed)
    model = loader.load(loader.latest(str(model_dir)))
    rng = np.random.default_rng(0)
    infer = {}
    for size in (1, 64, 256):
        batch = {name: rng.random(size).astype(np.float32) for name in RAW_FEATURES}
        model.explain(batch)  # warm-up: trace and first call
        calls = max(20, 2000 // size)
        seconds = _median_time(repeat, lambda batch=batch, calls=calls: [model.explain(batch) for _ in range(calls)])
        infer[str(size)] = round(seconds / calls / size * 1e6, 1)
    return {
        "validate_us_per_event": round(validate * 1e6, 2),
        "features_us_per_event": round(feature_us * 1e6, 2),
        "infer_us_per_event_by_batch_size": infer,
    }


def _null_chain(pipeline, payloads):
    from transforms.validation import ValidateMessages

    validated = pipeline | "Payloads" >> beam.Create(payloads, reshuffle=False) | "Validate" >> ValidateMessages("transactions")
    return validated.events | "Format" >> beam.Map(lambda tx: json.dumps(tx._asdict()))


def _full_chain(pipeline, payloads, store, model_dir):
    from transforms.features import ComputeFeatures, WriteEntityCells
    from transforms.scoring import FraudModelHandler, ScoreTransactions, insight_message
    from transforms.validation import ValidateMessages

    validated = pipeline | "Payloads" >> beam.Create(payloads, reshuffle=False) | "Validate" >> ValidateMessages("transactions")
    no_feedback = pipeline | "NoFeedback" >> beam.Create([])
    computed = (validated.events, no_feedback) | "ComputeFeatures" >> ComputeFeatures(store)
    handler = FraudModelHandler(str(model_dir), poll_secs=None, max_batch_size=256)
    scored = computed.transactions | "Score" >> ScoreTransactions(handler, str(model_dir))
    # No Pub/Sub in a batch chain: each insight's state cells are written as the stream writes them after publishing.
    _ = (
        scored.outcomes
        | "FlattenOutcomes" >> beam.Flatten()
        | "StateCells" >> beam.FlatMap(lambda keyed: [(key, [cell]) for key, cell in keyed[1].cells])
        | "WriteEntityCells" >> WriteEntityCells(store, max_buffering_secs=None)  # batch: by count only
    )
    return scored.insights | "Format" >> beam.Map(insight_message)


def _run_chain(build) -> tuple[float, int]:
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_pipelines import options as opts

    options = PipelineOptions(["--direct_num_workers=1", "--direct_running_mode=in_memory"])
    opts.prepare_local_run(options, streaming=False)
    started = time.perf_counter()
    pipeline = beam.Pipeline(options=options)
    outputs = build(pipeline)
    _ = outputs | "Count" >> beam.combiners.Count.Globally() | "Check" >> beam.Map(_expect_all)
    pipeline.run().wait_until_finish()
    return time.perf_counter() - started, CHAIN_EVENTS


def _expect_all(count: int) -> None:
    if count != CHAIN_EVENTS:
        raise RuntimeError(f"chain emitted {count} outputs for {CHAIN_EVENTS} inputs")


def bench_chains(services, history, model_dir, repeat: int, log) -> dict:
    from rtml import emulators
    from transforms.features import StoreConfig

    payloads = transaction_payloads(history, CHAIN_EVENTS)
    if len(payloads) != CHAIN_EVENTS:
        raise RuntimeError(f"need {CHAIN_EVENTS} transactions, the file has {len(payloads)}")
    from transforms import scoring

    null_times, full_times = [], []
    scoring.BATCH_SIZES.clear()
    for attempt in range(repeat):
        null_times.append(_run_chain(lambda p: _null_chain(p, payloads))[0])
        table = f"chain{attempt}{int(time.time())}"
        emulators.ensure_feature_table(services, table)
        store = StoreConfig(services.project, services.instance, table)
        full_times.append(_run_chain(lambda p, store=store: _full_chain(p, payloads, store, model_dir))[0])
        log(f"chain run {attempt + 1}: null {null_times[-1]:.1f} s, full {full_times[-1]:.1f} s")
    null_s, full_s = statistics.median(null_times), statistics.median(full_times)
    batches = sum(scoring.BATCH_SIZES.values())
    examples = sum(size * n for size, n in scoring.BATCH_SIZES.items())
    return {
        "events": CHAIN_EVENTS,
        "null_chain_events_per_s": round(CHAIN_EVENTS / null_s, 1),
        "full_chain_events_per_s": round(CHAIN_EVENTS / full_s, 1),
        "ratio_full_to_null": round(null_s / full_s, 3),
        "null_seconds": [round(t, 1) for t in null_times],
        "full_seconds": [round(t, 1) for t in full_times],
        "inference_batches": batches,
        "mean_inference_batch_size": round(examples / max(batches, 1), 1),
        "max_inference_batch_size": max(scoring.BATCH_SIZES, default=0),
    }
