"""Decisions from thresholds and reasons from contributions (pure, batched)."""

import numpy as np

from models.decisions import decide, top_reasons


def test_decisions_follow_the_thresholds_inclusively():
    scores = np.array([0.0, 0.29, 0.3, 0.5, 0.8, 0.95])
    assert decide(scores, review=0.3, decline=0.8) == ["approve", "approve", "review", "review", "decline", "decline"]


def test_reasons_are_the_largest_positive_contributions_in_order():
    names = ("a", "b", "c", "d", "e")
    contributions = np.array([[0.1, 2.0, -3.0, 0.5, 0.7], [-1.0, -2.0, 0.0, 0.3, -0.1]])
    values = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0]])
    first, second = top_reasons(contributions, values, names)
    assert [(r["feature"], r["value"], r["contribution"]) for r in first] == [("b", 2.0, 2.0), ("e", 5.0, 0.7), ("d", 4.0, 0.5)]
    assert second == [{"feature": "d", "value": 9.0, "contribution": 0.3}]  # only what pushed the score up
