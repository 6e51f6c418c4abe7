"""TextStream: the pieces sent while tokens arrive concatenate to Tokenizer.decode of all the tokens, and
no piece holds a replacement character for a UTF-8 character whose byte pieces are still arriving."""

import pytest
import sentencepiece as spm
from _sp_fixtures import train_tiny_sp

from llavarad.model.tokenizer import Tokenizer
from llavarad.serve.stream import TextStream


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(str(train_tiny_sp(tmp_path_factory.mktemp("sp"))))


def pieces(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    stream = TextStream(tokenizer)
    return [stream.push(i) for i in ids] + [stream.finish()]


TEXTS = [
    "Heart size é 肺 normal ✓ ok",  # characters outside the tiny vocabulary: 2-, 3- and 3-byte byte pieces
    "Effusion. </s>",  # the literal end text, which decode cuts from the end
    "a </s> b",  # ... but only at the very end
    "  trailing spaces   ",
    "</",
    "肺",
]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_decoded_text(tokenizer, text):
    ids = tokenizer.sp.encode(text)  # plain sentencepiece: "</s>" stays text, as a model could write it
    sent = pieces(tokenizer, ids)
    assert "".join(sent) == tokenizer.decode(ids)
    assert "\ufffd" not in "".join(sent)


def test_byte_pieces_are_held_back_until_their_character_is_whole(tokenizer):
    sp: spm.SentencePieceProcessor = tokenizer.sp
    ids = sp.encode("x 肺")
    assert [sp.id_to_piece(i) for i in ids[-3:]] == ["<0xE8>", "<0x82>", "<0xBA>"]  # the test exercises byte pieces
    assert sp.decode(ids[:-1]).endswith("\ufffd")  # what a naive stream would send
    sent = pieces(tokenizer, ids)
    assert sent[-4:] == ["", "", " 肺", ""]  # nothing while the bytes arrive (nor the space before), then the whole character
    assert "".join(sent) == "x 肺"


def test_an_invalid_byte_sequence_is_sent_once_text_follows(tokenizer):
    sp = tokenizer.sp
    ids = [sp.piece_to_id("<0xE8>"), *sp.encode("x")]  # a lead byte never completed
    assert "\ufffd" in tokenizer.decode(ids)  # the final text keeps the replacement character ...
    assert "".join(pieces(tokenizer, ids)) == tokenizer.decode(ids)  # ... and so does the stream
