"""The shared bootstrap draw equals scipy.stats.bootstrap (percentile, seed 3) and rouge_score's."""

import numpy as np
import pytest

from llavarad.metrics.bootstrap import mean_with_ci, resample_counts, resample_indices


def test_mean_ci_equals_scipy_as_the_official_radgraph_ci():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(0)
    rewards = rng.random(73).tolist()
    # rrg_eval/f1radgraph.py: bootstrap over indices, statistic = mean reward of the resample.
    bs = bootstrap(data=(list(range(73)),), statistic=lambda i: np.mean([rewards[k] for k in i]), method="percentile",
                   paired=False, vectorized=False, confidence_level=0.95, random_state=3, n_resamples=500)
    ours = mean_with_ci(rewards, resample_counts(resample_indices(73, 500, 3), 73))
    assert ours["value"] == pytest.approx(np.mean(rewards), abs=1e-15)
    assert ours["median"] == pytest.approx(np.median(bs.bootstrap_distribution), abs=1e-12)
    assert ours["ci_l"] == pytest.approx(bs.confidence_interval.low, abs=1e-12)
    assert ours["ci_h"] == pytest.approx(bs.confidence_interval.high, abs=1e-12)


def test_indices_equal_rouge_scores_draw():
    np.random.seed(3)  # what rouge_score's BootstrapAggregator draws after the official np.random.seed(3)
    expected = np.stack([np.random.choice(np.arange(11), size=11) for _ in range(500)])
    np.testing.assert_array_equal(resample_indices(11, 500, 3), expected)


def test_counts():
    idx = np.array([[0, 0, 2], [1, 2, 2]])
    np.testing.assert_array_equal(resample_counts(idx, 3), [[2, 0, 1], [0, 1, 2]])
    assert mean_with_ci([1.0, 2.0, 3.0], None) == {"value": 2.0}
