"""The WordPiece tokenizer equals transformers `BertTokenizer` on a small vocab."""

import pytest

from _metrics_fixtures import REPORTS, write_vocab
from llavarad.metrics.wordpiece import WordPiece


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    write_vocab(path)
    return str(path)


@pytest.mark.parametrize("lowercase", [True, False])
def test_tokenize_equals_transformers(vocab_path, lowercase):
    from transformers import BertTokenizer

    ref = BertTokenizer(vocab_path, do_lower_case=lowercase)
    ours = WordPiece(vocab_path, lowercase=lowercase)
    for text in REPORTS:
        expected = ref.tokenize(text)
        assert ours.tokenize(text) == expected, repr(text)
        assert ours.convert_tokens_to_ids(expected) == ref.convert_tokens_to_ids(expected)
    # Something of each kind actually happened, so the comparison is not vacuous.
    pieces = {t for text in REPORTS for t in ref.tokenize(text)}
    assert {"[UNK]", "##able", "[SEP]", "中", "."} <= pieces
    assert ("cafe" in pieces) == lowercase  # accents stripped only when lowercasing


def test_encode_follows_chexbert_truncation(vocab_path):
    from transformers import BertTokenizer

    ref = BertTokenizer(vocab_path)
    ours = WordPiece(vocab_path)
    for text in REPORTS + ["the lungs are clear . " * 200]:
        # CheXbert: encode_plus(tokens); if longer than 512: res[:511] + [SEP]; empty -> [CLS, SEP].
        tokens = ref.tokenize(text)
        res = ref.encode_plus(tokens)["input_ids"] if tokens else [ref.cls_token_id, ref.sep_token_id]
        if len(res) > 512:
            res = res[:511] + [ref.sep_token_id]
        assert ours.encode(text) == res
    assert len(ours.encode("the " * 600)) == 512


def test_bad_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab"):
        WordPiece(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ValueError, match="UNK"):
        WordPiece(str(bad))
