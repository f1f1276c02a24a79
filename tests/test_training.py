"""Training: thresholds and drift summaries (pure), and `rtml train` end to end on simulated data."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models import loader, training
from models.features import RAW_FEATURES
from rtml import drift
from tests.conftest import TRAINING_WINDOW

# ---- pure logic ---------------------------------------------------------------------------


def test_review_threshold_flags_the_configured_share_of_validation_transactions():
    scores = np.linspace(0.0, 1.0, 1000, endpoint=False)
    labels = np.zeros(1000)
    chosen = training.choose_thresholds(labels, scores, review_rate=0.02, decline_precision=0.9)
    assert (scores >= chosen.review).sum() == 20


def test_decline_threshold_is_the_lowest_score_reaching_the_precision():
    # Top 10 all fraud, next 10 half fraud, the rest genuine.
    scores = np.arange(100, 0, -1) / 100.0
    labels = np.zeros(100)
    labels[:10] = 1
    labels[10:20:2] = 1
    chosen = training.choose_thresholds(labels, scores, review_rate=0.3, decline_precision=0.8)
    flagged = scores >= chosen.decline
    assert labels[flagged].mean() >= 0.8
    # Flagging the top 17 catches 14 frauds (0.824); 18 hold 14 (0.778), 19 hold 15 (0.789),
    # and from there precision only falls.
    assert flagged.sum() == 17
    assert chosen.review == pytest.approx(scores[29])
    assert "precision >= 80%" in chosen.method


def test_decline_falls_back_to_a_tenth_of_the_review_share_and_never_goes_below_review():
    rng = np.random.default_rng(1)
    scores = rng.random(1000)
    labels = (rng.random(1000) < 0.01).astype(float)  # unrelated to the score: no precise threshold
    chosen = training.choose_thresholds(labels, scores, review_rate=0.05, decline_precision=0.9)
    assert (scores >= chosen.decline).sum() == 5
    assert chosen.decline >= chosen.review
    assert "no threshold reached" in chosen.method


def test_tied_scores_are_one_threshold():
    scores = np.array([0.9, 0.9, 0.9, 0.9, 0.1, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0])
    chosen = training.choose_thresholds(labels, scores, review_rate=0.5, decline_precision=0.7, min_declines=2)
    assert chosen.decline == 0.9  # 3 of the 4 tied at 0.9 are fraud: 0.75


def test_positive_weight_defaults_to_the_square_root_of_the_class_ratio():
    labels = np.array([1.0] * 10 + [0.0] * 990)
    assert training.positive_weight(labels, None) == pytest.approx(np.sqrt(99))
    assert training.positive_weight(labels, 3.0) == 3.0
    with pytest.raises(ValueError, match="no fraud"):
        training.positive_weight(np.zeros(5), None)


def test_drift_summary_bins_and_psi():
    rng = np.random.default_rng(3)
    base = rng.normal(size=20_000)
    summary = drift.summarize(base)
    assert summary["count"] == 20_000
    assert len(summary["bin_edges"]) == 9
    assert sum(summary["bin_proportions"]) == pytest.approx(1.0)
    assert all(p == pytest.approx(0.1, abs=0.002) for p in summary["bin_proportions"])
    same = drift.bin_proportions(rng.normal(size=20_000), summary["bin_edges"])
    shifted = drift.bin_proportions(rng.normal(loc=1.0, size=20_000), summary["bin_edges"])
    assert drift.psi(summary["bin_proportions"], same) < 0.01
    assert drift.psi(summary["bin_proportions"], shifted) > drift.PSI_ALERT


def test_drift_summary_of_a_binary_feature_keeps_two_populated_bins():
    summary = drift.summarize([0.0] * 70 + [1.0] * 30)
    assert summary["bin_edges"] == [0.0, 1.0]
    assert summary["bin_proportions"] == pytest.approx([0.0, 0.7, 0.3])


# ---- end to end: simulate, backfill, `rtml train` -----------------------------------------

TRAIN = TRAINING_WINDOW


@pytest.fixture(scope="module")
def examples_dir(trained):
    return trained.examples


@pytest.fixture(scope="module")
def exported(trained):
    return trained.version


@pytest.mark.slow
def test_train_exports_a_version_whose_metadata_holds_every_promised_field(exported):
    metadata = json.loads((Path(exported) / "metadata.json").read_text())
    assert metadata["version"] == Path(exported).name
    assert metadata["created_at"].endswith("Z")
    assert metadata["training_window"] == {
        "start": TRAIN[0],
        "end": TRAIN[1],
        "validation_start": "2026-02-21",
        "validation_days": 2,
    }
    assert metadata["feature_names"] == list(RAW_FEATURES)
    thresholds = metadata["thresholds"]
    assert 0 < thresholds["review"] <= thresholds["decline"] <= 1
    assert "validation" in thresholds["method"]
    validation = metadata["validation_metrics"]
    for key in ("auc_roc", "average_precision", "card_precision_at_100"):
        assert 0 <= validation[key] <= 1
    assert validation["auc_roc"] > 0.7  # the simulated frauds are learnable
    assert validation["review"]["alert_rate"] == pytest.approx(0.02, abs=0.005)
    assert set(metadata["feature_statistics"]) == set(RAW_FEATURES)
    amount = metadata["feature_statistics"]["amount"]
    assert amount["count"] == metadata["examples"]["train"] and amount["min"] >= 0 and amount["bin_edges"]
    assert metadata["examples"]["train_positives"] > 0 and metadata["examples"]["validation_positives"] > 0
    files = metadata["files"]
    assert "saved_model/saved_model.pb" in files
    for name in ("roc.png", "precision_recall.png", "score_histogram.png", "loss.png", "summary.md"):
        assert f"report/{name}" in files
    for rel, digest in files.items():
        assert loader.sha256_of(str(Path(exported) / rel)) == digest
    assert len(metadata["history"]["loss"]) == metadata["model"]["epochs_run"] <= 40


@pytest.mark.slow
def test_report_holds_pngs_and_a_summary_linking_them(exported):
    report = Path(exported) / "report"
    for name in ("roc.png", "precision_recall.png", "score_histogram.png", "loss.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (report / "summary.md").read_text()


@pytest.mark.slow
def test_loaded_signature_scores_the_examples_and_reasons_come_from_the_same_call(exported, examples_dir):
    from rtml import examples

    model = loader.load(exported)
    batch = examples.read_columns(str(examples_dir), pattern="examples-00000-*")
    assert batch["label"].size > 100
    scores = model.score(batch)
    explained_scores, contributions = model.explain(batch)
    assert scores.shape == batch["label"].shape
    assert np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_allclose(explained_scores, scores, rtol=1e-6)
    assert contributions.shape == (scores.size, len(RAW_FEATURES))
    assert np.isfinite(contributions).all() and np.abs(contributions).sum() > 0
    # Frauds score higher than genuine transactions on average.
    assert scores[batch["label"] > 0].mean() > scores[batch["label"] == 0].mean()


@pytest.mark.slow
def test_a_batch_goes_in_as_one_matrix_and_scores_as_the_signatures_do_feature_by_feature(exported, examples_dir):
    import tensorflow as tf

    from models.serving import EXPLAIN_SIGNATURE, SERVING_SIGNATURE
    from rtml import examples

    model = loader.load(exported)
    batch = examples.read_columns(str(examples_dir), pattern="examples-00000-*")
    by_feature = {name: tf.constant(np.asarray(batch[name], dtype=np.float32)) for name in RAW_FEATURES}
    served = model.saved_model.signatures[SERVING_SIGNATURE](**by_feature)
    explained = model.saved_model.signatures[EXPLAIN_SIGNATURE](**by_feature)
    matrix = np.stack([np.asarray(batch[name], dtype=np.float32) for name in RAW_FEATURES], axis=1)
    scores, contributions = model.explain_matrix(matrix)
    np.testing.assert_allclose(scores, explained["score"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(contributions, explained["contributions"].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.score(batch), served["score"].numpy(), rtol=1e-6)
    # Columns are taken in RAW_FEATURES order: swapping two changes the answer.
    swapped = matrix[:, [1, 0, *range(2, len(RAW_FEATURES))]]
    assert not np.allclose(model.explain_matrix(swapped)[1], contributions)
    # A batch of one: float32 kernels for one row round differently from a
    # batch's, so it is held to the signature's own answer for that one row.
    one, _ = model.explain_matrix(matrix[:1])
    first = model.saved_model.signatures[EXPLAIN_SIGNATURE](**{name: column[:1] for name, column in by_feature.items()})
    assert one.shape == (1,)
    np.testing.assert_allclose(one, first["score"].numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match=f"\\[batch, {len(RAW_FEATURES)}\\] matrix"):
        model.explain_matrix(matrix[:, :-1])


@pytest.mark.slow
@pytest.mark.parametrize("tamper", ["changed", "missing", "extra", "metadata_hash"])
def test_a_tampered_version_is_refused(exported, tmp_path, tamper):
    copy = tmp_path / "version"
    shutil.copytree(exported, copy)
    variables = next((copy / "saved_model" / "variables").glob("variables.data-*"))
    if tamper == "changed":
        data = bytearray(variables.read_bytes())
        data[len(data) // 2] ^= 0x01
        variables.write_bytes(bytes(data))
    elif tamper == "missing":
        (copy / "report" / "loss.png").unlink()
    elif tamper == "extra":
        (copy / "saved_model" / "assets" / "injected.txt").write_text("not exported")
    else:
        metadata = json.loads((copy / "metadata.json").read_text())
        metadata["files"]["saved_model/saved_model.pb"] = "0" * 64
        (copy / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(loader.ModelIntegrityError, match="refused"):
        loader.load(str(copy))


@pytest.mark.slow
def test_train_refuses_a_window_without_room_for_validation(examples_dir, tmp_path):
    from beam_pipelines import train

    with pytest.raises(ValueError, match="validation_days"):
        train.run(["--examples", str(examples_dir), "--train_start", "2026-02-16", "--train_end", "2026-02-17",
                   "--validation_days", "2", "--model_dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_training_is_one_job_whose_last_step_publishes_the_version_and_removes_its_work_folder(examples_dir, tmp_path):
    """What a Flex Template launches: one pipeline. A default version name taken between launch and
    export moves aside to `-2`; the step's output is the version's metadata."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    from beam_pipelines import options as opts
    from beam_pipelines import train

    model_dir, work = tmp_path / "models", tmp_path / "work"
    options = PipelineOptions(
        ["--examples", str(examples_dir), "--train_start", TRAIN[0], "--train_end", TRAIN[1],
         "--model_dir", str(model_dir), "--work_dir", str(work), "--epochs", "2"]
    )
    opts.prepare_local_run(options, streaming=False)
    plan = train.make_plan(options, verbose=0)
    assert plan.default_version and plan.work_dir.startswith(str(work / plan.version))
    (model_dir / plan.version).mkdir(parents=True)  # taken after the launch
    expected = f"{plan.version}-2"
    pipeline = beam.Pipeline(options=options)
    built = train.build(pipeline, options, plan)
    summary = built.metadata | beam.Map(
        lambda m: (m["version"], m["path"], m["model"]["epochs_run"], sorted(m["timings_s"]), m["files"] == loader.file_hashes(m["path"]))
    )
    assert_that(summary, equal_to([(expected, str(model_dir / expected), 2, ["analyze", "train_and_export"], True)]))
    pipeline.run().wait_until_finish()
    assert loader.verify(str(model_dir / expected))["version"] == expected
    assert work.is_dir() and not list(work.iterdir())  # the run's sub-folder is gone, the folder given stays


