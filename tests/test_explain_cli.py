"""infer.py --explain on the tiny release: overlays and JSON for one image and for a query file,
the findings text unchanged, bad paths as one error line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _infer_fixtures import REASONS, cpu_without_avx512, read_jsonl, shared_tiny_release, write_images, write_jsonl
from PIL import Image

import infer
from llavarad.explain.sentences import split_sentences
from llavarad.model import quant

NEW = 24
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain_cli")
    tiny = shared_tiny_release(tmp_path_factory)
    images = write_images(tmp / "images", 3)
    return tiny, tmp, images


def model_args(tiny) -> list[str]:
    return ["--model", str(tiny.release), "--base", str(tiny.base), "--max-new-tokens", str(NEW), "--device", "cpu"]


def check_report(folder, stem: str, findings: str, image_size: tuple[int, int]) -> None:
    """<stem>.json holds one 2 x 2 grid per sentence of the findings; <stem>_k.png is each overlay."""
    report = json.loads((folder / f"{stem}.json").read_text())
    sentences = [findings[a:b] for a, b in split_sentences(findings)]
    assert report["findings"] == findings and [s["text"] for s in report["sentences"]] == sentences
    assert report["image_size"] == list(image_size) and report["grid"] == (2 if sentences else None)
    for k, s in enumerate(report["sentences"], start=1):
        assert s["overlay"] == f"{stem}_{k}.png" and len(s["relevance"]) == 2 and len(s["relevance"][0]) == 2
        with Image.open(folder / s["overlay"]) as im:
            assert im.size[0] > image_size[0] and im.size[1] > image_size[1]


def test_single_image(setup, tmp_path, capsys):
    tiny, tmp, images = setup
    image = str(tmp / "images" / images[1])
    assert infer.main([image, "--reason", "Cough.", *model_args(tiny)]) == 0
    plain = capsys.readouterr().out
    assert infer.main([image, "--reason", "Cough.", *model_args(tiny), "--explain", str(tmp_path / "maps")]) == 0
    assert capsys.readouterr().out == plain  # --explain does not change the findings
    findings = plain.strip()
    assert split_sentences(findings)  # the test would notice a report without sentences
    with Image.open(image) as im:
        check_report(tmp_path / "maps", "img1", findings, im.size)
    assert not list(tmp_path.glob("*.json"))  # nothing outside the folder


def test_query_file(setup, tmp_path, capsys):
    tiny, tmp, images = setup
    queries = write_jsonl(tmp / "images" / "queries.jsonl", images, REASONS[:3])
    out, maps = tmp_path / "preds.jsonl", tmp_path / "maps"
    argv = ["--query-file", str(queries), "--output", str(out), "--workers", "0", *model_args(tiny), "--explain", str(maps)]
    assert infer.main(argv) == 0
    assert "explained 3 reports" in capsys.readouterr().err
    for rec, name in zip(read_jsonl(out), images):
        with Image.open(tmp / "images" / name) as im:
            check_report(maps, rec["id"], rec["prediction"], im.size)
    before = {p.name: p.stat().st_mtime_ns for p in maps.iterdir()}
    (maps / "q02.json").unlink()  # rerun: only the missing report is explained again
    assert infer.main(argv) == 0
    assert "explained 1 reports" in capsys.readouterr().err
    after = {p.name: p.stat().st_mtime_ns for p in maps.iterdir()}
    assert {n for n in after if after[n] != before.get(n)} == {n for n in after if n.startswith("q02")}


def test_bad_explain_path(setup, tmp_path, capsys):
    tiny, tmp, images = setup
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert infer.main([str(tmp / "images" / images[0]), *model_args(tiny), "--explain", str(blocker / "maps")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {blocker / 'maps'}: cannot create the heatmap folder") and err.count("\n") == 1


def test_int4_explains_where_its_layout_unpacks(setup, tmp_path, capsys):
    """int4 on a CPU with AVX512 (here) or AVX2 (torch's AVX2 kernels: ATEN_CPU_CAPABILITY=avx2) is
    in a tiled layout that unpacks for the backward: --explain works. With neither (default) int4
    packs otherwise: one error line after loading, before anything is generated or written."""
    if quant._cpu_tile() != 64:
        pytest.skip("this CPU's int4 kernel does not read tiles64")
    tiny, tmp, images = setup
    image = str(tmp / "images" / images[1])
    assert infer.main([image, *model_args(tiny), "--quantize", "int4", "--explain", str(tmp_path / "maps")]) == 0
    findings = capsys.readouterr().out.strip()
    with Image.open(image) as im:
        check_report(tmp_path / "maps", "img1", findings, im.size)

    def run(capability: str, maps: Path) -> subprocess.CompletedProcess:
        env = {**os.environ, **cpu_without_avx512(capability), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "infer.py", image, *model_args(tiny), "--quantize", "int4", "--explain", str(maps)],
                              cwd=Path(infer.__file__).parent, env=env, capture_output=True, text=True, timeout=300)

    done = run("avx2", tmp_path / "avx2")
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(image) as im:
        check_report(tmp_path / "avx2", "img1", done.stdout.strip(), im.size)
    done = run("default", tmp_path / "none")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --explain needs gradients through the decoder, which int4 weights packed for a CPU with neither "
        "AVX512 nor AVX2 do not give (use int8 or no quantization there)")
    assert not list((tmp_path / "none").iterdir())


def test_file_stems_of_distinct_ids_are_distinct():
    from llavarad.explain.relevance import file_stem

    ids = ["a/b", "a_b", "a b", "../a_b", 7, "7", "s50414267"]
    stems = [file_stem(i) for i in ids]
    assert file_stem("s50414267") == "s50414267" and file_stem("a_b") == "a_b"  # safe names unchanged
    assert all("/" not in s and not s.startswith(".") for s in stems)
    assert len(set(stems)) == len(ids) - 1  # 7 and "7" name the same file; JSON keeps them distinct ids
