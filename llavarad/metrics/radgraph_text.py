"""How the radgraph package turns a report into words, and words into BERT segments.

RadGraph labels words, not wordpieces: the report is split into words with the package's regex,
each word is cut into wordpieces on its own (AllenNLP's "mismatched" indexer), and a word's
vector is later the mean of its pieces' vectors. Reports longer than one BERT window are cut into
windows of `max_length - 2` pieces, each run as its own `[CLS] ... [SEP]` sequence, and the
pieces' vectors are put back in order (AllenNLP's long-sequence folding).
"""

import re
from dataclasses import dataclass

from llavarad.metrics.wordpiece import WordPiece

# The radgraph package puts a space before and after each of / , : . ! ? ( ) that has none.
# Its character class is written `[/,-,:,.,!?()]`, where `,-,` is the range from "," to ",":
# hyphens are not split ("x-ray" stays one word).
_PUNCT_GAP = re.compile(r"(?<! )(?=[/,:.!?()])|(?<=[/,:.!?()])(?! )")


def split_words(text: str) -> list[str]:
    """The report's words, as the radgraph package gives them to the model (whole report = one
    sentence). Its dataset reader also maps the words "/." and "/?" to "." and "?", which this
    split can never produce, so that step is left out."""
    return _PUNCT_GAP.sub(" ", text).split()


@dataclass
class Pieces:
    """A report's words cut into wordpieces.

    ids: the pieces of all words in order, without [CLS]/[SEP].
    spans: per word, the half-open range of its pieces in `ids`; None for a word with no pieces
        (its vector is zero, as in AllenNLP).
    """

    ids: list[int]
    spans: list[tuple[int, int] | None]


def word_pieces(words: list[str], tokenizer: WordPiece) -> Pieces:
    ids: list[int] = []
    spans: list[tuple[int, int] | None] = []
    for word in words:
        word_ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))
        spans.append((len(ids), len(ids) + len(word_ids)) if word_ids else None)
        ids.extend(word_ids)
    return Pieces(ids, spans)


def fold(ids: list[int], max_length: int, cls_id: int, sep_id: int) -> list[list[int]]:
    """BERT inputs for a piece sequence: consecutive windows of `max_length - 2` pieces, each
    wrapped in [CLS] ... [SEP]. A sequence that fits is one window; no pieces give one empty window."""
    room = max_length - 2
    return [[cls_id, *ids[i : i + room], sep_id] for i in range(0, max(len(ids), 1), room)]
