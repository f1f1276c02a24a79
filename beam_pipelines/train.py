"""Training as one Beam batch pipeline: tf.Transform analysis, Keras training, a versioned SavedModel.

1. The pipeline selects the examples of `--train_start .. --train_end` (dates, UTC, inclusive)
   from the backfill's TFRecords, splits off the last `--validation_days` as the validation
   split, runs `AnalyzeAndTransformDataset` on the training split and `TransformDataset` on the
   validation split, and writes the transformed splits, the raw validation examples, the
   transform graph and the raw training statistics into a work folder.
2. Its last step, `TrainAndExport`, runs once, on one worker, when all of that is written (the
   writes' results are its side inputs). Keras trains on the transformed splits (early stopping
   on the validation loss); the export wraps the model and the transform graph into one
   SavedModel, scores the raw validation examples through it, chooses the decision thresholds,
   draws the report, and writes `--model_dir/<version>/` with `metadata.json` (sha256 of every
   file) written last, so a watcher never sees a half-written version. It then removes the work
   folder.

    python -m beam_pipelines.train --examples out/examples --train_start 2026-03-01 \\
        --train_end 2026-03-07 --model_dir out/models

`start(argv)` builds and submits the job and returns: the Flex Template launcher's entry.
`run(argv)` also waits for it and returns the new version's metadata: `rtml train`'s.
Locally the FnApiRunner runs the whole job in this process (one worker, in memory, as tf.Transform
did before the step moved in: the Keras step then trains where `rtml train` runs, and a second
worker process would only hold a second copy of TensorFlow). On Dataflow the work folder must be
on gs:// (`--work_dir`), and the training step runs on a worker.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult, PipelineState

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

METRICS_NAMESPACE = "train"


PUBLISH_GUARDS = ("none", "average_precision")
REFUSED_DIR = ".refused"  # hidden: model folders starting with "." are never served


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
        parser.add_argument(
            "--model_version",
            default=None,
            help="Version name; the job fails if it exists already (default: the UTC time at launch, "
            "YYYYMMDD-HHMMSS, with a -N suffix if that name is taken when the model is exported).",
        )
        parser.add_argument(
            "--publish_guard",
            choices=PUBLISH_GUARDS,
            default="none",
            help="'average_precision': score the validation split with the serving (newest) version in "
            "--model_dir too, and publish the new version only if its average precision is at least as "
            f"high; a refused version goes to MODEL_DIR/{REFUSED_DIR}/VERSION (default: %(default)s).",
        )
        parser.add_argument(
            "--work_dir",
            default=None,
            help="Folder for the transformed data; each run works in a sub-folder of it, removed after a "
            "successful export (default: a temporary local folder; required, on gs://, on Dataflow).",
        )


class TrainingData(NamedTuple):
    train: beam.PCollection  # transformed training examples (serialized)
    validation: beam.PCollection  # transformed validation examples (serialized)
    validation_raw: beam.PCollection  # raw validation examples (serialized, as the backfill wrote them)
    statistics: beam.PCollection  # one dict: FeatureStatisticsFn's output over the training split
    validation_counts: beam.PCollection  # one dict: examples and positives of the validation split
    written: beam.PCollection  # the name of every file and folder written into the work folder, once written


class Training(NamedTuple):
    data: TrainingData
    metadata: beam.PCollection  # one dict: the exported version's metadata, plus `path` and `timings_s`


@dataclass(frozen=True)
class TrainPlan:
    """A training run's settings, fixed at launch; plain values, so the training step can carry them."""

    model_dir: str
    version: str
    default_version: bool  # named after the launch time: becomes `-N` if taken at export (a given name fails)
    created: dt.datetime
    launched: float  # wall clock (time.time()) at launch, where the analysis timing starts
    work_dir: str  # this run's own work folder
    temporary: bool  # work_dir is a local temporary folder (no --work_dir)
    window: TrainingWindow
    train_start: str
    train_end: str
    validation_days: int
    config: TrainConfig
    review_rate: float
    decline_precision: float
    publish_guard: str  # "none" or "average_precision" (see --publish_guard)
    verbose: int  # Keras progress output: 0 silent, 2 one line per epoch


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
    if not opts.is_local(options) and not (args.work_dir or "").startswith("gs://"):
        raise ValueError("--work_dir must be a gs:// folder when running on Dataflow")
    return args


