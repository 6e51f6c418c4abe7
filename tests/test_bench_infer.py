"""bench/infer_bench.py --tiny: the whole GPU benchmark script, run on the CPU at tiny shapes, so that
its one GPU run does not fail on a slip in the script itself."""

import json

from _bench_fixtures import load_bench


def test_infer_bench_tiny_runs_every_row_and_matches_transformers(tmp_path, capsys):
    """Every row is timed (none FAILED), and on the same random weights and input embeddings our greedy
    tokens equal transformers' `generate` tokens, for every check prompt (float32 on the CPU)."""
    bench = load_bench("infer_bench")
    args = ["--tiny", "--skip-compile", "--repeats", "1", "--batches", "1,4", "--json", str(tmp_path / "b.json")]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out and "MISMATCH" not in out
    result = json.loads((tmp_path / "b.json").read_text())
    assert [(r["impl"], r["batch"]) for r in result["rows"]] == [
        ("llavarad no graph (CPU)", 1), ("llavarad no graph (CPU)", 4), ("llavarad eager", 1),
        ("transformers eager generate", 1), ("transformers eager generate", 4),
        ("transformers static cache (CPU)", 1), ("transformers static cache (CPU)", 4),
    ]
    for r in result["rows"]:
        assert r["reports_per_s"] > 0 and r["peak_gib"] is None, r
    assert result["checks"] == {"llavarad batch 3 vs each prompt alone": 1.0, "transformers generate vs llavarad alone": 1.0}
