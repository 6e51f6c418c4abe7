"""Training outputs in the official layouts, so that our loader (weights.load_llavarad), the official
LLaVA-Rad code and peft all read them (docs/release-format.md):

- pretrain: `mm_projector.bin` {"model.mm_projector.{0,2}.{weight,bias}"} + the LLaVA `config.json`;
- lora: the release folder: `config.json`, `adapter_config.json`, `adapter_model.safetensors`
  (peft key names), `non_lora_trainables.bin` (the projector) and a copy of the tower json + checkpoint.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from llavarad.model.config import TOWER_CKPT, TOWER_JSON, LoRAConfig, read_json
from llavarad.model.weights import ours_to_hf


def llava_config(base_dir: Path, mm_hidden: int, tower_json: str, tower_ckpt: str) -> dict:
    """The base Llama config.json plus the LLaVA fields the official code reads (llava_arch.py)."""
    cfg = read_json(base_dir / "config.json")
    cfg.update(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava",
        mm_vision_tower="biomedclip_cxr_518",
        mm_vision_tower_config=tower_json,
        mm_vision_tower_checkpoint=tower_ckpt,
        mm_projector_type="mlp2x_gelu",
        mm_hidden_size=mm_hidden,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="square",
        use_mm_proj=True,
        use_cache=True,
    )
    return cfg


def save_pretrain_outputs(folder: Path, projector: dict[str, Tensor], base_dir: Path, tower_dir: Path) -> None:
    """projector: the Projector's state dict ("0.weight", "0.bias", "2.weight", "2.bias")."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({f"model.mm_projector.{k}": v.contiguous() for k, v in projector.items()}, folder / "mm_projector.bin")
    cfg = llava_config(base_dir, projector["0.weight"].shape[1], str((tower_dir / TOWER_JSON).resolve()), str((tower_dir / TOWER_CKPT).resolve()))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def peft_adapter_config(lora: LoRAConfig, base_name: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": lora.r,
        "lora_alpha": int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha,  # peft declares an int
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
    }


def save_lora_release(folder: Path, projector: dict[str, Tensor], adapter: dict[str, Tensor], lora: LoRAConfig,
                      base_dir: Path, base_name: str, tower_dir: Path) -> None:
    """adapter: {"layers.{i}.attn.q_proj.lora_A": (r, in), "...lora_B": (out, r), ...} (llavarad.model.lora names)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (TOWER_JSON, TOWER_CKPT):  # the tower never trains: the folder carries the one it ran with
        if (tower_dir / name).resolve() != (folder / name).resolve():
            shutil.copyfile(tower_dir / name, folder / name)
    cfg = llava_config(base_dir, projector["0.weight"].shape[1], str((folder / TOWER_JSON).resolve()), str((folder / TOWER_CKPT).resolve()))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "adapter_config.json").write_text(json.dumps(peft_adapter_config(lora, base_name), indent=2))
    peft_keys = {}
    for key, t in adapter.items():
        module, ab = key.rsplit(".", 1)  # "layers.0.attn.q_proj", "lora_A"
        hf_module = ours_to_hf(module + ".weight").removesuffix(".weight")  # "model.layers.0.self_attn.q_proj"
        peft_keys[f"base_model.model.{hf_module}.{ab}.weight"] = t.contiguous()
    save_file(peft_keys, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    torch.save({f"base_model.model.model.mm_projector.{k}": v.contiguous() for k, v in projector.items()},
               folder / "non_lora_trainables.bin")
