"""The training loss and its normalisation: each micro-batch's cross-entropy summed over its
supervised tokens, the step's token counts over all ranks (one all-reduce: the loss's denominator
and what the log reports), and the factor each micro-batch's sum is scaled by before the backward.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from llavarad.model.tokenizer import IGNORE_INDEX


def summed_cross_entropy(lm_head: nn.Module, h: Tensor, labels: Tensor) -> Tensor:
    """Decoder outputs h (B, T, dim) and labels (B, T) -> the next-token cross-entropy summed over
    the supervised positions (a float32 scalar)."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX
    logits = lm_head(h[:, :-1][keep])  # (n, vocab), only where supervised: saves B*T*vocab
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


@dataclass
class StepCounts:
    """A step's batch, summed over its micro-batches and all ranks."""

    supervised: float  # tokens with a target
    real: float  # positions that are not padding
    slots: float  # positions, padding included
    rows: float  # samples
    missing: float  # unreadable images
    truncated: float  # samples cut at max_len

    @staticmethod
    def all_ranks(micro: list[dict], device: torch.device) -> "StepCounts":
        counts = torch.tensor([[b["n_supervised"], b["n_real"], b["labels"].numel(), len(b["ids"]), b["n_missing"],
                                b["n_truncated"]] for b in micro], dtype=torch.float64).sum(0).to(device)
        dist.all_reduce(counts)
        return StepCounts(*counts.tolist())



def loss_weights(n_supervised: list[int], step_supervised: float, world: int, loss_norm: str) -> list[float]:
    """The factor each of this rank's micro-batches multiplies its summed cross-entropy by before the
    backward. FSDP then averages the gradients over the `world` ranks (divides their sum by world).

    n_supervised: each micro-batch's supervised tokens; step_supervised: the step's, over all ranks.
    "global": world / step_supervised for all, so the gradient is that of sum(ce) / step_supervised.
    "micro": 1 / (accum x n) for a micro-batch of n supervised tokens, so each token weighs
    1 / (world x accum x n) after the average. A micro-batch with nothing supervised adds nothing
    (there the official loss is 0 / 0).
    """
    if loss_norm == "global":
        return [world / max(step_supervised, 1.0)] * len(n_supervised)
    return [1.0 / (len(n_supervised) * n) if n else 0.0 for n in n_supervised]
