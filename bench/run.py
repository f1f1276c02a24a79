"""`make bench`: performance figures measured in one run on this machine, written as ratios.

Phases (each timed phase repeated `--repeat` times, the median kept; data generation and
process start-up are outside the timed part):
- backfill: `beam_pipelines.backfill` over 6 months of 5,000 customers and 10,000 terminals
  (about 1.8 million transactions, examples written and feature state loaded into Bigtable),
  next to `bench/plain_features.py`, a plain single-process Python implementation of the same
  features over the same file;
- kernels and chains: `bench/chain.py`, microseconds per event of validation, features and the
  model alone (batch 1, 64, 256), and 100,000 transactions through the full chain against the
  null chain in a batch pipeline;
- scoring: `bench/streaming.py`, the passthrough pipeline against the scoring pipeline on the
  emulators (maximum throughput, and latency at 100 events/s);
- streaming Bigtable RPCs: the feature pipeline on the bundle-based DirectRunner against the
  emulators, warm-started by a backfill of the first week, streaming the second week; Bigtable
  read and write RPCs per 1,000 events, over the whole stream and over its second half.

Writes `bench/results.json` and the table in `BENCHMARKS.md`.
"""

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data"


def _log(text: str) -> None:
    print(f"[bench {dt.datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def simulated(name: str, **config) -> Path:
    """A simulated replay file, generated once and kept under bench/data/ (not committed)."""
    from rtml import simulator

    DATA.mkdir(exist_ok=True)
    path = DATA / f"{name}.jsonl"
    if not path.exists():
        _log(f"simulating {name}: {config}")
        simulator.simulate_to_file(simulator.SimulationConfig(**config), path)
    return path


def median_run(repeat: int, run) -> tuple[float, list[float], object]:
    times, last = [], None
    for _ in range(repeat):
        started = time.monotonic()
        last = run()
        times.append(time.monotonic() - started)
    return statistics.median(times), times, last


def bench_backfill(services, repeat: int) -> dict:
    from beam_pipelines import backfill
    from bench.plain_features import plain_features
    from rtml import emulators

    path = simulated("six_months", days=180, customers=5000, terminals=10000, seed=42)
    _log("plain single-process features")
    plain_s, plain_all, counts = median_run(repeat, lambda: plain_features(str(path)))
    events = counts["transactions"] + counts["feedback"]

    def run_backfill():
        table = f"bench{int(time.time() * 1000)}"
        emulators.ensure_feature_table(services, table)
        with tempfile.TemporaryDirectory() as out:
            result = backfill.run(
                [
                    f"--input={path}",
                    f"--examples_out={out}",
                    f"--project={services.project}",
                    f"--bigtable_table={table}",
                ]
            )
            result.wait_until_finish()
            return backfill.summary(result)

    _log("backfill (FnApiRunner, 2 worker processes)")
    backfill_s, backfill_all, totals = median_run(repeat, run_backfill)
    assert totals["transactions"] == counts["transactions"], (totals, counts)
    return {
        "events": events,
        "transactions": counts["transactions"],
        "plain_seconds": round(plain_s, 2),
        "plain_runs": [round(t, 2) for t in plain_all],
        "plain_events_per_s": round(events / plain_s),
        "backfill_seconds": round(backfill_s, 2),
        "backfill_runs": [round(t, 2) for t in backfill_all],
        "backfill_events_per_s": round(events / backfill_s),
        "backfill_examples": totals.get("examples"),
        "backfill_state_rows": totals.get("state_rows_written"),
        "ratio_backfill_to_plain": round(plain_s / backfill_s, 3),
    }


def bench_streaming_rpcs(services) -> dict:
    """Warm start from a backfill of week 1, stream week 2, count Bigtable RPCs from the pipeline's metrics."""
    from beam_pipelines import featurize
    from rtml import emulators, entity_store, pubsub_tools
    from tests.conftest import make_topics
    from tests.feature_runs import featurize_args, run_backfill, write_replay

    path = simulated("two_weeks", days=14, customers=500, terminals=1000, seed=7)
    lines = list(pubsub_tools.read_replay(path))
    split = next(i for i, line in enumerate(lines) if line.published_at >= "2026-01-08")
    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    first, second = (
        write_replay(work / "first.jsonl", lines[:split]),
        write_replay(work / "second.jsonl", lines[split:]),
    )
    table = f"benchstream{int(time.time())}"
    emulators.ensure_feature_table(services, table)
    _log("warm start: backfill of week 1")
    run_backfill(services, [first], work / "examples", table=table)
    topics = make_topics(services)
    project = services.project
    entity_store.PROCESS_RPCS.clear()
    result = featurize.run(featurize_args(services, topics, table))

    def counters() -> dict:
        """Bigtable requests of this process's feature DoFns (the job runs in-process)."""
        return {
            "bigtable_read_rpcs": entity_store.PROCESS_RPCS["read"],
            "bigtable_write_rpcs": entity_store.PROCESS_RPCS["write"],
        }

    _log("streaming week 2 through the feature pipeline")
    stats = pubsub_tools.replay(
        second,
        project=project,
        transactions_topic=topics["transactions"],
        feedback_topic=topics["fraud-feedback"],
        progress=False,
    )
    events = stats.transactions + stats.feedback
    received = 0
    started = time.monotonic()
    half = None
    while received < stats.transactions and time.monotonic() - started < 1800:
        received += pubsub_tools.pull(topics["features"] + "-sub", project, count=200, idle_timeout=1.0)
        if half is None and received >= stats.transactions // 2:
            half = (received, counters())
    time.sleep(3)  # let the last batched writes flush
    final = counters()
    seconds = time.monotonic() - started
    result.cancel()
    rpcs = final.get("bigtable_read_rpcs", 0) + final.get("bigtable_write_rpcs", 0)
    out = {
        "events": events,
        "transactions_featured": received,
        "seconds": round(seconds, 1),
        "events_per_s": round(events / seconds, 1),
        "read_rpcs": final.get("bigtable_read_rpcs", 0),
        "write_rpcs": final.get("bigtable_write_rpcs", 0),
        "rpcs_per_1000_events": round(1000 * rpcs / events, 1),
    }
    if half is not None:
        half_received, early = half
        later_rpcs = rpcs - early.get("bigtable_read_rpcs", 0) - early.get("bigtable_write_rpcs", 0)
        later_events = max(1, received - half_received)
        out["second_half_rpcs_per_1000_transactions"] = round(1000 * later_rpcs / later_events, 1)
        out["second_half_read_rpcs"] = final.get("bigtable_read_rpcs", 0) - early.get("bigtable_read_rpcs", 0)
    return out


def write_report(results: dict) -> None:
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    b, s = results.get("backfill"), results.get("streaming_rpcs")
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` on {results['machine']['when']} on {results['machine']['cpus']} CPUs "
        f"({results['machine']['platform']}), Python {results['machine']['python']}. Every figure comes from "
        f"that one run; timed phases repeated {results['repeat']} time(s), median kept. Raw numbers: "
        "`bench/results.json`.",
        "",
        "| benchmark | runner | measured | baseline | ratio | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    if b:
        lines.append(
            f"| backfill, {b['transactions']:,} transactions (180 days, 5,000 customers) | FnApiRunner, 2 processes, "
            f"examples + Bigtable state | {b['backfill_events_per_s']:,} events/s ({b['backfill_seconds']} s) | "
            f"plain Python, same features: {b['plain_events_per_s']:,} events/s ({b['plain_seconds']} s) | "
            f"{b['ratio_backfill_to_plain']} | >= 1.0 |"
        )
    if s:
        lines.append(
            f"| streaming Bigtable RPCs, {s['events']:,} events (warm start) | bundle-based DirectRunner + emulators | "
            f"{s['rpcs_per_1000_events']} RPCs per 1,000 events ({s['read_rpcs']:,} reads, {s['write_rpcs']:,} writes); "
            f"second half {s.get('second_half_rpcs_per_1000_transactions', '-')} | one RPC per event: 1,000 | "
            f"{round(s['rpcs_per_1000_events'] / 1000, 3)} | < 100 per 1,000 |"
        )
    k, ch = results.get("kernels"), results.get("chain")
    if k:
        infer = k["infer_us_per_event_by_batch_size"]
        lines.append(
            f"| kernels, one process | plain Python / TensorFlow | validate {k['validate_us_per_event']} us/event, features "
            f"{k['features_us_per_event']} us/event, model alone {infer['1']} / {infer['64']} / {infer['256']} us/event at "
            "batch 1 / 64 / 256 | - | - | - |"
        )
    if ch:
        lines.append(
            f"| full chain (validate, features, RunInference, insight), {ch['events']:,} transactions, batch | FnApiRunner, "
            f"1 process, Bigtable emulator | {ch['full_chain_events_per_s']:,} events/s (mean inference batch "
            f"{ch['mean_inference_batch_size']}) | null chain (validate, format): {ch['null_chain_events_per_s']:,} events/s | "
            f"{ch['ratio_full_to_null']} | - |"
        )
    c = results.get("scoring")
    if c:
        p, q = c["passthrough"], c["scoring"]
        lines.append(
            f"| streaming throughput, {c['events']:,} transactions published at once | bundle-based DirectRunner + emulators | "
            f"scoring: {q['max_throughput_per_s']['median']} events/s (mean inference batch "
            f"{q.get('mean_inference_batch_size', {}).get('median', '-')}) | passthrough (validate -> write): "
            f"{p['max_throughput_per_s']['median']} events/s | {c['throughput_ratio']} | >= 0.9 |"
        )
        if "scoring_no_health" in c:
            n = c["scoring_no_health"]
            lines.append(
                f"| model health's cost, {c['events']:,} transactions published at once | bundle-based DirectRunner + emulators | "
                f"scoring with health: {q['max_throughput_per_s']['median']} events/s | scoring with `--no_health`: "
                f"{n['max_throughput_per_s']['median']} events/s (p99 at {c['paced_rate_per_s']:.0f}/s: {n['p99_ms']['median']} ms) | "
                f"{c['health_throughput_ratio']} | - |"
            )
        lines.append(
            f"| streaming latency p99 at {c['paced_rate_per_s']:.0f} events/s offered | bundle-based DirectRunner + emulators | "
            f"scoring: p50 {q['p50_ms']['median']} ms, p99 {q['p99_ms']['median']} ms | passthrough: p50 "
            f"{p['p50_ms']['median']} ms, p99 {p['p99_ms']['median']} ms | {c['p99_ratio']} | <= 1.5 |"
        )
    lines += [
        "",
        "Reproduce: `make bench` (starts its own emulators; the 6-month file is generated into `bench/data/`).",
        "",
    ]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per timed phase, median kept (default: 3)")
    parser.add_argument("--only", choices=["backfill", "streaming", "scoring", "chain"], help="run one phase only")
    args = parser.parse_args(argv)
    from rtml import config, emulators

    state = Path(tempfile.mkdtemp(prefix="bench-emulators-"))
    services = config.LocalServices(
        pubsub_host=f"localhost:{emulators.free_port()}", bigtable_host=f"localhost:{emulators.free_port()}"
    )
    emulators.start(services, state=state, log=_log)
    os.environ.update(services.environ())
    results = {
        "machine": {
            "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "repeat": args.repeat,
    }
    try:
        if args.only in (None, "backfill"):
            results["backfill"] = bench_backfill(services, args.repeat)
            _log(json.dumps(results["backfill"]))
        if args.only in (None, "streaming"):
            results["streaming_rpcs"] = bench_streaming_rpcs(services)
            _log(json.dumps(results["streaming_rpcs"]))
        if args.only in (None, "scoring", "chain"):
            from bench import chain, streaming

            models = streaming.model_dir(Path(tempfile.mkdtemp(prefix="bench-model-")), _log)
        if args.only in (None, "chain"):
            history = simulated("chain", days=30, customers=1700, terminals=3400, seed=5)
            results["kernels"] = chain.bench_kernels(history, models, args.repeat)
            _log(json.dumps(results["kernels"]))
            results["chain"] = chain.bench_chains(services, history, models, args.repeat, _log)
            _log(json.dumps(results["chain"]))
        if args.only in (None, "scoring"):
            results["scoring"] = streaming.bench_scoring(services, args.repeat, _log, models)
            _log(json.dumps(results["scoring"]))
    finally:
        emulators.stop(state=state, log=_log)
    write_report(results)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