def make_plan(options: PipelineOptions, verbose: int = 2, look_in_model_dir: bool = False) -> TrainPlan:
    """Check the options and fix the run's version name and work folder.

    A launcher does not look into `--model_dir` (`look_in_model_dir=False`): the default name is
    the launch time, and the training step adds `-N` if it is taken by then. `run()`, which must
    know the final name, looks first: it takes a free name, and refuses a taken `--model_version`
    before any work.
    """
    launched = time.time()
    args = check(options)
    model_dir = options.view_as(opts.ModelDirOptions).model_dir
    created = dt.datetime.fromtimestamp(launched, dt.UTC)
    if look_in_model_dir:
        version = args.model_version or new_version_name(model_dir, created)
        if taken(model_dir, version):
            raise ValueError(f"model version {version} exists already in {model_dir}")
    else:
        version = args.model_version or version_name(created)
    temporary = args.work_dir is None
    if temporary:
        work_dir = tempfile.mkdtemp(prefix="rtml-train-")
    else:
        work_dir = FileSystems.join(args.work_dir, f"{version}.{secrets.token_hex(4)}")
    return TrainPlan(
        model_dir=model_dir,
        version=version,
        default_version=args.model_version is None and not look_in_model_dir,
        created=created,
        launched=launched,
        work_dir=work_dir,
        temporary=temporary,
        window=training_window(args),
        train_start=args.train_start,
        train_end=args.train_end,
        validation_days=args.validation_days,
        config=TrainConfig(params=ModelParams(kind=args.model_type), epochs=args.epochs, batch_size=args.batch_size, seed=args.seed),
        review_rate=args.review_rate,
        decline_precision=args.decline_precision,
        publish_guard=args.publish_guard,
        verbose=verbose,
    )


def analyze(pipeline: beam.Pipeline, options: PipelineOptions, work_dir: str) -> TrainingData:
    """The analysis: examples -> transformed splits, transform graph and statistics in `work_dir`."""
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    args = check(options)
    window = training_window(args)
    raw_metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(raw_feature_spec()))
    pattern = FileSystems.join(args.examples, "*" + examples.FILE_SUFFIX)
    split = (
        pipeline
        # A launcher checks nothing on storage: on Dataflow a missing folder fails the job instead.
        | "ReadExamples" >> beam.io.ReadFromTFRecord(pattern, validate=opts.is_local(options))
        | "SplitByTime"
        >> beam.ParDo(SplitByTimeFn(window)).with_outputs(SplitByTimeFn.TRAIN, SplitByTimeFn.VALIDATION)
    )
    train_raw = split[SplitByTimeFn.TRAIN] | "TrainFeatures" >> beam.Values()
    validation = split[SplitByTimeFn.VALIDATION]
    validation_raw = validation | "ValidationFeatures" >> beam.Values()
    transform_dir = FileSystems.join(work_dir, "transform")
    with tft_beam.Context(temp_dir=FileSystems.join(work_dir, "tft_tmp")):
        (train_transformed, transformed_metadata), transform_fn = (
            train_raw,
            raw_metadata,
        ) | "AnalyzeAndTransform" >> tft_beam.AnalyzeAndTransformDataset(preprocessing_fn)
        validation_transformed, _ = (
            (validation_raw, raw_metadata),
            transform_fn,
        ) | "TransformValidation" >> tft_beam.TransformDataset()
        transform_written = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(transform_dir)

    coder = tft.coders.ExampleProtoCoder(transformed_metadata.schema)
    encoded, written = {}, []
    for name, data in (("train", train_transformed), ("validation", validation_transformed)):
        encoded[name] = data | f"Encode{name.title()}" >> beam.Map(coder.encode)
        written.append(
            encoded[name]
            | f"Write{name.title()}"
            >> beam.io.WriteToTFRecord(FileSystems.join(work_dir, "transformed", name), file_name_suffix=examples.FILE_SUFFIX)
        )
    raw_records = validation | "ValidationRecords" >> beam.Keys()
    written.append(
        raw_records
        | "WriteValidationRaw"
        >> beam.io.WriteToTFRecord(FileSystems.join(work_dir, "validation_raw", "part"), file_name_suffix=examples.FILE_SUFFIX)
    )
    statistics = train_raw | "TrainStatistics" >> beam.CombineGlobally(FeatureStatisticsFn())
    written.append(
        statistics
        | "StatisticsJson" >> beam.Map(json.dumps)
        | "WriteStatistics"
        >> beam.io.WriteToText(FileSystems.join(work_dir, "statistics"), file_name_suffix=".json", shard_name_template="")
    )
    counts = validation_raw | "ValidationCounts" >> beam.CombineGlobally(CountLabelsFn())
    written.append(
        counts
        | "CountsJson" >> beam.Map(json.dumps)
        | "WriteValidationCounts"
        >> beam.io.WriteToText(
            FileSystems.join(work_dir, "validation_counts"), file_name_suffix=".json", shard_name_template=""
        )
    )
    # WriteTransformFn emits one None once the graph is in place; name the folder instead.
    written.append(transform_written | "TransformFnWritten" >> beam.Map(lambda _, path: path, transform_dir))
    files = written | "Written" >> beam.Flatten()
    return TrainingData(encoded["train"], encoded["validation"], raw_records, statistics, counts, files)