@pytest.mark.slow
def test_train_refuses_a_given_version_that_exists_before_doing_any_work(examples_dir, tmp_path):
    from beam_pipelines import train

    (tmp_path / "v1").mkdir()
    with pytest.raises(ValueError, match="v1 exists already"):
        train.run(["--examples", str(examples_dir), "--train_start", TRAIN[0], "--train_end", TRAIN[1],
                   "--model_dir", str(tmp_path), "--model_version", "v1"])
    assert [path.name for path in tmp_path.iterdir()] == ["v1"]


@pytest.fixture(scope="module")
def analyzed(examples_dir, tmp_path_factory):
    """The training pipeline's analysis alone: transformed splits and the transform graph."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_pipelines import options as opts
    from beam_pipelines import train

    work = tmp_path_factory.mktemp("analyzed")
    options = PipelineOptions(
        ["--examples", str(examples_dir), "--train_start", TRAIN[0], "--train_end", TRAIN[1], "--model_dir", str(work / "m")]
    )
    opts.prepare_local_run(options, streaming=False)
    pipeline = beam.Pipeline(options=options)
    train.analyze(pipeline, options, str(work))
    pipeline.run().wait_until_finish()
    return work


@pytest.mark.slow
def test_exported_signature_scores_like_the_in_memory_model(analyzed, examples_dir, tmp_path):
    import tensorflow as tf
    import tensorflow_transform as tft

    from models import serving
    from rtml import examples

    output = tft.TFTransformOutput(str(analyzed / "transform"))
    spec = output.transformed_feature_spec()
    train = training.read_transformed(str(analyzed / "transformed" / "train*"), spec)
    validation = training.read_transformed(str(analyzed / "transformed" / "validation*"), spec)
    model, _ = training.fit(train, validation, training.TrainConfig(epochs=2), verbose=0)
    scorer = serving.build_scorer(model, output.transform_features_layer(), {name: 0.0 for name in RAW_FEATURES})
    batch = examples.read_columns(str(examples_dir), pattern="examples-00001-*")
    inputs = {name: tf.constant(batch[name]) for name in RAW_FEATURES}
    in_memory = scorer.serve(inputs)["score"].numpy()
    serving.save(scorer, str(tmp_path / "saved"))
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    from_disk = loaded.signatures[serving.SERVING_SIGNATURE](**inputs)["score"].numpy()
    assert from_disk.size == batch["label"].size > 100
    np.testing.assert_allclose(from_disk, in_memory, rtol=1e-6, atol=1e-7)
    assert np.std(in_memory) > 0  # a real model, not a constant


@pytest.mark.slow
def test_transformed_splits_follow_the_time_split(analyzed, examples_dir):
    import tensorflow_transform as tft

    from rtml import examples

    spec = tft.TFTransformOutput(str(analyzed / "transform")).transformed_feature_spec()
    _, train_labels = training.read_transformed(str(analyzed / "transformed" / "train*"), spec)
    _, validation_labels = training.read_transformed(str(analyzed / "transformed" / "validation*"), spec)
    day = 86_400_000_000
    start = 1_771_200_000_000_000  # 2026-02-16T00:00:00Z
    train_raw = examples.read_columns(str(examples_dir), start, start + 5 * day)
    validation_raw = examples.read_columns(str(examples_dir), start + 5 * day, start + 7 * day)
    assert train_labels.size == train_raw["label"].size > 0
    assert validation_labels.size == validation_raw["label"].size > 0
    assert train_labels.sum() == train_raw["label"].sum()
    statistics = json.loads((analyzed / "statistics.json").read_text())
    assert statistics["examples"] == train_raw["label"].size
    assert statistics["features"]["amount"]["mean"] == pytest.approx(float(np.mean(train_raw["amount"].astype(np.float64))), rel=1e-6)
