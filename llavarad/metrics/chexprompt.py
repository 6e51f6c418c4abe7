"""CheXprompt: a GPT-4 judge counts the errors of a generated Findings section against the reference.

The messages, the answer parser and the default sampling are those of the official package
(github microsoft/chexprompt, `evaluator.py` and `eval_utils.py`): the system instructions, a user
message with the six error types, five worked examples and the two reports in triple quotes, byte
for byte. The judge answers two lines of (type, count) pairs, clinically significant and
insignificant; `parse_answer` gives exactly the counts the official parser gives, or None where it
gives none. `summarize` turns the ratings into the figures evaluate.py reports. The requests
themselves are judge.py's business.
"""

import hashlib
from dataclasses import dataclass

from llavarad.metrics.bootstrap import mean_with_ci, resample_counts, resample_indices

# The official answer letters and the key names its parser gives them.
ERROR_TYPES = {
    "A": "false_positive_finding",
    "B": "omission_finding",
    "C": "incorrect_location",
    "D": "incorrect_severity",
    "E": "false_positive_comparison",
    "F": "omission_comparison",
}
SIDES = {"clinically_significant": "significant", "clinically_insignificant": "insignificant"}
SIGNIFICANT = "Number of clinically significant errors by type:"
INSIGNIFICANT = "Number of clinically insignificant errors by type:"
SAMPLING = {"temperature": 0.0, "top_p": 0.9, "max_tokens": 128}  # the official ReportEvaluator's defaults

SYSTEM = (
    "Instructions: You are an expert radiologist. Judge the diagnostic accuracy of generated radiology "
    "report findings based on a reference findings section. For each error type, count how many errors "
    "exist in the candidate report. Examples are provided for you. For clinically significant and "
    "clinically insignificant errors of 6 error types, count how many of each error type there are. "
    "Refer to the reference and candidate findings as needed to keep maximum accuracy in counting each "
    "error type. Finally, provide the error counts in the list format exactly as it is given to you."
)

# The user message; `examples` is the five worked examples, each between "##" lines.
USER = '''A clinically significant error is one that likely affects treatment, management, or outcomes. There are six error types:
A) False prediction of finding that is not present in the reference findings
B) Omission of finding that is present in the reference findings
C) Incorrect location/position of finding in the candidate findings compared to the reference findings
D) Incorrect severity of finding in the candidate findings compared to the reference findings
E) Mention of comparison that is not present in the reference findings
F) Omission of comparison describing a change from a previous study that is present in the reference findings

Desired output format:
Number of clinically significant errors by type: [(A, n_A), (B, n_B), (C, n_C), (D, n_D), (E, n_E), (F, n_F)]
Number of clinically insignificant errors by type: [(A, n_A), (B, n_B), (C, n_C), (D, n_D), (E, n_E), (F, n_F)]
##
{examples}
##
Reference Findings: """{reference}"""

Candidate Findings: """{candidate}"""

Errors:'''


@dataclass(frozen=True)
class Example:
    reference: str
    candidate: str
    significant: tuple[int, ...]  # counts of A..F
    insignificant: tuple[int, ...]
    blank_line: bool = False  # the official third example has an empty line between its two count lines


EXAMPLES = [
    Example(
        "Dilated distal esophagus as seen previously containing ingested food contents.  No signs of "
        "aspiration.  Please refer to prior CT torso for full descriptive details of esophageal "
        "abnormalities.",
        "Dobbhoff terminates in the distal esophagus .",
        (1, 1, 0, 0, 0, 1), (0, 0, 0, 0, 0, 0),
    ),
    Example(
        "PA and lateral chest compared to ___ and ___:  Mild pulmonary edema is less severe today than it "
        "was on ___.  Small pleural effusions and moderate cardiomegaly are comparable.  There is no "
        "pneumonia.  Very small right upper lobe lung nodule may be present projected over the intersection "
        "of the right first anterior and fifth posterior ribs.  Findings were discussed by Dr. ___ with Dr. "
        "___ by telephone at the time of this dictation.",
        "1. Mildly improved pulmonary edema with increased cardiomegaly, now moderate. 2. Small right "
        "pleural effusion, better assessed on prior chest CTA, likely unchanged.  No effusion on the left. "
        "3. No evidence of pneumonia.",
        (0, 1, 0, 1, 0, 0), (0, 1, 0, 0, 0, 0),
    ),
    Example(
        "In comparison with the study of ___, the monitoring and support devices are unchanged.  "
        "Opacification at the right base is unchanged, again consistent with collapse of the middle and "
        "lower lobes.  The left lung remains clear.",
        "In comparison with the study of ___ , the monitoring and support devices essentially unchanged . "
        "Continued low lung volumes without definite vascular congestion . The right base is clear on this "
        "study . Opacification at the left base is consistent with small effusion and atelectatic changes .",
        (1, 1, 0, 0, 0, 0), (1, 0, 0, 0, 0, 0),
        blank_line=True,
    ),
    Example(
        "Heart size is enlarged but stable. There remains moderate pulmonary edema which is unchanged. There "
        "is an unchanged left retrocardiac opacity. There are likely small bilateral effusions. There are no "
        "pneumothoraces.",
        "Heart size is upper limits of normal but stable.  There is persistent mild pulmonary edema. There "
        "is a left retrocardiac opacity, stable. There are no pneumothoraces.",
        (0, 0, 0, 1, 0, 0), (0, 0, 0, 0, 0, 0),
    ),
    Example(
        "1.  Left retrocardiac opacification could be atelectasis or infection.  2.  Pulmonary vascular "
        "congestion without evidence of interstitial edema.  3.  Possible small left pleural effusion.",
        "1.  Pulmonary vascular congestion without frank interstitial edema.  2.  Small bilateral pleural "
        "effusions.  3.  Subsegmental bilateral lower lobe atelectasis.",
        (0, 0, 0, 0, 0, 0), (1, 0, 0, 0, 0, 0),
    ),
]


