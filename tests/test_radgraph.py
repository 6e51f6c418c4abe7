"""F1-RadGraph: report splitting, the partial reward, the archive loader's errors, the cache, and the
radgraph package's published expectations with the real weights (when given)."""

import json
import os
import re

import numpy as np
import pytest
import torch

from _metrics_fixtures import REPORTS, write_vocab
from _radgraph_fixtures import PACKAGE_SPLIT, archive_files, tiny_config, tiny_radgraph, tiny_state_dict, write_archive
from llavarad.metrics import radgraph as rg_module
from llavarad.metrics.radgraph import load_radgraph, partial_reward, radgraph_rewards
from llavarad.metrics.radgraph_text import fold, split_words, word_pieces
from llavarad.metrics.wordpiece import WordPiece


# ---------------------------------------------------------------------------------------------
# Text


def test_split_words():
    assert split_words("No pleural effusion.") == ["No", "pleural", "effusion", "."]
    assert split_words("Size: normal/stable (2.5cm), x-ray!? ok") == [
        "Size", ":", "normal", "/", "stable", "(", "2", ".", "5cm", ")", ",", "x-ray", "!", "?", "ok"
    ]
    assert split_words("  ") == [] and split_words("a;b 1-2") == ["a;b", "1-2"]


@pytest.mark.parametrize("text", REPORTS)
def test_split_words_is_the_package_split(text):
    assert split_words(text) == re.sub(PACKAGE_SPLIT, " ", text).split()


def test_word_pieces_and_fold(tmp_path):
    write_vocab(tmp_path / "vocab.txt")
    tok = WordPiece(str(tmp_path / "vocab.txt"))
    p = word_pieces(["Unaffable", "\u200b", "effusion"], tok)
    assert tok.convert_tokens_to_ids(["un", "##aff", "##able", "effusion"]) == p.ids
    assert p.spans == [(0, 3), None, (3, 4)]
    C, S = 101, 102
    assert fold([], 16, C, S) == [[C, S]]
    assert fold(list(range(14)), 16, C, S) == [[C, *range(14), S]]
    assert fold(list(range(29)), 16, C, S) == [[C, *range(14), S], [C, *range(14, 28), S], [C, 28, S]]


# ---------------------------------------------------------------------------------------------
# Reward


def ann(*entities):
    """An annotation from (tokens, label, has_relation) triples."""
    return {"text": "", "entities": {
        str(i + 1): {"tokens": t, "label": lab, "start_ix": 0, "end_ix": 0, "relations": [["modify", "1"]] if rel else []}
        for i, (t, lab, rel) in enumerate(entities)
    }}


EFF = ("effusion", "OBS-DP", False)
PLEURAL = ("pleural", "ANAT-DP", False)
PLEURAL_REL = ("pleural", "ANAT-DP", True)
EDEMA = ("edema", "OBS-DA", False)


@pytest.mark.parametrize(
    "hyp, ref, expected",
    [
        (ann(EFF, PLEURAL_REL), ann(EFF, PLEURAL_REL), 1.0),
        (ann(EFF, PLEURAL_REL), ann(EFF, PLEURAL), 0.5),  # the relation flag is part of the item
        (ann(EFF, PLEURAL, EDEMA), ann(EFF, PLEURAL_REL), 0.4),  # P 1/3, R 1/2
        (ann(EFF, EFF, EFF), ann(EFF, PLEURAL), 2 / 3),  # sets: P 1, R 1/2
        (ann(("Effusion", "OBS-DP", False)), ann(EFF), 0.0),  # tokens keep their case
        (ann(("effusion", "OBS-U", False)), ann(EFF), 0.0),  # labels must match
        (ann(), ann(EFF), 0.0),
        (ann(EFF), ann(), 0.0),
        (ann(), ann(), 0.0),
    ],
)
def test_partial_reward(hyp, ref, expected):
    assert partial_reward(hyp, ref) == pytest.approx(expected, rel=1e-12, abs=0)


# ---------------------------------------------------------------------------------------------
# Loader errors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_radgraph(tmp_path_factory.mktemp("radgraph"))


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _config_with(path: tuple, value) -> dict:
    cfg = tiny_config()
    node = cfg
    for k in path[:-1]:
        node = node[k]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return cfg


