"""Bootstrap confidence intervals as the official LLaVA-Rad evaluation draws them.

The official script resamples reports with `scipy.stats.bootstrap(random_state=3,
method="percentile")` for CheXbert and RadGraph, and with rouge_score's `BootstrapAggregator` after
`np.random.seed(3)` for ROUGE. Both draw the very same indices, `RandomState(3).randint(0, n,
(500, n))`, so every per-report metric here shares one draw: its CI equals theirs and the metrics
of one resample describe the same reports. (BLEU follows sacrebleu's own procedure, see bleu.py.)

A metric plugs in through `counts`: row b says how often each report is in resample b, so a mean
over resample b is `counts[b] @ scores / n` and a corpus statistic is `counts[b] @ per_report_stats`.
"""

import numpy as np

CONFIDENCE = 0.95


def resample_indices(n: int, n_resamples: int = 500, seed: int = 3) -> np.ndarray:
    """(n_resamples, n) report indices drawn with replacement, equal to scipy's and rouge_score's."""
    return np.random.RandomState(seed).randint(0, n, (n_resamples, n))


def resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(B, n) float64: how many times each report appears in each resample."""
    B = indices.shape[0]
    counts = np.zeros((B, n))
    np.add.at(counts, (np.arange(B)[:, None], indices), 1.0)
    return counts


def bootstrap_mean(scores: list[float], counts: np.ndarray) -> np.ndarray:
    """(B,) the mean per-report score of each resample (the bootstrap distribution of the mean)."""
    return counts @ np.asarray(scores, dtype=np.float64) / counts.shape[1]


def summarize(value: float, samples: np.ndarray | None, confidence: float = CONFIDENCE) -> dict:
    """The full-data value next to the official figures: the bootstrap median and the
    percentile interval (linear interpolation, as scipy and rouge_score compute it)."""
    if samples is None:  # bootstrap switched off
        return {"value": float(value)}
    alpha = 100 * (1 - confidence) / 2
    ci_l, median, ci_h = np.percentile(samples, [alpha, 50, 100 - alpha])
    return {"value": float(value), "median": float(median), "ci_l": float(ci_l), "ci_h": float(ci_h)}


def mean_with_ci(scores: list[float], counts: np.ndarray | None) -> dict:
    """A per-report metric (ROUGE, F1-RadGraph): mean over all reports and its bootstrap figures."""
    value = float(np.mean(scores))
    return summarize(value, None if counts is None else bootstrap_mean(scores, counts))
