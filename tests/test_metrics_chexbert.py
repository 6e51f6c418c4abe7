"""CheXbert labels equal the official labeler run on transformers; the label cache skips known texts."""

import numpy as np
import pytest
import torch

import llavarad.metrics.chexbert as chexbert
from _metrics_fixtures import REPORTS, chexbert_state_dict, random_bert, reference_chexbert_labels, report_pairs, write_vocab
from llavarad.metrics.chexbert import binarize, chexbert_labels, load_chexbert


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("chexbert")
    vocab = d / "vocab.txt"
    tokens = write_vocab(vocab)
    sd = chexbert_state_dict(random_bert(len(tokens)))
    torch.save({"model_state_dict": sd, "epoch": 3}, d / "chexbert.pth")
    return str(d / "chexbert.pth"), str(vocab), sd


def texts():
    preds, refs = report_pairs(20)
    long = "the lungs are clear . " * 120  # 600 pieces: cut to 512 ids
    return preds + refs + [long, long + "edema", "  Heart\n\nsize   is\tnormal.  "]


def test_labels_equal_official_labeler(weights):
    path, vocab, sd = weights
    ours = chexbert_labels(texts(), path, vocab, device="cpu", batch_size=16)
    expected = reference_chexbert_labels(texts(), sd, vocab)
    np.testing.assert_array_equal(ours, expected)
    assert ours.shape == (len(texts()), 14)
    varied = sum(len(set(ours[:, j])) > 1 for j in range(14))
    assert varied >= 7, "the tiny model should give varied labels, else the test proves little"


def test_cache_labels_only_new_texts(weights, tmp_path, monkeypatch):
    path, vocab, _ = weights
    cache = str(tmp_path / "cache" / "chexbert.json")
    first = chexbert_labels(REPORTS, path, vocab, "cpu", cache=cache)
    seen = []
    real_label = chexbert.label
    monkeypatch.setattr(chexbert, "label", lambda model, ids, *a, **k: seen.append(len(ids)) or real_label(model, ids, *a, **k))
    np.testing.assert_array_equal(chexbert_labels(REPORTS, path, vocab, "cpu", cache=cache), first)
    assert seen == []  # every text was cached: BERT never ran
    both = chexbert_labels(REPORTS + ["Stable cardiomegaly.", REPORTS[2]], path, vocab, "cpu", cache=cache)
    assert seen == [1]
    np.testing.assert_array_equal(both[: len(REPORTS)], first)
    # Other weights never read these labels.
    other = tmp_path / "other.pth"
    sd = torch.load(path, weights_only=True)
    sd["model_state_dict"]["module.linear_heads.0.bias"] += 1
    torch.save(sd, other)
    chexbert_labels(REPORTS, str(other), vocab, "cpu", cache=cache)
    assert seen[-1] == len(set(chexbert.clean(t) for t in REPORTS))


def test_binarize():
    labels = np.array([[0, 1, 2, 3]])
    np.testing.assert_array_equal(binarize(labels, False), [[0, 1, 0, 0]])
    np.testing.assert_array_equal(binarize(labels, True), [[0, 1, 0, 1]])


def test_bad_checkpoints(weights, tmp_path):
    path, vocab, sd = weights
    with pytest.raises(FileNotFoundError, match="nope.pth: CheXbert checkpoint not found"):
        load_chexbert(str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: cannot read"):
        load_chexbert(str(tmp_path / "junk.pth"))
    no_head = {k: v for k, v in sd.items() if k != "module.linear_heads.13.bias"}
    torch.save({"model_state_dict": no_head}, tmp_path / "nohead.pth")
    with pytest.raises(ValueError, match="linear_heads.13.bias"):
        load_chexbert(str(tmp_path / "nohead.pth"))
    torch.save({"model_state_dict": {**sd, "module.classifier.weight": torch.zeros(2)}}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="classifier.weight"):
        load_chexbert(str(tmp_path / "extra.pth"))
