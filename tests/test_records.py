"""Loaders: filters and prompts as the official llava/utils.py data_loaders (docs/prompt.md)."""

import json

import pytest

from llavarad.infer.records import load_records

NO_REASON = "Provide a description of the findings in the radiology image."
WITH_REASON = "Provide a description of the findings in the radiology image given the following indication: "


def annotation(i, view="PA", findings="Mild cardiomegaly.", reason="Cough.\nFever.", method="rule-based", image=None):
    return {
        "id": f"s{i}", "image": image or f"mimic/p10/p1000/s{i}/img{i}.jpg", "view": view, "reason": reason,
        "generate_method": method,
        "conversations": [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": findings}],
    }


@pytest.fixture
def query_file(tmp_path):
    data = [
        annotation(0),                                  # kept everywhere
        annotation(1, view="LATERAL"),                  # not frontal
        annotation(2, findings=None),                   # no findings
        annotation(3, method="gpt4"),                   # train only
        annotation(4, view="AP", reason=None),          # no reason
        annotation(5, image="files/p10/x.jpg"),         # no mimic/ prefix
    ]
    path = tmp_path / "chat_test.json"
    path.write_text(json.dumps(data))
    return path


def test_mimic_test_findings(query_file):
    recs = load_records(query_file, "mimic_test_findings")
    assert [r.id for r in recs] == ["s0", "s4", "s5"]
    assert recs[0].image == "p10/p1000/s0/img0.jpg" and recs[2].image == "files/p10/x.jpg"
    assert recs[0].question == WITH_REASON + "Cough. Fever."
    assert recs[1].question == NO_REASON
    assert recs[0].reference == "Mild cardiomegaly."
    assert recs[0].query == "<image>\n" + WITH_REASON + "Cough. Fever."


def test_mimic_train_findings_keeps_gpt4_records(query_file):
    assert [r.id for r in load_records(query_file, "mimic_train_findings")] == ["s0", "s3", "s4", "s5"]


def test_default_uses_own_question(query_file):
    recs = load_records(query_file, "default")
    assert len(recs) == 6 and recs[1].question == "Describe the image." and recs[0].image.startswith("mimic/")


def test_jsonl(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": 1, "image": "a.png", "reason": "Chest pain."}\n\n{"id": "b", "image": "b.png"}\n')
    recs = load_records(path)
    assert [(r.id, r.question, r.reference) for r in recs] == [(1, WITH_REASON + "Chest pain.", None), ("b", NO_REASON, None)]  # ids keep their JSON type (issue 10.18)


@pytest.mark.parametrize("text, message", [
    ('{"id": 1, "image": "a.png"}\n{"id": 2, "image": \n', "line 2 is not valid JSON"),
    ('{"id": 1}\n', "line 1 has no 'image'"),
])
def test_jsonl_errors(tmp_path, text, message):
    path = tmp_path / "q.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_records(path)


def test_json_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="malformed JSON"):
        load_records(bad)
    bad.write_text(json.dumps([{"id": 1, "image": "x", "conversations": [{"value": "q"}, {"value": "f"}]}]))
    with pytest.raises(ValueError, match="record 0 has no field 'generate_method'"):
        load_records(bad, "mimic_test_findings")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.json")
