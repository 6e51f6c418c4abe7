"""The training loop of both stages: `setup` loads, shards and resumes; `_run_stage` runs the
optimizer steps (for each, `accum` micro-batches forward + backward, clip, lr = get_lr(step),
AdamW, log, validate, checkpoint); `export` writes the trained weights in the official layouts.
The learning rate is a pure function of the step (`get_lr`, the official recipe's cosine schedule)
and AdamW is built by `build_optimizer`.

The loss of a step (`loss_norm`):
- "global" (default): the summed cross-entropy of every supervised token of the global batch
  divided by their number, counted over all micro-batches and ranks before the first backward, so
  a step's gradient does not depend on how its samples are split into micro-batches or processes;
- "micro": the official HF Trainer's, each micro-batch's mean cross-entropy over its own supervised
  tokens, divided by the accumulation steps and averaged over the ranks, so that a token weighs
  1 / (world x accum x the supervised tokens of its micro-batch).
"""

import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from llavarad.dist import close_distributed, init_distributed, print0
from llavarad.model.config import LoRAConfig
from llavarad.model.lora import lora_state_dict
from llavarad.model.tokenizer import Tokenizer
from llavarad.model.weights import resolve_folder
from llavarad.train.checkpoint import list_checkpoints, load_checkpoint, read_meta, save_checkpoint
from llavarad.train.config import TrainConfig, resume_changes, resume_safe_fields
from llavarad.train.data import (TEMPLATES, StepSampler, TrainDataset, accumulation_steps, collate, eval_batches,
                           load_train_records, steps_per_epoch, text_length)
from llavarad.train.loss import StepCounts, loss_weights
from llavarad.train.model import TrainModel, build_model, trainable_parameters
from llavarad.train.parallel import parallelize
from llavarad.train.progress import MetricsLog, format_record
from llavarad.train.release import save_lora_release, save_pretrain_outputs


def run_training(cfg: TrainConfig) -> Path:
    """Run one stage; returns the run folder. Under torchrun every rank calls it."""
    rank, world, device = init_distributed(need_group=True)  # FSDP2 needs a group, even for one process
    try:
        return _run_stage(cfg, rank, world, device)
    finally:
        close_distributed()


