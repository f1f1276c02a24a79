"""Feature distributions for drift checks: training summaries and the population stability index.

The training pipeline stores a summary of every raw feature (and of the validation scores) in
the model's metadata; a live window of the same values is binned with the stored edges and
compared with the stored proportions.
"""

from __future__ import annotations

import math

import numpy as np

DECILES = tuple(q / 10 for q in range(1, 10))
PSI_FLOOR = 1e-4
PSI_ALERT = 0.2


def summarize(values) -> dict:
    """Count, mean, std, min, max, decile bin edges and the share of values in each bin."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("cannot summarize an empty feature")
    edges = np.unique(np.quantile(data, DECILES, method="inverted_cdf"))  # edges are observed values
    return {
        "count": int(data.size),
        "mean": float(data.mean()),
        "std": float(data.std()),
        "min": float(data.min()),
        "max": float(data.max()),
        "bin_edges": [float(edge) for edge in edges],
        "bin_proportions": [float(p) for p in bin_proportions(data, edges)],
    }


def bin_proportions(values, edges) -> np.ndarray:
    """Share of `values` in each of the `len(edges) + 1` bins; bin i holds edges[i-1] <= v < edges[i]."""
    data = np.asarray(values, dtype=np.float64)
    counts = np.bincount(np.searchsorted(np.asarray(edges), data, side="right"), minlength=len(edges) + 1)
    return counts / max(int(data.size), 1)


def psi(expected, actual, floor: float = PSI_FLOOR) -> float:
    """Population stability index of `actual` bin shares against `expected` (shares floored at `floor`)."""
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(float(e), floor), max(float(a), floor)
        total += (a - e) * math.log(a / e)
    return total
