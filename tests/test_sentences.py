"""Splitting findings into sentences: the cases radiology text throws at a naive split on '. '."""

import pytest

from llavarad.explain.sentences import split_sentences

CASES = [
    ("Mild cardiomegaly. No focal consolidation.", ["Mild cardiomegaly.", "No focal consolidation."]),
    ("Opacity, e.g. pneumonia. Heart is normal.", ["Opacity, e.g. pneumonia.", "Heart is normal."]),
    ("Opacity, i.e. Atelectasis. Done.", ["Opacity, i.e. Atelectasis.", "Done."]),
    ("Nodule of 1.5 cm in the right upper lobe. Stable.", ["Nodule of 1.5 cm in the right upper lobe.", "Stable."]),
    ("Findings discussed with Dr. Smith at 3 p.m. today.", ["Findings discussed with Dr. Smith at 3 p.m. today."]),
    ("1. Left effusion. 2. No pneumothorax.", ["1. Left effusion.", "2. No pneumothorax."]),
    ("Unchanged since 2019. Stable!  Is there edema? No.", ["Unchanged since 2019.", "Stable!", "Is there edema?", "No."]),
    ("Lines and tubes as before\nLungs clear", ["Lines and tubes as before", "Lungs clear"]),
    ("  No acute process.  ", ["No acute process."]),
    ("No acute process", ["No acute process"]),
    ("", []),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_split_sentences(text, expected):
    spans = split_sentences(text)
    assert [text[a:b] for a, b in spans] == expected
