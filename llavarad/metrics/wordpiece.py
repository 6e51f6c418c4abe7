"""BERT WordPiece tokenizer (uncased by default), equal to transformers `BertTokenizer.tokenize`.

CheXbert and RadGraph label reports with BERT, so the exact pieces decide the labels. The steps
mirror `BertTokenizer`: special tokens such as `[SEP]` written in the text are kept whole; the
rest is lowercased character by character, cleaned of control characters, CJK characters are
spaced out, NFC-normalised, split on whitespace; each word is lowercased, stripped of accents and
split on punctuation; then each piece is cut greedily into the longest vocabulary entries, with
`##` marking continuations and `[UNK]` for a word that cannot be cut or is over 100 characters.
"""

import re
import unicodedata
from functools import lru_cache

SPECIAL_TOKENS = ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]")
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
MAX_WORD_CHARS = 100

# CJK Unified Ideographs blocks (not Hangul / Kana, which are space-separated scripts).
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


@lru_cache(maxsize=None)
def _is_punctuation(ch: str) -> bool:
    # Every ASCII non-alphanumeric symbol counts, even `^ $ `` which Unicode calls symbols.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _strip_accents(word: str) -> str:
    if word.isascii():
        return word
    return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")


@lru_cache(maxsize=None)
def _clean_char(ch: str) -> str:
    """What a character becomes before whitespace splitting: removed, a space, spaced out, itself."""
    if ord(ch) == 0 or ord(ch) == 0xFFFD or _is_control(ch):
        return ""
    if _is_whitespace(ch):
        return " "
    return f" {ch} " if _is_cjk(ch) else ch


def _split_on_punctuation(word: str) -> list[str]:
    pieces: list[str] = []
    new_piece = True
    for ch in word:
        if _is_punctuation(ch):
            pieces.append(ch)
            new_piece = True
        else:
            if new_piece:
                pieces.append("")
            pieces[-1] += ch
            new_piece = False
    return pieces


def load_vocab(path: str) -> dict[str, int]:
    """Token -> id, one token per line; a later duplicate line wins, as in transformers."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: BERT vocab file not found") from None
    vocab = {line.rstrip("\n"): i for i, line in enumerate(lines)}
    if "[UNK]" not in vocab:
        raise ValueError(f"{path}: not a BERT vocab file (no [UNK] token)")
    return vocab


class WordPiece:
    """`tokenize`, `convert_tokens_to_ids` and CheXbert's `encode` over a BERT `vocab.txt`."""

    def __init__(self, vocab_path: str, lowercase: bool = True):
        self.vocab = load_vocab(vocab_path)
        self.lowercase = lowercase
        self.unk_id = self.vocab["[UNK]"]
        for tok in ("[CLS]", "[SEP]"):
            if tok not in self.vocab:
                raise ValueError(f"{vocab_path}: BERT vocab file has no {tok} token")
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self._pieces: dict[str, list[str]] = {}

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        for i, chunk in enumerate(_SPECIAL_RE.split(text)):
            if i % 2 == 1:  # a special token written in the text
                tokens.append(chunk)
            elif chunk:
                if self.lowercase:
                    # Per character, as transformers does: "Σ" never becomes a final sigma.
                    chunk = "".join(ch.lower() for ch in chunk)
                for word in self._basic_tokenize(chunk):
                    tokens.extend(self._wordpiece(word))
        return tokens

    def _basic_tokenize(self, text: str) -> list[str]:
        words = []
        for word in unicodedata.normalize("NFC", "".join(map(_clean_char, text))).split():
            if word in SPECIAL_TOKENS:  # only reachable once cleaning joined one up, e.g. "[CL\0S]"
                words.append(word)
                continue
            if self.lowercase:
                word = _strip_accents(word.lower())
            words.extend(_split_on_punctuation(word))
        return " ".join(words).split()

    def _wordpiece(self, word: str) -> list[str]:
        if word not in self._pieces:  # reports reuse few words: cut each once
            self._pieces[word] = self._cut(word)
        return self._pieces[word]

    def _cut(self, word: str) -> list[str]:
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            else:  # no prefix of the rest is in the vocab
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.vocab.get(t, self.unk_id) for t in tokens]

    def encode(self, text: str, max_length: int = 512) -> list[int]:
        """[CLS] + ids + [SEP]; longer texts keep their first max_length - 2 pieces.

        CheXbert's rule: `res[:511] + [SEP]` when [CLS] + ids + [SEP] exceeds 512, i.e. the same.
        """
        ids = self.convert_tokens_to_ids(self.tokenize(text))[: max_length - 2]
        return [self.cls_id, *ids, self.sep_id]
