"""Fit a model on transformed examples, and choose its decision thresholds on the validation split.

Fraud is about 1 percent of transactions. Positives get a class weight (by default the square
root of the negative-to-positive ratio: enough to keep the rare class in every gradient step
without flattening the score scale), and training stops when the validation loss has not
improved for `patience` epochs, keeping the best weights. Seeds are fixed and TF ops are made
deterministic, so the same data and settings give the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from models.features import LABEL, TRANSFORMED_FEATURES
from models.model import ModelParams, build_model, compile_model


@dataclass(frozen=True)
class TrainConfig:
    params: ModelParams = field(default_factory=ModelParams)
    epochs: int = 40
    batch_size: int = 512
    patience: int = 4
    seed: int = 42
    positive_weight: float | None = None  # None: sqrt(negatives / positives)


def read_transformed(file_pattern: str, feature_spec: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All transformed examples matching `file_pattern` as numpy columns, and their labels."""
    import tensorflow as tf

    files = tf.io.gfile.glob(file_pattern)
    if not files:
        return {name: np.zeros(0, np.float32) for name in TRANSFORMED_FEATURES}, np.zeros(0, np.float32)
    dataset = tf.data.TFRecordDataset(files).batch(8192).map(lambda batch: tf.io.parse_example(batch, feature_spec))
    columns: dict[str, list] = {name: [] for name in (*TRANSFORMED_FEATURES, LABEL)}
    for batch in dataset.as_numpy_iterator():
        for name, values in columns.items():
            values.append(batch[name])
    arrays = {name: np.concatenate(values).astype(np.float32) for name, values in columns.items()}
    labels = arrays.pop(LABEL)
    return arrays, labels


def positive_weight(labels: np.ndarray, configured: float | None) -> float:
    if configured is not None:
        return configured
    positives = float(labels.sum())
    negatives = float(labels.size - positives)
    if positives == 0:
        raise ValueError("the training split holds no fraud: widen the training window or check the labels")
    return math.sqrt(negatives / positives)


def fit(train: tuple[dict, np.ndarray], validation: tuple[dict, np.ndarray], config: TrainConfig, verbose: int = 2):
    """Train a model of `config.params.kind`; returns (model, history dict of per-epoch metrics)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    features, labels = train
    val_features, val_labels = validation
    if labels.size == 0:
        raise ValueError("no training examples in the training window")
    if val_labels.size == 0:
        raise ValueError("no validation examples: the last days of the training window hold no transactions")
    weight = positive_weight(labels, config.positive_weight)
    model = build_model(config.params)
    compile_model(model, config.params)
    callback = tf.keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=config.patience, restore_best_weights=True
    )
    history = model.fit(
        features,
        labels,
        sample_weight=np.where(labels > 0.5, weight, 1.0).astype(np.float32),
        validation_data=(val_features, val_labels, np.where(val_labels > 0.5, weight, 1.0).astype(np.float32)),
        epochs=config.epochs,
        batch_size=config.batch_size,
        shuffle=True,
        callbacks=[callback],
        verbose=verbose,
    )
    record = {name: [float(v) for v in values] for name, values in history.history.items()}
    record["positive_weight"] = weight
    record["best_epoch"] = int(np.argmin(record["val_loss"])) + 1
    return model, record


@dataclass(frozen=True)
class Thresholds:
    review: float
    decline: float
    method: str


def choose_thresholds(
    labels: np.ndarray, scores: np.ndarray, review_rate: float, decline_precision: float, min_declines: int = 10
) -> Thresholds:
    """Decision thresholds from validation scores.

    `review`: the score above which the top `review_rate` share of validation transactions lie
    (the review team's capacity). `decline`: the lowest score at which the validation
    transactions scoring at least that much are fraud with precision >= `decline_precision`
    (over at least `min_declines` of them); when no threshold reaches it, decline is the top
    tenth of the review share. `decline` is never below `review`.
    """
    if scores.size == 0:
        raise ValueError("no validation scores to choose thresholds from")
    order = np.argsort(-scores, kind="stable")
    ranked_scores = scores[order]
    ranked_labels = labels[order]
    review_count = max(1, int(round(review_rate * scores.size)))
    review = float(ranked_scores[review_count - 1])
    hits = np.cumsum(ranked_labels)
    flagged = np.arange(1, scores.size + 1)
    # Only the last position of each run of equal scores is a real threshold.
    last_of_tie = np.append(ranked_scores[1:] != ranked_scores[:-1], True)
    ok = last_of_tie & (flagged >= min_declines) & (hits / flagged >= decline_precision)
    if ok.any():
        decline = float(ranked_scores[np.flatnonzero(ok)[-1]])
        method = (
            f"review: top {review_rate:.2%} of validation transactions by score; decline: lowest score with "
            f"validation precision >= {decline_precision:.0%} over >= {min_declines} transactions"
        )
    else:
        decline_count = max(1, review_count // 10)
        decline = float(ranked_scores[decline_count - 1])
        method = (
            f"review: top {review_rate:.2%} of validation transactions by score; decline: top "
            f"{review_rate / 10:.2%} (no threshold reached precision {decline_precision:.0%} on validation)"
        )
    return Thresholds(review=review, decline=max(decline, review), method=method)


def decision_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Alert rate, precision and recall of `score >= threshold`."""
    flagged = scores >= threshold
    caught = float(labels[flagged].sum())
    positives = float(labels.sum())
    return {
        "threshold": threshold,
        "alert_rate": float(flagged.mean()) if scores.size else 0.0,
        "precision": caught / float(flagged.sum()) if flagged.any() else 0.0,
        "recall": caught / positives if positives else 0.0,
    }
