"""From scores and contributions to decisions and reasons, for whole batches at once."""

from __future__ import annotations

import numpy as np

DECISIONS = ("approve", "review", "decline")
MAX_REASONS = 3


def decide(scores: np.ndarray, review: float, decline: float) -> list[str]:
    """`decline` at or above the decline threshold, else `review` at or above review, else `approve`."""
    scores = np.asarray(scores)
    levels = (scores >= review).astype(np.int8) + (scores >= decline).astype(np.int8)
    return [DECISIONS[level] for level in levels]


def top_reasons(contributions: np.ndarray, values: np.ndarray, names, k: int = MAX_REASONS) -> list[list[dict]]:
    """Per row, the up-to-`k` features with the largest positive contribution, largest first.

    `contributions` and `values` are [batch, features] in the order of `names`. Only features
    that pushed the score up are reasons; a row with none gets an empty list.
    """
    contributions = np.asarray(contributions, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(-contributions, axis=1, kind="stable")[:, :k]
    reasons = []
    for row, columns in enumerate(order):
        reasons.append(
            [
                {"feature": names[c], "value": float(values[row, c]), "contribution": float(contributions[row, c])}
                for c in columns
                if contributions[row, c] > 0
            ]
        )
    return reasons
