"""python -m llavarad.export: the exported folder gives infer.py the release's text (float32) or the
on-the-fly --quantize text (int8, int4: the same tensors), a damaged export is one error line naming
the file, the write is atomic, and a folder that is not an export is never written into."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _infer_fixtures import cpu_without_avx512, shared_tiny_release, write_images
from safetensors.torch import load_file, save_file

import infer
from llavarad.infer import export as export_module
from llavarad.infer.export import MANIFEST, export, load_export
from llavarad.model.quant import QuantLinear
from llavarad.model.weights import load_llavarad

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    images = [str(tmp / "images" / n) for n in write_images(tmp / "images", 2)]
    return shared_tiny_release(tmp_path_factory), images, tmp


def mapped_from(t: torch.Tensor, folder: Path) -> bool:
    """Whether the tensor's memory is a mapping of a file in `folder` (/proc/self/maps), not a copy."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *_, name = line.split(maxsplit=5)
        lo, hi = (int(a, 16) for a in span.split("-"))
        if lo <= t.data_ptr() < hi:
            return name.startswith(str(folder))
    return False


def findings(capsys, model: list[str], image: str, reason: str | None, *extra: str) -> str:
    args = [image, "--max-new-tokens", "8", "--model", *model, *(["--reason", reason] if reason else []), *extra]
    assert infer.main(args) == 0
    return capsys.readouterr().out.strip()


