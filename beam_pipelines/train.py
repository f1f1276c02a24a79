"""Training: tf.Transform analysis in a Beam pipeline, a Keras model, a versioned SavedModel export.

1. A Beam batch pipeline selects the examples of `--train_start .. --train_end` (dates, UTC,
   inclusive) from the backfill's TFRecords, splits off the last `--validation_days` as the
   validation split, runs `AnalyzeAndTransformDataset` on the training split and
   `TransformDataset` on the validation split, and writes the transformed splits, the
   transform graph and the raw training statistics into a work folder.
2. Keras trains on the transformed splits (early stopping on the validation loss).
3. The export wraps the model and the transform graph into one SavedModel, scores the raw
   validation examples through it, chooses the decision thresholds, draws the report, and
   writes `--model_dir/<version>/` with `metadata.json` (sha256 of every file) written last,
   so a watcher never sees a half-written version.

    python -m beam_pipelines.train --examples out/examples --train_start 2026-03-01 \\
        --train_end 2026-03-07 --model_dir out/models

On Dataflow the Beam step runs on workers and training runs where the command runs (the
Flex Template launcher); the work folder must then be on gs:// (`--work_dir`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines import options as opts
from models import loader
from models.features import RAW_FEATURES, raw_feature_spec
from models.model import MODEL_KINDS, ModelParams
from models.preprocessing import preprocessing_fn
from models.training import TrainConfig
from rtml import examples
from transforms.training import CountLabelsFn, FeatureStatisticsFn, SplitByTimeFn, TrainingWindow

_LOG = logging.getLogger(__name__)
DAY_US = 86_400_000_000


class TrainOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--examples", default=None, help="Required. Folder of backfill examples (*.tfrecord), local or gs://.")
        parser.add_argument("--train_start", default=None, help="Required. First day of the training window, YYYY-MM-DD (UTC).")
        parser.add_argument("--train_end", default=None, help="Required. Last day of the training window, YYYY-MM-DD (UTC), inclusive.")
        parser.add_argument(
            "--validation_days",
            type=int,
            default=2,
            help="The last days of the window, held out to stop training and choose thresholds (default: %(default)s).",
        )
        parser.add_argument("--model_type", default="mlp", choices=MODEL_KINDS, help="Model kind (default: %(default)s).")
        parser.add_argument("--epochs", type=int, default=40, help="At most this many epochs (default: %(default)s).")
        parser.add_argument("--batch_size", type=int, default=512, help="Training batch size (default: %(default)s).")
        parser.add_argument("--seed", type=int, default=42, help="Random seed (default: %(default)s).")
        parser.add_argument(
            "--review_rate",
            type=float,
            default=0.02,
            help="Share of validation transactions at or above the review threshold (default: %(default)s).",
        )
        parser.add_argument(
            "--decline_precision",
            type=float,
            default=0.8,
            help="Validation precision the decline threshold must reach (default: %(default)s).",
        )
        parser.add_argument("--model_version", default=None, help="Version name (default: the UTC time, YYYYMMDD-HHMMSS).")
        parser.add_argument(
            "--work_dir",
            default=None,
            help="Folder for the transformed data (default: a temporary folder; must be gs:// on Dataflow). Removed after a successful export.",
        )


class TrainingData(NamedTuple):
    train: beam.PCollection  # transformed training examples (serialized)
    validation: beam.PCollection  # transformed validation examples (serialized)
    validation_raw: beam.PCollection  # raw validation examples (serialized, as the backfill wrote them)
    statistics: beam.PCollection  # one dict: FeatureStatisticsFn's output over the training split
    validation_counts: beam.PCollection  # one dict: examples and positives of the validation split


def _day(text: str | None, name: str) -> dt.date:
    if not text:
        raise ValueError(f"--{name} is required: a date YYYY-MM-DD (UTC)")
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--{name} must be a date YYYY-MM-DD, got {text!r}") from None


def _micros(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()) * 1_000_000


def training_window(args: TrainOptions) -> TrainingWindow:
    start, end = _day(args.train_start, "train_start"), _day(args.train_end, "train_end")
    if end < start:
        raise ValueError(f"--train_end {end} is before --train_start {start}")
    days = (end - start).days + 1
    if not 1 <= args.validation_days < days:
        raise ValueError(
            f"--validation_days must be at least 1 and leave training days: the window has {days} days, got {args.validation_days}"
        )
    end_us = _micros(end) + DAY_US
    return TrainingWindow(_micros(start), end_us - args.validation_days * DAY_US, end_us)


def check(options: PipelineOptions) -> TrainOptions:
    """Validate the training options before anything is built (flags are not argparse-required:
    Beam parses every imported options class for any pipeline in the process)."""
    args = options.view_as(TrainOptions)
    if not args.examples:
        raise ValueError("--examples is required: the folder the backfill wrote its examples to")
    if not options.view_as(opts.ModelDirOptions).model_dir:
        raise ValueError("--model_dir is required: the folder exported versions are written to")
    training_window(args)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    if not 0 < args.review_rate < 1:
        raise ValueError("--review_rate must be between 0 and 1")
    if not 0 < args.decline_precision <= 1:
        raise ValueError("--decline_precision must be in (0, 1]")
    if args.model_version is not None and (not args.model_version or "/" in args.model_version or args.model_version.startswith(".")):
        raise ValueError(f"--model_version must be a plain folder name, got {args.model_version!r}")
    return args


def build(pipeline: beam.Pipeline, options: PipelineOptions, work_dir: str) -> TrainingData:
    """The analysis pipeline: examples -> transformed splits, transform graph and statistics in `work_dir`."""
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    args = check(options)
    window = training_window(args)
    raw_metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(raw_feature_spec()))
    pattern = FileSystems.join(args.examples, "*" + examples.FILE_SUFFIX)
    split = (
        pipeline
        | "ReadExamples" >> beam.io.ReadFromTFRecord(pattern)
        | "SplitByTime"
        >> beam.ParDo(SplitByTimeFn(window)).with_outputs(SplitByTimeFn.TRAIN, SplitByTimeFn.VALIDATION)
    )
    train_raw = split[SplitByTimeFn.TRAIN] | "TrainFeatures" >> beam.Values()
    validation = split[SplitByTimeFn.VALIDATION]
    validation_raw = validation | "ValidationFeatures" >> beam.Values()
    with tft_beam.Context(temp_dir=FileSystems.join(work_dir, "tft_tmp")):
        (train_transformed, transformed_metadata), transform_fn = (
            train_raw,
            raw_metadata,
        ) | "AnalyzeAndTransform" >> tft_beam.AnalyzeAndTransformDataset(preprocessing_fn)
        validation_transformed, _ = (
            (validation_raw, raw_metadata),
            transform_fn,
        ) | "TransformValidation" >> tft_beam.TransformDataset()
        _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(FileSystems.join(work_dir, "transform"))
    import tensorflow_transform as tft

    coder = tft.coders.ExampleProtoCoder(transformed_metadata.schema)
    encoded = {}
    for name, data in (("train", train_transformed), ("validation", validation_transformed)):
        encoded[name] = data | f"Encode{name.title()}" >> beam.Map(coder.encode)
        _ = encoded[name] | f"Write{name.title()}" >> beam.io.WriteToTFRecord(
            FileSystems.join(work_dir, "transformed", name), file_name_suffix=examples.FILE_SUFFIX
        )
    raw_records = validation | "ValidationRecords" >> beam.Keys()
    _ = raw_records | "WriteValidationRaw" >> beam.io.WriteToTFRecord(
        FileSystems.join(work_dir, "validation_raw", "part"), file_name_suffix=examples.FILE_SUFFIX
    )
    statistics = train_raw | "TrainStatistics" >> beam.CombineGlobally(FeatureStatisticsFn())
    _ = (
        statistics
        | "StatisticsJson" >> beam.Map(json.dumps)
        | "WriteStatistics"
        >> beam.io.WriteToText(FileSystems.join(work_dir, "statistics"), file_name_suffix=".json", shard_name_template="")
    )
    counts = validation_raw | "ValidationCounts" >> beam.CombineGlobally(CountLabelsFn())
    _ = (
        counts
        | "CountsJson" >> beam.Map(json.dumps)
        | "WriteValidationCounts"
        >> beam.io.WriteToText(
            FileSystems.join(work_dir, "validation_counts"), file_name_suffix=".json", shard_name_template=""
        )
    )
    return TrainingData(encoded["train"], encoded["validation"], raw_records, statistics, counts)


def new_version_name(model_dir: str, now: dt.datetime) -> str:
    """`YYYYMMDD-HHMMSS` in UTC, with a `-N` suffix if that folder exists already."""
    base = now.astimezone(dt.UTC).strftime("%Y%m%d-%H%M%S")
    name, n = base, 1
    while FileSystems.exists(FileSystems.join(model_dir, name)):
        n += 1
        name = f"{base}-{n}"
    return name


def _read_json(path: str) -> dict:
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def run(argv: list[str] | None = None, verbose: int = 2) -> dict:
    """Analyze, train and export; returns the new version's metadata (plus its `path`)."""
    started = time.monotonic()
    options = PipelineOptions(argv)
    args = check(options)
    model_dir = options.view_as(opts.ModelDirOptions).model_dir
    opts.prepare_local_run(options, streaming=False)
    if not opts.is_local(options) and not (args.work_dir or "").startswith("gs://"):
        raise ValueError("--work_dir must be a gs:// folder when running on Dataflow")
    created = dt.datetime.now(dt.UTC)
    version = args.model_version or new_version_name(model_dir, created)
    if FileSystems.exists(FileSystems.join(model_dir, version)):
        raise ValueError(f"model version {version} exists already in {model_dir}")
    temporary = args.work_dir is None
    work_dir = tempfile.mkdtemp(prefix="rtml-train-") if temporary else FileSystems.join(args.work_dir, version)
    _LOG.info("analyzing examples with tf.Transform into %s", work_dir)
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options, work_dir)
    pipeline.run().wait_until_finish()
    analyzed = time.monotonic()
    metadata = train_and_export(args, model_dir, version, created, work_dir, verbose)
    metadata["timings_s"] = {"analyze": round(analyzed - started, 1), "train_and_export": round(time.monotonic() - analyzed, 1)}
    if temporary:
        shutil.rmtree(work_dir, ignore_errors=True)
    else:
        FileSystems.delete([work_dir])
    return metadata


