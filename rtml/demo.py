"""`rtml demo`: the whole loop on simulated data, end to end on the local emulators.

Emulators up -> simulate 90 days -> backfill the first 83 (training examples, and the feature
state into a fresh Bigtable table) -> train on three weeks that end a label-delay week before
the stream starts -> start the scoring pipeline -> replay the last week through Pub/Sub with a
share of malformed messages -> collect every insight and dead letter -> evaluate the insights
against the simulated fraud reports -> print a summary. Everything it started is stopped.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections import Counter
from pathlib import Path

from rtml import config, emulators, pubsub_tools, simulator
from rtml.processes import PipelineProcess

DAYS = 90
CUSTOMERS = 600
TERMINALS = 1200
START = dt.date(2026, 1, 1)
STREAM_DAYS = 7
TRAIN_DAYS = 21
LABEL_DELAY_DAYS = 7
MALFORMED_RATE = 0.01
# Offered load: well below what the local DirectRunner sustains for scoring with model health on
# (see README "Monitoring"), so the latencies measure the pipeline rather than a queue.
REPLAY_RATE = 25.0
# The replay starts with the scoring process, so its first transactions wait while the pipeline
# starts and loads the model; the summary also gives the latency of those published after this.
STEADY_AFTER_S = 30.0


def _step(text: str) -> None:
    print(f"\n==> [{dt.datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def windows() -> dict[str, dt.date]:
    """The demo's calendar: stream the last week, train on three weeks ending a week before it."""
    end = START + dt.timedelta(days=DAYS - 1)
    stream_start = end - dt.timedelta(days=STREAM_DAYS - 1)
    train_end = stream_start - dt.timedelta(days=LABEL_DELAY_DAYS + 1)
    return {
        "train_start": train_end - dt.timedelta(days=TRAIN_DAYS - 1),
        "train_end": train_end,
        "stream_start": stream_start,
        "stream_end": end,
    }


def run(services: config.LocalServices, workdir: str = "out/demo", keep_emulators: bool = False) -> int:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    started_here = not all(row["running"] or row["answering"] for row in emulators.status(services))
    _step("starting the local emulators")
    emulators.start(services, log=lambda text: print(text, file=sys.stderr))
    try:
        with emulators.emulator_environment(services):
            return _loop(services, work)
    finally:
        if started_here and not keep_emulators:
            _step("stopping the emulators this demo started")
            emulators.stop(log=lambda text: print(text, file=sys.stderr))


def split_history(history: Path, cut: str, end: str, before: Path, after: Path) -> tuple[int, int]:
    """Lines published before `cut` go to `before`; from `cut` up to `end` (exclusive) to `after`."""
    counts = [0, 0]
    with open(before, "w", encoding="utf-8") as first, open(after, "w", encoding="utf-8") as second:
        for line in pubsub_tools.read_replay(history):
            record = json.dumps({"kind": line.kind, "event": line.event}) + "\n"
            if line.published_at < cut:
                first.write(record)
                counts[0] += 1
            elif line.published_at < end:
                second.write(record)
                counts[1] += 1
    return counts[0], counts[1]


def _loop(services: config.LocalServices, work: Path) -> int:
    from rtml import cli, evaluate, loadtest

    calendar = windows()
    history, backfill_file, stream_file = work / "history.jsonl", work / "backfill.jsonl", work / "stream.jsonl"
    _step(f"simulating {DAYS} days of {CUSTOMERS} customers at {TERMINALS} terminals")
    simulated = simulator.simulate_to_file(
        simulator.SimulationConfig(days=DAYS, customers=CUSTOMERS, terminals=TERMINALS, start=START),
        history,
        progress=True,
    )
    cut = f"{calendar['stream_start'].isoformat()}T00:00:00Z"
    stop = f"{(calendar['stream_end'] + dt.timedelta(days=1)).isoformat()}T00:00:00Z"
    in_history, in_stream = split_history(history, cut, stop, backfill_file, stream_file)
    print(f"{in_history:,} events before {cut} to backfill, {in_stream:,} to stream", file=sys.stderr)

    table = f"demo-{int(time.time())}"
    emulators.ensure_feature_table(services, table)
    service_flags = [
        f"--project={services.project}",
        f"--pubsub-emulator={services.pubsub_host}",
        f"--bigtable-emulator={services.bigtable_host}",
    ]
    _step(f"backfilling the history: training examples, and the feature state into Bigtable table {table}")
    if cli.main(["backfill", "--input", str(backfill_file), "--examples-out", str(work / "examples"), "--table", table, *service_flags]):
        return 1
    _step(f"training on {calendar['train_start']} .. {calendar['train_end']} (tf.Transform + Keras)")
    model_dir = work / "models"
    train_args = ["--examples", str(work / "examples"), "--model-dir", str(model_dir), "--quiet"]
    train_args += ["--train-start", calendar["train_start"].isoformat(), "--train-end", calendar["train_end"].isoformat()]
    if cli.main(["train", *train_args]):
        return 1

    project = services.project
    topics = {topic: topic for topic in config.TOPICS}
    # Messages left on the subscriptions by earlier runs would be scored or counted too.
    for topic in (config.TRANSACTIONS_TOPIC, config.FEEDBACK_TOPIC, config.INSIGHTS_TOPIC, config.DEAD_LETTER_TOPIC, config.HEALTH_TOPIC):
        pubsub_tools.drain(config.subscription_for(topic), project)
    _step("starting the scoring pipeline (python -m beam_pipelines.score)")
    args = [f"--project={project}", f"--bigtable_table={table}", f"--model_dir={model_dir}"]
    transactions = sum(1 for line in pubsub_tools.read_replay(stream_file) if line.kind == "transaction")
    with PipelineProcess("beam_pipelines.score", args, work / "score.log", services.environ()) as pipeline:
        _step(
            f"replaying {calendar['stream_start']} .. {calendar['stream_end']} at {REPLAY_RATE:.0f} events/s "
            f"with {MALFORMED_RATE:.0%} malformed messages; collecting insights and dead letters"
        )
        measured = loadtest.drive(
            stream_file,
            project,
            topics,
            config.subscription_for(config.INSIGHTS_TOPIC),
            config.subscription_for(config.DEAD_LETTER_TOPIC),
            transactions,
            pipeline,
            rate=REPLAY_RATE,
            malformed_rate=MALFORMED_RATE,
            label="insights",
        )
        health = []  # the health records published so far (one a minute); `rtml top` shows them live
        pubsub_tools.pull(config.subscription_for(config.HEALTH_TOPIC), project, idle_timeout=2.0, on_message=health.append)
    insights_file = work / "insights.jsonl"
    with open(insights_file, "w", encoding="utf-8") as handle:
        for message in measured.outputs.values():
            handle.write(message.data.decode("utf-8") + "\n")
    _step("evaluating the insights against the simulated fraud reports")
    quality = evaluate.evaluate(insights_file, history)
    from models import loader

    last_health = json.loads(health[-1].data) if health else None
    ok = _print_summary(simulated, measured, transactions, quality, insights_file, loader.latest(str(model_dir)), len(health), last_health)
    return 0 if ok else 1


