"""llavarad.infer.sampling.choose: greedy at temperature 0, samples that follow softmax(logits / T) restricted to
the nucleus (chi-square against the distribution computed here in numpy), and draws that depend only on
(seed, counter), never on the other rows of the batch."""

import numpy as np
import pytest
import torch
from scipy import stats

from llavarad.infer.sampling import choose, uniforms

LOGITS = [2.0, 1.5, 1.4, 0.3, 0.0, -0.2, -1.0, -1.1, -2.5, 3.1, 0.9, -4.0]


def nucleus_probs(logits: list[float], temperature: float, top_p: float) -> np.ndarray:
    """softmax(logits / T), keeping the most likely tokens until their mass reaches top_p, renormalised."""
    z = np.array(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    kept = np.zeros_like(p)
    mass = 0.0
    for i in np.argsort(-p, kind="stable"):
        if mass >= top_p:
            break
        kept[i] = p[i]
        mass += p[i]
    return kept / kept.sum()


def draw(n: int, temperature: float, top_p: float, seeds=None, counters=None) -> np.ndarray:
    logits = torch.tensor(LOGITS).expand(n, -1)
    seeds = torch.arange(n) if seeds is None else seeds
    counters = torch.full((n,), 7) if counters is None else counters
    return choose(logits, torch.full((n,), temperature), torch.full((n,), top_p), seeds, counters).numpy()


def assert_follows(tokens: np.ndarray, expected: np.ndarray) -> None:
    counts = np.bincount(tokens, minlength=len(expected))
    assert counts[expected == 0].sum() == 0, "a token outside the nucleus was sampled"
    support = expected > 0
    assert support.sum() > 2  # the test means something
    _, p_value = stats.chisquare(counts[support], expected[support] * len(tokens))
    assert p_value > 1e-3, (counts, expected * len(tokens))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.93), (1.6, 0.75)])
def test_samples_follow_the_nucleus_distribution_across_seeds(temperature, top_p):
    assert_follows(draw(40_000, temperature, top_p), nucleus_probs(LOGITS, temperature, top_p))


def test_samples_follow_the_distribution_along_one_seeds_positions():
    tokens = draw(40_000, 0.8, 0.95, seeds=torch.full((40_000,), 12345), counters=torch.arange(40_000))
    assert_follows(tokens, nucleus_probs(LOGITS, 0.8, 0.95))


def test_temperature_zero_is_argmax_and_tiny_top_p_is_greedy():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    seeds, counters = torch.arange(64), torch.arange(64)
    greedy = logits.argmax(-1)
    assert torch.equal(choose(logits, torch.zeros(64), torch.full((64,), 0.5), seeds, counters), greedy)
    assert torch.equal(choose(logits, torch.full((64,), 1.5), torch.full((64,), 1e-6), seeds, counters), greedy)
    sampled = choose(logits, torch.full((64,), 1.5), torch.ones(64), seeds, counters)
    assert not torch.equal(sampled, greedy)  # sampling does sample


def test_a_rows_draw_does_not_depend_on_its_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 40, generator=g)
    temperature = torch.tensor([0.0, 1.0, 0.5, 1.2, 0.0, 0.9, 1.0, 2.0])
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.5, 0.3, 1.0, 0.99, 0.8])
    seeds = torch.tensor([3, 3, -7, 2**62, 0, 11, 12, 13])
    counters = torch.tensor([100, 101, 5, 5, 9, 9, 9, 9])
    batch = choose(logits, temperature, top_p, seeds, counters)
    alone = [int(choose(logits[i : i + 1], temperature[i : i + 1], top_p[i : i + 1], seeds[i : i + 1], counters[i : i + 1])) for i in range(8)]
    assert batch.tolist() == alone
    shuffled = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    assert choose(logits[shuffled], temperature[shuffled], top_p[shuffled], seeds[shuffled], counters[shuffled]).tolist() == batch[shuffled].tolist()


def test_uniforms_are_uniform_and_differ_by_seed_and_counter():
    u = uniforms(torch.arange(200), torch.zeros(200, dtype=torch.long), 500).flatten().numpy()
    assert 0 < u.min() and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    a = uniforms(torch.tensor([1, 1, 2, 2**40 + 1]), torch.tensor([0, 1, 0, 0]), 64)
    for i in range(4):
        for j in range(i):
            assert not torch.equal(a[i], a[j])  # another seed (its high half too) or position: other noise
