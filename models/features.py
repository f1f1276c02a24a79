"""The model's features in one place: names, raw types, and how each is preprocessed.

The raw features are the contract's reference features, as the backfill writes them into the
training examples and the feature engine attaches them to every transaction in the stream.
"""

from rtml.features import CUSTOMER_FEATURES, FEATURE_NAMES, TERMINAL_FEATURES

LABEL = "label"
EVENT_TIME = "event_time_us"

# Heavy-tailed, non-negative amounts and counts: log1p, then z-score on the training data.
LOG_ZSCORE = ("amount",) + tuple(name for name in CUSTOMER_FEATURES + TERMINAL_FEATURES if "risk" not in name)
# Already on [0, 1] with a meaning of their own (flags and fraud shares): used as they are.
IDENTITY = ("tx_during_weekend", "tx_during_night") + tuple(name for name in TERMINAL_FEATURES if "risk" in name)

assert sorted(LOG_ZSCORE + IDENTITY) == sorted(FEATURE_NAMES)

RAW_FEATURES = FEATURE_NAMES


def transformed_name(name: str) -> str:
    """The name of a raw feature after preprocessing."""
    return f"{name}_xf"


TRANSFORMED_FEATURES = tuple(transformed_name(name) for name in RAW_FEATURES)


def raw_feature_spec() -> dict:
    """The `tf.io` parsing spec of a training example: every feature, the label, the event time."""
    import tensorflow as tf

    spec = {name: tf.io.FixedLenFeature([], tf.float32) for name in RAW_FEATURES}
    spec[LABEL] = tf.io.FixedLenFeature([], tf.int64)
    spec[EVENT_TIME] = tf.io.FixedLenFeature([], tf.int64)
    return spec
