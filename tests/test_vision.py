"""The vision tower against timm (the trunk) and open_clip (the loader LLaVA-Rad uses)."""

import json

import pytest
import torch

from _vision_fixtures import (
    TINY, model_json, official_hidden_states, randomize_, tiny_timm_tower, training_checkpoint,
    write_tiny_tower,
)
from llavarad.model.vision import VisionConfig, VisionTower
from llavarad.model.weights import load_tower

JSON, CKPT = "biomedclipcxr_518.json", "biomedclipcxr_518_checkpoint.pt"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny tower in the release layout, its timm reference and a batch of pixels."""
    folder = tmp_path_factory.mktemp("tower")
    trunk = write_tiny_tower(folder)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    return folder, trunk, pixels


@pytest.mark.parametrize("select_layer", [-2, -1, 1, -3, 0])
def test_tower_matches_timm_hidden_states(release, select_layer):
    folder, trunk, pixels = release
    tower = load_tower(str(folder / JSON), str(folder / CKPT), select_layer=select_layer)
    want = official_hidden_states(trunk, pixels)[select_layer][:, 1:]  # LLaVA-Rad's feature_select("patch")
    got = tower(pixels)
    assert got.shape == (2, 4, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tower_builds_only_needed_blocks(release):
    folder, _, _ = release
    tower = load_tower(str(folder / JSON), str(folder / CKPT))  # depth 3, select -2 -> blocks 0 and 1
    assert len(tower.blocks) == 2
    assert tower.cfg == VisionConfig(image_size=28, patch_size=14, width=32, depth=3, heads=2, mlp_hidden=128)
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())
    assert "norm.weight" not in tower.state_dict()


def test_full_size_names_and_shapes_match_open_clip_trunk():
    """The default config and every parameter name/shape equal open_clip's TimmModel trunk of the
    release's timm model (built on the meta device), less the final norm and the unused last block."""
    from open_clip.timm_model import TimmModel

    with torch.device("meta"):
        reference = TimmModel("vit_base_patch14_dinov2", embed_dim=512, pool="", proj="linear")
        ours = VisionTower(VisionConfig(), select_layer=-1)
        ours_default = VisionTower(VisionConfig())
    want = {k: v.shape for k, v in reference.trunk.state_dict().items() if not k.startswith("norm.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == want
    assert want["pos_embed"] == (1, 1370, 768)
    assert {k for k in ours.state_dict()} - {k for k in ours_default.state_dict()} == {
        k for k in want if k.startswith("blocks.11.")
    }


def test_open_clip_loads_the_same_checkpoint(tmp_path):
    """open_clip's own loader (the official path: create_model_from_pretrained) reads a checkpoint
    that open_clip itself wrote; LLaVA-Rad's forward over its trunk equals our tower."""
    import open_clip
    from timm.models import register_model

    name = "llavarad_test_tiny_cxr"

    @register_model
    def vit_llavarad_test_tiny_patch14_dinov2(pretrained=False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return tiny_timm_tower(seed=5, **kwargs)

    cfg = {
        "embed_dim": 16,
        "custom_text": True,  # text under text.*, as BiomedCLIP's HF text tower is
        "vision_cfg": {
            **model_json(28, 16)["vision_cfg"], "timm_model_name": vit_llavarad_test_tiny_patch14_dinov2.__name__,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    open_clip.factory._MODEL_CONFIGS[name] = cfg  # what LLaVA-Rad's from_pretrained does with the json
    try:
        model = open_clip.create_model(name)
        randomize_(model, seed=7)
        state = {f"module.{k}": v for k, v in model.state_dict().items()}
        torch.save({"epoch": 1, "name": name, "state_dict": state}, tmp_path / CKPT)
        (tmp_path / JSON).write_text(json.dumps(cfg))
        reloaded, _ = open_clip.create_model_from_pretrained(name, pretrained=str(tmp_path / CKPT))
    finally:
        del open_clip.factory._MODEL_CONFIGS[name]
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    want = official_hidden_states(reloaded.visual.trunk.eval(), pixels)[-2][:, 1:]
    got = load_tower(str(tmp_path / JSON), str(tmp_path / CKPT))(pixels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["bare_module", "no_module", "bare"])
def test_checkpoint_layouts(tmp_path, release, layout):
    folder, trunk, pixels = release
    state = training_checkpoint(trunk)["state_dict"]
    if layout != "bare_module":
        state = {k.removeprefix("module."): v for k, v in state.items()}
    checkpoint = state if layout.startswith("bare") else {"state_dict": state, "epoch": 1}
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    tower = load_tower(str(folder / JSON), str(tmp_path / "ckpt.pt"))
    torch.testing.assert_close(tower(pixels), official_hidden_states(trunk, pixels)[-2][:, 1:], rtol=1e-5, atol=1e-5)


def test_blocks_after_the_selected_one_are_ignored(tmp_path, release):
    folder, trunk, pixels = release
    checkpoint = training_checkpoint(trunk)
    state = checkpoint["state_dict"]
    state["module.visual.trunk.blocks.2.mlp.fc1.weight"] = torch.zeros(1)  # never loaded: wrong shape is fine
    state["module.visual.trunk.norm.weight"] = torch.zeros(5)
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    tower = load_tower(str(folder / JSON), str(tmp_path / "ckpt.pt"), select_layer=-2)
    torch.testing.assert_close(tower(pixels), official_hidden_states(trunk, pixels)[-2][:, 1:], rtol=1e-5, atol=1e-5)


def test_head_width_defaults_to_64(tmp_path):
    trunk = tiny_timm_tower(seed=3, embed_dim=128, num_heads=2)  # 128 / 64 = 2 heads
    torch.save(training_checkpoint(trunk), tmp_path / CKPT)
    (tmp_path / JSON).write_text(json.dumps(model_json(image_size=28, head_width=None)))
    tower = load_tower(str(tmp_path / JSON), str(tmp_path / CKPT))
    assert tower.cfg.heads == 2
    pixels = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(tower(pixels), official_hidden_states(trunk, pixels)[-2][:, 1:], rtol=1e-5, atol=1e-5)


def _write_bad(tmp_path, release, edit) -> str:
    _, trunk, _ = release
    checkpoint = training_checkpoint(trunk)
    edit(checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "bad.pt")
    return str(tmp_path / "bad.pt")


def test_error_wrong_shape_names_key_file_and_shapes(tmp_path, release):
    folder, _, _ = release
    key = "module.visual.trunk.blocks.1.attn.qkv.weight"
    path = _write_bad(tmp_path, release, lambda s: s.__setitem__(key, torch.zeros(96, 16)))
    with pytest.raises(ValueError) as e:
        load_tower(str(folder / JSON), path)
    message = str(e.value)
    assert path in message and "visual.trunk.blocks.1.attn.qkv.weight" in message
    assert "(96, 16)" in message and "(96, 32)" in message


def test_error_unknown_key(tmp_path, release):
    folder, _, _ = release
    path = _write_bad(tmp_path, release, lambda s: s.__setitem__("module.visual.trunk.reg_token", torch.zeros(1, 4, 32)))
    with pytest.raises(ValueError, match=r"unknown tensor visual\.trunk\.reg_token \(1, 4, 32\)") as e:
        load_tower(str(folder / JSON), path)
    assert path in str(e.value)


def test_error_missing_key(tmp_path, release):
    folder, _, _ = release
    path = _write_bad(tmp_path, release, lambda s: s.pop("module.visual.trunk.blocks.1.ls2.gamma"))
    want = r"missing tensor visual\.trunk\.blocks\.1\.ls2\.gamma \(expected shape \(32,\)\)"
    with pytest.raises(ValueError, match=want) as e:
        load_tower(str(folder / JSON), path)
    assert path in str(e.value)


def test_error_no_trunk(tmp_path, release):
    folder, _, _ = release
    torch.save({"state_dict": {"module.text.proj.0.weight": torch.zeros(2, 2)}}, tmp_path / "text_only.pt")
    with pytest.raises(ValueError, match=r"text_only\.pt: no visual\.trunk\.\* tensors"):
        load_tower(str(folder / JSON), str(tmp_path / "text_only.pt"))


def test_error_image_size_mismatch(tmp_path, release):
    folder, _, _ = release
    (tmp_path / JSON).write_text(json.dumps(model_json(image_size=518, head_width=16)))
    with pytest.raises(ValueError, match=r"image_size 518 does not match .*2x2 grid of 14-px patches \(28 px\)") as e:
        load_tower(str(tmp_path / JSON), str(folder / CKPT))
    assert str(tmp_path / JSON) in str(e.value)


def test_error_missing_files(tmp_path, release):
    folder, _, _ = release
    with pytest.raises(FileNotFoundError, match="nope.pt: no such file"):
        load_tower(str(folder / JSON), str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="nope.json: no such file"):
        load_tower(str(tmp_path / "nope.json"), str(folder / CKPT))


def test_error_not_a_checkpoint(tmp_path, release):
    folder, _, _ = release
    (tmp_path / "notes.pt").write_text("just text\nover two lines\n")
    with pytest.raises(ValueError, match=r"notes\.pt: cannot load checkpoint \(") as e:
        load_tower(str(folder / JSON), str(tmp_path / "notes.pt"))
    assert "\n" not in str(e.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not a valid open_clip model json"):
        load_tower(str(tmp_path / "bad.json"), str(folder / CKPT))


def test_error_select_layer_and_pixel_shape(release):
    folder, _, _ = release
    with pytest.raises(ValueError, match="select_layer -5 is out of range for a tower of depth 3"):
        load_tower(str(folder / JSON), str(folder / CKPT), select_layer=-5)
    tower = load_tower(str(folder / JSON), str(folder / CKPT))
    with pytest.raises(ValueError, match=r"expects pixels of shape \(B, 3, 28, 28\), got \(1, 3, 32, 32\)"):
        tower(torch.zeros(1, 3, 32, 32))


def test_tiny_fixture_matches_the_brief(release):
    """The lead's end-to-end tests rely on these numbers."""
    folder, trunk, _ = release
    assert (trunk.patch_embed.img_size, trunk.embed_dim, len(trunk.blocks), trunk.blocks[0].attn.num_heads) == (
        (28, 28), 32, 3, 2)
    assert TINY["img_size"] == 28
    assert json.loads((folder / JSON).read_text())["vision_cfg"]["head_width"] == 16
