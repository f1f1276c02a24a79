"""Streaming end to end on the emulators: the passthrough pipeline against the scoring pipeline.

Both run as `python -m beam_pipelines.NAME` on the bundle-based DirectRunner against the same
emulators, fed the same simulated transactions (feedback left out, so each input has exactly
one output):
- maximum sustained throughput: a warm-up of 200 events, then 3,000 published as fast as
  possible; outputs per second from the first publish to the last output;
- latency at 100 events/s: 3,000 events paced at 100/s; publish-to-output p50 and p99.
Passthrough is `beam_pipelines.validate` (validate -> write); scoring is `beam_pipelines.score`
(validate -> Bigtable-backed features -> RunInference -> insight, and model health), each on
fresh topics, and scoring on a fresh feature table. Scoring also runs with `--no_health`, to
show what the health records cost.
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
from pathlib import Path

WARMUP = 200
EVENTS = 3000
PACED_RATE = 100.0


def _transactions_only(source: Path, out: Path, skip: int, count: int) -> Path:
    kept = 0
    with open(source, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for line in src:
            if '"kind": "transaction"' not in line and '"kind":"transaction"' not in line:
                continue
            if skip:
                skip -= 1
                continue
            dst.write(line)
            kept += 1
            if kept == count:
                break
    return out


def model_dir(work: Path, log) -> Path:
    """A small exported model: simulate, backfill, `rtml train` (the same steps a user runs)."""
    from beam_pipelines import backfill, train
    from rtml import simulator

    history = work / "history.jsonl"
    simulator.simulate_to_file(simulator.SimulationConfig(days=40, customers=600, terminals=1200, seed=11), history)
    backfill.run(["--input", str(history), "--examples_out", str(work / "examples"), "--no_state"]).wait_until_finish()
    log("training the benchmark model")
    argv = ["--examples", str(work / "examples"), "--train_start", "2026-01-31", "--train_end", "2026-02-09"]
    train.run([*argv, "--model_dir", str(work / "models")], verbose=0)
    return work / "models"


def _run_pipeline(
    services, module: str, args: list[str], output_topic_key: str, source: Path, work: Path, log, repeat: int, variant: str = ""
) -> dict:
    """`variant` names a second run of the same module (own log, own feature table)."""
    from rtml import config, loadtest
    from rtml.processes import PipelineProcess
    from tests.conftest import make_topics

    results = {"max_throughput_per_s": [], "p50_ms": [], "p99_ms": [], "paced_throughput_per_s": []}
    for attempt in range(repeat):
        topics = make_topics(services)
        project = services.project
        io = [
            f"--project={project}",
            f"--transactions_subscription={config.subscription_path(project, topics['transactions'] + '-sub')}",
            f"--feedback_subscription={config.subscription_path(project, topics['fraud-feedback'] + '-sub')}",
            f"--dead_letter_topic={config.topic_path(project, topics['dead-letter'])}",
            f"--output_topic={config.topic_path(project, topics[output_topic_key])}",
        ]
        extra = list(args)
        if module == "beam_pipelines.score":
            from rtml import emulators

            table = f"bench{variant}{attempt}{abs(hash(str(work))) % 10_000}"
            emulators.ensure_feature_table(services, table)
            extra.append(f"--bigtable_table={table}")
        files = {
            name: _transactions_only(source, work / f"{name}-{attempt}.jsonl", skip, count)
            for name, skip, count in (
                ("warmup", attempt * 7000, WARMUP),
                ("burst", attempt * 7000 + WARMUP, EVENTS),
                ("paced", attempt * 7000 + WARMUP + EVENTS, EVENTS),
            )
        }
        subscription = topics[output_topic_key] + "-sub"
        with PipelineProcess(module, io + extra, work / f"{module}{variant}-{attempt}.log") as job:
            loadtest.drive(files["warmup"], project, topics, subscription, None, WARMUP, job, progress=False, idle_timeout_s=300)
            burst = loadtest.drive(files["burst"], project, topics, subscription, None, EVENTS, job, progress=False)
            paced = loadtest.drive(files["paced"], project, topics, subscription, None, EVENTS, job, rate=PACED_RATE, progress=False)
        batches, examples = logged_batches(work / f"{module}{variant}-{attempt}.log")
        results.setdefault("inference_batches_logged", []).append(batches)
        results.setdefault("mean_inference_batch_size", []).append(round(examples / batches, 2) if batches else None)
        if len(burst.outputs) != EVENTS or len(paced.outputs) != EVENTS:
            raise RuntimeError(f"{module}: expected {EVENTS} outputs, got {len(burst.outputs)} and {len(paced.outputs)}")
        p50, p99 = paced.latency_percentiles(50, 99)
        results["max_throughput_per_s"].append(round(burst.throughput(), 1))
        results["paced_throughput_per_s"].append(round(paced.throughput(), 1))
        results["p50_ms"].append(round(p50, 1))
        results["p99_ms"].append(round(p99, 1))
        log(f"{module} run {attempt + 1}: {json.dumps({k: v[-1] for k, v in results.items()})}")
    return {
        key: {"median": round(statistics.median([v for v in values if v is not None] or [0]), 2), "runs": values}
        for key, values in results.items()
    }


def logged_batches(log: Path) -> tuple[int, int]:
    """Inference batches and transactions from the scoring pipeline's periodic log summaries."""
    batches = examples = 0
    pattern = re.compile(r"inference: (\d+) batches, (\d+) transactions")
    for line in log.read_text(errors="replace").splitlines():
        match = pattern.search(line)
        if match:
            batches += int(match.group(1))
            examples += int(match.group(2))
    return batches, examples


def bench_scoring(services, repeat: int, log, models: Path | None = None) -> dict:
    from rtml import config, simulator

    work = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    models = models or model_dir(work, log)
    source = work / "stream.jsonl"
    simulator.simulate_to_file(simulator.SimulationConfig(days=14, customers=1500, terminals=3000, seed=21), source)
    log("passthrough pipeline (beam_pipelines.validate)")
    passthrough = _run_pipeline(services, "beam_pipelines.validate", [], config.VALIDATED_TOPIC, source, work, log, repeat)
    log("scoring pipeline (beam_pipelines.score)")
    scoring = _run_pipeline(
        services, "beam_pipelines.score", [f"--model_dir={models}"], config.INSIGHTS_TOPIC, source, work, log, repeat
    )
    log("scoring pipeline without model health (beam_pipelines.score --no_health)")
    no_health = _run_pipeline(
        services, "beam_pipelines.score", [f"--model_dir={models}", "--no_health"], config.INSIGHTS_TOPIC, source, work, log, repeat, "nohealth"
    )
    return {
        "events": EVENTS,
        "paced_rate_per_s": PACED_RATE,
        "passthrough": passthrough,
        "scoring": scoring,
        "scoring_no_health": no_health,
        "health_throughput_ratio": round(scoring["max_throughput_per_s"]["median"] / no_health["max_throughput_per_s"]["median"], 3),
        "throughput_ratio": round(scoring["max_throughput_per_s"]["median"] / passthrough["max_throughput_per_s"]["median"], 3),
        "p99_ratio": round(scoring["p99_ms"]["median"] / passthrough["p99_ms"]["median"], 3),
    }