def _run_stage(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Path:
    run = setup(cfg, rank, world, device)
    images = ImageBudget(cfg.max_missing_frac, run.n_records, cfg.image_folder)
    bar = tqdm(total=run.total, initial=run.start, disable=rank != 0, dynamic_ncols=True, desc=cfg.stage)
    run.model.train()
    for step in range(run.start, run.total):
        micro = [_to(device, next(run.batches)) for _ in range(run.accum)]
        counts = StepCounts.all_ranks(micro, device)
        images.check(counts.missing, counts.rows)
        weights = loss_weights([b["n_supervised"] for b in micro], counts.supervised, world, cfg.loss_norm)
        lr = get_lr(step, run.total, cfg.lr, cfg.warmup_ratio)
        loss_sum, grad_norm = train_step(run.model, run.optimizer, micro, weights, lr, cfg.grad_clip)
        bar.update(1)

        run.log.add(loss_sum, counts)
        done = step + 1
        if done % cfg.log_every == 0 or done == run.total:
            bar.write(format_record(run.log.flush(done, lr, grad_norm, device), run.total))
        if run.val_loader is not None and ((cfg.val_every and done % cfg.val_every == 0) or done == run.total):
            val_loss = validate(run.model, run.val_loader, device)
            run.log.write({"step": done, "val_loss": val_loss})
            bar.write(f"step {done}/{run.total} | val loss {val_loss:.4f}")
        if (cfg.save_every and done % cfg.save_every == 0) or done == run.total:
            save_checkpoint(run.dir, done, run.params, run.optimizer, {"config": cfg.to_dict()}, cfg.keep_checkpoints)
    bar.close()
    export(run, cfg)
    dist.barrier()
    return run.dir


@dataclass
class Run:
    """What the loop works on, made by `setup`."""

    dir: Path
    model: TrainModel
    params: dict[str, nn.Parameter]  # what trains, by name: the checkpoint's keys
    optimizer: torch.optim.Optimizer
    batches: Iterator[dict]  # this rank's micro-batches, from step `start` on
    val_loader: DataLoader | None
    start: int  # the first step to run (> 0 when resumed)
    total: int  # optimizer steps of the whole run
    accum: int  # micro-batches per rank per step
    n_records: int
    lora: LoRAConfig
    base_dir: Path
    log: MetricsLog


def setup(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Run:
    """Check the settings (and those of the checkpoint to resume), load and shard the model, restore
    the checkpoint, and start the data loaders at the step to continue from."""
    accum = accumulation_steps(cfg.global_batch, cfg.micro_batch, world)  # before loading 7B parameters
    run_dir, template = Path(cfg.output), TEMPLATES[cfg.stage]
    checkpoint = checkpoint_to_resume(cfg, run_dir)
    records = load_train_records(cfg.data, cfg.loader)
    base_dir = resolve_folder(cfg.base, "base model")
    tokenizer = Tokenizer(str(base_dir / "tokenizer.model"))
    lora = LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)

    torch.manual_seed(cfg.seed)  # the new projector / LoRA weights: the same draw on every rank
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model = build_model(cfg.stage, str(base_dir), cfg.tower, cfg.projector, lora, dtype, device, cfg.quantize_base)
    n_image, image_size = model.tower.num_patches, model.tower.cfg.image_size
    dataset = TrainDataset(records, cfg.image_folder, tokenizer, template, n_image, image_size, cfg.max_len)
    parallelize(model, cfg.activation_checkpointing)
    params = trainable_parameters(model)
    optimizer = build_optimizer(list(params.values()), cfg.weight_decay, device)

    per_epoch = steps_per_epoch(len(records), cfg.global_batch)
    total = cfg.max_steps or cfg.epochs * per_epoch  # a changed length on resume: the schedule follows the new one
    start = 0
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, params, optimizer)  # also restores the RNG states
        if start > total:
            raise ValueError(f"{checkpoint}: the run is at step {start}, past this run's {total} steps")
        print0(f"resumed from {checkpoint} at step {start}")
    else:
        torch.manual_seed(cfg.seed + 1 + rank)  # LoRA dropout: a different stream on every rank
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    n_trainable = sum(p.numel() for p in params.values())
    partial = len(records) % cfg.global_batch
    print0(f"{cfg.stage}: {len(records)} samples, {per_epoch} steps per epoch"
           f"{f' (the last with {partial} samples)' if partial else ''}, {total} steps; global batch {cfg.global_batch} = "
           f"{world} ranks x {cfg.micro_batch} x {accum} accumulation; {n_trainable:,} trainable parameters")

    sampler = StepSampler([text_length(r, template) for r in records], cfg.global_batch, cfg.micro_batch, rank, world,
                          cfg.seed, start, total)
    batches = iter(_loader(dataset, sampler, cfg.num_workers, device, cfg.seed))
    val_loader = None
    if cfg.val_data:
        val_set = TrainDataset(load_train_records(cfg.val_data, cfg.loader), cfg.image_folder, tokenizer, template,
                               n_image, image_size, cfg.max_len)
        val_loader = _loader(val_set, eval_batches(len(val_set), cfg.micro_batch, rank, world), cfg.num_workers, device, cfg.seed)
    n_lora = sum(p.numel() for p in model.llm.parameters() if p.requires_grad)
    log = MetricsLog(run_dir / "metrics.jsonl", rank == 0, model.llm.cfg, n_lora, cfg.peak_tflops * 1e12 * world)
    log.keep_until(start)  # lines a killed run wrote after its last checkpoint are written again
    return Run(run_dir, model, params, optimizer, batches, val_loader, start, total, accum, len(records), lora, base_dir, log)


