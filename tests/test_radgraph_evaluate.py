"""End to end: `evaluate.py --radgraph` on a tiny random RadGraph archive."""

import csv
import json

import numpy as np
import pytest

import evaluate
from _metrics_fixtures import report_pairs
from _radgraph_fixtures import tiny_radgraph
from llavarad.metrics import radgraph as rg_module
from llavarad.metrics.radgraph import radgraph_rewards


def test_evaluate_scores_f1_radgraph(tmp_path, capsys, monkeypatch):
    from scipy.stats import bootstrap

    archive, vocab, *_ = tiny_radgraph(tmp_path)
    preds, refs = report_pairs(8, seed=2)
    records = [{"id": f"s{i}", "prediction": p, "reference": r} for i, (p, r) in enumerate(zip(preds, refs))]
    (tmp_path / "preds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    argv = [str(tmp_path / "preds.jsonl"), "--radgraph", archive, "--radgraph-vocab", vocab, "--device", "cpu",
            "--batch-size", "8", "--cache", str(tmp_path / "cache")]
    assert evaluate.main(argv + ["--output-dir", str(tmp_path / "out")]) == 0
    assert "F1-RadGraph" in capsys.readouterr().out

    rewards = radgraph_rewards(preds, refs, archive, vocab, "cpu", 3, None)
    assert len(set(rewards)) >= 4 and rewards[preds.index("")] == 0.0  # varied, so the figures prove something
    per_report = [json.loads(line) for line in (tmp_path / "out" / "per_report.jsonl").read_text().splitlines()]
    assert [r["F1-RadGraph"] for r in per_report] == rewards
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["metrics"]["F1-RadGraph"]["value"] == pytest.approx(np.mean(rewards), abs=1e-12)

    # The official figures: scipy's bootstrap of the mean reward, 500 resamples, seed 3, percentile.
    bs = bootstrap(data=(list(range(len(rewards))),), statistic=lambda i: np.mean([rewards[k] for k in i]),
                   method="percentile", paired=False, vectorized=False, confidence_level=0.95, random_state=3, n_resamples=500)
    with open(tmp_path / "out" / "main.csv", newline="") as f:
        rows = list(csv.reader(f))
    column = rows[0].index("F1-RadGraph")
    main = {r[0]: float(r[column]) for r in rows[1:]}
    assert main["median"] == pytest.approx(np.median(bs.bootstrap_distribution), abs=1e-12)
    assert main["ci_l"] == pytest.approx(bs.confidence_interval.low, abs=1e-12)
    assert main["ci_h"] == pytest.approx(bs.confidence_interval.high, abs=1e-12)

    # A second run reads every annotation from the cache: no model is loaded.
    monkeypatch.setattr(rg_module, "load_radgraph", lambda *a: pytest.fail("model loaded despite the cache"))
    assert evaluate.main(argv + ["--output-dir", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "main.csv").read_text() == (tmp_path / "out" / "main.csv").read_text()


def test_evaluate_names_a_bad_archive(tmp_path, capsys):
    archive, vocab, *_ = tiny_radgraph(tmp_path)
    (tmp_path / "preds.jsonl").write_text('{"prediction": "No effusion.", "reference": "No effusion."}\n')
    (tmp_path / "broken.tar.gz").write_bytes(b"not a tar")
    argv = [str(tmp_path / "preds.jsonl"), "--radgraph", str(tmp_path / "broken.tar.gz"), "--radgraph-vocab", vocab,
            "--output-dir", str(tmp_path / "out")]
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "broken.tar.gz: not a RadGraph model archive" in err and err.count("\n") == 1
