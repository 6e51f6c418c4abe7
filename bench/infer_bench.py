"""Inference throughput: llavarad's engine against Hugging Face transformers `generate`, one GPU, one run.

    PYTHONPATH=. python bench/infer_bench.py          # everything (about 6-8 minutes on an H100)
    PYTHONPATH=. python bench/infer_bench.py --skip-compile --skip-hf-static --repeats 2   # about 3 minutes

Random weights in the real LLaVA-Rad shapes (Vicuna-7B decoder, ViT-B/14 at 518 px, mlp2x_gelu
projector), built directly on the GPU in bf16; nothing is downloaded. Every prompt is 1369 image
tokens + 80 text tokens = 1449 tokens, and every report is exactly 128 new tokens (EOS never ends a
row), so both sides do the same work:
  - reports/s at batch B = B / (seconds for one batch); ours is timed from pixels (vision tower,
    projector, splicing, generation), HF's from ready input embeddings (the decoder alone);
  - decode tok/s at batch 1 = 127 / (time with 128 new tokens - time with 1 new token);
  - each figure is the median of --repeats timed runs after one untimed first call
    ("first s": the first call's time, which includes HF's compilation).
Before timing, the GPU checks that CUDA-graph (and compiled) decoding gives the eager tokens, on
prompts of different lengths with rows refilled mid-batch. One table is printed at the end (rows
also print as they finish); --json writes the rows to a file.
"""

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from llavarad import llama
from llavarad.config import LlamaConfig
from llavarad.generate import BatchGenerator
from llavarad.llama import Llama
from llavarad.model import LlavaRad, Projector
from llavarad.tokenizer import IMAGE_TOKEN_INDEX
from llavarad.vision import VisionConfig, VisionTower

IMAGE_TOKENS, TEXT_TOKENS, NEW = 1369, 80, 128
PROMPT = IMAGE_TOKENS + TEXT_TOKENS
ROWS: list[dict] = []


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(first call seconds, median of `repeats` further calls), each ended by a synchronize."""
    times = []
    for _ in range(1 + repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def record(impl: str, batch: int, first: float, seconds: float, decode_tps: float | None = None, setup: float | None = None) -> None:
    row = {
        "impl": impl, "batch": batch, "reports_per_s": batch / seconds, "new_tok_per_s": batch * NEW / seconds,
        "decode_tok_per_s_b1": decode_tps, "first_s": first, "setup_s": setup,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    ROWS.append(row)
    print(format_row(row), flush=True)
    torch.cuda.reset_peak_memory_stats()


def failed(impl: str, batch: int, error: BaseException) -> None:
    message = str(error).splitlines()[0][:200] if str(error) else ""
    ROWS.append({"impl": impl, "batch": batch, "error": f"{type(error).__name__}: {message}"})
    print(format_row(ROWS[-1]), flush=True)
    gc.collect()
    torch.cuda.empty_cache()


HEADER = (f"{'implementation':<34} {'batch':>5} {'reports/s':>10} {'new tok/s':>10} {'decode tok/s':>13} "
          f"{'first s':>8} {'setup s':>8} {'peak GiB':>9}")


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['impl']:<34} {r['batch']:>5}  FAILED {r['error']}"
    dec = f"{r['decode_tok_per_s_b1']:.1f}" if r["decode_tok_per_s_b1"] else "-"
    setup = f"{r['setup_s']:.1f}" if r["setup_s"] is not None else "-"
    return (f"{r['impl']:<34} {r['batch']:>5} {r['reports_per_s']:>10.2f} {r['new_tok_per_s']:>10.0f} {dec:>13} "
            f"{r['first_s']:>8.1f} {setup:>8} {r['peak_gib']:>9.1f}")


# ---------------------------------------------------------------- ours


def build_ours(device: torch.device) -> LlavaRad:
    torch.manual_seed(0)
    with torch.device(device), default_dtype(torch.bfloat16):
        tower = VisionTower(VisionConfig(), select_layer=-2)  # the real 518 px ViT-B/14; the unused last block is never built
        model = LlavaRad(tower, Projector(768, 4096), Llama(LlamaConfig()))
    return model.eval()


def prompt_ids(n_text: int, seed: int) -> list[int]:
    """BOS, some text, the image, more text: n_text text tokens in all (BOS included)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 32000, (n_text - 1,), generator=g).tolist()
    return [1, *text[:34], IMAGE_TOKEN_INDEX, *text[34:]]


def run_ours(model: LlavaRad, gen: BatchGenerator, pixels: torch.Tensor, ids: list[list[int]], new: int) -> dict:
    with torch.no_grad():
        feats = model.encode_images(pixels)  # (B, 1369, 4096)
        embeds, lengths = model.embed(ids, feats)
        prompts = ((b, embeds[b, :n]) for b, n in enumerate(lengths.tolist()))
        return dict(gen.run(prompts, new))