def checkpoint_to_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The newest checkpoint when resuming (None: start from step 0), after checking that this run
    changes none of the settings that the trained weights depend on."""
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and not cfg.resume:
        raise ValueError(f"{run_dir} already holds checkpoints of a run; pass --resume to continue it, or choose another --output")
    if not checkpoints:
        if cfg.resume:
            print0(f"no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        return None
    path = checkpoints[-1]
    saved = read_meta(path).get("config")
    if saved is None:
        raise ValueError(f"{path}: saved without the run's settings (by an older llavarad), so a resume cannot check them; "
                         "start a new run in another --output")
    refused, allowed = resume_changes(saved, cfg)
    if refused:
        raise ValueError(f"{path}: --resume with changed settings that change the result: {'; '.join(refused)} "
                         f"(only {', '.join(resume_safe_fields())} may change)")
    if allowed:
        print0(f"resuming with changed settings: {'; '.join(allowed)}")
    return path


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


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro: list[dict], weights: list[float], lr: float,
               grad_clip: float) -> tuple[Tensor, Tensor]:
    """One optimizer step over this rank's micro-batches: backward of weight x summed cross-entropy
    for each, the gradient's global norm clipped to grad_clip (0: not clipped), AdamW at lr.
    Returns the summed cross-entropy of the micro-batches and the gradient norm before clipping,
    both still on the device."""
    loss_sum = 0.0
    for i, (b, weight) in enumerate(zip(micro, weights)):
        model.set_requires_gradient_sync(i == len(micro) - 1)  # reduce the gradients once, after the last micro-batch
        ce = model(b["pixels"], b["ids"], b["labels"])
        (ce * weight).backward()
        loss_sum = loss_sum + ce.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def export(run: Run, cfg: TrainConfig) -> None:
    """The trained weights in the official layouts: the projector's state dict, and in the lora stage
    the decoder's LoRA tensors (lora.lora_state_dict), gathered from their shards (every rank calls it)."""
    projector = _gathered(run.model.projector.state_dict())
    adapter = _gathered(lora_state_dict(run.model.llm)) if cfg.stage == "lora" else {}
    if dist.get_rank() == 0:
        if cfg.stage == "pretrain":
            save_pretrain_outputs(run.dir, projector, run.base_dir, Path(cfg.tower))
        else:
            save_lora_release(run.dir, projector, adapter, run.lora, run.base_dir, cfg.base, Path(cfg.tower))
        print(f"wrote {run.dir}", file=sys.stderr)


def _gathered(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Full float32 CPU copies of (possibly sharded) tensors; a collective when they are sharded."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().cpu() for k, v in state.items()}


def _to(device: torch.device, batch: dict) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _loader(dataset: TrainDataset, batch_sampler, num_workers: int, device: torch.device, seed: int) -> DataLoader:
    # Its own generator, so that starting workers does not draw from the global RNG (bit-exact resume).
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


class ImageBudget:
    """Stops the run once more than `max_frac` of the images read since this process started were
    unreadable (counted against one epoch at least, so that an early bad image does not stop it)."""

    def __init__(self, max_frac: float, n_records: int, image_folder: str):
        self.max_frac, self.n_records, self.image_folder = max_frac, n_records, image_folder
        self.missing = self.seen = 0

    def check(self, missing: float, rows: float) -> None:
        self.missing, self.seen = self.missing + int(missing), self.seen + int(rows)
        if self.missing > self.max_frac * max(self.seen, self.n_records):
            raise ValueError(f"{self.missing} of {self.seen} images read under {self.image_folder} were missing or "
                             f"unreadable (max_missing_frac {self.max_frac}); check --image-folder")


@torch.no_grad()
def validate(model: TrainModel, loader: DataLoader, device: torch.device) -> float:
    """Mean cross-entropy per supervised token over the whole held-out set."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for b in loader:
        b = _to(device, b)
        total[0] += model(b["pixels"], b["ids"], b["labels"])
        total[1] += b["n_supervised"]
    dist.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()
