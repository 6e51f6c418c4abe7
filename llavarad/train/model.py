"""The model as training sees it: frozen tower -> trainable projector -> decoder (frozen, or frozen
with LoRA), and the summed next-token loss over the supervised positions.

Precision ("bfloat16"): the frozen weights are stored in bf16 (a 7B decoder takes 13.5 GB, not 27),
what trains (projector, LoRA) stays in float32 as the optimizer's master copy, and the forward runs
under bf16 autocast (TrainModel.forward turns it on when the frozen weights are bf16), which casts
the float32 weights for each matmul. "float32" keeps everything in float32 with no autocast (the
CPU tests).
"""

from pathlib import Path

import torch
from torch import Tensor, nn

from llavarad.model.config import LoRAConfig
from llavarad.model.llama import Llama
from llavarad.model.llava import LlavaRad, Projector
from llavarad.model.lora import apply_lora
from llavarad.model.vision import VisionTower
from llavarad.model.weights import load_llm, load_projector, load_tower, locate_tower, resolve_folder
from llavarad.train.loss import summed_cross_entropy


class TrainModel(LlavaRad):
    """LlavaRad (tower, projector and decoder under one root, so that FSDP gathers every weight the
    forward uses) with the training forward: images encoded as at inference, the loss over the labels."""

    def forward(self, pixels: Tensor, ids: list[list[int]], labels: Tensor) -> Tensor:
        """pixels (B, 3, S, S); ids (B rows of T token ids, one image token each) and labels
        (B, T - 1 + N) from data.collate -> the cross-entropy summed over the supervised tokens
        (normalising is the caller's job: see loss.loss_weights)."""
        bf16 = self.llm.embed_tokens.weight.dtype == torch.bfloat16  # the "bfloat16" recipe: autocast the matmuls
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=bf16):
            image = self.encode_images(pixels)  # (B, N, dim); the tower is frozen, so the gradient starts at the projector
            h = torch.stack(self.embed(ids, image))  # rows padded alike in collate: (B, T - 1 + N, dim)
            B, T = h.shape[:2]
            pos = torch.arange(T, device=h.device).expand(B, T)  # (B, T); right padding keeps positions
            h = self.llm(h, pos)  # (B, T, dim)
            return summed_cross_entropy(self.llm.lm_head, h, labels)

    def train(self, mode: bool = True) -> "TrainModel":
        """The tower stays in eval mode whatever the mode: it is frozen, only the decoder trains."""
        super().train(mode)
        self.tower.eval()
        return self


def build_model(stage: str, base: str, tower_dir: str, projector: str | None, lora: LoRAConfig,
                dtype: torch.dtype, device: torch.device, quantize_base: str | None = None) -> TrainModel:
    """Load the base decoder (`quantize_base`: its linear layers quantized, QLoRA), the tower and
    (lora stage) the pretrained projector; see `assemble`.
    Seed torch before: the new projector / LoRA weights are drawn here, and every rank must draw the same."""
    llm = load_llm(resolve_folder(base, "base model"), dtype, device, quantize=quantize_base, trainable_input=True)
    tower = load_tower(*map(str, locate_tower(tower_dir=tower_dir))).to(device=device, dtype=dtype)
    if projector is None:
        proj = Projector(tower.cfg.width, llm.cfg.dim)
    else:
        try:
            proj = load_projector(Path(projector), tower.cfg.width, llm.cfg.dim)
        except ValueError as e:
            raise ValueError(f"{e} (the projector must map the tower width {tower.cfg.width} to the decoder width {llm.cfg.dim})") from None
    return assemble(stage, tower, proj.to(device), llm, lora)


def assemble(stage: str, tower: VisionTower, projector: Projector, llm: Llama, lora: LoRAConfig) -> TrainModel:
    """Freeze the tower and the decoder, keep the projector trainable in float32, and in the lora
    stage add LoRA to the decoder (in float32 too: the optimizer's master copy)."""
    tower.requires_grad_(False)
    llm.requires_grad_(False)
    projector.to(torch.float32).requires_grad_(True)
    if stage == "lora":
        apply_lora(llm, lora, dtype=torch.float32)
    return TrainModel(tower, projector, llm)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
