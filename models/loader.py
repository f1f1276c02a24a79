"""Open an exported model version, after checking that its files are the ones it was exported with.

A version folder (`<model-dir>/<version>/`) holds `saved_model/` (the SavedModel), `report/`
and `metadata.json`, whose `files` maps every other file's relative path to its sha256. A
version whose files are missing, changed, or joined by files the export did not write is
refused with `ModelIntegrityError` before TensorFlow reads any of it. Paths may be local or
`gs://` (read through `tf.io.gfile`).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.features import RAW_FEATURES
from models.serving import EXPLAIN_SIGNATURE, SERVING_SIGNATURE

METADATA_FILE = "metadata.json"
SAVED_MODEL_DIR = "saved_model"
REPORT_DIR = "report"


class ModelIntegrityError(Exception):
    """An exported version that must not be served: its files do not match its metadata."""


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with _gfile().GFile(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(version_dir: str) -> dict[str, str]:
    """sha256 of every file under `version_dir` except the metadata, by relative POSIX path."""
    gfile = _gfile()
    root = version_dir.rstrip("/")
    hashes = {}
    for directory, _subdirs, files in gfile.walk(root):
        for name in files:
            path = posixpath.join(directory, name) if "://" in root else f"{directory}/{name}"
            relative = path[len(root) + 1 :]
            if relative != METADATA_FILE:
                hashes[relative] = sha256_of(path)
    return dict(sorted(hashes.items()))


def read_metadata(version_dir: str) -> dict:
    path = f"{version_dir.rstrip('/')}/{METADATA_FILE}"
    gfile = _gfile()
    if not gfile.exists(path):
        raise ModelIntegrityError(f"{version_dir}: no {METADATA_FILE}; not an exported model version")
    try:
        with gfile.GFile(path, "r") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ModelIntegrityError(f"{path}: not valid JSON ({error})") from error


def verify(version_dir: str) -> dict:
    """The version's metadata, once every file's sha256 matches it; else `ModelIntegrityError`."""
    metadata = read_metadata(version_dir)
    expected = metadata.get("files")
    if not isinstance(expected, dict) or not expected:
        raise ModelIntegrityError(f"{version_dir}: metadata lists no file hashes")
    actual = file_hashes(version_dir)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(name for name in set(expected) & set(actual) if expected[name] != actual[name])
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if changed:
        problems.append(f"sha256 mismatch in {', '.join(changed)}")
    if extra:
        problems.append(f"unexpected {', '.join(extra)}")
    if problems:
        raise ModelIntegrityError(f"model version {metadata.get('version', version_dir)} refused: {'; '.join(problems)}")
    return metadata


@dataclass
class LoadedModel:
    """A verified model version, ready to score batches of raw features."""

    path: str
    metadata: dict
    saved_model: Any
    _matrix_calls: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def version(self) -> str:
        return self.metadata["version"]

    @property
    def thresholds(self) -> dict:
        return self.metadata["thresholds"]

    def _call(self, signature: str, values: np.ndarray) -> dict:
        """A signature run on a [batch, len(RAW_FEATURES)] matrix, columns in RAW_FEATURES order.

        The signatures take one tensor per feature; converting 15 arrays one by one was about
        40% of a small batch's time. So the matrix goes in as one tensor and is split into the
        signature's inputs inside a graph traced once per signature.
        """
        import tensorflow as tf

        call = self._matrix_calls.get(signature)
        if call is None:
            call = self._matrix_calls[signature] = _by_matrix(self.saved_model.signatures[signature])
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2 or values.shape[1] != len(RAW_FEATURES):
            raise ValueError(f"expected a [batch, {len(RAW_FEATURES)}] matrix of features, got shape {values.shape}")
        return call(tf.constant(values))

    @staticmethod
    def _matrix(features: dict[str, np.ndarray]) -> np.ndarray:
        return np.stack([np.asarray(features[name], dtype=np.float32) for name in RAW_FEATURES], axis=1)

    def score(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Fraud scores for a batch: `features` maps every raw feature name to a 1-D array."""
        return self._call(SERVING_SIGNATURE, self._matrix(features))["score"].numpy()

    def explain(self, features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and per-feature contributions ([batch, len(RAW_FEATURES)]) in one call."""
        return self.explain_matrix(self._matrix(features))

    def explain_matrix(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`explain` for a [batch, len(RAW_FEATURES)] matrix, columns in RAW_FEATURES order."""
        outputs = self._call(EXPLAIN_SIGNATURE, values)
        return outputs["score"].numpy(), outputs["contributions"].numpy()


def _by_matrix(signature):
    """`signature` (one float32 input per raw feature) as a concrete function of one matrix."""
    import tensorflow as tf

    width = len(RAW_FEATURES)

    @tf.function(input_signature=[tf.TensorSpec([None, width], tf.float32)])
    def call(values):
        return signature(**dict(zip(RAW_FEATURES, tf.unstack(values, num=width, axis=1), strict=True)))

    return call.get_concrete_function()


def load(version_dir: str) -> LoadedModel:
    """Verify, then load with `tf.saved_model.load` (Keras cannot open the embedded tf.Transform graph)."""
    import tensorflow as tf

    metadata = verify(version_dir)
    feature_names = metadata.get("feature_names")
    if list(feature_names or []) != list(RAW_FEATURES):
        raise ModelIntegrityError(
            f"model version {metadata.get('version')} expects features {feature_names}, this release computes {list(RAW_FEATURES)}"
        )
    saved = tf.saved_model.load(f"{version_dir.rstrip('/')}/{SAVED_MODEL_DIR}")
    return LoadedModel(path=version_dir, metadata=metadata, saved_model=saved)


def versions(model_dir: str) -> list[str]:
    """Folders of `model_dir` that hold a `metadata.json`, oldest name first (names sort by time)."""
    gfile = _gfile()
    if not gfile.isdir(model_dir):
        return []
    found = []
    for name in sorted(gfile.listdir(model_dir)):
        name = name.rstrip("/")
        if name.startswith("."):
            continue
        if gfile.exists(f"{model_dir.rstrip('/')}/{name}/{METADATA_FILE}"):
            found.append(f"{model_dir.rstrip('/')}/{name}")
    return found


def latest(model_dir: str) -> str | None:
    """The newest exported version folder in `model_dir`, or None."""
    found = versions(model_dir)
    return found[-1] if found else None
