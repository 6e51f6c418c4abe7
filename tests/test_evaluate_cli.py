"""End to end: `evaluate.py` on a tiny random chexbert.pth writes the official files with the figures
of the official pipeline, re-built in the test on transformers, sklearn, scipy, sacrebleu, rouge_score."""

import csv
import json
import sys
import types

import numpy as np
import pytest
import torch

import evaluate
from _metrics_fixtures import CHEXBERT_CONDITIONS, chexbert_state_dict, official_scores, random_bert, reference_chexbert_labels, report_pairs, write_vocab

N_RESAMPLES = 40  # the official 500 makes the sklearn reference slow; the draw is the same either way
MAIN_COLUMNS = ["BLEU-1", "BLEU-4", "ROUGE-L", "ROUGE-2", "Micro-F1-14", "Macro-F1-14", "Micro-F1-5", "Macro-F1-5",
                "Micro-F1-14+", "Macro-F1-14+", "Micro-F1-5+", "Macro-F1-5+"]
BREAKDOWN_ROWS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                  "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                  "Pneumothorax", "Support Devices", "micro avg", "macro avg"]


@pytest.fixture(autouse=True)
def _default_sacrebleu_seed(monkeypatch):
    monkeypatch.delenv("SACREBLEU_SEED", raising=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    tokens = write_vocab(d / "vocab.txt")
    sd = chexbert_state_dict(random_bert(len(tokens)))
    torch.save({"model_state_dict": sd}, d / "chexbert.pth")
    preds, refs = report_pairs(30, seed=1)
    records = [{"id": f"s{i}", "query": "Findings?", "prediction": p, "reference": r} for i, (p, r) in enumerate(zip(preds, refs))]
    records[3] = {"id": "s3", "error": "CUDA out of memory", "reference": refs[3]}
    records[5].pop("prediction")
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines.insert(7, "")  # blank lines are skipped
    (d / "preds.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    scored = [("" if i in (3, 5) else p) for i, p in enumerate(preds)]
    return d, sd, scored, refs


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], {r[0]: [float(x) for x in r[1:]] for r in rows[1:]}, [r[0] for r in rows[1:]]


def test_outputs_equal_the_official_pipeline(setup, capsys):
    d, sd, preds, refs = setup
    out = d / "out"
    rc = evaluate.main([str(d / "preds.jsonl"), "--chexbert", str(d / "chexbert.pth"), "--bert-vocab", str(d / "vocab.txt"),
                        "--output-dir", str(out), "--bootstrap", str(N_RESAMPLES), "--device", "cpu", "--batch-size", "8"])
    assert rc == 0
    labels = reference_chexbert_labels(preds + refs, sd, str(d / "vocab.txt"))
    expected = official_scores(preds, refs, labels, n_resamples=N_RESAMPLES)

    header, main, rows = read_csv(out / "main.csv")
    assert header == [""] + MAIN_COLUMNS and rows == ["median", "ci_l", "ci_h"]
    for j, name in enumerate(MAIN_COLUMNS):
        for key in ("median", "ci_l", "ci_h"):
            assert main[key][j] == pytest.approx(expected[name][key], abs=1e-9), (name, key)
    assert len({main["median"][j] for j in range(4, 12)}) > 4  # CheXbert figures vary, so they prove something

    for fname, key in (("breakdown_p.csv", "breakdown+"), ("breakdown_n.csv", "breakdown-")):
        header, table, rows = read_csv(out / fname)
        assert header == ["", "f1-score", "precision", "recall", "support"] and rows == BREAKDOWN_ROWS
        for row in rows:
            got = dict(zip(header[1:], table[row]))
            for col in header[1:]:
                assert got[col] == pytest.approx(expected[key][row][col], abs=1e-12), (fname, row, col)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["records"] == {"scored": len(preds), "failed": 2, "failed_lines": [4, 6],
                                  "failed_handling": "scored as empty predictions"}
    assert list(metrics["skipped"]) == ["F1-RadGraph"] and "--radgraph" in metrics["skipped"]["F1-RadGraph"]
    for name in ("Micro-F1-14", "Macro-F1-5+"):
        assert metrics["metrics"][name]["value"] == pytest.approx(expected[name]["value"], abs=1e-12)
    assert metrics["metrics"]["BLEU-4"]["value"] == pytest.approx(expected["BLEU-4"]["median"], abs=1e-9)

    per_report = [json.loads(line) for line in (out / "per_report.jsonl").read_text().splitlines()]
    assert len(per_report) == len(preds)
    assert per_report[3]["failed"] and per_report[3]["prediction"] == "" and not per_report[2]["failed"]
    assert per_report[0]["id"] == "s0" and per_report[8]["line"] == 10
    assert np.mean([r["ROUGE-L"] for r in per_report]) == pytest.approx(metrics["metrics"]["ROUGE-L"]["value"])
    assert set(per_report[0]) >= {"chexbert_prediction", "chexbert_reference", "chexbert_disagree"}
    # Each report's labels are the official labeler's; "disagree" compares positive vs not.
    names = ("blank", "positive", "negative", "uncertain")
    for row, pred, ref in zip(per_report, labels[: len(preds)], labels[len(preds) :]):
        assert row["chexbert_prediction"] == {c: names[v] for c, v in zip(CHEXBERT_CONDITIONS, pred) if v}
        assert row["chexbert_reference"] == {c: names[v] for c, v in zip(CHEXBERT_CONDITIONS, ref) if v}
        assert row["chexbert_disagree"] == [c for c, p, r in zip(CHEXBERT_CONDITIONS, pred, ref) if (p == 1) != (r == 1)]
    assert sum(bool(r["chexbert_disagree"]) for r in per_report) > 5

    shown = capsys.readouterr()
    assert "Micro-F1-14" in shown.out and "F1-RadGraph   skipped" in shown.out and "2 records failed" in shown.err


def test_radgraph_plugs_in_like_any_per_report_metric(setup, monkeypatch):
    from scipy.stats import bootstrap

    d, _, preds, refs = setup
    calls = []

    def radgraph_rewards(hyps, refs_, archive, vocab, device, batch_size, cache):
        calls.append((archive, vocab, device, batch_size, cache))
        return [len(h) % 7 / 7 for h in hyps]

    monkeypatch.setitem(sys.modules, "llavarad.metrics.radgraph", types.SimpleNamespace(radgraph_rewards=radgraph_rewards))
    out = d / "out_rg"
    rc = evaluate.main([str(d / "preds.jsonl"), "--radgraph", str(d / "chexbert.pth"), "--radgraph-vocab", str(d / "vocab.txt"),
                        "--output-dir", str(out), "--device", "cpu", "--cache", str(d / "cache"), "--batch-size", "4"])
    assert rc == 0
    assert calls == [(str(d / "chexbert.pth"), str(d / "vocab.txt"), "cpu", 4, str(d / "cache" / "radgraph.json"))]
    rewards = radgraph_rewards(preds, refs, *calls[0])
    # The official F1-RadGraph figures: scipy bootstrap of the mean reward, seed 3, percentile.
    bs = bootstrap(data=(list(range(len(preds))),), statistic=lambda i: np.mean([rewards[k] for k in i]),
                   method="percentile", paired=False, vectorized=False, confidence_level=0.95, random_state=3, n_resamples=500)
    header, main, _ = read_csv(out / "main.csv")
    assert header == ["", "BLEU-1", "BLEU-4", "ROUGE-L", "ROUGE-2", "F1-RadGraph"]
    assert main["median"][-1] == pytest.approx(np.median(bs.bootstrap_distribution), abs=1e-12)
    assert main["ci_l"][-1] == pytest.approx(bs.confidence_interval.low, abs=1e-12)
    assert main["ci_h"][-1] == pytest.approx(bs.confidence_interval.high, abs=1e-12)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["F1-RadGraph"]["value"] == pytest.approx(np.mean(rewards))
    assert list(metrics["skipped"]) == ["CheXbert"]
    per_report = [json.loads(line) for line in (out / "per_report.jsonl").read_text().splitlines()]
    assert [r["F1-RadGraph"] for r in per_report] == rewards


def test_skip_errors_drops_failed_records_loudly(setup, capsys):
    d, _, preds, refs = setup
    out = d / "out_skip"
    assert evaluate.main([str(d / "preds.jsonl"), "--skip-errors", "--bootstrap", "0", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["records"]["scored"] == len(preds) - 2 and metrics["records"]["failed_handling"] == "dropped"
    assert "dropped (--skip-errors)" in capsys.readouterr().err
    header, main, rows = read_csv(out / "main.csv")
    assert rows == ["value"] and "median" not in metrics["metrics"]["BLEU-4"]


@pytest.mark.parametrize("content, message", [
    ('{"prediction": "a", "reference": "b"}\n{"prediction": "a", "reference"\n', "preds.jsonl:2: not valid JSON"),
    ('{"prediction": "a"}\n', "preds.jsonl:1: missing key 'reference'"),
    ('{"prediction": 3, "reference": "b"}\n', "preds.jsonl:1: 'prediction' is not a string"),
    ("[1, 2]\n", "preds.jsonl:1: expected a JSON object"),
    ("", "preds.jsonl: no records to score (empty file)"),
    ('{"error": "x", "reference": "b"}\n', "preds.jsonl: no records"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, content, message):
    path = tmp_path / "preds.jsonl"
    path.write_text(content)
    argv = [str(path), "--output-dir", str(tmp_path / "o")] + (["--skip-errors"] if "error" in content else [])
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_missing_weights_are_named(setup, tmp_path, capsys):
    d = setup[0]
    preds = str(d / "preds.jsonl")
    assert evaluate.main([preds, "--chexbert", str(tmp_path / "none.pth"), "--bert-vocab", str(d / "vocab.txt")]) == 1
    assert "none.pth: file given to --chexbert not found" in capsys.readouterr().err
    assert evaluate.main([preds, "--chexbert", str(d / "chexbert.pth"), "--output-dir", str(tmp_path / "o")]) == 0  # vocab.txt beside it
    lonely = tmp_path / "chexbert.pth"
    lonely.write_bytes(b"")
    assert evaluate.main([preds, "--chexbert", str(lonely)]) == 1
    assert "--chexbert needs --bert-vocab" in capsys.readouterr().err
    assert evaluate.main([preds, "--radgraph", str(lonely)]) == 1
    assert "--radgraph needs --radgraph-vocab" in capsys.readouterr().err


def test_says_which_files_it_wrote(setup, capsys):
    """Without CheXbert no breakdown is written, and the last line does not claim one (issue 10.16)."""
    d = setup[0]
    out = d / "out_no_chexbert"
    assert evaluate.main([str(d / "preds.jsonl"), "--bootstrap", "0", "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["main.csv", "metrics.json", "per_report.jsonl"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"Wrote metrics.json, main.csv, per_report.jsonl to {out}"