def build(pipeline: beam.Pipeline, options: PipelineOptions, plan: TrainPlan) -> Training:
    """The training pipeline: the analysis into `plan.work_dir`, then `TrainAndExport` once all of it is written."""
    data = analyze(pipeline, options, plan.work_dir)
    metadata = (
        pipeline
        | "Plan" >> beam.Create([plan])
        | "TrainAndExport"
        >> beam.Map(
            train_and_export,
            statistics=beam.pvalue.AsSingleton(data.statistics),
            validation_counts=beam.pvalue.AsSingleton(data.validation_counts),
            written=beam.pvalue.AsList(data.written),
        )
    )
    return Training(data, metadata)


def version_name(now: dt.datetime) -> str:
    """The default version name: `YYYYMMDD-HHMMSS` in UTC."""
    return now.astimezone(dt.UTC).strftime("%Y%m%d-%H%M%S")


def taken(model_dir: str, version: str) -> bool:
    """Whether `model_dir/version` is in use: a local folder, or on object storage a published metadata.json
    (a gs:// "folder" is only a name prefix; files left by a failed attempt are overwritten by the next)."""
    folder = FileSystems.join(model_dir, version)
    return FileSystems.exists(folder) or FileSystems.exists(FileSystems.join(folder, loader.METADATA_FILE))


def new_version_name(model_dir: str, now: dt.datetime, base: str | None = None) -> str:
    """`base` (default: `YYYYMMDD-HHMMSS` of `now`, UTC), with a `-N` suffix if that version is taken already."""
    base = base or version_name(now)
    name, n = base, 1
    while taken(model_dir, name):
        n += 1
        name = f"{base}-{n}"
    return name


def start(argv: list[str] | None = None, verbose: int = 2) -> PipelineResult:
    """Build and submit the training job; returns without waiting (the Flex Template entry)."""
    options = PipelineOptions(argv)
    return _start(options, make_plan(options, verbose))


def _start(options: PipelineOptions, plan: TrainPlan) -> PipelineResult:
    opts.prepare_local_run(options, streaming=False)
    _LOG.info("training model version %s; analysis in %s", plan.version, plan.work_dir)
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options, plan)
    return pipeline.run()


def run(argv: list[str] | None = None, verbose: int = 2) -> dict:
    """Analyze, train and export, and wait: the new version's metadata plus its `path` and `timings_s`."""
    options = PipelineOptions(argv)
    plan = make_plan(options, verbose, look_in_model_dir=True)
    try:
        result = _start(options, plan)
        state = result.wait_until_finish()
    finally:
        if plan.temporary:
            shutil.rmtree(plan.work_dir, ignore_errors=True)
    if state != PipelineState.DONE:
        raise RuntimeError(f"the training job ended {state}, without a model version")
    path = FileSystems.join(plan.model_dir, plan.version)
    if not FileSystems.exists(path):  # the publish guard refused it
        path = FileSystems.join(plan.model_dir, REFUSED_DIR, plan.version)
    metadata = loader.read_metadata(path)
    metadata["path"] = path
    metadata["timings_s"] = timings(result)
    return metadata


