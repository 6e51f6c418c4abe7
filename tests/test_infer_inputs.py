"""infer.py on bad or unusual input (issue 10): one error line before the model loads, resumed runs
that lose nothing, ids kept as written, prompts checked against the decoder's context, the exit
code of a batch run with failed records, the official prediction records."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _infer_fixtures import read_jsonl, shared_tiny_release, write_corrupt, write_images

import infer
from llavarad.model.prompt import QUESTION, QUESTION_WITH_REASON

NEW = 6
LONG_REASON = "Shortness of breath and fever. " * 120  # about 1,000 tokens: over the tiny decoder's 512 positions


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tiny = shared_tiny_release(tmp_path_factory)
    folder = tmp_path_factory.mktemp("inputs")
    return tiny, folder, write_images(folder, 4)


def batch(tiny, queries, output, *extra):
    tiny, folder, _ = tiny
    return infer.main(["--query-file", str(queries), "--image-folder", str(folder), "--output", str(output), "--model", str(tiny.release),
                       "--base", str(tiny.base), "--max-new-tokens", str(NEW), "--workers", "0", *extra])


def write_queries(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def last_error(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    """Every image once, with and without reasons and references; the file a clean run writes."""
    _, folder, images = tiny
    rows = [{"id": f"q{i}", "image": im, "reason": "Cough. " if i % 2 else None} for i, im in enumerate(images)]
    for r in rows[2:]:
        r["reference"] = "Clear."
    queries = write_queries(folder / "queries.jsonl", [{k: v for k, v in r.items() if v is not None} for r in rows])
    out = tmp_path_factory.mktemp("full") / "preds.jsonl"
    assert batch(tiny, queries, out) == 0
    return queries, out


def test_prediction_records_as_the_official_code_writes_them(full_run):
    """query: the human turn unstripped ("<image>\\n" + question, the reason as given); reference: null when none."""
    got = read_jsonl(full_run[1])
    assert got[0]["query"] == "<image>\n" + QUESTION and got[0]["reference"] is None
    assert got[1]["query"] == "<image>\n" + QUESTION_WITH_REASON.format(reason="Cough. ")  # trailing space kept
    assert got[1]["reference"] is None and got[2]["reference"] == "Clear."
    assert [list(r) for r in got] == [["id", "query", "reference", "prediction"]] * len(got)


def test_resume_keeps_a_complete_last_line_without_newline(tiny, full_run, tmp_path, capsys):
    queries, full = full_run
    lines = full.read_text().splitlines(keepends=True)
    cut = tmp_path / "preds.jsonl"
    cut.write_text("".join(lines[:2])[:-1])  # `head -n 2 preds.jsonl | head -c -1`
    assert batch(tiny, queries, cut) == 0
    assert "done: 2 predicted, 2 skipped" in capsys.readouterr().err
    assert cut.read_text() == full.read_text()


def test_output_that_is_not_ours_is_never_overwritten(tiny, full_run, tmp_path, capsys):
    for text in ("my notes", "my notes\nmore notes\n"):
        notes = tmp_path / "notes.txt"
        notes.write_text(text)
        assert batch(tiny, full_run[0], notes) == 1
        assert last_error(capsys).startswith(f"error: {notes}:1: not valid JSON") and notes.read_text() == text


def test_ids_keep_their_json_type(tiny, tmp_path, capsys):
    images = tiny[2]
    queries = write_queries(tiny[1] / "ids.jsonl", [{"id": 1, "image": images[0]}, {"id": "1", "image": images[1]}])
    out = tmp_path / "preds.jsonl"
    assert batch(tiny, queries, out) == 0
    assert [r["id"] for r in read_jsonl(out)] == [1, "1"]
    assert batch(tiny, queries, out) == 0 and "0 predicted, 2 skipped" in capsys.readouterr().err  # resume knows both


@pytest.mark.parametrize("row, message", [
    ({"image": "a.png"}, "line 1 has no 'id'"),
    ({"id": None, "image": "a.png"}, "line 1: 'id' must be a string or an integer, got null"),
    ({"id": True, "image": "a.png"}, "line 1: 'id' must be a string or an integer, got true"),
    ({"id": "a", "image": 5}, "line 1: 'image' must be a string, got 5"),
    ({"id": "a", "image": "a.png", "reason": 42}, "line 1: 'reason' must be a string or null, got 42"),
    ({"id": "a", "image": "a.png", "reference": ["x"]}, "line 1: 'reference' must be a string or null, got [\"x\"]"),
    ({"id": "a", "image": "a.png", "reason": "Cough \udcff"}, "line 1: 'reason' holds a lone surrogate (\\udcff), not text"),
])
def test_bad_record_fields_fail_before_the_model_loads(tiny, tmp_path, capsys, row, message):
    queries = write_queries(tmp_path / "q.jsonl", [row])
    code = infer.main(["--query-file", str(queries), "--output", str(tmp_path / "o.jsonl"),
                       "--model", str(tmp_path / "no-model"), "--base", str(tmp_path / "no-base")])
    assert code == 1 and last_error(capsys) == f"error: {queries}: {message}"
    assert not (tmp_path / "o.jsonl").exists()


def test_annotation_ids_and_fields_are_checked(tmp_path, capsys):
    human = {"from": "human", "value": "<image>\nDescribe.  "}
    rows = [{"id": None, "image": "a.png", "conversations": [human, {"from": "gpt", "value": "x"}]}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows))
    assert infer.main(["--query-file", str(path), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert last_error(capsys) == f"error: {path}: record 0: 'id' must be a string or an integer, got null"


def test_non_utf8_query_file_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"id": "a", "image": "a.png"}\n{"id": "b", "image": "b\xe9.png"}\n')
    assert infer.main(["--query-file", str(path), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert last_error(capsys) == f"error: {path}:2: not UTF-8 text (byte 0xe9)"


@pytest.mark.parametrize("argv, message", [
    (["x.png", "--reason", "Cough \udcff"], "--reason is not UTF-8 text (byte 0xff at character 6)"),
    (["x.png", "--device", "tpu"], "--device tpu: not a device name"),
    (["--query-file", "q.jsonl", "--output", "o.jsonl", "--limit", "-1"], "--workers and --limit must be at least 0"),
    (["--query-file", "q.jsonl", "--output", "o.jsonl", "--workers", "-1"], "--workers and --limit must be at least 0"),
])
def test_bad_arguments_fail_when_parsed(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        infer.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in err[-1] and sum("error" in line for line in err) == 1  # usage, then one error line


def usage_error(capsys, argv) -> str:
    """parse_args refuses argv with exit 2: the usage, then one error line, which is returned."""
    with pytest.raises(SystemExit) as e:
        infer.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and sum("error" in line for line in err) == 1
    return err[-1]


@pytest.mark.parametrize("link", ["same path", "other spelling", "symlink", "hard link"])
def test_output_that_is_the_query_file_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, link):
    queries = write_queries(tmp_path / "q.jsonl", [{"id": "a", "image": "a.png"}])
    before = queries.read_bytes()
    monkeypatch.chdir(tmp_path)
    output = {"same path": "q.jsonl", "other spelling": "../" + tmp_path.name + "/./q.jsonl",
              "symlink": tmp_path / "link.jsonl", "hard link": tmp_path / "hard.jsonl"}[link]
    if link == "symlink":
        output.symlink_to(queries)
    elif link == "hard link":
        os.link(queries, output)
    err = usage_error(capsys, ["--query-file", "q.jsonl", "--output", str(output)])
    assert err.endswith(f"error: --output {output}: is the query file q.jsonl; give the predictions a file of their own")
    assert queries.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["q.jsonl", *(["link.jsonl"] if link == "symlink" else ["hard.jsonl"] if link == "hard link" else [])])


def test_output_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    queries = write_queries(tmp_path / "q.jsonl", [{"id": "a", "image": "a.png"}])
    argv = ["--query-file", str(queries), "--output"]
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert usage_error(capsys, [*argv, str(tmp_path)]).endswith(f"--output {tmp_path}: is a folder, expected a predictions file")
    assert usage_error(capsys, [*argv, str(notes / "preds.jsonl")]).endswith(f"--output {notes / 'preds.jsonl'}: {notes} is a file, not a folder")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere: pretend
    new = tmp_path / "new" / "preds.jsonl"
    assert usage_error(capsys, [*argv, str(new)]).endswith(f"--output {new}: cannot create a file in {tmp_path} (permission denied)")
    assert usage_error(capsys, [*argv, str(notes)]).endswith(f"--output {notes}: cannot be written (permission denied)")
    assert not new.parent.exists() and notes.read_text() == "my notes"


def test_reason_bytes_that_are_not_utf8_from_a_shell():
    """`--reason "$(printf 'Cough \\xff')"`: the bytes reach Python as a lone surrogate."""
    run = subprocess.run([sys.executable, "infer.py", "x.png", "--reason", b"Cough \xff"], capture_output=True,
                         cwd=Path(infer.__file__).parent, env={**os.environ, "LC_ALL": "C.UTF-8"})
    err = run.stderr.decode().strip().splitlines()
    assert run.returncode == 2 and err[-1].endswith("error: --reason is not UTF-8 text (byte 0xff at character 6)")
    assert "Traceback" not in run.stderr.decode()


def test_cuda_without_a_gpu_fails_when_parsed(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        infer.parse_args(["x.png", "--device", "cuda"])
    assert "--device cuda: no CUDA GPU is available here" in capsys.readouterr().err


def test_help_shows_every_default(capsys, monkeypatch):
    monkeypatch.setattr(infer.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with pytest.raises(SystemExit):
        infer.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for default in ("microsoft/llava-rad", "lmsys/vicuna-7b-v1.5", "(default: 256)", "(default: 32)", "(default: 2,"):
        assert default in help_text
    assert infer.parse_args(["x.png"]).workers == 2  # at most the CPUs this process may use


def test_folder_as_image(tiny, capsys):
    tiny_release, folder, _ = tiny
    assert infer.main([str(folder), "--model", str(tiny_release.release), "--base", str(tiny_release.base)]) == 1
    assert last_error(capsys) == f"error: {folder}: is a folder, expected an image file"


def test_prompt_over_the_context(tiny, tmp_path, capsys):
    """One image: an error. A query file: that record's error record, the others predicted, exit 3."""
    tiny_release, folder, images = tiny
    argv = [str(folder / images[0]), "--model", str(tiny_release.release), "--base", str(tiny_release.base)]
    assert infer.main([*argv, "--reason", LONG_REASON, "--max-new-tokens", "2"]) == 1
    err = last_error(capsys)
    assert err.startswith("error: the prompt takes ") and err.endswith("over the decoder's context of 512 (max_position_embeddings)")
    assert infer.main([*argv, "--max-new-tokens", "600"]) == 1  # a short prompt, too many new tokens
    assert "+ max_new_tokens 600 = " in last_error(capsys)
    rows = [{"id": "long", "image": images[0], "reason": LONG_REASON}, {"id": "short", "image": images[1]}]
    out = tmp_path / "preds.jsonl"
    assert batch(tiny, write_queries(tmp_path / "q.jsonl", rows), out) == infer.FAILED_RECORDS
    got = read_jsonl(out)
    assert "over the decoder's context of 512" in got[0]["error"] and "prediction" not in got[0]
    assert "prediction" in got[1]


def test_failed_records_exit_non_zero_after_writing_the_rest(tiny, tmp_path, capsys):
    _, folder, images = tiny
    rows = [{"id": "a", "image": images[0]}, {"id": "b", "image": write_corrupt(folder)}, {"id": "c", "image": images[2]}]
    out = tmp_path / "preds.jsonl"
    assert batch(tiny, write_queries(folder / "with_bad.jsonl", rows), out) == infer.FAILED_RECORDS == 3
    got = read_jsonl(out)
    assert [("prediction" in r, "error" in r) for r in got] == [(True, False), (False, True), (True, False)]
    assert "1 records failed" in last_error(capsys)
