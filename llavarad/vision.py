"""The vision tower: BiomedCLIP-CXR's ViT-B/14 in timm's `vit_base_patch14_dinov2` layout.

LLaVA-Rad runs the whole ViT, keeps every block's output and uses hidden_states[-2] (the output of
block 10 of 12) without the CLS token. The final `norm` is never applied and the blocks after the
selected one never matter, so this module builds only the blocks up to the selected one. Parameter
names are timm's, so the open_clip checkpoint's `visual.trunk.*` tensors load without a key map.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llavarad.errors import first_line


@dataclass
class VisionConfig:
    image_size: int = 518
    patch_size: int = 14
    width: int = 768
    depth: int = 12  # blocks in the checkpoint; the tower may build fewer (see select_layer)
    heads: int = 12
    mlp_hidden: int = 3072
    eps: float = 1e-6


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.proj(pixels)  # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, C), patches in row-major order


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=True)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, C // self.heads)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs), no mask: every token sees all
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class LayerScale(nn.Module):
    """DINOv2's per-channel scale on each residual branch (timm calls the parameter `gamma`)."""

    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm's nn.GELU default


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = Mlp(cfg)
        self.ls2 = LayerScale(cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def blocks_needed(depth: int, select_layer: int) -> int:
    """How many blocks produce hidden_states[select_layer].

    hidden_states has depth + 1 entries, as in LLaVA: [embeddings, block 0 out, ..., last block out];
    entry i is the output after i blocks. select_layer -2 of depth 12 -> 11 blocks (block index 10).
    """
    if not -(depth + 1) <= select_layer <= depth:
        raise ValueError(f"select_layer {select_layer} is out of range for a tower of depth {depth}")
    return select_layer % (depth + 1)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, select_layer: int = -2):
        super().__init__()
        self.cfg = cfg
        self.select_layer = select_layer
        grid = cfg.image_size // cfg.patch_size
        self.num_patches = grid * grid
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, cfg.width))  # CLS + patches
        n_blocks = blocks_needed(cfg.depth, select_layer)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(n_blocks))

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) normalized pixels -> (B, N_patches, width): the selected block's output, CLS dropped."""
        size = self.cfg.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"vision tower expects pixels of shape (B, 3, {size}, {size}), got {tuple(pixels.shape)}")
        B = pixels.shape[0]
        x = self.patch_embed(pixels)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + N, C)
        x = x + self.pos_embed  # (B, 1 + N, C); timm's norm_pre is the identity here
        for block in self.blocks:
            x = block(x)  # (B, 1 + N, C)
        return x[:, 1:]  # (B, N, C)


TRUNK_PREFIX = "visual.trunk."
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\..+")


def _trunk_state_dict(checkpoint: object, path: str) -> dict[str, Tensor]:
    """The timm trunk tensors of an open_clip checkpoint, keyed by timm name.

    Accepts an open_clip training checkpoint {"state_dict": {"module.visual.trunk.<k>": ...}, ...}
    (the release), the same without "module." (not trained with DDP), or the bare state dict.
    """
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        kind = type(checkpoint).__name__
        raise ValueError(f"{path}: expected an open_clip checkpoint (a dict of tensors), got a {kind}")
    trunk = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if name.startswith(TRUNK_PREFIX):
            if not isinstance(value, Tensor):
                raise ValueError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
            trunk[name.removeprefix(TRUNK_PREFIX)] = value
    if not trunk:
        raise ValueError(f"{path}: no {TRUNK_PREFIX}* tensors (is this an open_clip checkpoint of BiomedCLIP-CXR?)")
    return trunk


def _require(trunk: dict[str, Tensor], name: str, ndim: int, path: str) -> Tensor:
    if name not in trunk:
        raise ValueError(f"{path}: missing tensor {TRUNK_PREFIX}{name}")
    if trunk[name].ndim != ndim:
        raise ValueError(f"{path}: {TRUNK_PREFIX}{name} has shape {tuple(trunk[name].shape)}, expected {ndim} dims")
    return trunk[name]


