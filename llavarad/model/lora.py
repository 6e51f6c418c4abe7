"""LoRA in the PEFT convention: y = x W^T + dropout(x) A^T B^T * (alpha / r), B starting at zero.

`apply_lora` swaps the targeted `nn.Linear`s of a model for `LoRALinear`s that share the frozen
base weight; `merge_lora` is a pure function over state dicts that folds the adapter into the
weights (what the official loader does with the released adapter before inference).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llavarad.model.config import LoRAConfig
from llavarad.model.quant import QuantLinear


class LoRALinear(nn.Module):
    """`dtype` is A's and B's (default: the base weight's, or the activations' for a QuantLinear);
    training keeps them in float32, the optimizer's master copy, beside a bf16 frozen weight."""

    def __init__(self, base: nn.Linear | QuantLinear, r: int, alpha: float, dropout: float, dtype: torch.dtype | None = None):
        super().__init__()
        if isinstance(base, QuantLinear):  # QLoRA: the quantized layer computes x W^T and gives W no gradient
            self.quantized, base_dtype = base, base.scales.dtype
        else:
            self.quantized, base_dtype = None, base.weight.dtype
            self.weight = base.weight  # frozen base weight, shared, (out, in)
            self.weight.requires_grad_(False)
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        dev, dtype = base.weight.device, dtype or base_dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dtype))
        if dev.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of A

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight) if self.quantized is None else self.quantized(x)
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale


def apply_lora(model: nn.Module, cfg: LoRAConfig, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every nn.Linear (or QuantLinear) whose attribute name is in cfg.targets by a LoRALinear
    with A and B in `dtype` (default: the frozen weight's); returns their module paths."""
    replaced = []
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if name in cfg.targets and isinstance(child, (nn.Linear, QuantLinear)):
                setattr(module, name, LoRALinear(child, cfg.r, cfg.alpha, cfg.dropout, dtype))
                replaced.append(f"{path}.{name}" if path else name)
    return replaced


def merge_lora(weights: dict[str, Tensor], adapter: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """Fold an adapter {"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)} into
    weights {"<module>.weight": (out, in)}: W + scale * B @ A, computed in float32.

    Returns a new dict; the inputs are not changed, so merging twice from the same base is the
    same as merging once.
    """
    merged = dict(weights)
    modules = sorted({k.rsplit(".", 1)[0] for k in adapter})
    for m in modules:
        a, b, key = adapter.get(f"{m}.lora_A"), adapter.get(f"{m}.lora_B"), f"{m}.weight"
        if a is None or b is None:
            raise ValueError(f"adapter: {m} needs both lora_A and lora_B")
        if key not in weights:
            raise ValueError(f"adapter: no base weight {key!r} for the LoRA of {m}")
        w = weights[key]
        if tuple(b.shape) != (w.shape[0], a.shape[0]) or a.shape[1] != w.shape[1]:
            raise ValueError(f"adapter: {m} lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit weight {tuple(w.shape)}")
        merged[key] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return merged


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable LoRA tensors of a model, keyed "<module>.lora_A" / "<module>.lora_B"."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
