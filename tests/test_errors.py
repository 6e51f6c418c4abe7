"""Bad input to infer.py: one clear line on stderr naming the file and the problem, exit code 1."""

import codecs
import shutil

import numpy as np
import pytest
import torch
from _release_fixtures import write_tiny_release
from PIL import Image

import infer
from llavarad.errors import first_line


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def tiny(pristine, tmp_path):
    """A fresh copy of the tiny release that a test may break, and a good image."""
    base, release = tmp_path / "base", tmp_path / "release"
    shutil.copytree(pristine.base, base)
    shutil.copytree(pristine.release, release)
    image = tmp_path / "chest.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8)).save(image)
    return base, release, image


def run(capsys, image, release, base):
    code = infer.main([str(image), "--model", str(release), "--base", str(base), "--max-new-tokens", "2", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_good_input_runs(tiny, capsys):
    base, release, image = tiny
    assert infer.main([str(image), "--model", str(release), "--base", str(base), "--max-new-tokens", "2", "--device", "cpu"]) == 0


def test_json_files_with_a_byte_order_mark_load(tiny, capsys):
    """The folders' JSON files saved by a Windows editor (issue 18.11)."""
    base, release, image = tiny
    argv = [str(image), "--model", str(release), "--base", str(base), "--max-new-tokens", "2", "--device", "cpu"]
    assert infer.main(argv) == 0
    expected = capsys.readouterr().out
    for path in [base / "config.json", *release.glob("*.json")]:
        path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    assert infer.main(argv) == 0 and capsys.readouterr().out == expected


def test_missing_model_folder(tiny, capsys):
    base, release, image = tiny
    code, err = run(capsys, image, release.parent / "nowhere", base)
    assert code == 1 and err.startswith("error: ") and "nowhere" in err and "not found" in err


def test_missing_file_in_release(tiny, capsys):
    base, release, image = tiny
    (release / "non_lora_trainables.bin").unlink()
    code, err = run(capsys, image, release, base)
    assert code == 1 and "non_lora_trainables.bin" in err


def test_missing_tower_checkpoint(tiny, capsys):
    base, release, image = tiny
    (release / "biomedclipcxr_518_checkpoint.pt").unlink()
    code, err = run(capsys, image, release, base)
    assert code == 1 and "biomedclipcxr_518_checkpoint.pt" in err


def test_image_that_is_not_an_image(tiny, capsys):
    base, release, image = tiny
    image.write_text("this is not a PNG")
    code, err = run(capsys, image, release, base)
    assert code == 1 and str(image) in err and "cannot read image" in err


def test_wrong_projector_shape(tiny, capsys):
    base, release, image = tiny
    sd = torch.load(release / "non_lora_trainables.bin", weights_only=True)
    sd["base_model.model.model.mm_projector.0.weight"] = torch.zeros(64, 7)
    torch.save(sd, release / "non_lora_trainables.bin")
    code, err = run(capsys, image, release, base)
    assert code == 1 and "non_lora_trainables.bin" in err and "mm_projector.0.weight" in err and "(64, 7)" in err


def test_wrong_base_shape_and_unknown_key(tiny, capsys):
    from safetensors.torch import load_file, save_file

    base, release, image = tiny
    sd = load_file(base / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, base / "model.safetensors")
    code, err = run(capsys, image, release, base)
    assert code == 1 and "model.safetensors" in err and "model.layers.1.mlp.up_proj.weight" in err and "(3, 3)" in err
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.1.mlp.extra.weight"] = torch.zeros(3)
    save_file(sd, base / "model.safetensors")
    code, err = run(capsys, image, release, base)
    assert code == 1 and "unexpected key 'model.layers.1.mlp.extra.weight'" in err


def test_missing_base_tensor(tiny, capsys):
    from safetensors.torch import load_file, save_file

    base, release, image = tiny
    sd = load_file(base / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, base / "model.safetensors")
    code, err = run(capsys, image, release, base)
    assert code == 1 and "missing" in err and "model.norm.weight" in err


def test_corrupt_adapter(tiny, capsys):
    base, release, image = tiny
    (release / "adapter_model.bin").write_bytes(b"\x00garbage")
    code, err = run(capsys, image, release, base)
    assert code == 1 and "adapter_model.bin" in err and "cannot read checkpoint" in err


def test_empty_checkpoint_file(tiny, capsys):
    """An interrupted download leaves an empty file; torch.load then raises an EOFError with no message."""
    base, release, image = tiny
    (release / "adapter_model.bin").write_bytes(b"")
    code, err = run(capsys, image, release, base)
    assert code == 1 and "adapter_model.bin" in err and "cannot read checkpoint (EOFError)" in err


def test_checkpoint_with_code_is_refused(tiny, capsys):
    """A pickle that would run code on load is refused by weights_only=True."""
    base, release, image = tiny
    torch.save({"x": torch.zeros(1), "evil": print}, release / "non_lora_trainables.bin")
    code, err = run(capsys, image, release, base)
    assert code == 1 and "non_lora_trainables.bin" in err and "cannot read checkpoint" in err


def test_a_long_library_message_is_cut_at_a_sentence_end():
    message = "The first sentence is whole and short. " + "The second one runs on " * 12 + "and ends here. Third."
    assert first_line(OSError(message + "\nmore lines")) == "OSError: The first sentence is whole and short."
    assert first_line(OSError("word " * 60)) == "OSError: " + "word " * 39 + "word ..."  # no sentence end: at a word


def test_hub_download_without_network_is_a_whole_sentence_with_the_command(tiny, capsys, monkeypatch):
    """huggingface_hub's own error when the hub cannot be reached and nothing is cached (issue 18.12)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError(
            "An error happened while trying to locate the files on the Hub and we cannot find the appropriate snapshot "
            "folder for the specified revision on the local disk. Please check your internet connection and try again.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    base, release, image = tiny
    code, err = run(capsys, image, "someone/release", base)
    assert code == 1 and err == (
        "error: someone/release: no such model folder, and the hub download failed (LocalEntryNotFoundError: An error "
        "happened while trying to locate the files on the Hub and we cannot find the appropriate snapshot folder for the "
        "specified revision on the local disk.); download it where there is a network "
        "(hf download someone/release --local-dir DIR) and pass DIR")


def test_failed_hub_download_is_one_line(tiny, capsys, monkeypatch):
    """A name that is no folder is tried as a hub repo id; a failed download is one clear line."""
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, **kw):
        raise OSError(f"cannot reach the hub for {repo_id}\nlong traceback text")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    base, release, image = tiny
    code, err = run(capsys, image, "someone/no-such-release", base)
    assert code == 1 and err.startswith("error: someone/no-such-release: no such model folder") and "hub download failed" in err
