"""LLaVA-Rad: vision tower -> mlp2x_gelu projector -> Llama, image features spliced into the prompt."""

import torch
from torch import Tensor, nn

from llavarad.model.llama import Llama
from llavarad.model.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llavarad.model.vision import VisionTower


class Projector(nn.Sequential):
    """mlp2x_gelu: Linear -> GELU -> Linear; indices 0 and 2 are the released key names."""

    def __init__(self, mm_hidden: int, dim: int):
        super().__init__(nn.Linear(mm_hidden, dim), nn.GELU(), nn.Linear(dim, dim))


def image_position(ids: list[int]) -> int:
    """Where the image goes: the index of the one IMAGE_TOKEN_INDEX in a row of token ids. The row
    of T ids becomes T - 1 + N embeddings: ids[:at], the N image features, ids[at + 1:]."""
    n = ids.count(IMAGE_TOKEN_INDEX)
    if n != 1:
        raise ValueError(f"a prompt has {n} image tokens, expected 1")
    return ids.index(IMAGE_TOKEN_INDEX)


def splice_image(ids: list[int], image: Tensor, embed: nn.Embedding) -> Tensor:
    """One row's token ids (one IMAGE_TOKEN_INDEX) + its image features (N, dim) -> the row's input
    embeddings (T - 1 + N, dim), the features in place of the image token.

    Both inference and training call it through `LlavaRad.embed`. Inference pads only when a batch
    forms (prefill); training pads the ids where its batch forms (data.collate, each row keeping its
    one image token), so the spliced rows have one length and stack, and `splice_labels` gives the
    labels the same N image positions.
    """
    at = image_position(ids)
    before = torch.tensor(ids[:at], dtype=torch.long, device=embed.weight.device)
    after = torch.tensor(ids[at + 1 :], dtype=torch.long, device=embed.weight.device)
    return torch.cat([embed(before), image.to(embed.weight.dtype), embed(after)])  # (T - 1 + N, dim)


def splice_labels(ids: list[int], labels: list[int], n_image: int) -> list[int]:
    """One row's labels (one per token id) -> one per position of the spliced row (T - 1 + N): the
    image's N positions are never supervised, as `splice_image` places them."""
    at = image_position(ids)
    return labels[:at] + [IGNORE_INDEX] * n_image + labels[at + 1 :]


class LlavaRad(nn.Module):
    def __init__(self, tower: VisionTower, projector: Projector, llm: Llama):
        super().__init__()
        self.tower, self.projector, self.llm = tower, projector, llm

    @property
    def device(self) -> torch.device:
        return self.llm.device

    def positions(self, ids: list[int]) -> int:
        """The decoder positions a prompt of token ids takes: its image token becomes the tower's patches."""
        return len(ids) - 1 + self.tower.num_patches

    def encode_images(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) -> projected image features (B, N, dim)."""
        feats = self.tower(pixels.to(self.tower.pos_embed.dtype))  # (B, N, mm_hidden)
        return self.projector(feats.to(self.projector[0].weight.dtype))

    def embed(self, ids: list[list[int]], image_feats: Tensor) -> list[Tensor]:
        """Token ids with one IMAGE_TOKEN_INDEX each + image features (B, N, dim) -> each row's
        input embeddings (T_b, dim), unpadded: padding happens where a batch forms (prefill)."""
        return [splice_image(row, image_feats[b], self.llm.embed_tokens) for b, row in enumerate(ids)]
