"""LLaVA-Rad: vision tower -> mlp2x_gelu projector -> Llama, image features spliced into the prompt."""

import torch
from torch import Tensor, nn

from llavarad.llama import Llama
from llavarad.tokenizer import IMAGE_TOKEN_INDEX
from llavarad.vision import VisionTower


class Projector(nn.Sequential):
    """mlp2x_gelu: Linear -> GELU -> Linear; indices 0 and 2 are the released key names."""

    def __init__(self, mm_hidden: int, dim: int):
        super().__init__(nn.Linear(mm_hidden, dim), nn.GELU(), nn.Linear(dim, dim))


class LlavaRad(nn.Module):
    def __init__(self, tower: VisionTower, projector: Projector, llm: Llama):
        super().__init__()
        self.tower, self.projector, self.llm = tower, projector, llm

    def encode_images(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) -> projected image features (B, N, dim)."""
        feats = self.tower(pixels.to(self.tower.pos_embed.dtype))  # (B, N, mm_hidden)
        return self.projector(feats.to(self.projector[0].weight.dtype))

    def embed(self, ids: list[list[int]], image_feats: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids with one IMAGE_TOKEN_INDEX each + image features (B, N, dim) ->
        right-padded input embeddings (B, T, dim) and the true lengths (B,).

        Pads are zero vectors; callers mask them (causally they only follow real tokens).
        """
        embed = self.llm.embed_tokens
        rows = []
        for b, row in enumerate(ids):
            if row.count(IMAGE_TOKEN_INDEX) != 1:
                raise ValueError(f"prompt {b} has {row.count(IMAGE_TOKEN_INDEX)} image tokens, expected 1")
            i = row.index(IMAGE_TOKEN_INDEX)
            before = torch.tensor(row[:i], dtype=torch.long, device=embed.weight.device)
            after = torch.tensor(row[i + 1 :], dtype=torch.long, device=embed.weight.device)
            rows.append(torch.cat([embed(before), image_feats[b].to(embed.weight.dtype), embed(after)]))  # (T_b, dim)
        lengths = torch.tensor([r.shape[0] for r in rows], device=embed.weight.device)
        out = embed.weight.new_zeros(len(rows), int(lengths.max()), embed.weight.shape[1])  # (B, T, dim)
        for b, r in enumerate(rows):
            out[b, : r.shape[0]] = r
        return out, lengths
