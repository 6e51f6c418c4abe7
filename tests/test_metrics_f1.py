"""Label F1 tables equal sklearn's classification_report; their CIs equal the official scipy bootstrap."""

import warnings

import numpy as np
import pytest

from llavarad.metrics.bootstrap import resample_counts, resample_indices
from llavarad.metrics.f1 import classification_report, f1_with_ci

NAMES = [f"c{i}" for i in range(14)]


def random_labels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = (rng.random((n, 14)) < rng.random(14)).astype(int)
    y_pred = np.where(rng.random((n, 14)) < 0.7, y_true, 1 - y_true)
    y_true[:, 3] = y_pred[:, 3] = 0  # a condition nobody has: F1 0 by zero_division, still in the macro mean
    y_pred[:, 5] = 0  # never predicted: precision 0
    y_true[:, 6] = 0  # never in the references: recall 0
    return y_true, y_pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_report_equals_sklearn(seed):
    from sklearn.metrics import classification_report as sk_report

    y_true, y_pred = random_labels(40 + 30 * seed, seed)
    for cols in (list(range(14)), [1, 4, 5, 7, 9]):
        names = [NAMES[c] for c in cols]
        expected = sk_report(y_true[:, cols].tolist(), y_pred[:, cols].tolist(), target_names=names, output_dict=True, zero_division=0)
        ours = classification_report(y_true[:, cols], y_pred[:, cols], names)
        for row in names + ["micro avg", "macro avg"]:
            for key in ("precision", "recall", "f1-score", "support"):
                assert ours[row][key] == pytest.approx(expected[row][key], abs=1e-12), (row, key)
        full = f1_with_ci(y_true[:, cols], y_pred[:, cols], names, None)
        assert full["micro"]["value"] == pytest.approx(expected["micro avg"]["f1-score"], abs=1e-12)
        assert full["macro"]["value"] == pytest.approx(expected["macro avg"]["f1-score"], abs=1e-12)


def test_micro_macro_cis_equal_scipy_bootstrap():
    from scipy.stats import bootstrap
    from sklearn.metrics import precision_recall_fscore_support

    n, n_resamples = 50, 120  # sklearn is slow; the draw itself is checked at 500 in test_metrics_bootstrap
    y_true, y_pred = random_labels(n, 7)
    counts = resample_counts(resample_indices(n, n_resamples, 3), n)
    ours = f1_with_ci(y_true, y_pred, NAMES, counts)
    for key in ("micro", "macro"):
        # The official `bootstrap_confidence_interval` of rrg_eval/chexbert.py.
        def stat(indices):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return precision_recall_fscore_support(y_pred=y_pred[indices], y_true=y_true[indices], average=key)[2]

        bs = bootstrap(data=(list(range(n)),), statistic=stat, method="percentile", paired=False, vectorized=False,
                       confidence_level=0.95, random_state=3, n_resamples=n_resamples)
        assert ours[key]["median"] == pytest.approx(np.median(bs.bootstrap_distribution), abs=1e-9)
        assert ours[key]["ci_l"] == pytest.approx(bs.confidence_interval.low, abs=1e-9)
        assert ours[key]["ci_h"] == pytest.approx(bs.confidence_interval.high, abs=1e-9)
        assert ours[key]["ci_l"] < ours[key]["ci_h"]


def test_per_label_cis_use_the_same_resamples():
    from sklearn.metrics import precision_recall_fscore_support

    n = 30
    y_true, y_pred = random_labels(n, 3)
    idx = resample_indices(n, 40, 3)
    ours = f1_with_ci(y_true, y_pred, NAMES, resample_counts(idx, n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per = np.array([precision_recall_fscore_support(y_true[i], y_pred[i], zero_division=0)[:3] for i in idx])  # (B, 3, L)
    for j, metric in enumerate(("precision", "recall", "f1-score")):
        low, high = np.percentile(per[:, j], [2.5, 97.5], axis=0)
        for c, name in enumerate(NAMES):
            assert ours["labels"][name][metric]["ci_l"] == pytest.approx(low[c], abs=1e-12)
            assert ours["labels"][name][metric]["ci_h"] == pytest.approx(high[c], abs=1e-12)
