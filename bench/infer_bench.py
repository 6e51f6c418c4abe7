"""Inference throughput: llavarad's engine against Hugging Face transformers `generate`, one GPU, one run.

    python bench/infer_bench.py          # everything (about 6-8 minutes on an H100)
    python bench/infer_bench.py --skip-compile --skip-hf-static --repeats 2   # about 3 minutes
    python bench/infer_bench.py --tiny --skip-compile --repeats 1   # CPU smoke test, seconds

Random weights in the real LLaVA-Rad shapes (Vicuna-7B decoder, ViT-B/14 at 518 px, mlp2x_gelu
projector), built directly on the GPU in bf16; nothing is downloaded. transformers' LlamaForCausalLM
shares our decoder's weight tensors (no second copy). Every prompt is 1369 image tokens + 80 text
tokens = 1449 tokens, and every report is exactly 128 new tokens (EOS never ends a row), so both
sides do the same work:
  - reports/s at batch B = B / (seconds for one batch); ours is timed from pixels (vision tower,
    projector, splicing, generation), HF's from ready input embeddings (the decoder alone);
  - decode tok/s at batch 1 = 127 / (time with 128 new tokens - time with 1 new token);
  - each figure is the median of --repeats timed runs after one untimed first call
    ("first s": the first call's time, which includes HF's compilation).
Before timing, it checks that CUDA-graph (and compiled) decoding gives the eager tokens, on prompts
of different lengths with rows refilled mid-batch, and how many of our greedy tokens transformers'
`generate` reproduces on the same weights and input embeddings. One table is printed at the end
(rows also print as they finish); --json writes the checks and rows to a file.

--tiny runs the same script on the CPU at tiny shapes in float32 (no CUDA graphs there): a smoke test
of this file whose timings mean nothing, and where our tokens must equal transformers' exactly.
"""

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from llavarad.demo import TINY_TOWER
from llavarad.infer.generate import BatchGenerator
from llavarad.model import llama
from llavarad.model.config import LLAMA_PRESETS, LlamaConfig
from llavarad.model.llama import Llama
from llavarad.model.llava import LlavaRad, Projector
from llavarad.model.tokenizer import IMAGE_TOKEN_INDEX
from llavarad.model.vision import VisionConfig, VisionTower
from llavarad.model.weights import ours_to_hf

CHECK_PROMPTS, CHECK_NEW = 6, 32  # the correctness check: 6 prompts of different lengths, 32 new tokens each


