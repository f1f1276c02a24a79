"""The Keras models: a small MLP, and a logistic regression as the baseline it must beat.

Both take the transformed features (`<feature>_xf`) by name and return the fraud logit; the
sigmoid is applied by the serving signature, so training uses a from-logits loss.
"""

from dataclasses import dataclass

from models.features import TRANSFORMED_FEATURES

MODEL_KINDS = ("mlp", "logistic")


@dataclass(frozen=True)
class ModelParams:
    kind: str = "mlp"
    hidden_units: tuple[int, ...] = (64, 32)
    dropout: float = 0.1
    learning_rate: float = 1e-3


def build_model(params: ModelParams):
    """An uncompiled Keras model: dict of transformed features -> logit, shape [batch, 1]."""
    import tensorflow as tf

    if params.kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {params.kind!r}; choose one of {', '.join(MODEL_KINDS)}")
    inputs = {name: tf.keras.Input(shape=(), name=name, dtype=tf.float32) for name in TRANSFORMED_FEATURES}
    x = tf.keras.layers.Concatenate(name="features")(
        [tf.keras.layers.Reshape((1,), name=f"{name}_column")(inputs[name]) for name in TRANSFORMED_FEATURES]
    )
    if params.kind == "mlp":
        for index, units in enumerate(params.hidden_units):
            x = tf.keras.layers.Dense(units, activation="relu", name=f"hidden_{index}")(x)
            if params.dropout:
                x = tf.keras.layers.Dropout(params.dropout, name=f"dropout_{index}")(x)
    logit = tf.keras.layers.Dense(1, name="logit")(x)
    return tf.keras.Model(inputs=inputs, outputs=logit, name=f"fraud_{params.kind}")


def compile_model(model, params: ModelParams) -> None:
    import tensorflow as tf

    model.compile(
        optimizer=tf.keras.optimizers.Adam(params.learning_rate),
        loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
        weighted_metrics=[],
        metrics=[tf.keras.metrics.AUC(curve="PR", from_logits=True, name="pr_auc")],
    )
