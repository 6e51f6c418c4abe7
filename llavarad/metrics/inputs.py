"""Read a predictions JSONL (ours or the official `infer` output): `prediction`, `reference`, `id`.

A failed study must never vanish silently: a record with an `error` field or without a prediction
is counted and scored as an empty prediction, or dropped when asked, and reported either way.
"""

from dataclasses import dataclass, field

from llavarad.jsonl import read_jsonl


@dataclass
class Predictions:
    predictions: list[str]
    references: list[str]
    ids: list  # the record's `id` (None when it has none)
    lines: list[int]  # line number of each kept record
    failed: list[bool]  # kept record had an error / no prediction and is scored as empty
    failed_lines: list[int] = field(default_factory=list)  # every failed record, kept or dropped
    dropped: bool = False  # True: failed records were dropped (--skip-errors)


def read_predictions(path: str, skip_errors: bool = False) -> Predictions:
    out = Predictions([], [], [], [], [], dropped=skip_errors)
    for lineno, rec in read_jsonl(path):
        if not isinstance(rec.get("reference"), str):
            what = "missing key 'reference'" if "reference" not in rec else "'reference' is not a string"
            raise ValueError(f"{path}:{lineno}: {what}")
        prediction = rec.get("prediction")
        if prediction is not None and not isinstance(prediction, str):
            raise ValueError(f"{path}:{lineno}: 'prediction' is not a string")
        failed = rec.get("error") is not None or prediction is None
        if failed:
            out.failed_lines.append(lineno)
            if skip_errors:
                continue
            prediction = ""
        out.predictions.append(prediction)
        out.references.append(rec["reference"])
        out.ids.append(rec.get("id"))
        out.lines.append(lineno)
        out.failed.append(failed)
    if not out.predictions:
        raise ValueError(f"{path}: no records to score" + (" (empty file)" if not out.failed_lines else " (all failed and --skip-errors was given)"))
    return out