@dataclass(frozen=True)
class Shapes:
    """What every row runs on: the release's shapes on the GPU, tiny ones on the CPU (--tiny)."""

    device: torch.device
    dtype: torch.dtype
    llm: LlamaConfig
    vision: VisionConfig
    new: int  # new tokens per report
    text: int = 80  # text tokens per prompt, BOS included

    @property
    def image_tokens(self) -> int:
        return (self.vision.image_size // self.vision.patch_size) ** 2

    @property
    def prompt(self) -> int:
        return self.image_tokens + self.text


RELEASE = Shapes(torch.device("cuda"), torch.bfloat16, LlamaConfig(), VisionConfig(), new=128)  # Vicuna-7B, ViT-B/14 at 518
TINY = Shapes(torch.device("cpu"), torch.float32, LLAMA_PRESETS["tiny"], TINY_TOWER, new=16)


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def sync(device: torch.device) -> None:
    """Wait for the queued kernels, so a timer measures the work and not its launch (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Drop dead objects and hand cached GPU blocks back, so a row does not pay for the previous one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    """Start a row's memory count afresh (CUDA only): what it holds now, its own allocations to come."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Most memory allocated since reset_peak (None off the GPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """(first call seconds, median of `repeats` further calls), each ended by a synchronize."""
    times = []
    for _ in range(1 + repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def record(s: Shapes, impl: str, batch: int, first: float, seconds: float, decode_tps: float | None = None,
           setup: float | None = None) -> dict:
    row = {
        "impl": impl, "batch": batch, "reports_per_s": batch / seconds, "new_tok_per_s": batch * s.new / seconds,
        "decode_tok_per_s_b1": decode_tps, "first_s": first, "setup_s": setup, "peak_gib": peak_gib(s.device),
    }
    print(format_row(row), flush=True)
    return row


def failed(impl: str, batch: int, error: BaseException) -> dict:
    message = str(error).splitlines()[0][:200] if str(error) else ""
    row = {"impl": impl, "batch": batch, "error": f"{type(error).__name__}: {message}"}
    print(format_row(row), flush=True)
    return row


def decode_rate(s: Shapes, seconds: float, prefill_only: float) -> float | None:
    """Tokens/s of the decode steps alone: the new tokens after the first, over the time they added."""
    return (s.new - 1) / (seconds - prefill_only) if seconds > prefill_only else None


HEADER = (f"{'implementation':<36} {'batch':>5} {'reports/s':>10} {'new tok/s':>10} {'decode tok/s':>13} "
          f"{'first s':>8} {'setup s':>8} {'peak GiB':>9}")


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['impl']:<36} {r['batch']:>5}  FAILED {r['error']}"
    dec = f"{r['decode_tok_per_s_b1']:.1f}" if r["decode_tok_per_s_b1"] else "-"
    setup = f"{r['setup_s']:.1f}" if r["setup_s"] is not None else "-"
    peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
    return (f"{r['impl']:<36} {r['batch']:>5} {r['reports_per_s']:>10.2f} {r['new_tok_per_s']:>10.0f} {dec:>13} "
            f"{r['first_s']:>8.1f} {setup:>8} {peak:>9}")


# ---------------------------------------------------------------- ours


def build_ours(s: Shapes) -> LlavaRad:
    torch.manual_seed(0)
    with torch.device(s.device), default_dtype(s.dtype):
        tower = VisionTower(s.vision, select_layer=-2)  # as released: the unused last block is never built
        model = LlavaRad(tower, Projector(s.vision.width, s.llm.dim), Llama(s.llm))
    return model.eval()


def prompt_ids(n_text: int, seed: int, vocab_size: int) -> list[int]:
    """BOS, some text, the image, more text: n_text text tokens in all (BOS included)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, vocab_size, (n_text - 1,), generator=g).tolist()
    return [1, *text[:34], IMAGE_TOKEN_INDEX, *text[34:]]


def prompt_embeds(model: LlavaRad, pixels: torch.Tensor, ids: list[list[int]]) -> list[torch.Tensor]:
    """Pixels (B, 3, S, S) and token ids -> each prompt's input embeddings (T_b, dim)."""
    with torch.no_grad():
        return model.embed(ids, model.encode_images(pixels))


def run_ours(model: LlavaRad, gen: BatchGenerator, pixels: torch.Tensor, ids: list[list[int]], new: int) -> dict:
    """From pixels to reports: tower, projector, splicing, then the generator -> {prompt index: tokens}."""
    return dict(gen.run(enumerate(prompt_embeds(model, pixels, ids)), new))


def bench_ours(model: LlavaRad, s: Shapes, name: str, batches: list[int], repeats: int, **kw) -> list[dict]:
    pixels = torch.randn(max(batches), 3, s.vision.image_size, s.vision.image_size, device=s.device)
    ids = prompt_ids(s.text, seed=0, vocab_size=s.llm.vocab_size)
    assert len(ids) - 1 + s.image_tokens == s.prompt
    rows = []
    for B in batches:
        reset_peak(s.device)
        try:
            t0 = time.perf_counter()
            gen = BatchGenerator(model.llm, B, s.prompt + s.new, eos_id=-1, **kw)  # eos -1: every report is s.new tokens
            sync(s.device)
            setup = time.perf_counter() - t0
            first, seconds = timed(lambda: run_ours(model, gen, pixels[:B], [ids] * B, s.new), repeats, s.device)
            decode = None
            if B == 1:
                _, prefill_only = timed(lambda: run_ours(model, gen, pixels[:1], [ids], 1), repeats, s.device)
                decode = decode_rate(s, seconds, prefill_only)
            rows.append(record(s, f"llavarad {name}", B, first, seconds, decode, setup))
        except Exception as e:
            rows.append(failed(f"llavarad {name}", B, e))
        finally:
            gen = None
            free(s.device)
    return rows


# ---------------------------------------------------------------- Hugging Face


def build_hf(llm: Llama, s: Shapes):
    """transformers' LlamaForCausalLM holding our decoder's own weight tensors (no second copy)."""
    import transformers
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    c = llm.cfg
    assert c.rope_theta == 10000.0, "transformers' default rope theta (its field moved in transformers 5)"
    cfg = HFConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    with torch.device(s.device), default_dtype(s.dtype):
        model = LlamaForCausalLM(cfg).to(s.dtype)
    model.load_state_dict({ours_to_hf(k): v for k, v in llm.state_dict().items()}, assign=True)
    free(s.device)  # the random weights it was built with
    model.generation_config.eos_token_id = None  # every report is s.new tokens
    model.generation_config.pad_token_id = 0
    print(f"transformers {transformers.__version__}: attention {getattr(model.config, '_attn_implementation', '?')}, "
          f"{model.dtype}", flush=True)
    return model.eval()


def hf_generate(model, embeds: torch.Tensor, new: int, **kw) -> torch.Tensor:
    """Greedy `generate` from input embeddings (B, T, dim) -> the new tokens (B, new)."""
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    n = out.shape[1] - (embeds.shape[1] if out.shape[1] > new else 0)  # some versions return the prompt positions too
    assert n == new, f"generate returned {n} new tokens, expected {new}"
    return out[:, -new:]


def bench_hf(model, s: Shapes, name: str, batches: list[int], repeats: int, **kw) -> list[dict]:
    embeds = torch.randn(max(batches), s.prompt, s.llm.dim, device=s.device, dtype=s.dtype) * 0.02
    rows = []
    for B in batches:
        reset_peak(s.device)
        try:
            first, seconds = timed(lambda: hf_generate(model, embeds[:B], s.new, **kw), repeats, s.device)
            decode = None
            if B == 1:
                _, prefill_only = timed(lambda: hf_generate(model, embeds[:1], 1, **kw), repeats, s.device)
                decode = decode_rate(s, seconds, prefill_only)
            rows.append(record(s, f"transformers {name}", B, first, seconds, decode))
        except Exception as e:
            rows.append(failed(f"transformers {name}", B, e))
        finally:
            free(s.device)
    return rows


# ---------------------------------------------------------------- the check before timing


def same_prefix(a: dict, b: dict) -> list[int]:
    """For each prompt, how many tokens of a and b agree before their first difference."""
    return [next((i for i, (x, y) in enumerate(zip(a[k], b[k])) if x != y), min(len(a[k]), len(b[k]))) for k in sorted(a)]


def check(model: LlavaRad, hf, s: Shapes, compile: bool) -> dict[str, float]:
    """Tokens of each way of decoding against eager llavarad, on prompts of different lengths streamed
    through 3 rows -> {comparison: share of the tokens that agree (up to each prompt's first difference)}."""
    size = s.vision.image_size
    pixels = torch.randn(CHECK_PROMPTS, 3, size, size, device=s.device)
    ids = [prompt_ids(20 + 9 * i, seed=i, vocab_size=s.llm.vocab_size) for i in range(CHECK_PROMPTS)]
    max_len = max(len(i) for i in ids) + s.image_tokens + CHECK_NEW
    eager = run_ours(model, BatchGenerator(model.llm, 3, max_len, -1), pixels, ids, CHECK_NEW)
    alone = {b: run_ours(model, BatchGenerator(model.llm, 1, max_len, -1), pixels[b:b + 1], ids[b:b + 1], CHECK_NEW)[0]
             for b in range(CHECK_PROMPTS)}
    exact = s.dtype == torch.float32  # in bf16, GEMMs of other shapes or other kernels may round differently
    results = {}

    def report(name: str, got: dict, against: dict, note: str) -> None:
        prefix = same_prefix(got, against)
        results[name] = sum(prefix) / (CHECK_NEW * CHECK_PROMPTS)
        verdict = "OK" if results[name] == 1 else "MISMATCH" if exact else note
        print(f"check: {name}: {results[name]:.1%} of tokens agree, per prompt {prefix} of {CHECK_NEW} ({verdict})", flush=True)

    report("llavarad batch 3 vs each prompt alone", eager, alone, "bf16 GEMMs of other shapes may round differently")
    if hf is not None:
        embeds = prompt_embeds(model, pixels, ids)
        theirs = {b: hf_generate(hf, e[None], CHECK_NEW)[0].tolist() for b, e in enumerate(embeds)}
        report("transformers generate vs llavarad alone", theirs, alone, "bf16 kernels differ: late splits are rounding")
    cuda, variants = s.device.type == "cuda", {}
    if cuda:
        variants["graph"] = dict(cuda_graph=True)
    if compile:
        variants["graph+compile" if cuda else "compile"] = dict(cuda_graph=cuda, compile=True)
    for name, kw in variants.items():
        try:
            got = run_ours(model, BatchGenerator(model.llm, 3, max_len, -1, **kw), pixels, ids, CHECK_NEW)
            note = "MISMATCH" if name == "graph" else "fused kernels may round differently"
            report(f"llavarad {name} vs eager, same batch", got, eager, note)
        except Exception as e:  # report and go on: the table is still worth having
            print(f"check: {name} FAILED {type(e).__name__}: {e}", flush=True)
    free(s.device)
    return results


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32", help="batch sizes for the main rows (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure, after one untimed (default: %(default)s)")
    p.add_argument("--skip-compile", action="store_true", help="skip llavarad's torch.compile'd decode step")
    p.add_argument("--skip-hf", action="store_true", help="skip every transformers row (and the token check against it)")
    p.add_argument("--skip-hf-static", action="store_true",
                   help="skip transformers with a static cache (compiles for ~1 min per batch size)")
    p.add_argument("--json", help="also write the checks and rows to this JSON file")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a smoke test of this script, no timing value")
    args = p.parse_args(argv)
    if args.tiny:
        s = TINY
    elif torch.cuda.is_available():
        s = RELEASE
    else:
        print("error: this benchmark needs a CUDA GPU (or --tiny for a CPU smoke test)", file=sys.stderr)
        return 1
    batches = [int(b) for b in args.batches.split(",")]
    ends = sorted({min(batches), max(batches)})
    cuda = s.device.type == "cuda"
    card = torch.cuda.get_device_name(s.device) if cuda else "CPU smoke test (--tiny: no CUDA graphs, timings mean nothing)"
    env = (f"{card} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
           f"flash-attn {'yes' if llama.flash_attn_func is not None and cuda else 'no (SDPA)'} | {time.strftime('%Y-%m-%d')}")
    print(env, flush=True)

    model = build_ours(s)
    hf = None if args.skip_hf else build_hf(model.llm, s)
    checks = check(model, hf, s, compile=not args.skip_compile)
    print(HEADER, flush=True)
    rows = bench_ours(model, s, "CUDA graph" if cuda else "no graph (CPU)", batches, args.repeats, cuda_graph=cuda)
    rows += bench_ours(model, s, "eager", [1], args.repeats)
    if not args.skip_compile:
        rows += bench_ours(model, s, "compile + CUDA graph" if cuda else "compile (CPU)", ends, args.repeats,
                           cuda_graph=cuda, compile=True)
    torch.compiler.reset()  # forget our compiled decode steps (and anything they hold) before transformers compiles
    free(s.device)

    if hf is not None:
        rows += bench_hf(hf, s, "eager generate", batches, args.repeats)
        if not args.skip_hf_static:
            rows += bench_hf(hf, s, "static cache + compile" if cuda else "static cache (CPU)", ends, args.repeats,
                             cache_implementation="static")  # transformers compiles its decode step on CUDA only

    print(f"\n{env}\nprompt {s.prompt} tokens ({s.image_tokens} image + {s.text} text), {s.new} new tokens, "
          f"{str(s.dtype).removeprefix('torch.')}, median of {args.repeats}\n{HEADER}")
    for r in rows:
        print(format_row(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "checks": checks, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