def timings(result: PipelineResult) -> dict[str, float | None]:
    """Seconds of the analysis (launch to the training step) and of the training step, from the
    job's metrics; None where the runner reports none."""
    from apache_beam.metrics.metric import MetricsFilter

    found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["distributions"]
    ms = {}
    for distribution in found:
        value = distribution.committed if distribution.committed is not None else distribution.attempted
        if value is not None and value.count:
            ms[distribution.key.metric.name] = value.max
    return {
        name: round(ms[f"{name}_ms"] / 1000, 1) if f"{name}_ms" in ms else None
        for name in ("analyze", "train_and_export")
    }


def train_and_export(plan: TrainPlan, statistics: dict, validation_counts: dict, written: list[str]) -> dict:
    """The job's last step: fit, export, evaluate, publish the version, remove the work folder.

    `statistics` describes the raw training split, `validation_counts` counts the validation
    split. `written` names everything the analysis wrote into the work folder: as a side input it
    holds this step back until all of it is there.
    """
    started = time.monotonic()
    analyze_s = max(0.0, time.time() - plan.launched)
    _LOG.info("training on the analysis in %s (%d outputs)", plan.work_dir, len(written))
    validation_start = _date_of(plan.window.validation_start_us)
    if not statistics["examples"]:
        raise ValueError(
            f"no examples from --train_start {plan.train_start} to the validation days ({validation_start} on): "
            "choose a window within the examples' dates"
        )
    if not validation_counts["examples"]:
        raise ValueError(
            f"no examples in the validation days {validation_start} .. {plan.train_end}: "
            "choose a window within the examples' dates, or fewer --validation_days"
        )
    version = plan.version
    if taken(plan.model_dir, version):
        if not plan.default_version:
            raise ValueError(f"model version {version} exists already in {plan.model_dir}")
        version = new_version_name(plan.model_dir, plan.created, base=version)
    metadata = _fit_and_publish(plan, version, statistics)
    train_and_export_s = time.monotonic() - started
    _remove_work_dir(plan)
    Metrics.distribution(METRICS_NAMESPACE, "analyze_ms").update(int(analyze_s * 1000))
    Metrics.distribution(METRICS_NAMESPACE, "train_and_export_ms").update(int(train_and_export_s * 1000))
    metadata["timings_s"] = {"analyze": round(analyze_s, 1), "train_and_export": round(train_and_export_s, 1)}
    return metadata


def _date_of(micros: int) -> str:
    return dt.datetime.fromtimestamp(micros / 1e6, dt.UTC).date().isoformat()


def _remove_work_dir(plan: TrainPlan) -> None:
    if plan.temporary:
        shutil.rmtree(plan.work_dir, ignore_errors=True)
    elif "://" in plan.work_dir:
        FileSystems.delete([plan.work_dir.rstrip("/") + "/"])  # a trailing slash deletes the whole prefix
    else:
        FileSystems.delete([plan.work_dir])


