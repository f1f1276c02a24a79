"""The exported SavedModel's signatures: raw reference features in, fraud score out.

The tf.Transform graph is part of the model (`transform_features_layer`), so a caller passes
the features exactly as the feature engine computes them and does no preprocessing.

- `serving_default`: `{feature: float32[batch]}` -> `{"score": float32[batch]}`.
- `explain`: the same inputs -> `score`, and `contributions` (float32[batch, features], in
  `RAW_FEATURES` order): the gradient of the logit with respect to each raw feature times the
  feature's distance from its training mean. One batched call gives the reasons for a whole
  inference batch.
"""

from models.features import RAW_FEATURES, TRANSFORMED_FEATURES

SERVING_SIGNATURE = "serving_default"
EXPLAIN_SIGNATURE = "explain"


def input_specs() -> dict:
    import tensorflow as tf

    return {name: tf.TensorSpec([None], tf.float32, name=name) for name in RAW_FEATURES}


def build_scorer(model, tft_layer, training_means: dict[str, float]):
    """A `tf.Module` with `serve` and `explain` tf.functions around the Keras model."""
    import tensorflow as tf

    class FraudScorer(tf.Module):
        def __init__(self):
            super().__init__(name="fraud_scorer")
            self.model = model
            self.tft_layer = tft_layer
            self.means = tf.constant([training_means[name] for name in RAW_FEATURES], tf.float32)

        def logit(self, features):
            transformed = self.tft_layer(features)
            return self.model({name: transformed[name] for name in TRANSFORMED_FEATURES}, training=False)[:, 0]

        @tf.function
        def serve(self, features):
            return {"score": tf.sigmoid(self.logit(features))}

        @tf.function
        def explain(self, features):
            stacked = tf.stack([tf.cast(features[name], tf.float32) for name in RAW_FEATURES], axis=1)
            with tf.GradientTape() as tape:
                tape.watch(stacked)
                columns = tf.unstack(stacked, num=len(RAW_FEATURES), axis=1)
                logit = self.logit(dict(zip(RAW_FEATURES, columns, strict=True)))
            gradient = tape.gradient(logit, stacked)
            return {"score": tf.sigmoid(logit), "contributions": gradient * (stacked - self.means)}

    return FraudScorer()


def save(scorer, directory: str) -> None:
    """Write the scorer as a SavedModel with both signatures."""
    import tensorflow as tf

    signatures = {
        SERVING_SIGNATURE: scorer.serve.get_concrete_function(input_specs()),
        EXPLAIN_SIGNATURE: scorer.explain.get_concrete_function(input_specs()),
    }
    tf.saved_model.save(scorer, directory, signatures=signatures)