NER_OUT = "_ner._ner_scorers.radgraph__ner_labels.1._module.bias"
BERT_KEY = "_embedder.token_embedder_bert._matched_embedder.transformer_model.encoder.layer.1.output.dense.weight"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f, sd: _without(f, "weights.th"), "has no weights.th"),
        (lambda f, sd: _without(f, "config.json"), "has no config.json"),
        (lambda f, sd: {k: v for k, v in f.items() if not k.startswith("vocabulary/")}, "has no vocabulary/"),
        (lambda f, sd: f | {"config.json": b"{not json"}, "config.json is not JSON"),
        (lambda f, sd: archive_files(sd, _config_with(("model", "feature_size"), None)), "config.json has no model.feature_size"),
        (lambda f, sd: archive_files(sd, _config_with(("model", "loss_weights", "coref"), 1.0)), "not supported"),
        (lambda f, sd: archive_files(sd, _config_with(("dataset_reader", "max_span_width"), 6)), "max_span_width"),
        (lambda f, sd: archive_files(_without(sd, NER_OUT)), f"missing {NER_OUT}"),
        (lambda f, sd: archive_files(sd | {"_relation.extra.weight": torch.zeros(1)}), "unknown _relation.extra.weight"),
        (lambda f, sd: archive_files(_without(sd, BERT_KEY)), f"missing {BERT_KEY}"),
        (lambda f, sd: archive_files(sd | {NER_OUT: torch.zeros(7)}), "has shape (7,)"),
        (lambda f, sd: f | {"weights.th": b"garbage"}, "weights.th is not a readable state dict"),
        (lambda f, sd: _without(f, "vocabulary/radgraph__relation_labels.txt"), "expected one vocabulary/*relation_labels.txt"),
        (lambda f, sd: f | {"vocabulary/radgraph__ner_labels.txt": b"OBS-DP\n\n"}, "must start with the empty"),
    ],
)
def test_loader_rejects_a_bad_archive(tiny, tmp_path, change, message):
    archive, vocab, sd, _ = tiny
    bad = write_archive(tmp_path / "bad.tar.gz", change(archive_files(sd), sd))
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_radgraph(bad, vocab)
    assert "bad.tar.gz" in str(err.value)


def test_loader_rejects_missing_or_non_archive_paths(tiny, tmp_path):
    archive, vocab, *_ = tiny
    with pytest.raises(FileNotFoundError, match="nowhere.tar.gz"):
        load_radgraph(str(tmp_path / "nowhere.tar.gz"), vocab)
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(ValueError, match="notes.txt: not a RadGraph model archive"):
        load_radgraph(str(tmp_path / "notes.txt"), vocab)
    with pytest.raises(FileNotFoundError, match="vocab.missing"):
        load_radgraph(archive, str(tmp_path / "vocab.missing"))


# ---------------------------------------------------------------------------------------------
# Rewards and cache


def test_rewards_of_empty_and_identical_texts(tiny):
    archive, vocab, *_ = tiny
    text = "Left basal atelectasis and mild pulmonary edema. No pneumothorax."
    hyps = ["", text, text, "   ", "( ) ."]
    refs = [text, "", text, text, text]
    rewards = radgraph_rewards(hyps, refs, archive, vocab, "cpu", 2, None)
    assert rewards[:2] == [0.0, 0.0]
    assert rewards[2] == 1.0  # the tiny model finds entities in this text
    assert rewards[3] == 0.0  # no words, so no entities
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        radgraph_rewards(["a", "b"], ["a"], archive, vocab)


def test_cache_is_used_and_equals_uncached(tiny, tmp_path, monkeypatch):
    archive, vocab, *_ = tiny
    texts = [t for t in REPORTS if t]
    hyps, refs = texts, texts[::-1]
    cache = str(tmp_path / "cache" / "radgraph.json")
    uncached = radgraph_rewards(hyps, refs, archive, vocab, "cpu", 4, None)
    assert radgraph_rewards(hyps, refs, archive, vocab, "cpu", 4, cache) == uncached
    (stored,) = json.load(open(cache)).values()  # one fingerprint: {text: annotation}
    assert set(stored) == set(texts)

    def no_model(*args):
        raise AssertionError("the model was loaded although every text is cached")

    monkeypatch.setattr(rg_module, "load_radgraph", no_model)
    assert radgraph_rewards(hyps, refs, archive, vocab, "cpu", 4, cache) == uncached
    monkeypatch.undo()

    # A new text extends the cache.
    radgraph_rewards(["Stable cardiomegaly."], [texts[0]], archive, vocab, "cpu", 4, cache)
    (stored,) = json.load(open(cache)).values()
    assert "Stable cardiomegaly." in stored


