"""Training-step speed on one GPU: llavarad (FSDP2 at world size 1) against transformers + peft.

    PYTHONPATH=. python bench/train_bench.py --json train_bench.json     # about 3 minutes on an H100

Both sides run the LLaVA-Rad stage-2 step at the 7B shape with random weights: batch 4 x 1449
tokens (1369 image slots + 80 text tokens, the last 60 supervised), LoRA r 64 / alpha 128 /
dropout 0.05 on q/k/v/o/gate/up/down of every layer, bf16, AdamW, gradient checkpointing.
- llavarad: the training loop's own `train_step` on a batch from the loop's own `collate`,
  tower and projector included (they run on 4 images), once per activation-checkpointing mode
  ("full" as in the configs, "selective" keeping matmul outputs, "none").
- transformers + peft: LlamaForCausalLM in bf16 with the same decoder weights, peft LoRA (its
  default float32 adapters), gradient checkpointing, the step under bf16 autocast as the HF Trainer
  does it, token ids in (no tower), logits over every position as transformers computes them.
Each row: median of --steps timed steps after 2 warm-up steps (synchronized), tokens/s =
4 x 1449 / step time, peak memory allocated. The first-step losses of both sides are printed:
same weights and LoRA B = 0, so they must agree (to bf16 rounding), which shows both do the same work.
"""

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llavarad.config import LLAMA_PRESETS, LlamaConfig, LoRAConfig  # noqa: E402
from llavarad.data import collate  # noqa: E402
from llavarad.llama import Llama  # noqa: E402
from llavarad.model import Projector  # noqa: E402
from llavarad.optim import build_optimizer  # noqa: E402
from llavarad.parallel import ensure_process_group, parallelize  # noqa: E402
from llavarad.tokenizer import IGNORE_INDEX  # noqa: E402
from llavarad.train_loop import flops_per_token, train_step  # noqa: E402
from llavarad.train_model import assemble, trainable_parameters  # noqa: E402
from llavarad.vision import VisionConfig, VisionTower  # noqa: E402
from llavarad.weights import ours_to_hf  # noqa: E402

BATCH, TEXT, SUPERVISED, IMAGE_AT = 4, 80, 60, 35  # 1369 image slots + 80 text tokens; the image follows ~35 system-prompt tokens
LORA = LoRAConfig(r=64, alpha=128.0, dropout=0.05)
TARGETS = list(LORA.targets)


def random_(module: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 0.02), norms and LayerScale at 1, drawn on the device (fast, no files)."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or "gamma" in name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)


def random_llm(cfg: LlamaConfig, device: torch.device) -> Llama:
    with torch.device("meta"):
        llm = Llama(cfg).to(torch.bfloat16)
    llm.to_empty(device=device)
    random_(llm, 0)
    return llm


