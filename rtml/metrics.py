"""Ranking metrics for fraud scores, in plain numpy (no Beam, no TensorFlow, no scikit-learn).

`auc_roc` and `average_precision` judge the ranking of all transactions; `card_precision_at_k`
judges what investigators see: each day, the k cards with the highest score, counted once a card is
known to be compromised. Labels are 0/1 (or booleans), scores any finite numbers; higher means
more likely fraud.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray


def auc_roc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve: the chance a random fraud scores above a random genuine one.

    Computed from average ranks (Mann-Whitney U), so a tie between a fraud and a genuine
    transaction counts one half, whatever order they happen to be in.
    """
    y, s = _checked(labels, scores)
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        only = "genuine (0)" if positives == 0 else "fraud (1)"
        raise ValueError(f"AUC ROC needs both classes, but all {len(y)} labels are {only}")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    mean_rank = last_rank - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = mean_rank[inverse.ravel()][y == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray]:
    """(fpr, tpr, thresholds) for plotting; one point per distinct score, highest first.

    Point i flags every transaction scored >= thresholds[i]; the first point is (0, 0) at an
    infinite threshold, so the arrays have equal length and the curve starts at the origin.
    """
    y, s = _checked(labels, scores)
    tps, fps, thresholds = _cumulative_counts(y, s)
    positives, negatives = tps[-1], fps[-1]
    if positives == 0 or negatives == 0:
        raise ValueError("a ROC curve needs both classes, but the labels hold only one")
    fpr = np.concatenate(([0.0], fps / negatives))
    tpr = np.concatenate(([0.0], tps / positives))
    return fpr, tpr, np.concatenate(([np.inf], thresholds))


def precision_recall_curve(
    labels: ArrayLike, scores: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray]:
    """(precision, recall, thresholds) for plotting; one point per distinct score, highest first.

    Point i flags every transaction scored >= thresholds[i]. Unlike scikit-learn, no artificial
    (precision 1, recall 0) point is appended, so the three arrays have equal length.
    """
    y, s = _checked(labels, scores)
    tps, fps, thresholds = _cumulative_counts(y, s)
    if tps[-1] == 0:
        raise ValueError(f"precision and recall need at least one fraud (1), but all {len(y)} labels are 0")
    return tps / (tps + fps), tps / tps[-1], thresholds


def average_precision(labels: ArrayLike, scores: ArrayLike) -> float:
    """Sum over distinct thresholds, highest first, of (recall_k - recall_k-1) * precision_k.

    Tied scores form one threshold, so their order does not matter; recall starts at 0. This is
    scikit-learn's `average_precision_score` (no interpolation).
    """
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


@dataclass(frozen=True)
class DailyCardPrecision:
    """Card precision@k of one day, and what it was computed from."""

    day: Hashable
    precision: float
    frauds_in_top_k: int  # compromised customers among the day's top k
    customers_ranked: int  # customers with a transaction that day, not found on an earlier day


def card_precision_at_k_by_day(
    days: Sequence[Hashable],
    customers: Sequence[Hashable],
    scores: ArrayLike,
    labels: ArrayLike,
    k: int = 100,
) -> list[DailyCardPrecision]:
    """Card precision@k of every day, in ascending day order.

    One entry per transaction in the four sequences. Each day, a customer scores the maximum of
    their transactions' scores and counts as fraud if any of those transactions is fraud.
    Customers are ranked by that score, highest first, ties by customer id ascending (so the
    result does not depend on input order), and the top k are checked. Customers found
    compromised on an earlier day (in that day's top k and fraud) are left out: investigators
    already know them.

    The precision is divided by k even when fewer than k customers are ranked that day, because
    the k alerts a day are the investigators' budget and an unused alert finds no fraud.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a whole number >= 1, got {k!r}")
    y, s = _checked(labels, scores)
    if len(days) != len(y) or len(customers) != len(y):
        raise ValueError(
            f"days, customers, scores and labels must have one entry per transaction, "
            f"got lengths {len(days)}, {len(customers)}, {len(s)} and {len(y)}"
        )
    # day -> customer -> [max score, any fraud]
    by_day: dict[Hashable, dict[Hashable, list]] = {}
    for day, customer, score, label in zip(days, customers, s.tolist(), y.tolist(), strict=True):
        seen = by_day.setdefault(day, {}).get(customer)
        if seen is None:
            by_day[day][customer] = [score, bool(label)]
        else:
            seen[0] = max(seen[0], score)
            seen[1] = seen[1] or bool(label)

    found: set[Hashable] = set()
    results = []
    for day in sorted(by_day):
        ranked = sorted(
            ((score, customer, fraud) for customer, (score, fraud) in by_day[day].items() if customer not in found),
            key=lambda item: (-item[0], item[1]),
        )
        caught = [customer for _, customer, fraud in ranked[:k] if fraud]
        results.append(DailyCardPrecision(day, len(caught) / k, len(caught), len(ranked)))
        found.update(caught)
    return results


def card_precision_at_k(
    days: Sequence[Hashable],
    customers: Sequence[Hashable],
    scores: ArrayLike,
    labels: ArrayLike,
    k: int = 100,
) -> float:
    """Mean daily card precision@k over the days that have transactions (see `card_precision_at_k_by_day`)."""
    daily = card_precision_at_k_by_day(days, customers, scores, labels, k)
    return float(np.mean([entry.precision for entry in daily]))


def _checked(labels: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Labels as a 0/1 int array and scores as a float array, after the shape and value checks."""
    y = np.asarray(labels)
    s = np.asarray(scores)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be one-dimensional, got shapes {y.shape} and {s.shape}")
    if len(y) != len(s):
        raise ValueError(f"labels and scores must have the same length, got {len(y)} and {len(s)}")
    if len(y) == 0:
        raise ValueError("labels and scores are empty")
    if y.dtype == bool:
        y = y.astype(np.int64)
    elif not np.issubdtype(y.dtype, np.number) or not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values such as {sorted(set(y.tolist()) - {0, 1})[:3]}")
    if not np.issubdtype(s.dtype, np.number) or s.dtype == bool:
        raise ValueError(f"scores must be numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        bad = int(np.argmin(np.isfinite(s)))
        raise ValueError(f"scores must be finite, got {float(s[bad])} at index {bad}")
    return y.astype(np.int64), s


def _cumulative_counts(y: NDArray[np.int64], s: NDArray[np.float64]) -> tuple[NDArray, NDArray, NDArray]:
    """True and false positives when flagging scores >= each distinct score, highest first."""
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last_of_group].astype(np.float64)
    fps = (last_of_group + 1) - tps
    return tps, fps, s[last_of_group]