def _print_summary(
    simulated, measured, transactions: int, quality: dict, insights_file: Path, version_dir, health_records: int, last_health: dict | None
) -> bool:
    from rich.console import Console
    from rich.table import Table

    stats = measured.stats
    malformed = sum(stats.malformed.values())
    dead = sum(measured.dead_letters.values())
    decisions = Counter(json.loads(m.data)["decision"] for m in measured.outputs.values())
    p50, p99 = measured.latency_percentiles(50, 99)
    steady_p50, steady_p99 = measured.latency_percentiles(50, 99, after_s=STEADY_AFTER_S)
    extra = set(measured.outputs) - set(measured.published_at_us)
    ok = len(measured.outputs) == transactions and not extra and measured.duplicates == 0 and dead == malformed
    table = Table(title="rtml demo: the whole loop")
    table.add_column("what")
    table.add_column("value", justify="right", overflow="fold")
    rows = [
        ("simulated transactions (90 days)", f"{simulated.transactions:,}"),
        ("events in: transactions streamed", f"{stats.transactions:,}"),
        ("events in: fraud reports streamed", f"{stats.feedback:,}"),
        ("events in: malformed messages", f"{malformed:,}"),
        ("insights out", f"{len(measured.outputs):,}"),
        ("duplicate insights", f"{measured.duplicates:,}"),
        ("dead letters", f"{dead:,}"),
    ]
    rows += [(f"  decision: {name}", f"{decisions.get(name, 0):,} ({decisions.get(name, 0) / max(len(measured.outputs), 1):.2%})") for name in ("approve", "review", "decline")]

    def metric(name: str) -> str:
        value = quality.get(name)
        return "n/a" if value is None else f"{value:.4f}"

    rows += [
        ("frauds among scored", f"{quality['frauds']:,}"),
        ("AUC ROC", metric("auc_roc")),
        ("average precision", metric("average_precision")),
        ("card precision@100", metric("card_precision_at_100")),
        (f"latency publish -> insight p50 / p99 (offered {REPLAY_RATE:.0f} events/s)", f"{p50:,.0f} ms / {p99:,.0f} ms"),
        (f"  the same after the first {STEADY_AFTER_S:.0f} s (the pipeline starts as the replay does)", f"{steady_p50:,.0f} ms / {steady_p99:,.0f} ms"),
        ("throughput (insights/s)", f"{measured.throughput():,.1f}"),
        ("health records on model-health (one a minute)", f"{health_records:,}"),
    ]
    if last_health is not None:
        labels = last_health["labels"]
        rows += [
            ("  last: drifted features (PSI >= 0.2)", ", ".join(last_health["drifted"]) or "none"),
            ("  last: precision so far, review / decline", " / ".join("-" if labels["precision"][d] is None else f"{labels['precision'][d]:.2%}" for d in ("review", "decline"))),
            ("  last: reported frauds among the scored (reports come ~7 days later)", f"{labels['reported_frauds']:,}"),
            ("  last: reported frauds flagged", "-" if labels["fraud_flagged_share"] is None else f"{labels['fraud_flagged_share']:.2%}"),
        ]
    rows.append(("reconciled (one insight per transaction, one dead letter per bad message)", "yes" if ok else "NO"))
    for name, value in rows:
        table.add_row(name, value)
    console = Console()
    console.print(table)
    # The paths go below the table, whole and unwrapped, so that they can be copied from any terminal.
    for name, path in (("insights", str(insights_file)), ("model report", f"{version_dir}/report/summary.md" if version_dir else "-")):
        console.print(f"{name}: {path}", soft_wrap=True, markup=False, highlight=False)
    return ok