def _fit_and_publish(plan: TrainPlan, version: str, statistics: dict) -> dict:
    """Fit on the transformed splits in the work folder, export, evaluate, publish `model_dir/version`."""
    import tensorflow as tf
    import tensorflow_transform as tft

    from models import report, serving, training
    from rtml import drift, metrics

    work_dir, config = plan.work_dir, plan.config
    transform_output = tft.TFTransformOutput(FileSystems.join(work_dir, "transform"))
    spec = transform_output.transformed_feature_spec()
    train = training.read_transformed(FileSystems.join(work_dir, "transformed", "train*"), spec)
    validation = training.read_transformed(FileSystems.join(work_dir, "transformed", "validation*"), spec)
    _LOG.info("training on %d examples (%d frauds), validating on %d", train[1].size, int(train[1].sum()), validation[1].size)
    model, history = training.fit(train, validation, config, verbose=plan.verbose)

    means = {name: statistics["features"][name]["mean"] for name in RAW_FEATURES}
    staging = tempfile.mkdtemp(prefix="rtml-export-")
    try:
        version_dir = os.path.join(staging, version)
        serving.save(serving.build_scorer(model, transform_output.transform_features_layer(), means), os.path.join(version_dir, loader.SAVED_MODEL_DIR))
        saved = loader.LoadedModel(version_dir, {"version": version}, tf.saved_model.load(os.path.join(version_dir, loader.SAVED_MODEL_DIR)))
        raw = examples.read_columns(FileSystems.join(work_dir, "validation_raw"))
        labels = raw["label"]
        scores = saved.score(raw)
        thresholds = training.choose_thresholds(labels, scores, plan.review_rate, plan.decline_precision)
        metadata = {
            "version": version,
            "created_at": plan.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "training_window": {
                "start": plan.train_start,
                "end": plan.train_end,
                "validation_start": _date_of(plan.window.validation_start_us),
                "validation_days": plan.validation_days,
            },
            "feature_names": list(RAW_FEATURES),
            "model": {
                "kind": config.params.kind,
                "params": {"hidden_units": list(config.params.hidden_units), "dropout": config.params.dropout, "learning_rate": config.params.learning_rate}
                if config.params.kind == "mlp"
                else {"learning_rate": config.params.learning_rate},
                "epochs_run": len(history["loss"]),
                "best_epoch": history["best_epoch"],
                "positive_weight": history["positive_weight"],
                "batch_size": config.batch_size,
                "seed": config.seed,
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
            "score_statistics": drift.summarize(scores),
            "framework": {"tensorflow": tf.__version__, "tensorflow_transform": tft.__version__, "apache_beam": beam.__version__},
        }
        report_dir = os.path.join(version_dir, loader.REPORT_DIR)
        os.makedirs(report_dir)
        for name, data in report.figures(labels, scores, history, thresholds).items():
            with open(os.path.join(report_dir, name), "wb") as handle:
                handle.write(data)
        with open(os.path.join(report_dir, "summary.md"), "w") as handle:
            handle.write(report.summary_markdown(metadata))
        guard = guard_check(plan.publish_guard, plan.model_dir, raw, metadata["validation_metrics"]["average_precision"])
        if guard is not None:
            metadata["publish_guard"] = guard
        metadata["files"] = loader.file_hashes(version_dir)
        with open(os.path.join(version_dir, loader.METADATA_FILE), "w") as handle:
            json.dump(metadata, handle, indent=2, sort_keys=False)
        published = guard is None or guard["published"]
        destination = publish(version_dir, plan.model_dir if published else FileSystems.join(plan.model_dir, REFUSED_DIR), version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    loader.verify(destination)
    if published:
        _LOG.info("exported model version %s to %s", version, destination)
    else:
        _LOG.warning(
            "model version %s NOT published: validation average precision %.4f is below the serving version %s's %.4f "
            "on the same examples; the refused version is in %s",
            version, guard["candidate"], guard["serving_version"], guard["serving"], destination,
        )
    metadata["path"] = destination
    return metadata


def guard_check(guard: str, model_dir: str, raw: dict, candidate_ap: float) -> dict | None:
    """The publish guard's verdict: the candidate's validation average precision against the
    serving version's on the same examples (`raw`: the validation split's columns, with `label`).

    The serving version is the newest one in `model_dir` that loads, as the scorer picks it.
    None when no guard is asked for; published when nothing serves yet.
    """
    from rtml import metrics

    if guard == "none":
        return None
    verdict = {"metric": "average_precision", "candidate": candidate_ap, "serving": None, "serving_version": None, "published": True}
    for path in reversed(loader.versions(model_dir)):
        try:
            serving = loader.load(path)
        except Exception as err:  # noqa: BLE001 - the scorer refuses it too, and serves an older one
            _LOG.warning("publish guard: skipping %s, which does not load: %s", path, err)
            continue
        serving_ap = metrics.average_precision(raw["label"], serving.score(raw))
        verdict.update(serving=serving_ap, serving_version=serving.version, published=candidate_ap >= serving_ap)
        break
    return verdict


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
    keys = ("version", "path", "thresholds", "validation_metrics", "examples", "publish_guard", "timings_s")
    print(json.dumps({key: metadata[key] for key in keys if key in metadata}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