def _config_from_tensors(
    trunk: dict[str, Tensor], head_width: int, image_size: int, names: tuple[str, str]
) -> VisionConfig:
    """Reads the architecture off the tensor shapes; the json only supplies head width and image size."""
    json_path, ckpt_path = names
    width, _, patch, _ = _require(trunk, "patch_embed.proj.weight", 4, ckpt_path).shape
    n_pos = _require(trunk, "pos_embed", 3, ckpt_path).shape[1]
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ValueError(f"{ckpt_path}: pos_embed has {n_pos} positions, not 1 CLS + a square grid of patches")
    if grid * patch != image_size:
        raise ValueError(
            f"{json_path}: image_size {image_size} does not match {ckpt_path}, whose pos_embed covers a "
            f"{grid}x{grid} grid of {patch}-px patches ({grid * patch} px)"
        )
    if head_width <= 0 or width % head_width:
        raise ValueError(f"{json_path}: head_width {head_width} does not divide the tower width {width}")
    indices = {int(m.group(1)) for m in map(_BLOCK_KEY.fullmatch, trunk) if m}
    if not indices:
        raise ValueError(f"{ckpt_path}: no {TRUNK_PREFIX}blocks.* tensors")
    mlp_hidden = _require(trunk, "blocks.0.mlp.fc1.weight", 2, ckpt_path).shape[0]
    return VisionConfig(
        image_size=image_size, patch_size=patch, width=width, depth=max(indices) + 1,
        heads=width // head_width, mlp_hidden=mlp_hidden,
    )


def load_tower(json_path: str, checkpoint_path: str, select_layer: int = -2) -> VisionTower:
    """Builds the tower from the open_clip model json and checkpoint of the release, frozen, in eval mode.

    The architecture comes from the tensors (patch size and width from patch_embed, depth from the
    block indices, image size from pos_embed, cross-checked with the json's image_size, MLP width from
    fc1); heads = width // vision_cfg.head_width (open_clip's default 64). Blocks after the selected
    one and the final norm are skipped. Parameters keep the checkpoint's dtype.
    """
    for path in (json_path, checkpoint_path):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
    try:
        model_cfg = json.loads(Path(json_path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: not a valid open_clip model json ({e})") from None
    vision_cfg = model_cfg.get("vision_cfg") if isinstance(model_cfg, dict) else None
    if not isinstance(vision_cfg, dict) or "image_size" not in vision_cfg:
        raise ValueError(f"{json_path}: no vision_cfg.image_size (is this an open_clip model json?)")
    image_size = vision_cfg["image_size"]
    if isinstance(image_size, list) and len(image_size) == 2 and image_size[0] == image_size[1]:
        image_size = image_size[0]  # open_clip also accepts [h, w]
    head_width = vision_cfg.get("head_width", 64)  # open_clip's default; the release leaves it out
    if not isinstance(image_size, int) or not isinstance(head_width, int):
        raise ValueError(
            f"{json_path}: vision_cfg.image_size and head_width must be integers, got {image_size!r}, {head_width!r}"
        )
    model_name = vision_cfg.get("timm_model_name", "an unnamed timm model")
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types, all meaning "not a loadable checkpoint"
        raise ValueError(f"{checkpoint_path}: cannot load checkpoint ({first_line(e)})") from None
    trunk = _trunk_state_dict(checkpoint, checkpoint_path)
    del checkpoint  # the text tower and optimizer state are not needed
    cfg = _config_from_tensors(trunk, head_width, image_size, (json_path, checkpoint_path))

    with torch.device("meta"):  # no memory, no random init: every tensor comes from the checkpoint
        tower = VisionTower(cfg, select_layer)
        block_params = set(Block(cfg).state_dict())
    expected = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    unused = {"norm.weight", "norm.bias"}  # the final norm, never applied by LLaVA-Rad
    unused |= {f"blocks.{i}.{p}" for i in range(len(tower.blocks), cfg.depth) for p in block_params}
    for name, shape in expected.items():
        if name not in trunk:
            raise ValueError(f"{checkpoint_path}: missing tensor {TRUNK_PREFIX}{name} (expected shape {shape})")
        if tuple(trunk[name].shape) != shape:
            raise ValueError(
                f"{checkpoint_path}: {TRUNK_PREFIX}{name} has shape {tuple(trunk[name].shape)}, expected {shape} "
                f"for {model_name} as configured by {json_path}"
            )
    for name in trunk:
        if name not in expected and name not in unused:
            raise ValueError(
                f"{checkpoint_path}: unknown tensor {TRUNK_PREFIX}{name} {tuple(trunk[name].shape)} "
                f"(not part of {model_name} in timm's dinov2 layout)"
            )
    tower.load_state_dict({k: trunk[k] for k in expected}, strict=True, assign=True)
    return tower.eval().requires_grad_(False)
