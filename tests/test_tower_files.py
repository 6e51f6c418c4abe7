"""Finding the vision tower: in the release folder, at the paths config.json gives, or in --tower
(issue 10.7), the file names defined once in weights.py next to the other checkpoint readers."""

import json
import shutil

import numpy as np
import pytest
from _infer_fixtures import shared_tiny_release
from PIL import Image

import infer
from llavarad.model.config import TOWER_CKPT, TOWER_JSON, MultimodalConfig
from llavarad.model.weights import locate_tower

NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tiny = shared_tiny_release(tmp_path_factory)
    image = tmp_path_factory.mktemp("image") / "chest.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 36), dtype=np.uint8)).save(image)
    return tiny, image


def official_output(tiny, tmp_path, tower_at):
    """The folder the official training code writes: config.json names the tower files by absolute
    paths on the training machine (here `tower_at`), and no tower file is in the folder."""
    folder = tmp_path / "llava-rad-lora"
    shutil.copytree(tiny.release, folder, ignore=shutil.ignore_patterns(TOWER_JSON, TOWER_CKPT))
    config = json.loads((folder / "config.json").read_text())
    config["mm_vision_tower_config"] = str(tower_at / TOWER_JSON)
    config["mm_vision_tower_checkpoint"] = str(tower_at / TOWER_CKPT)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def copy_tower(tiny, folder):
    folder.mkdir(parents=True)
    for name in (TOWER_JSON, TOWER_CKPT):
        shutil.copy(tiny.release / name, folder / name)
    return folder


def run(capsys, image, model, base, *extra):
    code = infer.main([str(image), "--model", str(model), "--base", str(base), "--max-new-tokens", str(NEW), *extra])
    out = capsys.readouterr()
    return code, out.out.strip(), out.err.strip().splitlines()[-1]


def test_official_training_output_loads_from_its_config_paths(tiny, tmp_path, capsys):
    tiny, image = tiny
    expected = run(capsys, image, tiny.release, tiny.base)[1]
    tower_at = copy_tower(tiny, tmp_path / "home" / "trainer" / "biomedclip")  # the training machine's paths exist here
    code, text, _ = run(capsys, image, official_output(tiny, tmp_path, tower_at), tiny.base)
    assert code == 0 and text == expected and text


def test_official_training_output_elsewhere_needs_tower(tiny, tmp_path, capsys):
    tiny, image = tiny
    expected = run(capsys, image, tiny.release, tiny.base)[1]
    folder = official_output(tiny, tmp_path, tmp_path / "gone")  # the training machine's paths do not exist here
    code, _, err = run(capsys, image, folder, tiny.base)
    assert code == 1 and err.startswith(f"error: {TOWER_JSON}: tower file not found")
    for tried in (folder / TOWER_JSON, tmp_path / "gone" / TOWER_JSON):  # every place tried is named
        assert str(tried) in err
    assert "--tower DIR" in err
    towers = copy_tower(tiny, tmp_path / "towers")
    code, text, _ = run(capsys, image, folder, tiny.base, "--tower", str(towers))
    assert code == 0 and text == expected
    code, _, err = run(capsys, image, folder, tiny.base, "--tower", str(tmp_path))
    assert code == 1 and str(tmp_path / TOWER_JSON) in err and str(folder / TOWER_JSON) in err


def test_search_order(tmp_path):
    """Release folder (config.json's file name, then the standard one), then config.json's path as
    written, then --tower."""
    release, elsewhere, given = (tmp_path / n for n in ("release", "elsewhere", "given"))
    for folder in (release, elsewhere, given):
        folder.mkdir()
        (folder / TOWER_CKPT).write_bytes(b"")
    mm = MultimodalConfig(mm_vision_tower_config=str(elsewhere / "renamed.json"),
                          mm_vision_tower_checkpoint=str(elsewhere / TOWER_CKPT))
    for folder in (elsewhere, given):
        (folder / "renamed.json").write_text("{}")
    (release / TOWER_JSON).write_text("{}")
    assert locate_tower(release, mm, str(given)) == (release / TOWER_JSON, release / TOWER_CKPT)
    (release / "renamed.json").write_text("{}")
    assert locate_tower(release, mm, str(given))[0] == release / "renamed.json"
    shutil.rmtree(release)
    assert locate_tower(release, mm, str(given)) == (elsewhere / "renamed.json", elsewhere / TOWER_CKPT)
    shutil.rmtree(elsewhere)
    assert locate_tower(release, mm, str(given)) == (given / "renamed.json", given / TOWER_CKPT)
    # training's --tower: the folder alone, under the standard names
    with pytest.raises(FileNotFoundError, match=f"^{TOWER_JSON}: tower file not found; tried {given / TOWER_JSON} \\(--tower DIR"):
        locate_tower(tower_dir=str(given))
