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

from llavarad.errors import lone_surrogate
from llavarad.jsonl import read_jsonl, read_text
from llavarad.model.prompt import IMAGE_TOKEN, human_turn

LOADERS = ("default", "mimic_train_findings", "mimic_test_findings")


@dataclass
class Record:
    id: str | int  # as the file has it: 1 and "1" are different ids, and each is written back as it came
    image: str  # path relative to the image folder
    query: str  # the human turn, unstripped, as the official prediction files record it
    reference: str | None  # the findings, when the record has them

    @property
    def question(self) -> str:
        """What the prompt holds: the human turn without the image token, stripped (as the official code)."""
        return self.query.replace(IMAGE_TOKEN, "").strip()


def load_records(path: str | Path, loader: str = "default") -> list[Record]:
    """Every record of a query file, its fields' types checked, so a bad file fails before a model loads."""
    path = Path(path)
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose from {', '.join(LOADERS)}")
    if path.suffix == ".jsonl":
        return [_from_jsonl(d, f"{path}: line {n}") for n, d in read_jsonl(path)]
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    records = []
    for i, d in enumerate(data):
        try:
            rec = _from_annotation(d, loader, f"{path}: record {i}")
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{path}: record {i} has no field {e.args[0]!r}" if isinstance(e, KeyError) else f"{path}: record {i} is malformed ({e})") from None
        if rec is not None:
            records.append(rec)
    return records


def _from_annotation(d: dict, loader: str, where: str) -> Record | None:
    human, findings = d["conversations"][0]["value"], d["conversations"][1]["value"]
    _check(where, {"id": d["id"], "image": d["image"], "conversations[0].value": human})
    if loader == "default":
        _check(where, {"conversations[1].value": findings}, optional=True)
        return Record(d["id"], d["image"], human, findings)
    if loader == "mimic_test_findings" and d["generate_method"] != "rule-based":
        return None
    if not isinstance(findings, str) or d["view"] not in ("AP", "PA"):
        return None
    _check(where, {"reason": d["reason"]}, optional=True)
    return Record(d["id"], d["image"].removeprefix("mimic/"), human_turn(d["reason"]), findings)


def _from_jsonl(d: dict, where: str) -> Record:
    for key in ("id", "image"):
        if key not in d:
            raise ValueError(f"{where} has no {key!r}")
    _check(where, {"id": d["id"], "image": d["image"]})
    _check(where, {"reason": d.get("reason"), "reference": d.get("reference")}, optional=True)
    return Record(d["id"], d["image"], human_turn(d.get("reason")), d.get("reference"))


def is_id(value: object) -> bool:
    """A query id is a JSON string or integer (true is no id, though Python's bool is an int)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _check(where: str, fields: dict[str, object], optional: bool = False) -> None:
    """Each field is text (the id may also be an integer; with optional=True, null is allowed too)."""
    for name, value in fields.items():
        ok = is_id(value) if name == "id" else isinstance(value, str)
        if not ok and not (optional and value is None):
            kinds = "a string or an integer" if name == "id" else "a string" + (" or null" if optional else "")
            raise ValueError(f"{where}: {name!r} must be {kinds}, got {json.dumps(value)}")
        if isinstance(value, str) and (i := lone_surrogate(value)) is not None:
            raise ValueError(f"{where}: {name!r} holds a lone surrogate (\\u{ord(value[i]):04x}), not text")
