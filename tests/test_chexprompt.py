"""CheXprompt's messages, parser and summary against the official package (github microsoft/chexprompt):
the messages byte for byte against the official text written out in chexprompt_official_prompt.txt,
the parser on answers the official parser reads and on those it refuses, the summary by hand."""

import re
from pathlib import Path

import numpy as np
import pytest

from llavarad.metrics.chexprompt import ERROR_TYPES, METRICS, SAMPLING, messages, parse_answer, summarize, usable

OFFICIAL = Path(__file__).with_name("chexprompt_official_prompt.txt")
SIG = "Number of clinically significant errors by type:"
INSIG = "Number of clinically insignificant errors by type:"
NAMES = list(ERROR_TYPES.values())


def official_parts() -> dict[str, str]:
    text = "".join(line for line in OFFICIAL.read_text(encoding="utf-8").splitlines(keepends=True) if not line.startswith("# "))
    chunks = re.split(r"^=== (\w+)\n", text, flags=re.M)[1:]
    return {name: body.removesuffix("\n") for name, body in zip(chunks[::2], chunks[1::2])}


def counts(*values: int) -> dict[str, int]:
    return dict(zip(NAMES, values))


def test_messages_are_the_official_ones_byte_for_byte():
    official = official_parts()
    got = messages(official["reference"], official["candidate"])
    assert got == [{"role": "system", "content": official["system"]}, {"role": "user", "content": official["user"]}]
    assert got[1]["content"].encode("utf-8") == official["user"].encode("utf-8")  # no normalisation on either side


def test_reports_are_put_in_as_they_are():
    """str.format in the official code: braces, quotes and newlines of a report are not read as a template."""
    user = messages('{x} """a"""\nb', "")[1]["content"]
    assert user.endswith('Reference Findings: """{x} """a"""\nb"""\n\nCandidate Findings: """"""\n\nErrors:')


def test_default_sampling_is_the_official_report_evaluator_s():
    assert SAMPLING == {"temperature": 0.0, "top_p": 0.9, "max_tokens": 128}


OFFICIAL_FORM = f"{SIG} ((A, 1), (B, 0), (C, 0), (D, 2), (E, 0), (F, 0))\n{INSIG} ((A, 0), (B, 1), (C, 0), (D, 0), (E, 0), (F, 3))"
ACCEPTED = [
    # the worked examples' form, as the judge is shown it
    (OFFICIAL_FORM, counts(1, 0, 0, 2, 0, 0), counts(0, 1, 0, 0, 0, 3)),
    # the instructions' form, in square brackets, after "Errors: "
    (f"Errors: {SIG} [(A, 0), (B, 0), (C, 0), (D, 0), (E, 0), (F, 1)]\n{INSIG} [(A, 2), (B, 0), (C, 0), (D, 0), (E, 0), (F, 0)]",
     counts(0, 0, 0, 0, 0, 1), counts(2, 0, 0, 0, 0, 0)),
    # the third worked example's blank line, and an explanation cut off
    (OFFICIAL_FORM.replace("\n", "\n\n") + "\nExplanation: the candidate adds a finding.", counts(1, 0, 0, 2, 0, 0), counts(0, 1, 0, 0, 0, 3)),
    # int() semantics: leading zeros, signs, underscores, spaces
    (f"{SIG} ((A, 01), (B, +2), (C, 1_0), (D,  0 ), (E, 0), (F, 0))\n{INSIG} ((A, 0), (B, 0), (C, 0), (D, 0), (E, 0), (F, -1))",
     counts(1, 2, 10, 0, 0, 0), counts(0, 0, 0, 0, 0, -1)),
    # fewer pairs, a key that is no letter A-F (kept as written), extra fields ignored
    (f"{SIG} ((A, 1), (G, 4))\n{INSIG} ((B, 2, 7))", {"false_positive_finding": 1, "G": 4}, {"omission_finding": 2}),
    # no space after the significant heading: the official parser keeps the heading in the first key
    (f"{SIG}((A, 1))\n{INSIG} ((A, 0))", {f"{SIG}A": 1}, {"false_positive_finding": 0}),
]
REFUSED = [
    None, "", "   ", "I cannot rate these reports.",
    f"{SIG} ((A, 1))",  # one heading only
    f"{SIG} ((A, 1), (B, one))\n{INSIG} ((A, 0))",  # not an integer
    f"{SIG} ((A, 1.5))\n{INSIG} ((A, 0))",
    f"{SIG} ((A, 1), (B,\n{INSIG} ((A, 0))",  # cut by max_tokens
    f"{SIG} ((A, 1))\n{INSIG} ((A, 0), (B",
    OFFICIAL_FORM + "\n\nThe candidate adds a finding.",  # text after the pairs, not after "Explanation"
    f"Explanation: none. {SIG} ((A, 1))\n{INSIG} ((A, 0))",  # cut before the pairs
    f"{SIG} ()\n{INSIG} ((A, 0))",
    "Invalid Request: Prompt was filtered",  # the official stand-in for a refused prompt
]


