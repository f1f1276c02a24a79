"""The `rtml` command line: local emulators, simulated data, replay and tail, the demo."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from rtml import config

EXIT_USAGE = 2


class CommandError(RuntimeError):
    """A failure the user can act on; printed without a traceback."""


def _services(args: argparse.Namespace) -> config.LocalServices:
    return config.LocalServices(
        pubsub_host=args.pubsub_emulator,
        bigtable_host=args.bigtable_emulator,
        project=args.project,
        instance=args.instance,
    )


def _use_services(args: argparse.Namespace) -> config.LocalServices:
    """Point this process's Google clients at the emulators, unless `--no-emulators`."""
    services = _services(args)
    if getattr(args, "no_emulators", False):
        for key in services.environ():
            os.environ.pop(key, None)
    else:
        os.environ.update(services.environ())
    return services


def cmd_up(args: argparse.Namespace) -> int:
    from rtml import emulators

    emulators.start(_services(args))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from rtml import emulators

    stopped = emulators.stop()
    if not stopped:
        print("nothing to stop: no emulator started by `rtml up` is running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from rtml import emulators

    rows = emulators.status(_services(args))
    table = Table(title="local emulators")
    for column in ("emulator", "host", "pid", "running", "answering"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(("-" if row[c] is None else str(row[c])) for c in ("emulator", "host", "pid", "running", "answering"))
        )
    Console().print(table)
    return 0 if all(row["answering"] for row in rows) else 1


def cmd_simulate(args: argparse.Namespace) -> int:
    from rtml import simulator

    try:
        cfg = simulator.SimulationConfig(
            days=args.days,
            customers=args.customers,
            terminals=args.terminals,
            start=args.start,
            seed=args.seed,
            feedback_delay_days=args.feedback_delay_days,
        )
    except (ValueError, TypeError) as err:
        raise CommandError(str(err)) from None
    summary = simulator.simulate_to_file(cfg, args.out, progress=not args.quiet)
    _print_kv(
        f"wrote {args.out}",
        {
            "transactions": f"{summary.transactions:,}",
            "feedback events": f"{summary.feedback:,}",
            "fraud rate": f"{summary.fraud_rate:.3%}",
            **{f"frauds: {name}": f"{count:,}" for name, count in summary.frauds_by_scenario.items()},
            "event times": f"{summary.first_event_time} .. {summary.last_event_time}",
            "seconds": f"{summary.seconds:.1f}",
        },
    )
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from rtml import pubsub_tools

    _use_services(args)
    try:
        stats = pubsub_tools.replay(
            args.input,
            project=args.project,
            transactions_topic=args.transactions_topic,
            feedback_topic=args.feedback_topic,
            rate=args.rate,
            speedup=args.speedup,
            malformed_rate=args.malformed_rate,
            seed=args.seed,
            limit=args.limit,
            progress=not args.quiet,
        )
    except (pubsub_tools.ReplayFileError, ValueError, OSError) as err:
        raise CommandError(str(err)) from None
    _print_kv(
        f"published {args.input}",
        {
            "transactions": f"{stats.transactions:,}",
            "feedback": f"{stats.feedback:,}",
            "malformed": f"{sum(stats.malformed.values()):,}",
            "seconds": f"{stats.seconds:.1f}",
            "events/s": f"{stats.published / stats.seconds:,.0f}" if stats.seconds else "-",
        },
    )
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from rtml import pubsub_tools

    _use_services(args)
    out = open(args.out, "w", encoding="utf-8") if args.out else None  # noqa: SIM115 - closed below

    def handle(message: pubsub_tools.PulledMessage) -> None:
        text = message.data.decode("utf-8", "replace")
        if out is not None:
            out.write(text.rstrip("\n") + "\n")
        else:
            print(text, flush=True)

    try:
        count = pubsub_tools.pull(
            args.subscription, args.project, count=args.count, idle_timeout=args.idle_timeout, on_message=handle
        )
    except KeyboardInterrupt:
        count = None
    finally:
        if out is not None:
            out.close()
    if count is not None:
        print(
            f"read {count:,} messages from {args.subscription}" + (f" into {args.out}" if args.out else ""),
            file=sys.stderr,
        )
    return 0


def cmd_seek(args: argparse.Namespace) -> int:
    import time

    from rtml import events, pubsub_tools

    _use_services(args)
    if args.to is not None:
        try:
            to_us = events.parse_timestamp(args.to, "--to")
        except events.InvalidMessage as err:
            raise CommandError(f"{err} (for example 2026-11-22T10:15:00Z)") from None
    else:
        to_us = time.time_ns() // 1000 - int(args.minutes_back * 60e6)
    when = dt.datetime.fromtimestamp(to_us / 1e6, dt.UTC).isoformat(timespec="seconds")
    for subscription in args.subscriptions:
        try:
            pubsub_tools.seek(subscription, to_us, args.project)
        except ValueError as err:
            raise CommandError(str(err)) from None
        print(f"{subscription}: messages received since {when} will be delivered again")
    return 0


def _run_backfill(args: argparse.Namespace, inputs: list[str], examples_out: str, no_state: bool) -> tuple[dict, float]:
    """The backfill pipeline with a progress bar over the input bytes: (totals, seconds)."""
    import tempfile
    import threading
    import time

    from tqdm import tqdm

    from beam_pipelines import backfill

    sizes = []
    for path in inputs:
        if not path.startswith("gs://") and not os.path.exists(path):
            raise CommandError(f"--input {path}: no such file")
        sizes.append(os.path.getsize(path) if not path.startswith("gs://") else 0)
    with tempfile.NamedTemporaryFile("w+", suffix=".progress") as progress:
        argv = [f"--input={path}" for path in inputs]
        argv += [f"--examples_out={examples_out}", f"--shards={args.shards}", f"--project={args.project}"]
        argv += [f"--bigtable_instance={args.instance}", f"--bigtable_table={args.table}"]
        argv += [f"--progress_file={progress.name}", *(["--no_state"] if no_state else [])]
        outcome: dict = {}

        def work() -> None:
            try:
                result = backfill.run(argv)
                result.wait_until_finish()
                outcome["totals"] = backfill.summary(result)
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                outcome["error"] = err

        started = time.monotonic()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        with tqdm(total=sum(sizes) or None, unit="B", unit_scale=True, desc="backfill", file=sys.stderr) as bar:
            while thread.is_alive():
                thread.join(0.5)
                done = sum(int(line) for line in open(progress.name) if line.strip())
                bar.update(done - bar.n)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["totals"], time.monotonic() - started


def _backfill_summary(totals: dict, seconds: float, no_state: bool) -> dict[str, str]:
    rejected = sum(v for k, v in totals.items() if k.startswith("rejected_"))
    return {
        "lines read": f"{totals.get('lines', 0):,}",
        "transactions": f"{totals.get('transactions', 0):,}",
        "feedback events": f"{totals.get('feedback', 0):,}",
        "rejected lines (see rejected.jsonl)": f"{rejected:,}",
        "duplicate transactions skipped": f"{totals.get('duplicates', 0):,}",
        "training examples written": f"{totals.get('examples', 0):,}",
        "  of which labelled fraud": f"{totals.get('fraud_examples', 0):,}",
        "entity rows loaded into Bigtable": "skipped" if no_state else f"{totals.get('state_rows_written', 0):,}",
        "seconds": f"{seconds:.1f}",
        "transactions/s": f"{totals.get('transactions', 0) / seconds:,.0f}",
    }


def cmd_backfill(args: argparse.Namespace) -> int:
    _use_services(args)
    totals, seconds = _run_backfill(args, args.input, args.examples_out, args.no_state)
    _print_kv(f"backfill -> {args.examples_out}", _backfill_summary(totals, seconds, args.no_state))
    return 0


def _train_argv(args: argparse.Namespace, examples: str, train_start, train_end) -> list[str]:
    return [
        f"--examples={examples}",
        f"--train_start={train_start}",
        f"--train_end={train_end}",
        f"--model_dir={args.model_dir}",
        f"--validation_days={args.validation_days}",
        f"--model_type={args.model_type}",
        f"--epochs={args.epochs}",
        f"--seed={args.seed}",
        f"--review_rate={args.review_rate}",
        f"--decline_precision={args.decline_precision}",
        *([f"--model_version={args.version}"] if args.version else []),
    ]


def _run_training(args: argparse.Namespace, argv: list[str]) -> dict:
    from beam_pipelines import train

    print("analyzing the training window with tf.Transform (Beam), then training ...", file=sys.stderr)
    try:
        return train.run(argv, verbose=0 if args.quiet else 2)
    except ValueError as err:
        raise CommandError(str(err)) from None


def _training_summary(metadata: dict) -> dict[str, str]:
    validation = metadata["validation_metrics"]
    thresholds = metadata["thresholds"]
    examples = metadata["examples"]
    window = metadata["training_window"]
    return {
        "exported to": metadata["path"],
        "training window": f"{window['start']} .. {window['end']} (validation from {window['validation_start']})",
        "training examples (frauds)": f"{examples['train']:,} ({examples['train_positives']:,})",
        "validation examples (frauds)": f"{examples['validation']:,} ({examples['validation_positives']:,})",
        "epochs (best)": f"{metadata['model']['epochs_run']} ({metadata['model']['best_epoch']})",
        "validation AUC ROC": f"{validation['auc_roc']:.4f}",
        "validation average precision": f"{validation['average_precision']:.4f}",
        "validation card precision@100": f"{validation['card_precision_at_100']:.4f}",
        "review threshold (alert rate, precision)": f"{thresholds['review']:.4f} ({validation['review']['alert_rate']:.2%}, {validation['review']['precision']:.2%})",
        "decline threshold (alert rate, precision)": f"{thresholds['decline']:.4f} ({validation['decline']['alert_rate']:.2%}, {validation['decline']['precision']:.2%})",
        "report": f"{metadata['path']}/report/summary.md",
        "seconds (analyze, train + export)": f"{metadata['timings_s']['analyze']}, {metadata['timings_s']['train_and_export']}",
    }


def cmd_train(args: argparse.Namespace) -> int:
    if "://" not in args.examples and not os.path.isdir(args.examples):
        raise CommandError(f"--examples {args.examples}: no such folder (write it with `rtml backfill`)")
    metadata = _run_training(args, _train_argv(args, args.examples, args.train_start, args.train_end))
    _print_kv(f"model version {metadata['version']}", _training_summary(metadata))
    return 0


RETRAIN_REFUSED = 3  # exit code of `rtml retrain` when the guard keeps the serving version


def cmd_retrain(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from rtml import retrain

    _use_services(args)
    for path in args.input:
        if "://" not in path and not os.path.exists(path):
            raise CommandError(f"--input {path}: no such file")
    try:
        last_day = args.end or retrain.last_transaction_day(args.input)
        start, end = retrain.training_window(last_day, args.days, 0 if args.end else args.label_delay_days)
    except ValueError as err:
        raise CommandError(str(err)) from None
    work = args.work_dir or tempfile.mkdtemp(prefix="rtml-retrain-")
    examples_out = os.path.join(work, "examples") if "://" not in work else work.rstrip("/") + "/examples"
    print(
        f"retraining on {start} .. {end} ({args.days} days"
        + ("" if args.end else f", ending {args.label_delay_days} days before the last transaction, {last_day}")
        + f"); examples in {examples_out}",
        file=sys.stderr,
    )
    try:
        totals, seconds = _run_backfill(args, args.input, examples_out, no_state=True)
        _print_kv("backfill (feature state untouched)", _backfill_summary(totals, seconds, no_state=True))
        argv = _train_argv(args, examples_out, start, end)
        argv.append(f"--publish_guard={'none' if args.no_guard else 'average_precision'}")
        metadata = _run_training(args, argv)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    guard = metadata.get("publish_guard")
    summary = _training_summary(metadata)
    if guard is not None:
        serving = "none" if guard["serving_version"] is None else f"{guard['serving_version']}: {guard['serving']:.4f}"
        summary["guard: candidate AP vs serving AP (same examples)"] = f"{guard['candidate']:.4f} vs {serving}"
    if guard is not None and not guard["published"]:
        summary["exported to"] += " (NOT served)"
        _print_kv(f"model version {metadata['version']} REFUSED: worse than the serving version", summary)
        return RETRAIN_REFUSED
    _print_kv(f"model version {metadata['version']} published; running scorers pick it up", summary)
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from rtml import top

    services = _use_services(args)
    return top.main(args, services.project)


def cmd_serve(args: argparse.Namespace) -> int:
    from beam_pipelines import options as opts
    from beam_pipelines import score
    from models import loader

    newest = loader.latest(args.model_dir)
    if newest is None:
        raise CommandError(f"--model-dir {args.model_dir}: no model version there; export one with `rtml train`")
    try:
        loader.verify(newest)
    except loader.ModelIntegrityError as err:
        print(f"warning: {err}; an older valid version will serve", file=sys.stderr)
    services = _use_services(args)
    argv = [
        f"--project={args.project}",
        f"--bigtable_instance={args.instance}",
        f"--model_dir={args.model_dir}",
        f"--model_poll_secs={args.model_poll_secs}",
        f"--inference_max_batch_size={args.max_batch_size}",
    ]
    if args.no_emulators:
        argv += ["--pubsub_emulator_host=none", "--bigtable_emulator_host=none"]
    else:
        argv += [f"--pubsub_emulator_host={services.pubsub_host}", f"--bigtable_emulator_host={services.bigtable_host}"]
    print(f"serving from {args.model_dir} (newest version {newest.rsplit('/', 1)[-1]}); Ctrl-C stops", file=sys.stderr)
    opts.streaming_main(score.build, argv + [arg for arg in args.beam_args if arg != "--"])
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from rtml import evaluate

    for flag, path in (("--insights", args.insights), ("--feedback", args.feedback)):
        if not os.path.isfile(path):
            raise CommandError(f"{flag} {path}: no such file")
    try:
        report = evaluate.evaluate(args.insights, args.feedback, k=args.k)
    except ValueError as err:
        raise CommandError(str(err)) from None

    def metric(name: str) -> str:
        value = report[name]
        if value is not None:
            return f"{value:.4f}"
        return "undefined: no fraud among scored" if report["frauds"] == 0 else "undefined: every scored is fraud"

    _print_kv(
        f"evaluation of {args.insights}",
        {
            "insights scored": f"{report['insights']:,}",
            "duplicate insights ignored": f"{report['duplicates_ignored']:,}",
            "frauds among scored": f"{report['frauds']:,}",
            "fraud rate": f"{report['fraud_rate']:.3%}",
            "AUC ROC": metric("auc_roc"),
            "average precision": metric("average_precision"),
            f"card precision@{args.k} (mean of {report['days']:,} days)": metric(f"card_precision_at_{args.k}"),
            "reports without insight": f"{report['reports_without_insight']:,}",
        },
    )
    line = json.dumps(report)
    print(line)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as out:
            out.write(line + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rtml import demo

    return demo.run(_services(args), workdir=args.workdir, keep_emulators=args.keep_emulators)


def _print_kv(title: str, values: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right", overflow="fold")  # a long path wraps; it is never cut
    for key, value in values.items():
        table.add_row(key, value)
    Console(stderr=False).print(table)


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from rtml import top

    services = argparse.ArgumentParser(add_help=False)
    group = services.add_argument_group("services (default: the local emulators)")
    group.add_argument(
        "--project",
        default=os.environ.get("PUBSUB_PROJECT_ID", config.DEFAULT_PROJECT),
        help="Google Cloud project (default: %(default)s)",
    )
    group.add_argument(
        "--instance", default=config.DEFAULT_BIGTABLE_INSTANCE, help="Bigtable instance (default: %(default)s)"
    )
    group.add_argument(
        "--pubsub-emulator",
        default=os.environ.get("PUBSUB_EMULATOR_HOST", config.DEFAULT_PUBSUB_HOST),
        metavar="HOST:PORT",
        help="Pub/Sub emulator address (default: %(default)s)",
    )
    group.add_argument(
        "--bigtable-emulator",
        default=os.environ.get("BIGTABLE_EMULATOR_HOST", config.DEFAULT_BIGTABLE_HOST),
        metavar="HOST:PORT",
        help="Bigtable emulator address (default: %(default)s)",
    )
    cloud = argparse.ArgumentParser(add_help=False)
    cloud.add_argument(
        "--no-emulators",
        action="store_true",
        help="talk to real Google Cloud (application default credentials) instead of the emulators",
    )

    parser = argparse.ArgumentParser(
        prog="rtml",
        description="Real-time ML pipelines on Apache Beam: card fraud detection, locally on the emulators or on Dataflow.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "up", parents=[services], help="start the local Pub/Sub and Bigtable emulators and create resources"
    )
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", parents=[services], help="stop the emulators `rtml up` started")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", parents=[services], help="show whether the local emulators run and answer")
    p.set_defaults(func=cmd_status)

    from rtml.simulator import SimulationConfig

    sim = SimulationConfig()
    p = sub.add_parser("simulate", help="write a synthetic replay file with known fraud scenarios")
    p.add_argument("--out", required=True, help="replay file to write (JSON Lines)")
    p.add_argument("--days", type=int, default=sim.days, help="days of history (default: %(default)s)")
    p.add_argument("--customers", type=int, default=sim.customers, help="number of customers (default: %(default)s)")
    p.add_argument("--terminals", type=int, default=sim.terminals, help="number of terminals (default: %(default)s)")
    p.add_argument("--start", type=_date, default=sim.start, help="first day, YYYY-MM-DD (default: %(default)s)")
    p.add_argument(
        "--seed",
        type=int,
        default=sim.seed,
        help="random seed; same arguments give the same file (default: %(default)s)",
    )
    p.add_argument(
        "--feedback-delay-days",
        type=float,
        default=sim.feedback_delay_days,
        help="days from a fraud to its report (default: %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("replay", parents=[services, cloud], help="publish a replay file to the input topics")
    p.add_argument("--input", required=True, help="replay file (JSON Lines, .gz allowed)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=_positive_float, help="events per second (default: as fast as possible)")
    pace.add_argument("--speedup", type=_positive_float, help="follow event time, X times faster than real time")
    p.add_argument(
        "--malformed-rate",
        type=float,
        default=0.0,
        help="also publish a malformed copy of this share of events, to exercise dead letters (default: 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --malformed-rate (default: %(default)s)")
    p.add_argument("--limit", type=int, help="publish at most this many lines")
    p.add_argument("--transactions-topic", default=config.TRANSACTIONS_TOPIC, help="(default: %(default)s)")
    p.add_argument("--feedback-topic", default=config.FEEDBACK_TOPIC, help="(default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "tail", parents=[services, cloud], help="read insights (or any subscription) and print or save them"
    )
    p.add_argument(
        "--subscription",
        default=config.subscription_for(config.INSIGHTS_TOPIC),
        help="subscription name or path (default: %(default)s)",
    )
    p.add_argument("--out", help="write one JSON object per line to this file instead of printing")
    p.add_argument("--count", type=int, help="stop after this many messages")
    p.add_argument("--idle-timeout", type=_positive_float, help="stop after this many seconds without a message")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser(
        "seek",
        parents=[services, cloud],
        help="replay the input subscriptions from a point in time (recovery after a crash of `rtml serve`)",
        description="Seek subscriptions back so their messages since a point in time are delivered again. "
        "After `rtml serve` died, seek to before the crash and start it again: transactions already "
        "handled are recognised in the feature state and not scored twice; the rest are scored.",
    )
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--to", help="RFC 3339 time to replay from, e.g. 2026-11-22T10:15:00Z")
    when.add_argument("--minutes-back", type=_positive_float, help="replay from this many minutes ago")
    p.add_argument(
        "--subscriptions",
        nargs="+",
        default=[config.subscription_for(topic) for topic in config.INPUT_TOPICS],
        help="subscription names or paths (default: %(default)s)",
    )
    p.set_defaults(func=cmd_seek)

    p = sub.add_parser(
        "backfill",
        parents=[services],
        help="batch: features over history -> training examples, and feature state into Bigtable",
    )
    p.add_argument("--input", nargs="+", required=True, help="replay files in publication order (local or gs://)")
    p.add_argument("--examples-out", required=True, help="folder for TFRecord training examples")
    p.add_argument("--shards", type=int, default=16, help="entity shards and example files (default: %(default)s)")
    p.add_argument("--table", default=config.FEATURES_TABLE, help="Bigtable feature table (default: %(default)s)")
    p.add_argument("--no-state", action="store_true", help="do not load the final feature state into Bigtable")
    p.set_defaults(func=cmd_backfill)

    training = argparse.ArgumentParser(add_help=False)
    training.add_argument("--model-dir", required=True, help="folder of model versions; the new one goes to MODEL_DIR/<version>/")
    training.add_argument(
        "--validation-days", type=int, default=2, help="last days of the window held out for early stopping and thresholds (default: %(default)s)"
    )
    training.add_argument("--model-type", choices=("mlp", "logistic"), default="mlp", help="(default: %(default)s)")
    training.add_argument("--epochs", type=int, default=40, help="at most this many epochs (default: %(default)s)")
    training.add_argument("--seed", type=int, default=42, help="(default: %(default)s)")
    training.add_argument(
        "--review-rate", type=float, default=0.02, help="share of validation transactions sent to review or above (default: %(default)s)"
    )
    training.add_argument(
        "--decline-precision", type=float, default=0.8, help="validation precision required to decline (default: %(default)s)"
    )
    training.add_argument("--version", help="version name (default: the UTC time, YYYYMMDD-HHMMSS)")
    training.add_argument("--quiet", action="store_true", help="no per-epoch lines")

    p = sub.add_parser(
        "train", parents=[training], help="tf.Transform + Keras training on backfill examples; exports a new model version"
    )
    p.add_argument("--examples", required=True, help="folder of training examples written by `rtml backfill`")
    p.add_argument("--train-start", required=True, type=_date, help="first day of the training window (YYYY-MM-DD, UTC)")
    p.add_argument("--train-end", required=True, type=_date, help="last day of the training window, inclusive")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "retrain",
        parents=[services, training],
        help="backfill recent history, train, and publish the new version unless it is worse than the serving one",
        description="Backfill the history into fresh examples (feature state in Bigtable is not touched), train on "
        "the last --days days whose fraud labels have arrived, and publish into --model-dir, where running scorers "
        "pick it up, only if its validation average precision is at least the serving version's on the same "
        f"examples. A refused version goes to MODEL_DIR/.refused/ and the command exits with {RETRAIN_REFUSED}.",
    )
    p.add_argument("--input", nargs="+", required=True, help="replay files of the history, in publication order (local or gs://)")
    p.add_argument("--days", type=int, default=30, help="days of training window, validation days included (default: %(default)s)")
    p.add_argument(
        "--label-delay-days",
        type=int,
        default=7,
        help="end the window this many days before the last transaction, so fraud reports had time to arrive (default: %(default)s)",
    )
    p.add_argument("--end", type=_date, help="last day of the training window (default: from the input and --label-delay-days)")
    p.add_argument("--work-dir", help="keep the backfilled examples here (default: a temporary folder, removed afterwards)")
    p.add_argument("--shards", type=int, default=16, help="backfill entity shards and example files (default: %(default)s)")
    p.add_argument("--table", default=config.FEATURES_TABLE, help=argparse.SUPPRESS)
    p.add_argument("--no-guard", action="store_true", help="publish even if the new version is worse than the serving one")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser(
        "serve",
        parents=[services, cloud],
        help="the streaming pipeline: Pub/Sub in, features, RunInference, insights out; runs until stopped",
    )
    p.add_argument("--model-dir", required=True, help="folder of exported model versions (local or gs://)")
    p.add_argument(
        "--model-poll-secs", type=_positive_float, default=20.0, help="look for new versions this often (default: %(default)s)"
    )
    p.add_argument("--max-batch-size", type=int, default=64, help="largest inference batch (default: %(default)s)")
    p.add_argument("beam_args", nargs=argparse.REMAINDER, help="further Beam pipeline options, after `--`")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "top", parents=[services, cloud], help="a live view of the scoring pipeline's model health records"
    )
    top.add_arguments(p)
    p.set_defaults(func=cmd_top)

    p = sub.add_parser(
        "evaluate", help="AUC ROC, average precision and card precision@k of scored insights against fraud feedback"
    )
    p.add_argument("--insights", required=True, help="insights file, one JSON object per line (`rtml tail --out`)")
    p.add_argument(
        "--feedback", required=True, help="fraud feedback as JSON Lines, or a replay file (only its feedback is used)"
    )
    p.add_argument(
        "--k", type=int, default=100, help="cards investigated per day for card precision@k (default: %(default)s)"
    )
    p.add_argument("--json-out", help="also write the JSON report to this file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", parents=[services], help="the whole loop on simulated data, end to end, with a summary")
    p.add_argument("--workdir", default="out/demo", help="where the demo writes its files (default: %(default)s)")
    p.add_argument("--keep-emulators", action="store_true", help="leave the emulators running afterwards")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="Connecting to Bigtable emulator")
    # TensorFlow's C++ start-up chatter (CPU features, CUDA probing) says nothing a user can act on.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("absl").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CommandError as err:
        print(f"rtml {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        from rtml.emulators import EmulatorError

        if isinstance(err, EmulatorError):
            print(f"rtml {args.command}: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
