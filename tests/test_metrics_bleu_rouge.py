"""BLEU equals sacrebleu and ROUGE equals rouge_score, values and bootstrap CIs, to 1e-9."""

import numpy as np
import pytest

from _metrics_fixtures import official_scores, report_pairs
from llavarad.metrics.bleu import bleu_with_ci, corpus_bleu, tokenize_13a
from llavarad.metrics.bootstrap import mean_with_ci, resample_counts, resample_indices
from llavarad.metrics.rouge import rouge_l, rouge_n

PREDS, REFS = report_pairs()


@pytest.fixture(autouse=True)
def _default_sacrebleu_seed(monkeypatch):
    monkeypatch.delenv("SACREBLEU_SEED", raising=False)


def test_pairs_cover_the_edge_cases():
    assert len(PREDS) >= 50 and "" in PREDS and "" in REFS
    assert any("2.5 cm" in p for p in PREDS) and any("é" in p for p in PREDS)


def test_13a_tokenizer_equals_sacrebleu():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()
    for text in PREDS + ["a &amp; b &lt;c&gt; &quot;d&quot;", "x-\ny <skipped> 3-4 1,000.5 end.", "  trailing  \n"]:
        assert tokenize_13a(text) == tok(text.rstrip()).split(), repr(text)


@pytest.mark.parametrize("order", [1, 4])
def test_corpus_bleu_equals_sacrebleu(order):
    from sacrebleu.metrics import BLEU

    for preds, refs in ((PREDS, REFS), (PREDS[:5], REFS[:5]), ([""] * 3, ["a b", "", "c"]), (["x y z"], ["x y"])):
        expected = BLEU(max_ngram_order=order).corpus_score(preds, [refs]).score
        assert corpus_bleu(preds, refs, order) == pytest.approx(expected, abs=1e-9)


def test_cis_equal_the_official_ones():
    ours = {name: bleu_with_ci(PREDS, REFS, order) for name, order in (("BLEU-1", 1), ("BLEU-4", 4))}
    counts = resample_counts(resample_indices(len(PREDS)), len(PREDS))
    ours["ROUGE-L"] = mean_with_ci([rouge_l(r, p) for p, r in zip(PREDS, REFS)], counts)
    ours["ROUGE-2"] = mean_with_ci([rouge_n(r, p, 2) for p, r in zip(PREDS, REFS)], counts)
    expected = official_scores(PREDS, REFS, labels=None)
    for name, figures in expected.items():
        for key, value in figures.items():
            assert ours[name][key] == pytest.approx(value, abs=1e-9), (name, key)
        assert figures["ci_l"] < figures["ci_h"]


def test_rouge_per_report_equals_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL", "rouge2", "rouge1"], use_stemmer=False)
    for p, r in zip(PREDS, REFS):
        s = scorer.score(r, p)
        assert rouge_l(r, p) == pytest.approx(s["rougeL"].fmeasure, abs=1e-12)
        assert rouge_n(r, p, 2) == pytest.approx(s["rouge2"].fmeasure, abs=1e-12)
        assert rouge_n(r, p, 1) == pytest.approx(s["rouge1"].fmeasure, abs=1e-12)
    assert len({rouge_l(r, p) for p, r in zip(PREDS, REFS)}) > 20  # the scores vary


def test_full_data_values():
    for order in (1, 4):
        result = bleu_with_ci(PREDS, REFS, order, n_resamples=0)
        assert result == {"value": corpus_bleu(PREDS, REFS, order)}
    scores = [rouge_l(r, p) for p, r in zip(PREDS, REFS)]
    assert mean_with_ci(scores, None) == {"value": pytest.approx(np.mean(scores), abs=1e-15)}