def counts_text(counts: tuple[int, ...]) -> str:
    """(1, 0, ...) -> "((A, 1), (B, 0), ...)", the worked examples' way of writing counts."""
    return "(" + ", ".join(f"({letter}, {n})" for letter, n in zip(ERROR_TYPES, counts)) + ")"


def _worked(e: Example) -> str:
    gap = "\n\n" if e.blank_line else "\n"
    return (f'Reference Findings: """{e.reference}"""\n\nCandidate Findings: """{e.candidate}"""\n\n'
            f"Errors: {SIGNIFICANT} {counts_text(e.significant)}{gap}{INSIGNIFICANT} {counts_text(e.insignificant)}")


# "##\n<example 1>\n##\n ... \n##\n<example 5>\n##": the user message has two "##" lines on each side.
WORKED_EXAMPLES = "##\n" + "\n##\n".join(_worked(e) for e in EXAMPLES) + "\n##"
PROMPT_ID = "sha256:" + hashlib.sha256((SYSTEM + "\0" + USER + "\0" + WORKED_EXAMPLES).encode()).hexdigest()[:16]


def messages(reference: str, candidate: str) -> list[dict[str, str]]:
    """The chat messages for one report pair, as the official ReportEvaluator sends them."""
    user = USER.format(examples=WORKED_EXAMPLES, reference=reference, candidate=candidate)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_answer(text: str | None) -> dict[str, dict[str, int]] | None:
    """{"clinically_significant": {key: count}, "clinically_insignificant": {...}} as the official
    parser reads the judge's answer, or None where it reads none (the official then asks again).

    The official steps: both headings must be in the answer; it is cut at its first "Explanation";
    the insignificant pairs are what follows the last "\\n" + insignificant heading, the significant
    ones what lies between the significant heading + " " and the first "\\n" + insignificant
    heading. A side reads as pairs `_pairs` accepts, or the whole answer has none.
    """
    if text is None or not text.strip() or SIGNIFICANT not in text or INSIGNIFICANT not in text:
        return None
    text = text.split("Explanation")[0]
    parts = text.split("\n" + INSIGNIFICANT)
    significant = _pairs(parts[0].split(SIGNIFICANT + " ")[-1].strip())
    insignificant = _pairs(parts[-1].strip())
    if significant is None or insignificant is None:
        return None
    return {"clinically_significant": significant, "clinically_insignificant": insignificant}


def _pairs(text: str) -> dict[str, int] | None:
    """ "((A, 1), (B, 0))" -> {"false_positive_finding": 1, "omission_finding": 0}, the official way:
    every "),", becomes a separator and every bracket is dropped; each piece is "key, count" (more
    commas: the rest is ignored) with the count read by Python's int(); a letter A-F becomes its
    name, any other key stays as written, a repeated key keeps its last count. One piece that does
    not read so: None."""
    for old, new in (("),", "::"), ("(", ""), (")", ""), ("[", ""), ("]", "")):
        text = text.replace(old, new)
    counts = {}
    for piece in text.split("::"):
        fields = piece.strip().split(",")
        if len(fields) < 2:
            return None
        try:
            n = int(fields[1].strip())
        except ValueError:
            return None
        key = fields[0].strip()
        counts[ERROR_TYPES.get(key, key)] = n
    return counts


def usable(rating: dict | None) -> bool:
    """A rating the summary can count: both sides hold the six error types, each a count >= 0. (The
    official parser also accepts answers with fewer, other or negative counts; those are kept in
    chexprompt.jsonl as parsed, and left out of the means like a failed rating.)"""
    return rating is not None and all(
        set(rating.get(side) or {}) == set(ERROR_TYPES.values()) and min(rating[side].values()) >= 0 for side in SIDES)


# The summary's figures, in the order of main.csv and the table.
TOTALS = ["CheXprompt-significant", "CheXprompt-insignificant", "CheXprompt-no-significant"]
PER_TYPE = [f"CheXprompt-{short}/{name}" for short in SIDES.values() for name in ERROR_TYPES.values()]
METRICS = TOTALS + PER_TYPE


def report_scores(rating: dict) -> dict[str, float]:
    """One usable rating's figures: error totals, 1.0 when it has no clinically significant error,
    and each type's count."""
    significant = sum(rating["clinically_significant"].values())
    scores = {"CheXprompt-significant": float(significant),
              "CheXprompt-insignificant": float(sum(rating["clinically_insignificant"].values())),
              "CheXprompt-no-significant": float(significant == 0)}
    for side, short in SIDES.items():
        for name in ERROR_TYPES.values():
            scores[f"CheXprompt-{short}/{name}"] = float(rating[side][name])
    return scores


def summarize(ratings: list[dict | None], n_resamples: int, seed: int) -> dict[str, dict]:
    """Every figure's mean over the usable ratings with its bootstrap interval: the official draw,
    `RandomState(seed).randint(0, m, (n_resamples, m))` over the m usable reports (when every report
    is usable, the very draw the other per-report metrics share). {} when none is usable."""
    scores = [report_scores(r) for r in ratings if usable(r)]
    if not scores:
        return {}
    m = len(scores)
    counts = resample_counts(resample_indices(m, n_resamples, seed), m) if n_resamples > 0 else None
    return {name: mean_with_ci([s[name] for s in scores], counts) for name in METRICS}
