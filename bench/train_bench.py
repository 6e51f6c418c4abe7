"""Training-step speed on one GPU: llavarad (FSDP2 at world size 1) against transformers + peft.

    python bench/train_bench.py --json train_bench.json     # about 3 minutes on an H100

Both sides run the LLaVA-Rad stage-2 step at the 7B shape with random weights: batch 4 x 1449
tokens (1369 image slots + 80 text tokens, the last 60 supervised), LoRA r 64 / alpha 128 /
dropout 0.05 on q/k/v/o/gate/up/down of every layer, bf16, AdamW, gradient checkpointing.
- llavarad: the training loop's own `train_step` on a batch from the loop's own `collate`,
  tower and projector included (they run on 4 images), once per activation-checkpointing mode
  ("full" as in the configs, "selective" keeping matmul outputs, "none").
- transformers + peft: LlamaForCausalLM in bf16 with the same decoder weights and the same LoRA A,
  peft LoRA (its default float32 adapters), gradient checkpointing, the step under bf16 autocast as
  the HF Trainer does it, logits over every position as transformers computes them. Its input is
  the embeddings our model builds for the batch (image features spliced into the image slots),
  computed once before timing, so it runs no tower or projector; they require grad, as in LLaVA,
  where the gradient flows back to the projector. Same labels.
Each row: median of --steps timed steps after 2 warm-up steps (synchronized), tokens/s =
4 x 1449 / step time, peak memory allocated, the first-step loss and the norm of every LoRA
gradient of the first step (same weights, same inputs and LoRA B = 0, so both sides must agree,
to bf16 rounding here, which shows they do the same work).

--tiny is the exact CPU check of that claim (no timing value): tiny shapes in float32 with no
autocast, decoder weights drawn wide enough (std 0.3) that the loss is far from ln(vocab), LoRA
dropout 0 (its random masks would differ between the sides) and no gradient clipping (ours also
clips the projector's gradient, which would rescale the LoRA gradients differently).
"""

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from llavarad.demo import TINY_TOWER
from llavarad.dist import close_distributed, init_distributed
from llavarad.model.config import LLAMA_PRESETS, LlamaConfig, LoRAConfig
from llavarad.model.llama import Llama
from llavarad.model.llava import Projector
from llavarad.model.lora import lora_state_dict
from llavarad.model.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llavarad.model.vision import VisionConfig, VisionTower
from llavarad.model.weights import ours_to_hf
from llavarad.train.data import collate
from llavarad.train.loop import build_optimizer, train_step
from llavarad.train.loss import loss_weights
from llavarad.train.model import TrainModel, assemble, trainable_parameters
from llavarad.train.parallel import parallelize
from llavarad.train.progress import flops_per_token

BATCH, TEXT, SUPERVISED, IMAGE_AT = 4, 80, 60, 35  # 1369 image slots + 80 text tokens; the image follows ~35 system-prompt tokens
LR = 1e-5


@dataclass
class Setup:
    """What differs between the GPU benchmark and the exact --tiny CPU check."""

    device: torch.device
    cfg: LlamaConfig
    vision: VisionConfig
    dtype: torch.dtype  # of the frozen weights; bf16 runs under bf16 autocast, float32 without
    std: float  # of the decoder's random weights
    lora: LoRAConfig
    clip: float  # gradient-norm clip

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)


