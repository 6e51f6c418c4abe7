"""The training loop of both stages, read top to bottom: load, shard, then for each optimizer step
`accum` micro-batches forward + backward, clip, lr = get_lr(step), step, log, validate, checkpoint;
at the end, the outputs in the official layouts. The learning rate is a pure function of the step
(`get_lr`, the official recipe's cosine schedule) and AdamW is built by `build_optimizer`.

The loss of a step is the summed cross-entropy of every supervised token in the global batch
divided by their number, counted over all micro-batches and ranks before the first backward, so a
step's gradient does not depend on how its samples are split into micro-batches or processes.
"""

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from llavarad.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from llavarad.config import LlamaConfig, LoRAConfig
from llavarad.data import (TEMPLATES, StepSampler, TrainDataset, accumulation_steps, collate, eval_batches,
                           load_train_records, text_length)
from llavarad.dist import close_distributed, init_distributed, print0
from llavarad.parallel import parallelize
from llavarad.release import save_lora_release, save_pretrain_outputs
from llavarad.tokenizer import Tokenizer
from llavarad.train_config import TrainConfig
from llavarad.train_model import TrainModel, build_model, trainable_parameters
from llavarad.weights import resolve_folder


def run_training(cfg: TrainConfig) -> Path:
    """Run one stage; returns the run folder. Under torchrun every rank calls it."""
    rank, world, device = init_distributed(need_group=True)  # FSDP2 needs a group, even for one process
    try:
        return _run_stage(cfg, rank, world, device)
    finally:
        close_distributed()


def _run_stage(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Path:
    accum = accumulation_steps(cfg.global_batch, cfg.micro_batch, world)  # before loading 7B parameters
    run_dir, template = Path(cfg.output), TEMPLATES[cfg.stage]
    records = load_train_records(cfg.data, cfg.loader)
    if len(records) < cfg.global_batch:
        raise ValueError(f"{cfg.data}: {len(records)} records to train on, fewer than one global batch of {cfg.global_batch}")
    base_dir = resolve_folder(cfg.base, "base model")
    tokenizer = Tokenizer(str(base_dir / "tokenizer.model"))
    bf16 = cfg.dtype == "bfloat16"
    lora = LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)

    torch.manual_seed(cfg.seed)  # the new projector / LoRA weights: the same draw on every rank
    model = build_model(cfg.stage, str(base_dir), cfg.tower, cfg.projector, lora, torch.bfloat16 if bf16 else torch.float32, device)
    n_image, image_size = model.tower.num_patches, model.tower.cfg.image_size
    dataset = TrainDataset(records, cfg.image_folder, tokenizer, template, n_image, image_size, cfg.max_len)
    parallelize(model, cfg.activation_checkpointing)
    params = trainable_parameters(model)
    optimizer = build_optimizer(list(params.values()), cfg.weight_decay, device)

    steps_per_epoch = len(records) // cfg.global_batch
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    meta = {"stage": cfg.stage, "global_batch": cfg.global_batch, "seed": cfg.seed, "total_steps": total}
    start = 0
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and not cfg.resume:
        raise ValueError(f"{run_dir} already holds checkpoints of a run; pass --resume to continue it, or choose another --output")
    if checkpoints:
        start = load_checkpoint(checkpoints[-1], params, optimizer, meta)  # also restores the RNG states
        print0(f"resumed from {checkpoints[-1]} at step {start}")
    else:
        if cfg.resume:
            print0(f"no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        torch.manual_seed(cfg.seed + 1 + rank)  # LoRA dropout: a different stream on every rank
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    n_trainable = sum(p.numel() for p in params.values())
    print0(f"{cfg.stage}: {len(records)} samples, {steps_per_epoch} steps per epoch ({len(records) % cfg.global_batch} samples "
           f"wait for the next), {total} steps; global batch {cfg.global_batch} = {world} ranks x {cfg.micro_batch} x {accum} "
           f"accumulation; {n_trainable:,} trainable parameters")

    sampler = StepSampler([text_length(r, template) for r in records], cfg.global_batch, cfg.micro_batch, rank, world,
                          cfg.seed, start, total)
    batches = iter(_loader(dataset, sampler, cfg.num_workers, device, cfg.seed))
    val_loader = None
    if cfg.val_data:
        val_set = TrainDataset(load_train_records(cfg.val_data, cfg.loader), cfg.image_folder, tokenizer, template,
                               n_image, image_size, cfg.max_len)
        val_loader = _loader(val_set, eval_batches(len(val_set), cfg.micro_batch, rank, world), cfg.num_workers, device, cfg.seed)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    n_lora = sum(p.numel() for n, p in params.items() if n.startswith("llm."))
    log = MetricsLog(run_dir / "metrics.jsonl", rank == 0, model.llm.cfg, n_lora, cfg.peak_tflops * 1e12 * world)
    log.keep_until(start)  # lines a killed run wrote after its last checkpoint are written again
    bar = tqdm(total=total, initial=start, disable=rank != 0, dynamic_ncols=True, desc=cfg.stage)
    model.train()
    n_missing = n_truncated = n_seen = 0  # since this process started
    for step in range(start, total):
        micro = [next(batches) for _ in range(accum)]
        # [supervised tokens, real tokens, padded slots, rows, unreadable images, cut samples], all micro-batches and ranks
        counts = torch.tensor([[b["n_supervised"], b["n_real"], b["tokens"].numel(), len(b["tokens"]),
                                b["n_missing"], b["n_truncated"]] for b in micro], dtype=torch.float64).sum(0).to(device)
        dist.all_reduce(counts)
        n_supervised, n_real, n_slots, n_rows, missing, truncated = counts.tolist()
        n_missing, n_truncated, n_seen = n_missing + int(missing), n_truncated + int(truncated), n_seen + int(n_rows)
        if n_missing > cfg.max_missing_frac * max(n_seen, len(records)):  # budget: a fraction of one epoch at least
            raise ValueError(f"{n_missing} of {n_seen} images read under {cfg.image_folder} were missing or unreadable "
                             f"(max_missing_frac {cfg.max_missing_frac}); check --image-folder")
        lr = get_lr(step, total, cfg.lr, cfg.warmup_ratio)
        loss_sum, grad_norm = train_step(model, micro, optimizer, list(params.values()), lr, cfg.grad_clip,
                                         n_supervised, world, autocast, device)
        bar.update(1)

        log.add(loss_sum, n_supervised, n_real, n_slots, n_rows)
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
            record = log.flush(done, lr, float(norm), device, n_missing, n_truncated)
            bar.write(format_record(record, total))
        if val_loader is not None and ((cfg.val_every and done % cfg.val_every == 0) or done == total):
            val_loss = validate(model, val_loader, device, autocast)
            log.write({"step": done, "val_loss": val_loss})
            bar.write(f"step {done}/{total} | val loss {val_loss:.4f}")
        if (cfg.save_every and done % cfg.save_every == 0) or done == total:
            save_checkpoint(run_dir, done, params, optimizer, meta, cfg.keep_checkpoints)
    bar.close()

    full = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu() for name, p in params.items()}
    if rank == 0:
        projector = {k.removeprefix("projector."): v for k, v in full.items() if k.startswith("projector.")}
        if cfg.stage == "pretrain":
            save_pretrain_outputs(run_dir, projector, base_dir, Path(cfg.tower))
        else:
            adapter = {k.removeprefix("llm."): v for k, v in full.items() if k.startswith("llm.")}
            save_lora_release(run_dir, projector, adapter, lora, base_dir, cfg.base, Path(cfg.tower))
        print(f"wrote {run_dir}", file=sys.stderr)
    dist.barrier()
    return run_dir


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


