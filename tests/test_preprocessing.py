"""The tf.Transform preprocessing on tiny data, against values computed by hand with numpy."""

import json

import numpy as np
import pytest

from models.features import EVENT_TIME, IDENTITY, LABEL, LOG_ZSCORE, RAW_FEATURES, transformed_name

pytestmark = pytest.mark.slow

ROWS = 5


def _rows() -> list[dict]:
    rng = np.random.default_rng(7)
    rows = []
    for i in range(ROWS):
        row = {name: float(rng.integers(0, 50)) for name in RAW_FEATURES}
        for name in IDENTITY:
            row[name] = float(i % 2) if "tx_during" in name else i / ROWS  # distinct: identifies the row
        row[LABEL] = i % 2
        row[EVENT_TIME] = 1_000_000 * i
        rows.append(row)
    return rows


def _analyze_and_transform(rows, temp_dir):
    import apache_beam as beam
    import tensorflow_transform.beam as tft_beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    from models.features import raw_feature_spec
    from models.preprocessing import preprocessing_fn

    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(raw_feature_spec()))
    with beam.Pipeline(options=PipelineOptions(runner="FnApiRunner")) as pipeline:
        with tft_beam.Context(temp_dir=str(temp_dir)):
            (transformed, _), _ = (pipeline | beam.Create(rows), metadata) | tft_beam.AnalyzeAndTransformDataset(
                preprocessing_fn
            )
        _ = (
            transformed
            | beam.Map(lambda row: json.dumps({key: float(value) for key, value in row.items()}))
            | beam.io.WriteToText(str(temp_dir / "out"), shard_name_template="")
        )
    return [json.loads(line) for line in (temp_dir / "out").read_text().splitlines()]


def test_preprocessing_fn_log_z_scores_amounts_and_counts_and_passes_flags_and_risks(tmp_path):
    rows = _rows()
    transformed = _analyze_and_transform(rows, tmp_path)
    assert len(transformed) == ROWS
    by_row = {round(float(t[transformed_name("terminal_risk_1d")]) * ROWS): t for t in transformed}
    assert sorted(by_row) == list(range(ROWS))
    for name in LOG_ZSCORE:
        logs = np.log1p(np.array([row[name] for row in rows]))
        expected = (logs - logs.mean()) / logs.std()  # tf.Transform z-scores with the population variance
        actual = np.array([by_row[i][transformed_name(name)] for i in range(ROWS)])
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=name)
    for name in IDENTITY:
        assert [float(by_row[i][transformed_name(name)]) for i in range(ROWS)] == pytest.approx([row[name] for row in rows])
    assert [float(by_row[i][LABEL]) for i in range(ROWS)] == [float(row[LABEL]) for row in rows]
    assert set(transformed[0]) == {transformed_name(name) for name in RAW_FEATURES} | {LABEL}
