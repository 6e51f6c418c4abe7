"""What the training loop reports: the model FLOPs per token for MFU, and metrics.jsonl (one line
per log step: loss, lr, grad norm, tokens/s, MFU, peak memory, padding share, unreadable images,
cut samples)."""

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from llavarad.model.config import LlamaConfig
from llavarad.train.loss import StepCounts


def flops_per_token(cfg: LlamaConfig, trainable_decoder_params: int, seq_len: float) -> float:
    """Model FLOPs of one trained token, for MFU: the decoder's forward (2 per weight, plus causal
    attention), the backward to the activations (the same again), and the gradients of the
    trainable decoder weights (2 per weight). Recomputation is not counted (that is what "model"
    FLOPs means); the tower, projector and lm_head are left out (under 2% at the 7B shape)."""
    matmul = cfg.n_layers * (cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.dim * cfg.hidden_dim)
    attention = 2 * cfg.n_layers * seq_len * cfg.dim  # QK^T and AV over on average seq_len / 2 keys, 2 FLOPs each
    return 4 * matmul + 2 * trainable_decoder_params + 3 * attention


class MetricsLog:
    """Sums over the steps since the last log line; rank 0 appends each line to metrics.jsonl."""

    def __init__(self, path: Path, main: bool, llm: LlamaConfig, trainable_decoder_params: int, peak_flops: float):
        self.path, self.main, self.llm, self.trainable, self.peak_flops = path, main, llm, trainable_decoder_params, peak_flops
        self.missing = self.truncated = 0  # since this process started
        self._reset()

    def _reset(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0  # on the device: summed across ranks only when flushed
        self.supervised = self.tokens = self.slots = self.rows = 0.0
        self.t0 = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, counts: StepCounts) -> None:
        self.loss_sum = self.loss_sum + loss_sum
        self.supervised, self.tokens = self.supervised + counts.supervised, self.tokens + counts.real
        self.slots, self.rows = self.slots + counts.slots, self.rows + counts.rows
        self.missing, self.truncated = self.missing + int(counts.missing), self.truncated + int(counts.truncated)

    def flush(self, step: int, lr: float, grad_norm: Tensor, device: torch.device) -> dict:
        """The line of the steps since the last flush (loss: per supervised token, whatever loss_norm)."""
        loss_sum = torch.as_tensor(self.loss_sum, device=device, dtype=torch.float32)
        dist.all_reduce(loss_sum)
        seconds = time.perf_counter() - self.t0
        tok_s = self.tokens / seconds
        flops = flops_per_token(self.llm, self.trainable, self.tokens / self.rows)
        record = {
            "step": step,
            "loss": loss_sum.item() / max(self.supervised, 1.0),
            "lr": lr,
            "grad_norm": float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm),
            "tokens_per_s": tok_s,
            "mfu": tok_s * flops / self.peak_flops,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
            "padding": 1 - self.tokens / self.slots,  # share of the batch that was padding
            "missing_images": self.missing,
            "truncated": self.truncated,
        }
        self.write(record)
        self._reset()
        return record

    def keep_until(self, step: int) -> None:
        if self.main and self.path.is_file():
            lines = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in lines))

    def write(self, record: dict) -> None:
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def format_record(r: dict, total: int) -> str:
    return (f"step {r['step']}/{total} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad norm {r['grad_norm']:.3f} | "
            f"{r['tokens_per_s']:,.0f} tok/s | mfu {100 * r['mfu']:.1f}% | peak mem {r['peak_mem_gib']:.1f} GiB")