def train_step(model: TrainModel, micro: list[dict], optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
               lr: float, grad_clip: float, n_supervised: float, world: int, autocast, device: torch.device):
    """One optimizer step over this rank's micro-batches -> (summed cross-entropy, gradient norm),
    both still on the device. `n_supervised`: supervised tokens of the step over all ranks."""
    loss_sum = torch.zeros((), device=device)
    for i, b in enumerate(micro):
        model.set_requires_gradient_sync(i == len(micro) - 1)  # reduce the gradients once, after the last micro-batch
        b = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
        with autocast:
            ce = model(b["pixels"], b["tokens"], b["image_mask"], b["labels"])
        # FSDP averages gradients over the ranks: scaling by world makes the result sum(ce) / n_supervised.
        (ce * world / max(n_supervised, 1.0)).backward()
        loss_sum += ce.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def _loader(dataset: TrainDataset, batch_sampler, num_workers: int, device: torch.device, seed: int) -> DataLoader:
    # Its own generator, so that starting workers does not draw from the global RNG (bit-exact resume).
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def validate(model: TrainModel, loader: DataLoader, device: torch.device, autocast) -> float:
    """Mean cross-entropy per supervised token over the whole held-out set."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for b in loader:
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        with autocast:
            ce = model(b["pixels"], b["tokens"], b["image_mask"], b["labels"])
        total[0] += ce
        total[1] += b["n_supervised"]
    dist.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


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
        self._reset()

    def _reset(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0  # on the device: summed across ranks only when flushed
        self.supervised = self.tokens = self.slots = self.rows = 0.0
        self.t0 = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, supervised: float, tokens: float, slots: float, rows: float) -> None:
        self.loss_sum = self.loss_sum + loss_sum
        self.supervised, self.tokens = self.supervised + supervised, self.tokens + tokens
        self.slots, self.rows = self.slots + slots, self.rows + rows

    def flush(self, step: int, lr: float, grad_norm: float, device: torch.device, missing: int, truncated: int) -> dict:
        loss_sum = torch.as_tensor(self.loss_sum, device=device, dtype=torch.float32)
        dist.all_reduce(loss_sum)
        seconds = time.perf_counter() - self.t0
        tok_s = self.tokens / seconds
        flops = flops_per_token(self.llm, self.trainable, self.tokens / self.rows)
        record = {
            "step": step,
            "loss": loss_sum.item() / max(self.supervised, 1.0),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tok_s,
            "mfu": tok_s * flops / self.peak_flops,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
            "padding": 1 - self.tokens / self.slots,  # share of the batch that was padding
            "missing_images": missing,
            "truncated": truncated,
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
