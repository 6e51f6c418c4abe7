"""A complete tiny LLaVA-Rad installation written in the real file layouts by the reference
libraries: a base folder (transformers save_pretrained + SentencePiece tokenizer.model) and a
release folder (peft adapter, non_lora_trainables.bin, open_clip tower json + checkpoint,
the LLaVA config.json with paths of the training machine in it)."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from _llama_fixtures import tiny_hf_llama, write_base
from _sp_fixtures import train_tiny_sp
from _vision_fixtures import write_tiny_tower
from peft import LoraConfig, PeftModel, get_peft_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TinyRelease:
    base: Path
    release: Path
    peft_model: PeftModel  # the decoder with the unmerged adapter, as peft loads it
    tower: torch.nn.Module  # the timm reference trunk
    projector: dict[str, torch.Tensor]  # {"0.weight", "0.bias", "2.weight", "2.bias"}


def write_tiny_release(tmp: Path, seed: int = 0, image_size: int = 28, max_positions: int = 512) -> TinyRelease:
    """The tiny release; image_size 518 and max_positions 2048 give LLaVA-Rad's real lengths (1,369 image slots)."""
    base, release = tmp / "base", tmp / "release"
    base.mkdir(parents=True)
    release.mkdir(parents=True)
    sp_path = train_tiny_sp(base)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(sp_path)).get_piece_size()
    hf = tiny_hf_llama(vocab_size=vocab, seed=seed, max_positions=max_positions)
    write_base(hf, base)

    peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:  # peft starts B at zero: randomise so the adapter matters
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(release, safe_serialization=False)  # adapter_model.bin, as released

    tower = write_tiny_tower(release, seed=seed, image_size=image_size)
    width = tower.embed_dim
    projector = {
        "0.weight": torch.randn(64, width, generator=g) * 0.2, "0.bias": torch.randn(64, generator=g) * 0.1,
        "2.weight": torch.randn(64, 64, generator=g) * 0.2, "2.bias": torch.randn(64, generator=g) * 0.1,
    }
    torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in projector.items()}, release / "non_lora_trainables.bin")

    config = json.loads((base / "config.json").read_text())
    config.update({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        "mm_vision_tower": "biomedclip_cxr_518", "mm_hidden_size": width, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "image_aspect_ratio": "square",
        "mm_vision_tower_config": "/home/trainer/llava-rad/biomedclipcxr_518.json",
        "mm_vision_tower_checkpoint": "/home/trainer/llava-rad/biomedclipcxr_518_checkpoint.pt",
    })
    (release / "config.json").write_text(json.dumps(config, indent=2))
    return TinyRelease(base, release, peft_model.eval(), tower.eval(), projector)