def check_ours(model: LlavaRad, device: torch.device, compile: bool) -> None:
    """CUDA-graph (and compiled) decoding == eager, on 6 prompts of different lengths through 3 rows."""
    pixels = torch.randn(6, 3, 518, 518, device=device)
    ids = [prompt_ids(20 + 9 * i, seed=i) for i in range(6)]
    max_len = max(len(i) for i in ids) + IMAGE_TOKENS + 32
    variants = {"graph": dict(cuda_graph=True)} | ({"graph+compile": dict(cuda_graph=True, compile=True)} if compile else {})
    eager = run_ours(model, BatchGenerator(model.llm, 3, max_len, -1), pixels, ids, 32)
    alone = {b: run_ours(model, BatchGenerator(model.llm, 1, max_len, -1), pixels[b:b + 1], ids[b:b + 1], 32)[0] for b in range(6)}
    agree = sum(a == b for k in eager for a, b in zip(eager[k], alone[k])) / (32 * 6)
    print(f"check: batch-3 eager vs each prompt alone: {agree:.1%} of tokens agree (bf16 GEMMs of other shapes may round differently)")
    for name, kw in variants.items():
        try:
            got = run_ours(model, BatchGenerator(model.llm, 3, max_len, -1, **kw), pixels, ids, 32)
            same = sum(a == b for k in eager for a, b in zip(eager[k], got[k])) / (32 * 6)
            verdict = "OK" if same == 1 else "MISMATCH" if name == "graph" else "differs: fused kernels may round differently"
            print(f"check: {name} vs eager, same batch: {same:.1%} of tokens agree ({verdict})", flush=True)
        except Exception as e:  # report and go on: the table is still worth having
            print(f"check: {name} FAILED {type(e).__name__}: {e}", flush=True)
    gc.collect()
    torch.cuda.empty_cache()


def bench_ours(model: LlavaRad, device: torch.device, name: str, batches: list[int], repeats: int, **kw) -> None:
    pixels = torch.randn(max(batches), 3, 518, 518, device=device)
    ids = prompt_ids(TEXT_TOKENS, seed=0)
    assert len(ids) - 1 + IMAGE_TOKENS == PROMPT
    for B in batches:
        try:
            t0 = time.perf_counter()
            gen = BatchGenerator(model.llm, B, PROMPT + NEW, eos_id=-1, **kw)  # eos -1: every report is NEW tokens
            torch.cuda.synchronize()
            setup = time.perf_counter() - t0
            first, seconds = timed(lambda: run_ours(model, gen, pixels[:B], [ids] * B, NEW), repeats)
            decode = None
            if B == 1:
                _, prefill_only = timed(lambda: run_ours(model, gen, pixels[:1], [ids], 1), repeats)
                decode = (NEW - 1) / (seconds - prefill_only)
            record(f"llavarad {name}", B, first, seconds, decode, setup)
        except Exception as e:
            failed(f"llavarad {name}", B, e)
        finally:
            gen = None
            gc.collect()
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- Hugging Face


def build_hf(device: torch.device):
    import transformers
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    cfg = HFConfig(  # Vicuna-7B v1.5; rope theta is the default 10000 (its field moved in transformers 5)
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device), default_dtype(torch.bfloat16):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.eos_token_id = None  # every report is NEW tokens
    model.generation_config.pad_token_id = 0
    print(f"transformers {transformers.__version__}: attention {model.config._attn_implementation}, "
          f"{model.dtype}", flush=True)
    return model.eval()


def hf_generate(model, embeds: torch.Tensor, new: int, **kw) -> None:
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    n = out.shape[1] - (embeds.shape[1] if out.shape[1] > new else 0)  # some versions return the prompt positions too
    assert n == new, f"generate returned {n} new tokens, expected {new}"


def bench_hf(model, device: torch.device, name: str, batches: list[int], repeats: int, **kw) -> None:
    embeds = torch.randn(max(batches), PROMPT, 4096, device=device, dtype=torch.bfloat16) * 0.02
    for B in batches:
        try:
            first, seconds = timed(lambda: hf_generate(model, embeds[:B], NEW, **kw), repeats)
            decode = None
            if B == 1:
                _, prefill_only = timed(lambda: hf_generate(model, embeds[:1], 1, **kw), repeats)
                decode = (NEW - 1) / (seconds - prefill_only)
            record(f"transformers {name}", B, first, seconds, decode)
        except Exception as e:
            failed(f"transformers {name}", B, e)
        finally:
            gc.collect()
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32", help="batch sizes for the main rows (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure, after one untimed (default: %(default)s)")
    p.add_argument("--skip-compile", action="store_true", help="skip llavarad's torch.compile'd decode step")
    p.add_argument("--skip-hf", action="store_true", help="skip every transformers row")
    p.add_argument("--skip-hf-static", action="store_true",
                   help="skip transformers with a static cache (compiles for ~1 min per batch size)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    batches = [int(b) for b in args.batches.split(",")]
    ends = sorted({min(batches), max(batches)})
    device = torch.device("cuda")
    env = (f"{torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
           f"flash-attn {'yes' if llama.flash_attn_func is not None else 'no (SDPA)'} | {time.strftime('%Y-%m-%d')}")
    print(env, flush=True)

    model = build_ours(device)
    check_ours(model, device, compile=not args.skip_compile)
    print(HEADER, flush=True)
    bench_ours(model, device, "CUDA graph", batches, args.repeats, cuda_graph=True)
    bench_ours(model, device, "eager", [1], args.repeats)
    if not args.skip_compile:
        bench_ours(model, device, "compile + CUDA graph", ends, args.repeats, cuda_graph=True, compile=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()

    if not args.skip_hf:
        hf = build_hf(device)
        bench_hf(hf, device, "eager generate", batches, args.repeats)
        if not args.skip_hf_static:
            bench_hf(hf, device, "static cache + compile", ends, args.repeats, cache_implementation="static")

    print(f"\n{env}\nprompt {PROMPT} tokens ({IMAGE_TOKENS} image + {TEXT_TOKENS} text), {NEW} new tokens, bf16, "
          f"median of {args.repeats}\n{HEADER}")
    for r in ROWS:
        print(format_row(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": ROWS}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
