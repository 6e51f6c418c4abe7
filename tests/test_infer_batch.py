"""Batch inference over a query file on the tiny release: batching never changes a prediction,
reruns resume, unreadable images become error records, the output is in the official format."""

import json

import pytest
import torch
from _infer_fixtures import REASONS, read_jsonl, shared_tiny_release, write_annotation, write_corrupt, write_images, write_jsonl

import infer
from llavarad.infer.batch import merge_results, run_queries
from llavarad.infer.images import load_image
from llavarad.infer.records import load_records
from llavarad.model.weights import load_llavarad

NEW = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    tiny = shared_tiny_release(tmp_path_factory)
    images = write_images(tmp / "images", len(REASONS))
    queries = write_jsonl(tmp / "images" / "queries.jsonl", images, REASONS)
    model, tokenizer = load_llavarad(str(tiny.release), str(tiny.base), torch.float32, "cpu")
    return tiny, tmp, queries, model, tokenizer


def run(setup, output, batch_size=3, records=None, **kw):
    tiny, tmp, queries, model, tokenizer = setup
    records = records if records is not None else load_records(queries)
    return run_queries(model, tokenizer, records, queries.parent, output, batch_size=batch_size, max_new_tokens=NEW,
                       workers=0, progress=False, **kw)


@pytest.fixture(scope="module")
def one_by_one(setup):
    """Each query alone through the single-image path (describe)."""
    tiny, tmp, queries, model, tokenizer = setup
    return {r.id: infer.describe(model, tokenizer, [load_image(str(queries.parent / r.image))], [REASONS[i]], NEW)[0]
            for i, r in enumerate(load_records(queries))}


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_batched_equals_one_by_one(setup, one_by_one, tmp_path, batch_size):
    summary = run(setup, tmp_path / "preds.jsonl", batch_size)
    out = read_jsonl(tmp_path / "preds.jsonl")
    assert {r["id"]: r["prediction"] for r in out} == one_by_one
    assert len(set(one_by_one.values())) > 1  # the test would notice swapped rows
    assert [r["id"] for r in out] == [r.id for r in load_records(setup[2])]  # query order
    assert (summary.predicted, summary.skipped, summary.failed) == (len(REASONS), 0, 0)


def test_output_format(setup, tmp_path):
    queries = setup[2]
    run(setup, tmp_path / "preds.jsonl")
    first = read_jsonl(tmp_path / "preds.jsonl")[0]
    rec = load_records(queries)[0]
    assert list(first) == ["id", "query", "reference", "prediction"]
    assert first["query"] == "<image>\nProvide a description of the findings in the radiology image."
    assert (first["id"], first["reference"]) == (rec.id, "Finding 0.")


def test_resume_after_kill(setup, tmp_path):
    full = tmp_path / "full.jsonl"
    run(setup, full)
    lines = full.read_text().splitlines(keepends=True)
    killed = tmp_path / "killed.jsonl"
    killed.write_text("".join(lines[:3]) + lines[3][:25])  # three reports, then a kill mid-write
    summary = run(setup, killed)
    assert killed.read_text() == full.read_text()
    assert (summary.predicted, summary.skipped) == (len(REASONS) - 3, 3)
    again = run(setup, killed)  # nothing left to do
    assert (again.predicted, again.skipped) == (0, len(REASONS)) and killed.read_text() == full.read_text()


def test_bad_images_become_error_records(setup, one_by_one, tmp_path, capsys):
    tiny, tmp, queries, model, tokenizer = setup
    records = load_records(queries)
    records[2].image = write_corrupt(queries.parent)
    records[4].image = "missing/none.png"
    summary = run(setup, tmp_path / "preds.jsonl", records=records)
    out = {r["id"]: r for r in read_jsonl(tmp_path / "preds.jsonl")}
    for i, rec in enumerate(records):
        if i in (2, 4):
            assert "prediction" not in out[rec.id] and rec.image in out[rec.id]["error"]
        else:
            assert out[rec.id]["prediction"] == one_by_one[rec.id]
    assert (summary.predicted, summary.failed) == (len(REASONS) - 2, 2)
    assert "broken.png: cannot read image" in capsys.readouterr().err
    # a rerun retries only the failed ones; they fail again and stay once each
    again = run(setup, tmp_path / "preds.jsonl", records=records)
    assert (again.predicted, again.skipped, again.failed) == (0, len(REASONS) - 2, 2)
    assert len(read_jsonl(tmp_path / "preds.jsonl")) == len(REASONS)


def test_merge_keeps_one_line_per_id(tmp_path):
    out = tmp_path / "preds.jsonl"
    out.write_text(json.dumps({"id": "b", "error": "x"}) + "\n" + json.dumps({"id": "zz", "prediction": "other run"}) + "\n")
    (tmp_path / "preds.jsonl.rank0.part").write_text(json.dumps({"id": "b", "prediction": "B"}) + "\n")
    (tmp_path / "preds.jsonl.rank1.part").write_text(json.dumps({"id": "a", "prediction": "A"}) + '\n{"id": "c", "predi')
    merge_results(out, ["a", "b", "c"])
    assert read_jsonl(out) == [{"id": "a", "prediction": "A"}, {"id": "b", "prediction": "B"}, {"id": "zz", "prediction": "other run"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl"]


def test_not_a_predictions_file(setup, tmp_path):
    out = tmp_path / "preds.jsonl"
    out.write_text("[1, 2,\n3]\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        run(setup, out)


def test_cli_annotation_file_and_workers(setup, tmp_path, capsys):
    tiny, tmp, queries, model, tokenizer = setup
    images = [line["image"] for line in read_jsonl(queries)]
    ann = write_annotation(tmp_path / "chat_test.json", images, REASONS)
    out = tmp_path / "preds.jsonl"
    argv = ["--query-file", str(ann), "--image-folder", str(queries.parent), "--loader", "mimic_test_findings",
            "--output", str(out), "--model", str(tiny.release), "--base", str(tiny.base), "--max-new-tokens", str(NEW),
            "--batch-size", "4", "--workers", "2"]
    assert infer.main(argv) == 0
    got = read_jsonl(out)
    assert [r["id"] for r in got] == ["s0", "s1", "s2", "s4", "s6"]  # LATERAL s3 and gpt4 s5 filtered out
    assert got[1]["query"].endswith("given the following indication: Cough.")
    err = capsys.readouterr().err
    assert "done: 5 predicted, 0 skipped" in err and "0 failed" in err


def test_cli_usage_errors(setup, tmp_path, capsys):
    with pytest.raises(SystemExit):
        infer.main(["--query-file", str(setup[2])])  # no --output
    assert "--query-file needs --output" in capsys.readouterr().err
    assert infer.main(["--query-file", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert "nope.jsonl: file not found" in capsys.readouterr().err


def test_cli_dicom_image(setup, capsys):
    pydicom = pytest.importorskip("pydicom")
    tiny = setup[0]
    dcm = pydicom.data.get_testdata_file("MR_small.dcm")
    argv = [dcm, "--model", str(tiny.release), "--base", str(tiny.base), "--max-new-tokens", str(NEW)]
    assert infer.main(argv) == 0
    text = capsys.readouterr().out.strip()
    model, tokenizer = setup[3], setup[4]
    assert text == infer.describe(model, tokenizer, [load_image(dcm)], [None], NEW)[0]
