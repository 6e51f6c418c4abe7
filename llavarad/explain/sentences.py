"""Findings text -> sentences, by a few rules that fit radiology reports.

A sentence ends at ".", "!" or "?" followed by whitespace (or at a line break), except when
  - the period closes an abbreviation ("e.g.", "i.e.", "Dr.", "vs.", "approx.", ...);
  - the next word starts with a lower-case letter ("... the tube, approx. the same position");
  - the period follows a list number that opens the sentence ("1. Small effusion." stays whole).
A decimal ("1.5 cm") never ends a sentence: no whitespace follows its period.
"""

import re

ABBREVIATIONS = {"e.g", "i.e", "dr", "mr", "mrs", "ms", "vs", "approx", "cf", "fig", "al", "resp", "incl"}
_END = re.compile(r"[.!?]+(?=\s)|\n")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of the sentences of `text`, surrounding whitespace excluded."""
    spans, start = [], 0
    for m in _END.finditer(text):
        if m.group() != "\n" and not _ends_sentence(text, start, m.start(), m.end()):
            continue
        spans.append((start, m.end()))
        start = m.end()
    spans.append((start, len(text)))
    return [_strip(text, a, b) for a, b in spans if text[a:b].strip()]


def _ends_sentence(text: str, start: int, dot: int, after: int) -> bool:
    """Whether the punctuation text[dot:after] closes the sentence that began at `start`."""
    words = text[start:dot].split()
    word = words[-1].lower() if words else ""
    if text[dot] == "." and word.lstrip("(") in ABBREVIATIONS:
        return False
    if text[dot] == "." and len(words) == 1 and word.isdigit():  # "1. Left effusion."
        return False
    following = text[after:].lstrip()
    return not following[:1].islower()


def _strip(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b