def test_cache_keeps_models_apart(tiny, tmp_path):
    """Annotations of another archive are filed apart and never read for this one."""
    archive, vocab, *_ = tiny
    texts = [t for t in REPORTS if t.strip()]
    cache = str(tmp_path / "radgraph.json")
    radgraph_rewards(texts, texts[::-1], archive, vocab, "cpu", 4, cache)
    other_sd, _ = tiny_state_dict(len(open(vocab).read().split()), seed=1)
    other = write_archive(tmp_path / "other", archive_files(other_sd))  # an unpacked folder
    expected = radgraph_rewards(texts, texts[::-1], other, vocab, "cpu", 4, None)
    assert expected != radgraph_rewards(texts, texts[::-1], archive, vocab, "cpu", 4, None)
    assert radgraph_rewards(texts, texts[::-1], other, vocab, "cpu", 4, cache) == expected
    assert len(json.load(open(cache))) == 2
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="junk.json: cache file is not valid JSON"):
        radgraph_rewards(["a"], ["a"], archive, vocab, "cpu", 4, str(tmp_path / "junk.json"))


# ---------------------------------------------------------------------------------------------
# The radgraph package's own test expectations, with the real weights

REAL_ARCHIVE = os.environ.get("LLAVARAD_RADGRAPH_ARCHIVE")
REAL_VOCAB = os.environ.get("LLAVARAD_RADGRAPH_VOCAB")
real = pytest.mark.skipif(
    not (REAL_ARCHIVE and REAL_VOCAB),
    reason="set LLAVARAD_RADGRAPH_ARCHIVE (radgraph.tar.gz) and LLAVARAD_RADGRAPH_VOCAB (its BERT vocab.txt)",
)

HYPS = [
    "no acute cardiopulmonary abnormality",
    "endotracheal tube terminates 2 5 cm above the carina bibasilar opacities likely represent atelectasis or aspiration",
    "there is no significant change since the previous exam",
    "unchanged mild pulmonary edema and moderate cardiomegaly",
    "no evidence of acute cardiopulmonary process moderate hiatal hernia",
    "no acute cardiopulmonary process",
]
REFS = [
    "no acute cardiopulmonary abnormality",
    "et tube terminates 2 cm above the carina retraction by several centimeters is recommended for more optimal placement bibasilar consolidations better assessed on concurrent chest ct",
    "there is no significant change since the previous exam the feeding tube and nasogastric tube have been removed",
    "unchanged mild pulmonary edema no radiographic evidence pneumonia",
    "no evidence of acute pulmonary process moderately large size hiatal hernia",
    "no acute intrathoracic process",
]


@real
def test_real_weights_partial_rewards():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rewards = radgraph_rewards(HYPS, REFS, REAL_ARCHIVE, REAL_VOCAB, device, 8, None)
    assert rewards == [1.0, 0.26666666666666666, 0.5714285714285715, 0.4, 0.42857142857142855, 0.4]
    assert np.mean(rewards) == 0.5111111111111111


@real
def test_real_weights_annotation():
    radgraph = load_radgraph(REAL_ARCHIVE, REAL_VOCAB)
    (a,) = radgraph.annotate(["no evidence of acute cardiopulmonary process moderate hiatal hernia"])
    entity = lambda t, lab, i, rel: {"tokens": t, "label": lab, "start_ix": i, "end_ix": i, "relations": rel}  # noqa: E731
    assert a == {
        "text": "no evidence of acute cardiopulmonary process moderate hiatal hernia",
        "entities": {
            "1": entity("acute", "OBS-DA", 3, []),
            "2": entity("cardiopulmonary", "ANAT-DP", 4, []),
            "3": entity("process", "OBS-DA", 5, [["located_at", "2"]]),
            "4": entity("moderate", "OBS-DP", 6, []),
            "5": entity("hiatal", "ANAT-DP", 7, []),
            "6": entity("hernia", "OBS-DP", 8, []),
        },
    }
