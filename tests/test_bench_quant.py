"""bench/quant_bench.py --tiny: the 7B benchmark script at a 2-layer shape, in-process, so that its
long run does not fail on a slip in the script; the decoder byte counts are checked by hand."""

import json

from _bench_fixtures import load_bench


def test_quant_bench_tiny_rows_and_their_sizes(tmp_path, capsys):
    bench = load_bench("quant_bench")
    assert bench.main(["--tiny", "--dir", str(tmp_path / "w"), "--prompt", "16", "--new", "4", "--json", str(tmp_path / "q.json")]) == 0
    result = json.loads((tmp_path / "q.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["bf16", "int8", "int4", "transformers bf16"]
    # TINY: dim 128, hidden 256, 2 layers, vocab 512. Block linears: 2 x (4 x 128 x 128 + 3 x 128 x 256) = 327,680
    # weights; the rest (embeddings, lm_head, 5 norms) 2 x 512 x 128 + 5 x 128 = 131,712 values, bf16 in every row.
    rest = 2 * 131_712
    assert rows["bf16"]["decoder_bytes"] == 2 * 327_680 + rest
    assert rows["int8"]["decoder_bytes"] == 327_680 + 2 * 2 * (4 * 128 + 2 * 256 + 128) + rest  # + a bf16 scale per row
    assert rows["int4"]["decoder_bytes"] == 327_680 // 2 + 327_680 // 128 * 4 + rest  # + a bf16 scale and zero per group of 128
    assert rows["transformers bf16"]["decoder_bytes"] >= rows["bf16"]["decoder_bytes"]  # + its RoPE buffer
    for r in rows.values():
        assert r["decode_tok_s"] > 0 and r["prefill_s"] > 0 and len(r["tokens"]) == 5
    assert rows["transformers bf16"]["tokens"] == rows["bf16"]["tokens"]  # same weights, same greedy tokens
    kernels = {(r["part"], r["mode"]): r["bytes"] for r in result["kernels"]}
    assert list(kernels) == [(p, m) for p in ("block", "lm_head") for m in ("bf16", "int8", "int4")]
    assert kernels["block", "int4"] == 327_680 // 4 + 327_680 // 128 * 2  # one of the 2 layers
    assert kernels["lm_head", "int8"] == 512 * 128 + 512 * 2
    assert "| int4 |" in capsys.readouterr().out


def test_quant_bench_tiny_export_rows(tmp_path):
    """The export rows: a random release exported per mode, loaded from the export, timed at each prompt
    length; the int4 export's layers are the tiles64 ones and the one-block prefill rows cover every mode."""
    bench = load_bench("quant_bench")
    argv = ["--tiny", "--dir", str(tmp_path / "w"), "--rows", "export bf16,export int4", "--prompt", "16,40", "--new", "3",
            "--kernels", "prefill", "--json", str(tmp_path / "q.json")]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "q.json").read_text())
    assert [(r["row"], r["prompt"]) for r in result["rows"]] == [(r, p) for r in ("export bf16", "export int4") for p in (16, 40)]
    assert all(r["tower_s"] > 0 and len(r["tokens"]) == 4 for r in result["rows"])
    assert sorted(e["export"] for e in result["exports"]) == ["bf16", "int4"]
    assert (tmp_path / "w" / "export-int4" / "manifest.json").is_file()
    modes = {(r["prompt"], r["mode"]) for r in result["prefill_kernels"]}
    assert modes == {(p, m) for p in (16, 40) for m in ("bf16", "int8 packed kernel", "int4 packed kernel", "int8", "int4")}
    assert all(r["ratio"] == 1.0 for r in result["prefill_kernels"] if r["mode"] == "bf16")  # each repeat against its own bf16