@pytest.mark.parametrize("answer,significant,insignificant", ACCEPTED)
def test_parser_gives_the_official_counts(answer, significant, insignificant):
    assert parse_answer(answer) == {"clinically_significant": significant, "clinically_insignificant": insignificant}


@pytest.mark.parametrize("answer", REFUSED)
def test_parser_refuses_what_the_official_refuses(answer):
    assert parse_answer(answer) is None


def test_only_six_types_with_counts_enter_the_summary():
    assert usable(parse_answer(ACCEPTED[0][0])) and not usable(None)
    assert not usable(parse_answer(ACCEPTED[3][0]))  # a negative count
    assert not usable(parse_answer(ACCEPTED[4][0]))  # missing and unknown types


def rating(significant: tuple, insignificant: tuple = (0,) * 6) -> dict:
    return {"clinically_significant": counts(*significant), "clinically_insignificant": counts(*insignificant)}


def test_summary_by_hand():
    ratings = [
        rating((1, 0, 0, 0, 0, 0)),                     # 1 significant, 0 insignificant
        None,                                           # failed: left out
        rating((0, 0, 0, 0, 0, 0), (0, 1, 0, 0, 0, 0)),  # 0, 1
        {"clinically_significant": {"G": 9}, "clinically_insignificant": {}},  # parsed, not six types: left out
        rating((2, 1, 0, 0, 0, 0), (1, 0, 0, 0, 0, 2)),  # 3, 3
        rating((0, 0, 0, 0, 0, 0)),                     # 0, 0
    ]
    got = summarize(ratings, n_resamples=0, seed=3)
    assert list(got) == METRICS
    assert got["CheXprompt-significant"] == {"value": (1 + 0 + 3 + 0) / 4}
    assert got["CheXprompt-insignificant"] == {"value": (0 + 1 + 3 + 0) / 4}
    assert got["CheXprompt-no-significant"] == {"value": 2 / 4}
    assert got["CheXprompt-significant/false_positive_finding"] == {"value": (1 + 0 + 2 + 0) / 4}
    assert got["CheXprompt-significant/omission_finding"] == {"value": 1 / 4}
    assert got["CheXprompt-insignificant/omission_comparison"] == {"value": 2 / 4}
    assert got["CheXprompt-significant/incorrect_location"] == {"value": 0.0}

    # The interval: the official draw over the 4 usable reports, the mean of each resample, percentiles.
    totals = np.array([1.0, 0.0, 3.0, 0.0])
    draw = np.random.RandomState(3).randint(0, 4, (50, 4))
    means = totals[draw].mean(axis=1)
    booted = summarize(ratings, n_resamples=50, seed=3)["CheXprompt-significant"]
    assert booted["value"] == 1.0
    assert booted["median"] == pytest.approx(np.median(means))
    assert (booted["ci_l"], booted["ci_h"]) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))


def test_no_usable_rating_gives_no_figures():
    assert summarize([None, None], n_resamples=10, seed=3) == {}
