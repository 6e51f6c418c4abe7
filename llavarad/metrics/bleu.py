"""Corpus BLEU with sacrebleu's semantics (13a tokenizer, case-sensitive, exp smoothing), 0-100.

The official script calls `sacrebleu.BLEU(max_ngram_order=N).corpus_score(preds, [refs],
n_bootstrap=500)`: one reference per report, n-gram matches clipped per report, counts summed over
the corpus, brevity penalty from the summed lengths. Its confidence interval is sacrebleu's own:
resample reports with `np.random.default_rng(12345)`, score each resample, and report the mean of
the resampled scores +- half the distance between the 2.5% and 97.5% order statistics.
"""

import math
import re
import statistics
from collections import Counter

import numpy as np

from llavarad.metrics.bootstrap import resample_counts

SACREBLEU_SEED = 12345

# mteval-v13a's language-dependent rules, in order.
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # most symbols become tokens
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma, unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... or unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def tokenize_13a(line: str) -> list[str]:
    line = line.rstrip()
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def _ngrams(tokens: list[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def bleu_stats(hyps: list[str], refs: list[str], max_order: int = 4) -> np.ndarray:
    """(n, 2 + 2 * max_order) int64 per report: hyp length, ref length, clipped matches per order,
    hyp n-grams per order. Sums of rows are the corpus statistics."""
    rows = []
    for hyp, ref in zip(hyps, refs):
        h, r = tokenize_13a(hyp), tokenize_13a(ref)
        h_ngrams, r_ngrams = _ngrams(h, max_order), _ngrams(r, max_order)
        correct, total = [0] * max_order, [0] * max_order
        for ngram, count in h_ngrams.items():
            total[len(ngram) - 1] += count
            correct[len(ngram) - 1] += min(count, r_ngrams[ngram])
        rows.append([len(h), len(r), *correct, *total])
    return np.array(rows, dtype=np.int64).reshape(len(rows), 2 + 2 * max_order)


def bleu_from_stats(stats, max_order: int = 4) -> float:
    """BLEU from summed statistics. Float32 statistics give float32 precisions, exactly as sacrebleu
    computes its bootstrap resamples; Python ints give its full-data score."""
    sys_len, ref_len = int(stats[0]), int(stats[1])
    correct, total = stats[2 : 2 + max_order], stats[2 + max_order :]
    if not any(correct):
        return 0.0
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    log_precisions = [-9999999999.0] * max_order  # sacrebleu's floor for log(0)
    smooth = 1.0
    for n in range(max_order):
        if total[n] == 0:
            break
        if correct[n] == 0:
            smooth *= 2  # exp smoothing: 1 / 2^k for the k-th order without a match
            p = 100.0 / (smooth * total[n])
        else:
            p = 100.0 * correct[n] / total[n]
        log_precisions[n] = math.log(p)
    return bp * math.exp(sum(log_precisions) / max_order)


def corpus_bleu(hyps: list[str], refs: list[str], max_order: int = 4) -> float:
    return bleu_from_stats([int(x) for x in bleu_stats(hyps, refs, max_order).sum(0)], max_order)


def bleu_with_ci(hyps: list[str], refs: list[str], max_order: int = 4, n_resamples: int = 500) -> dict:
    """{"value", "median", "ci_l", "ci_h"} as the official script reports BLEU: its "median" is the
    full-data score and the interval is sacrebleu's mean +- half-width (see the module docstring)."""
    stats = bleu_stats(hyps, refs, max_order)
    value = bleu_from_stats([int(x) for x in stats.sum(0)], max_order)
    if n_resamples <= 1:
        return {"value": value}
    n = len(hyps)
    idx = np.random.default_rng(SACREBLEU_SEED).choice(n, size=(n_resamples, n), replace=True)
    # sacrebleu sums float32 statistics; integer sums are exact in float32 below 2**24.
    sums = (resample_counts(idx, n) @ stats).astype(np.float32)  # (B, 2 + 2 * max_order)
    scores = sorted(bleu_from_stats(row, max_order) for row in sums)
    lower = n_resamples // 40
    half_width = 0.5 * (scores[n_resamples - lower - 1] - scores[lower])
    mean = statistics.mean(scores)
    return {"value": value, "median": value, "ci_l": mean - half_width, "ci_h": mean + half_width}
