"""OUTPUT_DIR/chexprompt.jsonl: the CheXprompt ratings, appended as they arrive and reused on a rerun.

One line per report, the official `rate_reports.py` record {"id", "reference", "candidate",
"rating"} (`rating` null when it failed) plus what a rerun needs and what the rating cost:
  "judge":  the model, the prompt's fingerprint and the sampling that made it; a rerun reuses a
            rating only when its reference, candidate and judge are all unchanged;
  "answer": the judge's last answer, as it came;
  "error":  why `rating` is null (absent otherwise);
  "usage":  {"requests", "prompt_tokens", "completion_tokens"} the judge reported for it.
While a run goes on the file grows in the order answers arrive (a kill -9 loses only the requests in
flight); at the end it is rewritten in prediction order.
"""

import json
import os
from pathlib import Path

from llavarad.jsonl import read_jsonl

FILE = "chexprompt.jsonl"
OFFICIAL_KEYS = ("id", "reference", "candidate", "rating")


def read_ratings(path: Path) -> list[dict]:
    """The lines of an earlier run ([] when there is none). A file that is not a ratings file is
    refused, never overwritten; a torn last line (a kill mid-write) is dropped."""
    if not path.exists():
        return []
    lines = []
    for n, line in read_jsonl(path, resumable=True):
        missing = [k for k in (*OFFICIAL_KEYS, "judge") if k not in line]
        if missing or not isinstance(line["reference"], str) or not isinstance(line["candidate"], str):
            what = f"no {', '.join(map(repr, missing))}" if missing else "a reference or candidate that is not text"
            raise ValueError(f"{path}:{n}: not a CheXprompt ratings line ({what}); move the file away or choose another --output-dir")
        lines.append(line)
    return lines


def reusable(lines: list[dict], judge: dict) -> dict[tuple[str, str], dict]:
    """(reference, candidate) -> the earlier line whose rating stands: made by this judge, not failed."""
    return {(x["reference"], x["candidate"]): x for x in lines if x["rating"] is not None and x["judge"] == judge}


def rewrite(path: Path, lines: list[dict]) -> None:
    """The finished file, in prediction order, replacing the growing one atomically."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
