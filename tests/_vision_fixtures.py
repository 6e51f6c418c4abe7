"""Tiny random BiomedCLIP-CXR vision towers written in the release's file layout, for tests.

The reference is timm's own `vit_base_patch14_dinov2` family (shrunk through create_model's
overrides), so the tensors written here have exactly the names and layout of the real trunk.
"""

import json
import math
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

TINY = dict(img_size=28, embed_dim=32, depth=3, num_heads=2)  # patch 14 (the family's), head width 16


def tiny_timm_tower(seed: int = 0, **overrides) -> nn.Module:
    """A timm ViT of the dinov2 family (CLS token, LayerScale, qkv bias) with random weights, in eval mode."""
    args = {**TINY, **overrides}
    model = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, init_values=0.5, **args)
    randomize_(model, seed)
    return model.eval()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Every parameter random and non-trivial (biases, norms, LayerScale gammas, pos_embed), of sane size."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("gamma"):
            p.copy_(0.3 + torch.rand(p.shape, generator=g))
        elif name.split(".")[-1] in ("cls_token", "pos_embed", "positional_embedding"):
            p.copy_(0.5 * noise)
        elif p.ndim >= 2:
            p.copy_(noise / math.sqrt(p[0].numel()))  # ~unit-variance outputs
        elif "norm" in name or "ln_" in name:
            p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
        else:
            p.copy_(0.1 * noise)


@torch.no_grad()
def official_hidden_states(trunk: nn.Module, pixels: Tensor) -> list[Tensor]:
    """What LLaVA-Rad's VisionTower.forward collects from a timm trunk: [embeddings, block 0 out, ...]."""
    x = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(pixels)))
    states = [x]
    for block in trunk.blocks:
        x = block(x)
        states.append(x)
    return states


def training_checkpoint(trunk: nn.Module, seed: int = 0, embed_dim: int = 16) -> dict:
    """An open_clip training checkpoint around `trunk`, as DDP training saves it: every key under
    "module.", a BERT text tower (as BiomedCLIP's), the projection head, logit_scale, optimizer state."""
    g = torch.Generator().manual_seed(seed + 1)
    width = trunk.embed_dim
    state = {f"module.visual.trunk.{k}": v.clone() for k, v in trunk.state_dict().items()}
    state["module.visual.head.proj.weight"] = torch.randn(embed_dim, width, generator=g)
    text = {
        "transformer.embeddings.word_embeddings.weight": (30, 8),
        "transformer.embeddings.position_embeddings.weight": (16, 8),
        "transformer.encoder.layer.0.attention.self.query.weight": (8, 8),
        "transformer.encoder.layer.0.attention.self.query.bias": (8,),
        "transformer.pooler.dense.weight": (8, 8),
        "proj.0.weight": (12, 8),
        "proj.2.weight": (embed_dim, 12),
    }
    state |= {f"module.text.{k}": torch.randn(shape, generator=g) for k, shape in text.items()}
    state["module.logit_scale"] = torch.tensor(4.6052)
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                 "param_groups": [{"lr": 1e-4, "weight_decay": 0.2, "params": [0]}]}
    return {"epoch": 3, "name": "biomedclipcxr_518", "state_dict": state, "optimizer": optimizer}


def model_json(image_size: int, head_width: int | None, embed_dim: int = 16) -> dict:
    """An open_clip model json shaped like the release's biomedclipcxr_518.json."""
    vision_cfg = {
        "timm_model_name": "vit_base_patch14_dinov2.lvd142m",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": image_size,
    }
    if head_width is not None:  # the release omits it: open_clip's default, 64
        vision_cfg["head_width"] = head_width
    text_cfg = {
        "hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
        "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
        "hf_proj_type": "mlp",
        "hf_pooler_type": "cls_last_hidden_state_pooler",
        "context_length": 256,
    }
    return {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def write_tiny_tower(
    folder: Path,
    json_name: str = "biomedclipcxr_518.json",
    ckpt_name: str = "biomedclipcxr_518_checkpoint.pt",
    seed: int = 0,
    image_size: int = 28,
) -> nn.Module:
    """Writes the json + checkpoint of a tiny random tower (image 28, patch 14, width 32, depth 3,
    head width 16; image 518 gives the real 37 x 37 patches) into `folder`; returns the timm
    reference model (use official_hidden_states)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trunk = tiny_timm_tower(seed, img_size=image_size)
    torch.save(training_checkpoint(trunk, seed), folder / ckpt_name)
    (folder / json_name).write_text(json.dumps(model_json(image_size=image_size, head_width=16), indent=2))
    return trunk
