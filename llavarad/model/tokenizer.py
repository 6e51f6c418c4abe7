"""SentencePiece tokenization, token for token as the official LLaVA-Rad code (the prompt's text: prompt.py).

The release ran Hugging Face's slow `LlamaTokenizer` in legacy mode. Its rules, reproduced here
with `sentencepiece` alone:
- the literal strings "<unk>", "<s>", "</s>" in text are their special tokens (0, 1, 2), never
  split into pieces;
- the text between them is encoded chunk by chunk, and every chunk gets SentencePiece's
  dummy-prefix space ("a</s>b" -> "▁a", "</s>", "▁b");
- decoding skips the special tokens.
The image is a sentinel id (IMAGE_TOKEN_INDEX) that the model replaces by the projected patches.
"""

import os
import re

import sentencepiece as spm

from llavarad.model.prompt import ANSWER_SEP, EOS_TEXT, IMAGE_TOKEN, build_prompt

IMAGE_TOKEN_INDEX = -200  # the sentinel id the model replaces by the projected patches
IGNORE_INDEX = -100  # a label that is not supervised
PAD_ID = 0  # <unk> in Llama's tokenizer: the official training pads with it
_SPECIAL_TEXT = re.compile("(<unk>|<s>|</s>)")


class Tokenizer:
    """Llama's SentencePiece model with the release's (slow HF, legacy) special-token rules."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path}: tokenizer model file not found")
        with open(model_path, "rb") as f:
            proto = f.read()
        try:
            # An empty file would parse as an empty, unusable model.
            self.sp = spm.SentencePieceProcessor(model_proto=proto) if proto else None
        except (RuntimeError, OSError):
            self.sp = None
        if self.sp is None or self.sp.get_piece_size() == 0:
            raise ValueError(f"{model_path}: not a SentencePiece model")
        self.unk_id, self.bos_id, self.eos_id = self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()
        if self.unk_id != PAD_ID:
            raise ValueError(f"{model_path}: expected a Llama tokenizer with <unk> at id {PAD_ID}, the padding id")
        self.pad_id = PAD_ID
        self.vocab_size = self.sp.get_piece_size()
        self._special = {"<unk>": self.unk_id, "<s>": self.bos_id, "</s>": self.eos_id}
        for text, i in self._special.items():
            if i < 0 or self.sp.id_to_piece(i) != text:
                raise ValueError(f"{model_path}: expected a Llama tokenizer with the special piece {text}")

    def encode_text(self, text: str) -> list[int]:
        """Ids of a text chunk, without BOS (HF `LlamaTokenizer(legacy=True).encode(text)[1:]`)."""
        ids = []
        # re.split with a group alternates text (even places) and special strings (odd places).
        for i, part in enumerate(_SPECIAL_TEXT.split(text)):
            if i % 2:
                ids.append(self._special[part])
            else:
                ids.extend(self.sp.encode(part))  # each chunk gets the dummy-prefix space
        return ids

    def encode_prompt(self, prompt: str) -> list[int]:
        """BOS, the text before the first "<image>", IMAGE_TOKEN_INDEX, the text after it.

        Only the first "<image>" is the image: the templates put it before any reason or findings,
        so a literal "<image>" inside those is encoded as the text it is. (The official code makes
        every "<image>" a sentinel and crashes on the second; the embedding must never see one.)
        """
        before, image, after = prompt.partition(IMAGE_TOKEN)
        ids = [self.bos_id] + self.encode_text(before)
        return ids + [IMAGE_TOKEN_INDEX] + self.encode_text(after) if image else ids

    def decode(self, ids: list[int]) -> str:
        """Generated ids -> text, as the official evaluation post-processes it.

        HF's decode also drops the first piece's leading "▁"; the strip below makes that moot.
        """
        special = set(self._special.values())
        text = self.sp.decode([i for i in ids if i not in special]).strip()
        if text.endswith(EOS_TEXT):
            text = text[: -len(EOS_TEXT)]
        return text.strip()

    def encode_plain(self, findings: str) -> tuple[list[int], list[int]]:
        """Stage-1 ("plain") sample "<image>" + findings + "\\n": ids and labels.

        Labels ignore BOS and the image; every token after them is supervised.
        """
        ids = self.encode_prompt(IMAGE_TOKEN + findings + "\n")
        n_masked = len(self.encode_prompt(IMAGE_TOKEN))  # BOS and the image
        return ids, [IGNORE_INDEX] * n_masked + ids[n_masked:]

    def encode_v1(self, question: str, findings: str, max_len: int | None = None) -> tuple[list[int], list[int]]:
        """Stage-2 (Vicuna "v1") sample: the inference prompt + " " + findings + "</s>".

        Labels follow the official `preprocess_v1`, so that odd texts get its masks too: the text
        is cut into rounds at "</s>"; each round is tokenized on its own to count its tokens, and
        its instruction (up to "ASSISTANT: ") is ignored. The "- 2" drops the instruction's own BOS
        and the lone "▁" its trailing space makes, a position the answer's first token takes. When
        the counts miss the sample's length (a round without exactly one " ASSISTANT: ", an empty
        answer, "<unk>" in the text) every label is ignored, as there, unless the count reaches
        `max_len` (the official model_max_length), where the official skips that check. With a
        normal answer only the answer tokens and the final EOS are supervised.
        """
        conversation = build_prompt(question)
        if findings:  # an empty message renders as "ASSISTANT:" with no "</s>"
            conversation += " " + findings + EOS_TEXT
        ids = self.encode_prompt(conversation)
        labels = list(ids)
        labels[0] = IGNORE_INDEX  # BOS
        start = 1
        for k, turn in enumerate(conversation.split(EOS_TEXT)):
            parts = turn.split(ANSWER_SEP)
            if len(parts) != 2:  # also the empty text after the last "</s>"
                break
            # The image is in the first turn only; a later turn's "<image>" is text, as in `ids`.
            encode = self.encode_prompt if k == 0 else lambda text: [self.bos_id] + self.encode_text(text)
            n_instruction = len(encode(parts[0] + ANSWER_SEP)) - 2
            _ignore(labels, start, start + n_instruction)
            start += len(encode(turn))
        _ignore(labels, start, len(labels))
        # The official check counts the ids that differ from the pad id (<unk>).
        if (max_len is None or start < max_len) and start != sum(i != self.pad_id for i in ids):
            _ignore(labels, 0, len(labels))
        return ids, labels


def _ignore(labels: list[int], start: int, stop: int) -> None:
    """labels[start:stop] = IGNORE_INDEX, clamped to the list like a tensor slice."""
    for i in range(max(start, 0), min(stop, len(labels))):
        labels[i] = IGNORE_INDEX
