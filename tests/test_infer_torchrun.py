"""torchrun with 2 CPU processes (gloo) writes the same predictions file as 1 process, and resumes
from what a single-process run left."""

import os
import subprocess
import sys
from pathlib import Path

from _infer_fixtures import REASONS, shared_tiny_release, write_corrupt, write_images, write_jsonl

import infer

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_equal_one(tmp_path_factory, tmp_path):
    tiny = shared_tiny_release(tmp_path_factory)
    images = write_images(tmp_path / "images", len(REASONS))
    images[3] = write_corrupt(tmp_path / "images")
    queries = write_jsonl(tmp_path / "images" / "queries.jsonl", images, REASONS)
    common = ["--query-file", str(queries), "--model", str(tiny.release), "--base", str(tiny.base),
              "--max-new-tokens", "8", "--batch-size", "2", "--workers", "0"]
    single = tmp_path / "single.jsonl"
    assert infer.main([*common, "--output", str(single)]) == infer.FAILED_RECORDS  # one image is corrupt (issue 10.19)

    multi = tmp_path / "multi.jsonl"
    lines = single.read_text().splitlines(keepends=True)
    multi.write_text(lines[1] + lines[0][:10])  # a single-process run killed after one report
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "infer.py"), *common, "--output", str(multi)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert multi.read_text() == single.read_text()
    assert f"done: {len(REASONS) - 2} predicted, 1 skipped" in proc.stderr and "1 failed" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "multi.jsonl", "single.jsonl"]  # parts merged away
