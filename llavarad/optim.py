"""AdamW and the learning-rate schedule of the official recipe (Hugging Face Trainer's "cosine")."""

import math

import torch
from torch import nn


def get_lr(step: int, total_steps: int, peak_lr: float, warmup_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over ceil(warmup_ratio * total)
    steps from 0, then a half cosine down to 0 at `total_steps`.

    The same numbers as transformers' get_cosine_schedule_with_warmup, which the official run used
    (so the very first step has lr 0, as there).
    """
    warmup = math.ceil(total_steps * warmup_ratio)
    if step < warmup:
        return peak_lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(params: list[nn.Parameter], weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the Trainer's defaults (betas 0.9/0.999, eps 1e-8); the lr is set before every step.
    Fused kernels on GPU; elsewhere one op per step for all tensors (foreach), not per tensor."""
    cuda = device.type == "cuda"
    return torch.optim.AdamW(
        params, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, fused=cuda or None, foreach=not cuda or None
    )
