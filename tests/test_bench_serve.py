"""bench/serve_bench.py --tiny: the whole serving benchmark (server under closed and open loops, infer.py
--query-file, one prefill) on the CPU with the tiny release, so that its GPU run does not fail on a slip
in the script; every streamed text equals infer.py's prediction for the same request."""

import json

from _bench_fixtures import load_bench
from _infer_fixtures import shared_tiny_release


def test_serve_bench_tiny(tmp_path_factory, tmp_path, capsys):
    tiny = shared_tiny_release(tmp_path_factory)
    bench = load_bench("serve_bench")
    assert bench.main(["--model", str(tiny.release), "--base", str(tiny.base), "--tiny", "--json", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert [r["load"] for r in result["rows"]] == ["closed loop, concurrency 1", "closed loop, concurrency 4", "open loop, 20 requests/s"]
    for r in result["rows"]:
        assert r["requests"] == 8 and r["requests_per_s"] > 0 and 0 < r["ttft_p50"] <= r["ttft_p99"], r
    checks = result["checks"]
    assert checks["MISMATCH"] == 0 and checks["server texts equal to infer.py"] == 24
    assert checks["offline reports/s"] > 0 and checks["one prefill s"] > 0
    assert "infer.py --query-file (offline)" in capsys.readouterr().out
