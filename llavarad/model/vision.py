"""The vision tower: BiomedCLIP-CXR's ViT-B/14 in timm's `vit_base_patch14_dinov2` layout.

LLaVA-Rad runs the whole ViT, keeps every block's output and uses hidden_states[-2] (the output of
block 10 of 12) without the CLS token. The final `norm` is never applied and the blocks after the
selected one never matter, so this module builds only the blocks up to the selected one. Parameter
names are timm's, so the open_clip checkpoint's `visual.trunk.*` tensors load without a key map
(`weights.load_tower` reads and checks them).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


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