def batch(cfg: LlamaConfig, vision: VisionConfig) -> dict:
    g = torch.Generator().manual_seed(0)
    image, image_size = (vision.image_size // vision.patch_size) ** 2, vision.image_size
    samples = []
    for _ in range(BATCH):
        n = image + TEXT
        tokens = torch.randint(3, cfg.vocab_size, (n,), generator=g)
        labels = torch.full((n,), IGNORE_INDEX)
        labels[-SUPERVISED:] = tokens[-SUPERVISED:]
        samples.append({"tokens": tokens, "labels": labels, "image_slots": (IMAGE_AT, image),
                        "pixels": torch.randn(3, image_size, image_size, generator=g), "missing": False, "truncated": False})
    return collate(samples)


def timed(step, steps: int, device: torch.device) -> tuple[float, float, float]:
    """(median seconds, peak GiB, first-step loss) of `step()`, which returns the step's loss tensor."""
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
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, first


def ours(cfg: LlamaConfig, vision: VisionConfig, checkpointing: str, steps: int, device: torch.device) -> tuple[float, float, float]:
    torch.manual_seed(0)
    with torch.device("meta"):
        tower = VisionTower(vision).to(torch.bfloat16)
    tower.to_empty(device=device)
    random_(tower, 1)
    model = assemble("lora", tower, Projector(vision.width, cfg.dim).to(device), random_llm(cfg, device), LORA)
    parallelize(model, checkpointing)
    model.train()
    params = list(trainable_parameters(model).values())
    optimizer = build_optimizer(params, 0.0, device)
    micro = [batch(cfg, vision)]
    n_supervised = float(micro[0]["n_supervised"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        loss_sum, _ = train_step(model, micro, optimizer, params, 1e-5, 1.0, n_supervised, 1, autocast, device)
        return loss_sum / n_supervised

    return timed(step, steps, device)


def hf_peft(cfg: LlamaConfig, vision: VisionConfig, steps: int, device: torch.device) -> tuple[float, float, float]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf_cfg = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                      max_position_embeddings=4096, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg)
    torch.set_default_dtype(default)
    llm = random_llm(cfg, device)  # the same decoder weights as ours
    model.load_state_dict({ours_to_hf(k): v for k, v in llm.state_dict().items()})
    del llm
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout, target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    b = batch(cfg, vision)
    ids, labels = b["tokens"].to(device), b["labels"].to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return timed(step, steps, device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed steps per row (median)")
    p.add_argument("--modes", default="full,selective,none", help="llavarad activation-checkpointing modes to time")
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers + peft row")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a smoke test of this script, no timing value")
    args = p.parse_args(argv)
    if args.tiny:
        device, cfg, vision = torch.device("cpu"), LLAMA_PRESETS["tiny"], VisionConfig(image_size=56, width=32, depth=3, heads=2, mlp_hidden=64)
    elif torch.cuda.is_available():
        device, cfg, vision = torch.device("cuda"), LlamaConfig(), VisionConfig()  # Vicuna-7B, ViT-B/14 at 518
    else:
        print("error: this benchmark needs a CUDA GPU (or --tiny for a CPU smoke test)", file=sys.stderr)
        return 1
    made_group = ensure_process_group(device)
    try:
        rows = run_rows(args, device, cfg, vision)
    finally:
        if made_group:
            dist.destroy_process_group()
    if args.json:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


def run_rows(args: argparse.Namespace, device: torch.device, cfg: LlamaConfig, vision: VisionConfig) -> list[dict]:
    n = (vision.image_size // vision.patch_size) ** 2 + TEXT
    tokens = BATCH * n
    flops = flops_per_token(cfg, 0, n)  # LoRA weight gradients left out: under 1%
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name} | torch {torch.__version__} | {BATCH} x {n} tokens, LoRA r {LORA.r}", flush=True)
    rows = []
    runs = [(f"llavarad, checkpointing {m}", lambda m=m: ours(cfg, vision, m, args.steps, device)) for m in args.modes.split(",")]
    if not args.skip_hf:
        runs.append(("transformers + peft, gradient checkpointing", lambda: hf_peft(cfg, vision, args.steps, device)))
    for label, run in runs:
        try:
            seconds, peak, loss = run()
        except torch.OutOfMemoryError:
            seconds = None
        # Free this row's model before the next row: here, outside the except block, whose
        # traceback would still hold it after an out-of-memory error.
        gc.collect()
        torch.cuda.empty_cache()
        if seconds is None:
            print(f"{label}: out of memory", flush=True)
            rows.append({"implementation": label, "error": "out of memory"})
            continue
        row = {"implementation": label, "step_s": seconds, "tokens_per_s": tokens / seconds, "peak_gib": peak,
               "mfu_989": tokens / seconds * flops / 989e12, "first_loss": loss}
        rows.append(row)
        print(f"{label}: {row['step_s']:.3f} s/step, {row['tokens_per_s']:,.0f} tok/s, MFU {100 * row['mfu_989']:.1f}%, "
              f"peak {peak:.1f} GiB, first loss {loss:.4f}", flush=True)
    reference = next((r for r in rows if r["implementation"].startswith("transformers") and "step_s" in r), None)
    for r in rows:
        if reference and r is not reference and "step_s" in r:
            r["speedup_vs_hf_peft"] = reference["step_s"] / r["step_s"]
            print(f"{r['implementation']}: {r['speedup_vs_hf_peft']:.2f}x transformers + peft", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
