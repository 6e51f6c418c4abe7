"""Token ids -> text pieces whose concatenation is exactly `Tokenizer.decode` of all the ids.

Decoding a prefix of the ids is not always a prefix of the final text, so a piece is held back while
the decoded text ends in something that can still change:
  - U+FFFD: a SentencePiece byte piece (<0xE8>) whose UTF-8 character is not complete yet; sending
    it would put a replacement character in the stream where the final text has a real one;
  - whitespace: `decode` strips the text's ends, so a trailing space is sent only once text follows;
  - a beginning of "</s>": `decode` cuts one literal "</s>" from the end of the text.
"""

from llavarad.model.prompt import EOS_TEXT
from llavarad.model.tokenizer import Tokenizer


def _settled(text: str) -> str:
    """The longest prefix of `text` that no later token can change."""
    while True:
        before = text
        text = text.rstrip().rstrip("\ufffd")
        for k in range(len(EOS_TEXT), 0, -1):
            if text.endswith(EOS_TEXT[:k]):
                text = text[:-k]
                break
        if text == before:
            return text


class TextStream:
    """Feed token ids one at a time; each call returns the new text that is safe to send ('' if none)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(_settled(self.tokenizer.decode(self.ids)))

    def finish(self) -> str:
        """The rest of the text, once the last token is in."""
        return self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # cannot happen with the rules above; fail loudly if it does
            raise RuntimeError(f"streamed text {self.sent!r} is not a prefix of the decoded text {text!r}")
        piece, self.sent = text[len(self.sent):], text
        return piece
