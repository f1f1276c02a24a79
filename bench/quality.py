"""Detection quality on simulated data: the exported MLP next to a logistic regression.

Protocol (the training issue's): simulate at least 60 days, backfill them, train on one week
(its last `--validation-days` held out for early stopping and thresholds), skip one week (the
label delay: those frauds are not yet reported when the model would be trained), and test on
the week after. Both models are trained by `rtml train` on the same examples, features and
split, exported, loaded back through the verified loader, and scored on the test week. Labels
come from every report in the simulated file (the test week's frauds are all reported by then).

    python -m bench.quality            # writes bench/quality.json and prints the table
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DAY = dt.timedelta(days=1)


def _log(text: str) -> None:
    print(f"[quality {dt.datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def _micros(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()) * 1_000_000


def test_metrics(loaded, test: dict) -> dict:
    from rtml import metrics

    labels = test["label"]
    scores = loaded.score(test)
    return {
        "auc_roc": metrics.auc_roc(labels, scores),
        "average_precision": metrics.average_precision(labels, scores),
        "card_precision_at_100": metrics.card_precision_at_k(test["day"], test["customer_id"], scores, labels, k=100),
    }


def run(days: int, customers: int, terminals: int, seed: int, train_start: dt.date, validation_days: int, work: Path) -> dict:
    from beam_pipelines import backfill, train
    from models import loader
    from rtml import examples, simulator

    config = simulator.SimulationConfig(days=days, customers=customers, terminals=terminals, seed=seed)
    history = work / "history.jsonl"
    _log(f"simulating {days} days of {customers} customers")
    simulator.simulate_to_file(config, history)
    _log("backfilling")
    examples_dir = work / "examples"
    backfill.run(["--input", str(history), "--examples_out", str(examples_dir), "--no_state"]).wait_until_finish()
    train_end = train_start + 6 * DAY
    test_start = train_end + 8 * DAY
    test_end = test_start + 6 * DAY
    if (test_end - config.start).days >= days:
        raise ValueError(f"{days} simulated days do not reach the end of the test week {test_end}")
    test = examples.read_columns(str(examples_dir), _micros(test_start), _micros(test_end + DAY))
    results = {}
    for kind in ("mlp", "logistic"):
        _log(f"training {kind}")
        metadata = train.run(
            [
                "--examples", str(examples_dir),
                "--train_start", train_start.isoformat(),
                "--train_end", train_end.isoformat(),
                "--validation_days", str(validation_days),
                "--model_dir", str(work / "models"),
                "--model_type", kind,
                "--model_version", kind,
                "--seed", str(seed),
            ],
            verbose=0,
        )
        loaded = loader.load(metadata["path"])
        results[kind] = {
            "test": test_metrics(loaded, test),
            "validation": {key: metadata["validation_metrics"][key] for key in ("auc_roc", "average_precision", "card_precision_at_100")},
            "epochs_run": metadata["model"]["epochs_run"],
        }
    return {
        "simulation": {"days": days, "customers": customers, "terminals": terminals, "seed": seed},
        "train_window": [train_start.isoformat(), train_end.isoformat()],
        "validation_days": validation_days,
        "label_delay_week": [(train_end + DAY).isoformat(), (test_start - DAY).isoformat()],
        "test_window": [test_start.isoformat(), test_end.isoformat()],
        "test_transactions": int(test["label"].size),
        "test_frauds": int(test["label"].sum()),
        "models": results,
    }


def table(result: dict) -> str:
    rows = [
        "| model | AUC ROC | average precision | card precision@100 |",
        "| --- | --- | --- | --- |",
    ]
    names = {"mlp": "MLP (exported model)", "logistic": "logistic regression"}
    for kind, values in result["models"].items():
        test = values["test"]
        rows.append(f"| {names[kind]} | {test['auc_roc']:.4f} | {test['average_precision']:.4f} | {test['card_precision_at_100']:.4f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--terminals", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train-start", type=dt.date.fromisoformat, default=dt.date(2026, 3, 2))
    parser.add_argument("--validation-days", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "quality.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rtml-quality-") as work:
        result = run(args.days, args.customers, args.terminals, args.seed, args.train_start, args.validation_days, Path(work))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"test week {result['test_window'][0]} .. {result['test_window'][1]}: "
          f"{result['test_transactions']} transactions, {result['test_frauds']} frauds")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