def test_float32_export_writes_the_release_text(tiny, capsys, one_thread):
    """Through the command line; then infer.py --model EXPORT (no --base) prints what the release prints."""
    release, images, tmp = tiny
    out = tmp / "float32"
    done = subprocess.run([sys.executable, "-m", "llavarad.export", "--model", str(release.release), "--base", str(release.base),
                           "--dtype", "float32", "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["dtype"] == "float32" and manifest["quantize"] is None
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], MANIFEST])
    assert all(n.endswith((".safetensors", ".json", ".model")) for n in manifest["files"])  # no pickle
    for image, reason in zip(images, [None, "Cough."]):
        expected = findings(capsys, [str(release.release), "--base", str(release.base)], image, reason)
        assert findings(capsys, [str(out)], image, reason) == expected


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_export_equals_quantizing_at_load(tiny, tmp_path, capsys, mode, one_thread):
    """The stored tensors are what --quantize computes at load (int4: in the kernel's CPU layout), and
    infer.py prints the same text. The tiny decoder's 160-row layers end in a 32-row tile."""
    release, images, _ = tiny
    out = export(str(release.release), str(release.base), tmp_path / mode, torch.float32, mode)
    exported, _ = load_export(out, "cpu")
    on_the_fly, _ = load_llavarad(str(release.release), str(release.base), torch.float32, "cpu", quantize=mode)
    layers = {n: m for n, m in exported.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    for name, m in on_the_fly.named_modules():
        if isinstance(m, QuantLinear):
            assert layers[name].kernel == m.kernel and torch.equal(layers[name].weight, m.weight)
            assert torch.equal(layers[name].scales, m.scales)
    for (name, a), b in zip(on_the_fly.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name
    for m in layers.values():  # the packed weights are the export's pages: no copy, aligned for the int8 kernel
        assert mapped_from(m.weight, out) and m.weight.data_ptr() % 64 == 0
    on_the_fly = [str(release.release), "--base", str(release.base), "--quantize", mode, "--dtype", "float32"]  # the export's
    expected = findings(capsys, on_the_fly, images[1], "Cough.")
    assert findings(capsys, [str(out)], images[1], "Cough.") == expected
    assert findings(capsys, [str(out)], images[1], "Cough.", "--quantize", mode) == expected
    other = "int4" if mode == "int8" else "int8"
    assert infer.main([images[1], "--model", str(out), "--quantize", other]) == 1
    assert f"the export is {mode}" in capsys.readouterr().err


@pytest.mark.parametrize("capability,tile", [("avx2", "32"), ("default", "None")])
def test_int4_export_repacks_for_a_cpu_without_avx512(tiny, tmp_path, capability, tile):
    """Where torch runs its AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, as on a CPU without AVX512) the int4
    kernel reads tiles of 32, and without either (default) another layout: the export's layers are
    re-tiled or repacked at load, and infer.py prints what --quantize int4 prints there."""
    release, images, _ = tiny
    out = export(str(release.release), str(release.base), tmp_path / "int4", torch.float32, "int4")
    env = {**os.environ, **cpu_without_avx512(capability), "OMP_NUM_THREADS": "1"}

    def run(*model: str) -> str:
        done = subprocess.run([sys.executable, "infer.py", images[0], "--max-new-tokens", "8", "--model", *model], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    check = "from llavarad.model import quant; print(quant._cpu_tile())"
    assert subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True).stdout.strip() == tile
    assert run(str(out)) == run(str(release.release), "--base", str(release.base), "--quantize", "int4", "--dtype", "float32")


def damage_cases(out: Path) -> list[tuple[str, object]]:
    """(file named in the error, a function that damages a fresh copy of the export `out`)."""

    def truncate(folder: Path) -> None:
        path = folder / "decoder-00001.safetensors"
        path.write_bytes(path.read_bytes()[:-100])

    def wrong_projector(folder: Path) -> None:
        rewrite(folder, "projector.safetensors", "2.weight", torch.zeros(3, 3))

    def wrong_decoder(folder: Path) -> None:
        rewrite(folder, "decoder-00001.safetensors", "norm.weight", torch.zeros(7))

    def garbage_header(folder: Path) -> None:
        path = folder / "tower.safetensors"
        path.write_bytes(b"\xff" * path.stat().st_size)

    return [("tower.json", lambda f: (f / "tower.json").unlink()), ("decoder-00001.safetensors", truncate),
            ("projector.safetensors", wrong_projector), ("decoder-00001.safetensors", wrong_decoder),
            ("tower.safetensors", garbage_header)]


def rewrite(folder: Path, name: str, key: str, value: torch.Tensor) -> None:
    """Replace one tensor and keep the manifest's sizes right, so that only the shape is wrong."""
    tensors = load_file(folder / name) | {key: value}
    save_file(tensors, folder / name)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = (folder / name).stat().st_size
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_damaged_export_is_one_error_line_naming_the_file(tiny, tmp_path, capsys):
    release, images, _ = tiny
    good = export(str(release.release), str(release.base), tmp_path / "good", torch.float32)
    for i, (name, damage) in enumerate(damage_cases(good)):
        copy = tmp_path / f"copy{i}"
        subprocess.run(["cp", "-r", str(good), str(copy)], check=True)
        damage(copy)
        assert infer.main([images[0], "--model", str(copy), "--max-new-tokens", "2"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {copy / name}"), (name, err)


def test_export_is_atomic_and_refuses_a_folder_that_is_not_an_export(tiny, tmp_path, monkeypatch, capsys):
    """A run killed before its end leaves the earlier export as it was (and no new folder when there
    was none); an empty folder or an earlier export is written; anything else is refused untouched."""
    release, images, _ = tiny
    args = (str(release.release), str(release.base))
    earlier = export(*args, tmp_path / "out", torch.float32)
    manifest = (earlier / MANIFEST).read_text()

    def killed(*_, **__):
        raise KeyboardInterrupt  # as a kill would, after the decoder was written

    monkeypatch.setattr(export_module, "load_tower", killed)
    for target in (earlier, tmp_path / "fresh"):
        with pytest.raises(KeyboardInterrupt):
            export(*args, target, torch.bfloat16, "int8")
    assert not (tmp_path / "fresh").exists() and (earlier / MANIFEST).read_text() == manifest
    assert not list(tmp_path.glob(".*"))  # a failure cleans up (a kill leaves .NAME.partial, without a manifest)
    monkeypatch.undo()
    load_export(earlier, "cpu")

    assert json.loads((export(*args, earlier, torch.float32, "int8") / MANIFEST).read_text())["quantize"] == "int8"
    (tmp_path / "empty").mkdir()
    export(*args, tmp_path / "empty", torch.float32)
    assert not list(tmp_path.glob(".*"))  # no partial or old folder left behind
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    from llavarad.export import main

    assert main(["--model", args[0], "--base", args[1], "--output", str(busy)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(busy) in err[0] and "refusing" in err[0]
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