def random_(module: torch.nn.Module, seed: int, std: float) -> None:
    """Weights ~ N(0, std), norms and LayerScale at 1, drawn on the device (fast, no files)."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or "gamma" in name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)


def on_device(module: torch.nn.Module, s: Setup, seed: int, std: float) -> torch.nn.Module:
    """`module` (built on the meta device) in s.dtype on s.device with random weights."""
    module = module.to(s.dtype).to_empty(device=s.device)
    random_(module, seed, std)
    return module


def build_ours(s: Setup) -> TrainModel:
    """Our LoRA-stage model with random weights; both sides call it, so they get the same ones."""
    torch.manual_seed(0)  # the projector and LoRA A are drawn from it
    with torch.device("meta"):
        tower, llm = VisionTower(s.vision), Llama(s.cfg)
    tower, llm = on_device(tower, s, 1, 0.02), on_device(llm, s, 0, s.std)
    return assemble("lora", tower, Projector(s.vision.width, s.cfg.dim).to(s.device), llm, s.lora)


def batch(cfg: LlamaConfig, vision: VisionConfig) -> dict:
    g = torch.Generator().manual_seed(0)
    image, image_size = (vision.image_size // vision.patch_size) ** 2, vision.image_size
    samples = []
    for _ in range(BATCH):
        text = torch.randint(3, cfg.vocab_size, (TEXT,), generator=g).tolist()
        labels = torch.full((image + TEXT,), IGNORE_INDEX)  # one per position once the image is spliced in
        labels[-SUPERVISED:] = torch.tensor(text[-SUPERVISED:])
        samples.append({"tokens": torch.tensor(text[:IMAGE_AT] + [IMAGE_TOKEN_INDEX] + text[IMAGE_AT:]), "labels": labels,
                        "pixels": torch.randn(3, image_size, image_size, generator=g), "missing": False, "truncated": False})
    return collate(samples)


def first_grad_norms(optimizer: torch.optim.Optimizer, named: dict[str, torch.Tensor]) -> dict[str, float]:
    """A dict that the first optimizer step fills with the norm of each named parameter's gradient
    (after clipping, before the update): a fingerprint of the step's backward."""
    norms = {}

    def record(*_):
        for name, p in named.items():
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            norms[name] = float(g.float().norm())
        handle.remove()

    handle = optimizer.register_step_pre_hook(record)
    return norms


def hf_lora_name(ours: str) -> str:
    """'llm.layers.0.attn.q_proj.lora_A' -> 'model.layers.0.self_attn.q_proj.lora_A' (the LoRA's module as transformers names it)."""
    module, ab = ours.removeprefix("llm.").rsplit(".", 1)
    return f"{ours_to_hf(module + '.weight').removesuffix('.weight')}.{ab}"