def train_and_export(args: TrainOptions, model_dir: str, version: str, created: dt.datetime, work_dir: str, verbose: int) -> dict:
    """Fit on the transformed splits in `work_dir`, export, evaluate, publish `model_dir/version`."""
    import tensorflow as tf
    import tensorflow_transform as tft

    from models import report, serving, training
    from rtml import metrics

    transform_output = tft.TFTransformOutput(FileSystems.join(work_dir, "transform"))
    spec = transform_output.transformed_feature_spec()
    train = training.read_transformed(FileSystems.join(work_dir, "transformed", "train*"), spec)
    validation = training.read_transformed(FileSystems.join(work_dir, "transformed", "validation*"), spec)
    _LOG.info("training on %d examples (%d frauds), validating on %d", train[1].size, int(train[1].sum()), validation[1].size)
    config = TrainConfig(params=ModelParams(kind=args.model_type), epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    model, history = training.fit(train, validation, config, verbose=verbose)

    statistics = _read_json(FileSystems.join(work_dir, "statistics.json"))
    means = {name: statistics["features"][name]["mean"] for name in RAW_FEATURES}
    staging = tempfile.mkdtemp(prefix="rtml-export-")
    try:
        version_dir = os.path.join(staging, version)
        serving.save(serving.build_scorer(model, transform_output.transform_features_layer(), means), os.path.join(version_dir, loader.SAVED_MODEL_DIR))
        saved = loader.LoadedModel(version_dir, {"version": version}, tf.saved_model.load(os.path.join(version_dir, loader.SAVED_MODEL_DIR)))
        raw = examples.read_columns(FileSystems.join(work_dir, "validation_raw"))
        labels = raw["label"]
        scores = saved.score(raw)
        thresholds = training.choose_thresholds(labels, scores, args.review_rate, args.decline_precision)
        window = training_window(args)
        metadata = {
            "version": version,
            "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "training_window": {
                "start": args.train_start,
                "end": args.train_end,
                "validation_start": dt.datetime.fromtimestamp(window.validation_start_us / 1e6, dt.UTC).date().isoformat(),
                "validation_days": args.validation_days,
            },
            "feature_names": list(RAW_FEATURES),
            "model": {
                "kind": args.model_type,
                "params": {"hidden_units": list(config.params.hidden_units), "dropout": config.params.dropout, "learning_rate": config.params.learning_rate}
                if args.model_type == "mlp"
                else {"learning_rate": config.params.learning_rate},
                "epochs_run": len(history["loss"]),
                "best_epoch": history["best_epoch"],
                "positive_weight": history["positive_weight"],
                "batch_size": args.batch_size,
                "seed": args.seed,
            },
            "signatures": {serving.SERVING_SIGNATURE: "raw features by name -> score", serving.EXPLAIN_SIGNATURE: "raw features by name -> score, contributions"},
            "thresholds": {"review": thresholds.review, "decline": thresholds.decline, "method": thresholds.method},
            "examples": {
                "train": int(train[1].size),
                "train_positives": int(train[1].sum()),
                "validation": int(labels.size),
                "validation_positives": int(labels.sum()),
            },
            "validation_metrics": {
                "auc_roc": metrics.auc_roc(labels, scores),
                "average_precision": metrics.average_precision(labels, scores),
                "card_precision_at_100": metrics.card_precision_at_k(raw["day"], raw["customer_id"], scores, labels, k=100),
                "review": training.decision_metrics(labels, scores, thresholds.review),
                "decline": training.decision_metrics(labels, scores, thresholds.decline),
                "loss": float(min(history["val_loss"])),
            },
            "history": {key: history[key] for key in ("loss", "val_loss", "pr_auc", "val_pr_auc") if key in history},
            "feature_statistics": statistics["features"],
            "score_statistics": _score_summary(scores),
            "framework": {"tensorflow": tf.__version__, "tensorflow_transform": tft.__version__, "apache_beam": beam.__version__},
        }
        report_dir = os.path.join(version_dir, loader.REPORT_DIR)
        os.makedirs(report_dir)
        for name, data in report.figures(labels, scores, history, thresholds).items():
            with open(os.path.join(report_dir, name), "wb") as handle:
                handle.write(data)
        with open(os.path.join(report_dir, "summary.md"), "w") as handle:
            handle.write(report.summary_markdown(metadata))
        metadata["files"] = loader.file_hashes(version_dir)
        with open(os.path.join(version_dir, loader.METADATA_FILE), "w") as handle:
            json.dump(metadata, handle, indent=2, sort_keys=False)
        destination = publish(version_dir, model_dir, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    loader.verify(destination)
    _LOG.info("exported model version %s to %s", version, destination)
    metadata["path"] = destination
    return metadata


def _score_summary(scores) -> dict:
    from rtml import drift

    return drift.summarize(scores)


def publish(version_dir: str, model_dir: str, version: str) -> str:
    """Copy a finished version folder into `model_dir`, metadata last; locally an atomic rename."""
    destination = FileSystems.join(model_dir, version)
    if "://" not in model_dir:
        os.makedirs(model_dir, exist_ok=True)
        partial = os.path.join(model_dir, f".{version}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(version_dir, partial)
        os.rename(partial, destination)
        return destination
    files = []
    for directory, _subdirs, names in os.walk(version_dir):
        for name in names:
            files.append(os.path.relpath(os.path.join(directory, name), version_dir))
    files.sort(key=lambda rel: rel == loader.METADATA_FILE)
    for rel in files:
        with open(os.path.join(version_dir, rel), "rb") as source, FileSystems.create(
            FileSystems.join(destination, *rel.split(os.sep))
        ) as target:
            shutil.copyfileobj(source, target)
    return destination


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metadata = run(argv)
    print(json.dumps({key: metadata[key] for key in ("version", "path", "thresholds", "validation_metrics", "examples", "timings_s")}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
