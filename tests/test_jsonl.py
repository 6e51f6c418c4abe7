"""One JSON-lines reader with one set of rules for the query file, the resumable predictions output
and evaluate.py's input (issue 9.8); files that are not UTF-8 are named with the line (issue 10.14);
a leading UTF-8 byte-order mark is accepted in every file a user gives us (issue 18.11)."""

import codecs
import json

import pytest

from llavarad.infer.batch import read_results
from llavarad.infer.records import load_records
from llavarad.jsonl import Appender, end_at_line, read_jsonl
from llavarad.metrics.inputs import read_predictions
from llavarad.train.config import parse_train_args
from llavarad.train.data import load_train_records

ROWS = [
    {"id": "a", "image": "a.png", "reason": "Cough.\u2028Fever.", "reference": "Clear.", "prediction": "Clear."},
    {"id": 2, "image": "b.png", "reference": "Small effusion.", "prediction": "Effusion."},
]


def readers(path):
    """What each caller makes of a file, reduced to the ids it found."""
    return {
        "query file": [r.id for r in load_records(path)],
        "predictions output": [r["id"] for r in read_results(path)],
        "evaluate input": read_predictions(str(path)).ids,
    }


def test_every_reader_reads_the_same_records(tmp_path):
    path = tmp_path / "x.jsonl"
    # a raw U+2028 inside a string (json.dumps(ensure_ascii=False) writes it), a blank line, and a
    # complete last line without its newline: every caller reads the same two records
    path.write_text(json.dumps(ROWS[0], ensure_ascii=False) + "\n\n" + json.dumps(ROWS[1]), encoding="utf-8")
    assert readers(path) == dict.fromkeys(["query file", "predictions output", "evaluate input"], ["a", 2])


@pytest.mark.parametrize("read", [load_records, read_results, lambda p: read_predictions(str(p))])
def test_every_reader_names_the_line_that_is_not_utf8(tmp_path, read):
    path = tmp_path / "x.jsonl"
    path.write_bytes(json.dumps(ROWS[1]).encode() + b"\n" + json.dumps(ROWS[0]).encode()[:-2] + b"\xff\"}\n")
    with pytest.raises(ValueError, match=f"^{path}:2: not UTF-8 text \\(byte 0xff\\)$"):
        read(path)


@pytest.mark.parametrize("read", [load_records, read_results, lambda p: read_predictions(str(p))])
def test_every_reader_refuses_a_line_that_is_not_an_object(tmp_path, read):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(ROWS[1]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=f"^{path}:2: expected a JSON object, got list$"):
        read(path)


def test_torn_last_line(tmp_path):
    """Only our own output may end in a torn line (a kill mid-write), and only one that begins a JSON
    object; a query file or an evaluation input with one is refused."""
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(ROWS[1]) + '\n{"id": "a", "que')
    assert [n for n, _ in read_jsonl(path, resumable=True)] == [1]
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
        read_jsonl(path)
    path.write_text(json.dumps(ROWS[1]) + "\nmy notes")
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
        read_jsonl(path, resumable=True)


def test_a_torn_line_before_the_last_is_refused_in_a_resumed_output(tmp_path):
    """A kill tears only the last line; a torn-looking line with complete lines after it (a file
    edited by hand, or two writers) is refused, never dropped, so the rewrite loses no record."""
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps(ROWS[1]) + '\n{"id": "a", "que\n' + json.dumps(ROWS[0]) + "\n")
    with pytest.raises(ValueError, match=f"^{path}:2: not valid JSON"):
        read_results(path)
    path.write_text(json.dumps(ROWS[1]) + '\n{"id": "a", "que\n')  # torn, then its newline: complete, and malformed
    with pytest.raises(ValueError, match=f"^{path}:2: not valid JSON"):
        read_results(path)


def test_end_at_line(tmp_path):
    path = tmp_path / "x.jsonl"
    complete = json.dumps(ROWS[1])
    path.write_text(complete + "\n" + complete)  # a complete last line keeps its record
    end_at_line(path)
    assert path.read_text() == complete + "\n" + complete + "\n"
    path.write_text(complete + '\n{"id": "a", "que')  # a torn one is cut
    end_at_line(path)
    assert path.read_text() == complete + "\n"
    end_at_line(path)
    assert path.read_text() == complete + "\n"


def test_annotation_json_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "chat_test.json"
    path.write_bytes(b'[\n  {"id": "a",\n   "reason": "Cough \xff"}\n]\n')
    with pytest.raises(ValueError, match=f"^{path}:3: not UTF-8 text \\(byte 0xff\\)$"):
        load_records(path)


def test_every_reader_accepts_a_leading_byte_order_mark(tmp_path):
    """Windows editors and Excel save UTF-8 with a byte-order mark; it is not part of the first record."""
    path = tmp_path / "x.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + (json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n").encode())
    assert readers(path) == dict.fromkeys(["query file", "predictions output", "evaluate input"], ["a", 2])
    assert [r.id for r in load_train_records(path, "default")] == ["a", 2]
    writer = Appender(path)  # a resumed output that begins with one: appended to, still read whole
    writer.write({"id": "c", "prediction": "Clear."})
    writer.close()
    assert [r["id"] for r in read_results(path)] == ["a", 2, "c"]


def test_annotation_json_with_a_byte_order_mark(tmp_path):
    human, gpt = {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Clear."}
    path = tmp_path / "chat.json"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps([{"id": "a", "image": "a.png", "conversations": [human, gpt]}]).encode())
    assert [r.id for r in load_records(path)] == [r.id for r in load_train_records(path, "default")] == ["a"]


def test_training_config_toml_with_a_byte_order_mark(tmp_path):
    config = tmp_path / "c.toml"
    config.write_bytes(codecs.BOM_UTF8 + b'stage = "pretrain"\nlr = 2e-4\n')
    cfg = parse_train_args(["--config", str(config), "--data", "d", "--image-folder", "i", "--base", "b", "--tower", "t", "--output", "o"])
    assert (cfg.stage, cfg.lr) == ("pretrain", 2e-4)