def timed(step, steps: int, device: torch.device) -> dict:
    """Median seconds, peak GiB and first-step loss of `step()`, which returns the step's loss tensor."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first = float(step())
    step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {"step_s": statistics.median(times), "peak_gib": peak, "first_loss": first}


def ours(s: Setup, checkpointing: str, steps: int) -> dict:
    model = build_ours(s)
    parallelize(model, checkpointing)
    model.train()
    named = trainable_parameters(model)
    params = list(named.values())
    optimizer = build_optimizer(params, 0.0, s.device)
    grads = first_grad_norms(optimizer, {hf_lora_name(k): p for k, p in named.items() if ".lora_" in k})
    micro = [{k: v.to(s.device) if torch.is_tensor(v) else v for k, v in batch(s.cfg, s.vision).items()}]
    n_supervised = float(micro[0]["n_supervised"])
    weights = loss_weights([micro[0]["n_supervised"]], n_supervised, 1, "global")

    def step():
        loss_sum, _ = train_step(model, optimizer, micro, weights, LR, s.clip)
        return loss_sum / n_supervised

    return {**timed(step, steps, s.device), "first_lora_grad_norms": grads}


@torch.no_grad()
def our_inputs(model: TrainModel, b: dict, s: Setup) -> torch.Tensor:
    """The decoder input our model builds for batch b, token embeddings with the image features in
    the image slots (B, T, dim): caught on its way into the decoder, as our training forward makes it."""
    caught = []
    hook = model.llm.register_forward_pre_hook(lambda _, args: caught.append(args[0]))
    b = {k: v.to(s.device) if torch.is_tensor(v) else v for k, v in b.items()}
    with s.autocast():
        model(b["pixels"], b["ids"], b["labels"])
    hook.remove()
    return caught[0]


def hf_peft(s: Setup, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    cfg = s.cfg
    hf_cfg = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                      max_position_embeddings=4096, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(s.dtype)
    with torch.device(s.device):
        model = LlamaForCausalLM(hf_cfg)
    torch.set_default_dtype(default)
    b = batch(cfg, s.vision)
    ours_model = build_ours(s)  # the same decoder weights and LoRA A as ours, and our spliced inputs
    embeds = our_inputs(ours_model, b, s).detach().requires_grad_(True)
    state = ours_model.llm.state_dict()
    model.load_state_dict({ours_to_hf(k): v for k, v in state.items() if ".lora_" not in k})
    adapters = {f"base_model.model.{hf_lora_name(k)}.default.weight": v for k, v in lora_state_dict(ours_model.llm).items()}
    del ours_model, state
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=s.lora.r, lora_alpha=s.lora.alpha, lora_dropout=s.lora.dropout,
                                             target_modules=list(s.lora.targets)))
    unexpected = model.load_state_dict(adapters, strict=False).unexpected_keys
    assert not unexpected, f"LoRA tensors peft does not have: {unexpected[:3]}"
    model.train()
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=s.device.type == "cuda")
    grads = first_grad_norms(optimizer, {k.removeprefix("base_model.model.").removesuffix(".default.weight"): p for k, p in named.items()})
    labels = b["labels"].to(s.device)

    def step():
        with s.autocast():
            loss = model(inputs_embeds=embeds, labels=labels).loss
        loss.backward()
        embeds.grad = None  # the projector's gradient in LLaVA; dropped here, as nothing trains on it
        torch.nn.utils.clip_grad_norm_(params, s.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return {**timed(step, steps, s.device), "first_lora_grad_norms": grads}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed steps per row (median)")
    p.add_argument("--modes", default="full,selective,none", help="llavarad activation-checkpointing modes to time")
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers + peft row")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a smoke test of this script, no timing value")
    args = p.parse_args(argv)
    if args.tiny:
        setup = Setup(torch.device("cpu"), LLAMA_PRESETS["tiny"], TINY_TOWER,
                      torch.float32, 0.3, LoRAConfig(r=64, alpha=128.0, dropout=0.0), math.inf)
    elif torch.cuda.is_available():  # Vicuna-7B, ViT-B/14 at 518
        setup = Setup(torch.device("cuda"), LlamaConfig(), VisionConfig(), torch.bfloat16, 0.02, LoRAConfig(r=64, alpha=128.0, dropout=0.05), 1.0)
    else:
        print("error: this benchmark needs a CUDA GPU (or --tiny for a CPU smoke test)", file=sys.stderr)
        return 1
    device = setup.device
    init_distributed(need_group=True, device=device)  # FSDP2 needs a process group, even for one process
    try:
        rows = run_rows(args, setup)
    finally:
        close_distributed()
    if args.json:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


def run_rows(args: argparse.Namespace, s: Setup) -> list[dict]:
    n = (s.vision.image_size // s.vision.patch_size) ** 2 + TEXT
    tokens = BATCH * n
    flops = flops_per_token(s.cfg, 0, n)  # LoRA weight gradients left out: under 1%
    name = torch.cuda.get_device_name() if s.device.type == "cuda" else "cpu"
    print(f"{name} | torch {torch.__version__} | {BATCH} x {n} tokens, LoRA r {s.lora.r}", flush=True)
    rows = []
    runs = [(f"llavarad, checkpointing {m}", lambda m=m: ours(s, m, args.steps)) for m in args.modes.split(",")]
    if not args.skip_hf:
        runs.append(("transformers + peft, gradient checkpointing", lambda: hf_peft(s, args.steps)))
    for label, run in runs:
        try:
            result = run()
        except torch.OutOfMemoryError:
            result = None
        # Free this row's model before the next row: here, outside the except block, whose
        # traceback would still hold it after an out-of-memory error.
        gc.collect()
        torch.cuda.empty_cache()
        if result is None:
            print(f"{label}: out of memory", flush=True)
            rows.append({"implementation": label, "error": "out of memory"})
            continue
        seconds, grads = result["step_s"], result.pop("first_lora_grad_norms")
        row = {"implementation": label, **result, "tokens_per_s": tokens / seconds, "mfu_989": tokens / seconds * flops / 989e12,
               "first_lora_grad_norms": grads}
        rows.append(row)
        print(f"{label}: {seconds:.3f} s/step, {row['tokens_per_s']:,.0f} tok/s, MFU {100 * row['mfu_989']:.1f}%, "
              f"peak {row['peak_gib']:.1f} GiB, first loss {row['first_loss']:.6f}, "
              f"first LoRA gradient norm {math.sqrt(sum(g * g for g in grads.values())):.6g}", flush=True)
    reference = next((r for r in rows if r["implementation"].startswith("transformers") and "step_s" in r), None)
    for r in rows:
        if reference and r is not reference and "step_s" in r:
            r["speedup_vs_hf_peft"] = reference["step_s"] / r["step_s"]
            print(f"{r['implementation']}: {r['speedup_vs_hf_peft']:.2f}x transformers + peft", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
