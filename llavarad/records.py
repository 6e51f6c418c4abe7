"""Query and training records: the PhysioNet LLaVA-Rad annotation JSON and a plain JSONL.

Loaders (the official `llava/utils.py` data_loaders, docs/prompt.md):
  - "default": every record as it is, its question taken from its own human turn;
  - "mimic_train_findings": AP/PA views with a string findings, the question rewritten from
    the record's reason, a leading "mimic/" stripped from the image path;
  - "mimic_test_findings": the same, and only records with generate_method == "rule-based".
A JSONL file holds {"id", "image", "reason"?, "reference"?} per line; its question always comes
from the reason, and the MIMIC filters do not apply (it has no view or findings fields).
"""

import json
from dataclasses import dataclass
from pathlib import Path

from llavarad.tokenizer import IMAGE_TOKEN, build_question

LOADERS = ("default", "mimic_train_findings", "mimic_test_findings")


@dataclass
class Record:
    id: str
    image: str  # path relative to the image folder
    question: str  # the human turn without the image token
    reference: str | None  # the findings, when the record has them

    @property
    def query(self) -> str:
        """The human turn as the official prediction files record it."""
        return f"{IMAGE_TOKEN}\n{self.question}"


def load_records(path: str | Path, loader: str = "default") -> list[Record]:
    path = Path(path)
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose from {', '.join(LOADERS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        return [_from_jsonl(path, i, d) for i, d in _read_jsonl(path)]
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    records = []
    for i, d in enumerate(data):
        try:
            rec = _from_annotation(d, loader)
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{path}: record {i} has no field {e.args[0]!r}" if isinstance(e, KeyError) else f"{path}: record {i} is malformed ({e})") from None
        if rec is not None:
            records.append(rec)
    return records


def _from_annotation(d: dict, loader: str) -> Record | None:
    human, findings = d["conversations"][0]["value"], d["conversations"][1]["value"]
    if loader == "default":
        return Record(str(d["id"]), d["image"], human.replace(IMAGE_TOKEN, "").strip(), findings)
    if loader == "mimic_test_findings" and d["generate_method"] != "rule-based":
        return None
    if not isinstance(findings, str) or d["view"] not in ("AP", "PA"):
        return None
    return Record(str(d["id"]), d["image"].removeprefix("mimic/"), build_question(d["reason"]), findings)


def _read_jsonl(path: Path):
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from None


def _from_jsonl(path: Path, line: int, d: dict) -> Record:
    for key in ("id", "image"):
        if not isinstance(d, dict) or key not in d:
            raise ValueError(f"{path}: line {line} has no {key!r}")
    return Record(str(d["id"]), d["image"], build_question(d.get("reason")), d.get("reference"))
