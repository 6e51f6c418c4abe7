"""ROUGE-L and ROUGE-N F-measures per report, with Google `rouge_score` semantics (no stemmer).

Tokens: the text lowercased, every run of characters outside [a-z0-9] treated as a space (so
"2.5 cm" is "2 5 cm" and accented letters split words). ROUGE-L is the longest common subsequence
of tokens; ROUGE-N counts clipped n-gram matches. Either is 0 when a side has no tokens.
"""

import re
from collections import Counter

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _fmeasure(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)  # one row of the LCS table at a time
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: str, prediction: str) -> float:
    ref, pred = tokenize(reference), tokenize(prediction)
    if not ref or not pred:
        return 0.0
    lcs = _lcs_length(ref, pred)
    return _fmeasure(lcs / len(pred), lcs / len(ref))


def rouge_n(reference: str, prediction: str, n: int = 2) -> float:
    ref, pred = tokenize(reference), tokenize(prediction)
    ref_ngrams = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
    pred_ngrams = Counter(tuple(pred[i : i + n]) for i in range(len(pred) - n + 1))
    overlap = sum(min(count, pred_ngrams[g]) for g, count in ref_ngrams.items())
    precision = overlap / max(sum(pred_ngrams.values()), 1)
    recall = overlap / max(sum(ref_ngrams.values()), 1)
    return _fmeasure(precision, recall)
