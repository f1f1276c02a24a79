"""Ranking metrics: brute-force cross-checks, invariants, and hand-computed card precision@k."""

import datetime as dt
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtml import metrics


def brute_force_auc(labels, scores) -> float:
    """Every (fraud, genuine) pair: 1 if the fraud scores higher, 0.5 for a tie."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_force_ap(labels, scores) -> float:
    """Flag scores >= t for each distinct t, highest first; add the recall gained times the precision."""
    total, previous_recall = 0.0, 0.0
    positives = sum(labels)
    for threshold in sorted(set(scores), reverse=True):
        flagged = [y for s, y in zip(scores, labels, strict=True) if s >= threshold]
        precision, recall = sum(flagged) / len(flagged), sum(flagged) / positives
        total += (recall - previous_recall) * precision
        previous_recall = recall
    return total


# Integer-valued scores so that ties are common and monotone transforms keep them exact.
labelled_scores = st.integers(min_value=2, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda y: 0 < sum(y) < len(y)),
        st.lists(st.integers(0, 12).map(float), min_size=n, max_size=n),
    )
)


# --- AUC ROC ---------------------------------------------------------------------------------


def test_auc_of_the_textbook_example_is_three_quarters():
    assert metrics.auc_roc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_auc_counts_a_tie_between_fraud_and_genuine_as_one_half():
    assert metrics.auc_roc([0, 1], [0.5, 0.5]) == 0.5
    assert metrics.auc_roc([1, 0, 0, 1], [0.9, 0.9, 0.1, 0.1]) == 0.5


def test_auc_accepts_boolean_labels():
    assert metrics.auc_roc([False, True, True], [0.2, 0.3, 0.9]) == 1.0


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1]])
def test_auc_with_one_class_raises_saying_both_classes_are_needed(labels):
    with pytest.raises(ValueError, match="needs both classes"):
        metrics.auc_roc(labels, [0.5] * len(labels))


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1], [0.5], "same length"),
        ([], [], "empty"),
        ([0, 2], [0.1, 0.2], "0 or 1"),
        ([0, 1], [0.1, math.nan], "finite"),
        ([0, 1], ["a", "b"], "numbers"),
    ],
)
def test_bad_inputs_are_rejected_with_the_reason(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        metrics.auc_roc(labels, scores)


@settings(max_examples=200, deadline=None)
@given(labelled_scores)
def test_auc_equals_the_share_of_correctly_ordered_pairs(data):
    labels, scores = data
    assert metrics.auc_roc(labels, scores) == pytest.approx(brute_force_auc(labels, scores))


@settings(max_examples=200, deadline=None)
@given(labelled_scores)
def test_auc_of_reversed_scores_is_one_minus_auc(data):
    labels, scores = data
    assert metrics.auc_roc(labels, [-s for s in scores]) == pytest.approx(1 - metrics.auc_roc(labels, scores))


@settings(max_examples=200, deadline=None)
@given(labelled_scores)
def test_auc_and_ap_do_not_change_under_a_strictly_increasing_transform(data):
    labels, scores = data
    squashed = [1 / (1 + math.exp(-(s - 6) / 3)) for s in scores]
    assert metrics.auc_roc(labels, squashed) == metrics.auc_roc(labels, scores)
    assert metrics.average_precision(labels, squashed) == metrics.average_precision(labels, scores)


@settings(max_examples=200, deadline=None)
@given(labelled_scores)
def test_area_under_the_roc_curve_points_equals_auc(data):
    labels, scores = data
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.auc_roc(labels, scores))


# --- average precision and the curves --------------------------------------------------------


def test_ap_of_the_textbook_example_is_five_sixths():
    # thresholds 0.8, 0.4, 0.35, 0.1: (recall, precision) = (1/2, 1), (1/2, 1/2), (1, 2/3), (1, 1/2)
    assert metrics.average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_ap_groups_tied_scores_into_one_threshold():
    # Any order of the tie would give 1.0 or 0.5 if ties were split; grouped, it is precision 1/2 at recall 1.
    assert metrics.average_precision([1, 0], [0.5, 0.5]) == 0.5
    assert metrics.average_precision([0, 1], [0.5, 0.5]) == 0.5


def test_ap_without_any_fraud_raises():
    with pytest.raises(ValueError, match="at least one fraud"):
        metrics.average_precision([0, 0], [0.1, 0.2])


def test_ap_with_only_frauds_is_one():
    assert metrics.average_precision([1, 1, 1], [0.1, 0.5, 0.5]) == 1.0


@settings(max_examples=200, deadline=None)
@given(labelled_scores)
def test_ap_equals_the_direct_loop_over_thresholds(data):
    labels, scores = data
    assert metrics.average_precision(labels, scores) == pytest.approx(brute_force_ap(labels, scores))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 20), st.integers(0, 20), st.randoms(use_true_random=False))
def test_ap_of_a_perfect_ranking_is_one(frauds, genuine, rnd):
    labels = [1] * frauds + [0] * genuine
    scores = [rnd.uniform(0.6, 1.0) for _ in range(frauds)] + [rnd.uniform(0.0, 0.5) for _ in range(genuine)]
    order = list(range(len(labels)))
    rnd.shuffle(order)
    assert metrics.average_precision([labels[i] for i in order], [scores[i] for i in order]) == pytest.approx(1.0)


def test_roc_curve_starts_at_the_origin_with_one_point_per_distinct_score():
    fpr, tpr, thresholds = metrics.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])


def test_precision_recall_curve_has_one_point_per_distinct_score_highest_first():
    precision, recall, thresholds = metrics.precision_recall_curve([0, 1, 0, 1], [0.1, 0.4, 0.4, 0.8])
    np.testing.assert_allclose(thresholds, [0.8, 0.4, 0.1])
    np.testing.assert_allclose(precision, [1, 2 / 3, 1 / 2])
    np.testing.assert_allclose(recall, [0.5, 1, 1])


# --- card precision@k ------------------------------------------------------------------------

D1, D2, D3 = dt.date(2018, 8, 1), dt.date(2018, 8, 2), dt.date(2018, 8, 3)


def cp_by_day(rows, k):
    """rows: (day, customer, score, label) per transaction."""
    days, customers, scores, labels = zip(*rows, strict=True)
    return metrics.card_precision_at_k_by_day(list(days), list(customers), list(scores), list(labels), k)


def test_card_precision_ranks_customers_by_their_highest_score_of_the_day():
    # k=2. A's best is 0.9 and one of A's two transactions is fraud; B and C tie at 0.8 and B (id
    # order) takes the second alert: 1 fraud in the top 2. D's fraud scores too low to be seen.
    rows = [
        (D1, "A", 0.1, 0),
        (D1, "A", 0.9, 1),
        (D1, "C", 0.8, 1),
        (D1, "B", 0.8, 0),
        (D1, "D", 0.3, 1),
    ]
    [day] = cp_by_day(rows, k=2)
    assert day == metrics.DailyCardPrecision(D1, 0.5, 1, 4)


def test_card_precision_leaves_out_customers_found_on_an_earlier_day():
    rows = [
        # day 1 top 2: A (fraud) and B -> 1/2; A is found, D (fraud, not in the top 2) is not.
        (D1, "A", 0.9, 1),
        (D1, "B", 0.8, 0),
        (D1, "D", 0.3, 1),
        # day 2: A (0.95) is already found, so the top 2 is C and D, both fraud -> 2/2.
        # Were A ranked, it would take an alert and the day would score 1/2.
        (D2, "A", 0.95, 0),
        (D2, "C", 0.7, 1),
        (D2, "D", 0.65, 1),
        (D2, "E", 0.6, 1),
        # day 3: A, C and D are found; E is not (outside day 2's top 2) -> E and B, 1/2.
        (D3, "C", 0.99, 1),
        (D3, "D", 0.98, 1),
        (D3, "E", 0.5, 1),
        (D3, "B", 0.4, 0),
    ]
    daily = cp_by_day(rows, k=2)
    assert [(d.day, d.precision, d.frauds_in_top_k, d.customers_ranked) for d in daily] == [
        (D1, 0.5, 1, 3),
        (D2, 1.0, 2, 3),
        (D3, 0.5, 1, 2),
    ]
    days, customers, scores, labels = zip(*rows, strict=True)
    assert metrics.card_precision_at_k(days, customers, scores, labels, k=2) == pytest.approx(2 / 3)


def test_card_precision_divides_by_k_when_fewer_than_k_customers_are_ranked():
    # One fraudulent customer on a day with k=4: precision 1/4, not 1/1.
    [day] = cp_by_day([(D1, "A", 0.9, 1), (D1, "A", 0.2, 0)], k=4)
    assert (day.precision, day.customers_ranked) == (0.25, 1)


def test_card_precision_counts_a_day_whose_customers_were_all_found_as_zero():
    daily = cp_by_day([(D1, "A", 0.9, 1), (D2, "A", 0.9, 1)], k=1)
    assert [(d.precision, d.customers_ranked) for d in daily] == [(1.0, 1), (0.0, 0)]


def test_card_precision_takes_days_in_ascending_order_whatever_the_input_order():
    # ISO date strings work as day keys. In order, day 1 finds A so day 2 ranks only B (genuine).
    rows = [("2018-08-02", "A", 0.9, 1), ("2018-08-02", "B", 0.1, 0), ("2018-08-01", "A", 0.9, 1)]
    daily = cp_by_day(rows, k=1)
    assert [(d.day, d.precision) for d in daily] == [("2018-08-01", 1.0), ("2018-08-02", 0.0)]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([D1, D2, D3]),
            st.sampled_from("ABCDEF"),
            st.sampled_from([0.1, 0.5, 0.9]),
            st.integers(0, 1),
        ),
        min_size=1,
        max_size=30,
    ),
    st.integers(1, 4),
    st.randoms(use_true_random=False),
)
def test_card_precision_does_not_depend_on_the_order_of_transactions(rows, k, rnd):
    shuffled = list(rows)
    rnd.shuffle(shuffled)
    assert cp_by_day(shuffled, k) == cp_by_day(rows, k)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_card_precision_rejects_a_k_that_is_not_a_positive_whole_number(k):
    with pytest.raises(ValueError, match="k must be"):
        metrics.card_precision_at_k([D1], ["A"], [0.5], [1], k=k)


def test_card_precision_rejects_sequences_of_different_lengths():
    with pytest.raises(ValueError, match="one entry per transaction"):
        metrics.card_precision_at_k([D1, D1], ["A"], [0.5], [1])
